"""Peak memory of loading a PNG set, each measurement in a fresh process, for tests/test_memory.py.

    python tests/memory_worker.py ours FOLDER
        Streams one shuffled epoch of `dataset.make_dataset` over the PNGs in
        FOLDER (batch 32, 256 px) and prints {"images", "peak_rss_mb"} as JSON.
    python tests/memory_worker.py seed FOLDER
        The seed report's loader, the positive control: decodes every image
        into one float32 NumPy array up front, and prints the same JSON.

A fresh process per measurement makes the peak its own: VmHWM starts afresh
at exec.
"""

import io
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_png_set(folder, n, pool=64, size=256):
    """Writes `n` OASIS-named phantom PNGs (copies of `pool` distinct slices) into `folder`."""
    sys.path.insert(0, str(REPO))
    from PIL import Image

    import dataset

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for k in range(pool):
        buf = io.BytesIO()
        Image.fromarray(dataset.phantom_slice(k // 32 + 1, k % 32, size=size)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    for i in range(n):
        (folder / f"case_{i // 32 + 1:05d}_slice_{i % 32}.nii.png").write_bytes(blobs[i % pool])
    return folder


def peak_rss_mb():
    """Peak resident memory of this process in MB (VmHWM; `ru_maxrss` would count the parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def stream_ours(folder, batch_size=32):
    """Our loader: one shuffled epoch of the streaming pipeline."""
    sys.path.insert(0, str(REPO))
    import dataset

    split, _ = dataset.check_split("memory", dataset.make_split(dataset.list_images(folder)))
    ds = dataset.make_dataset(split, image_size=256, batch_size=batch_size, shuffle=True, seed=0)
    n = sum(int(batch.shape[0]) for batch in ds)
    return {"images": n, "peak_rss_mb": peak_rss_mb()}


def load_all_seed(folder):
    """The seed report's loader: every image decoded into one float32 array."""
    import numpy as np
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))
    images = np.array([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])[..., None]
    return {"images": len(images), "peak_rss_mb": peak_rss_mb()}


def measure(kind, folder, timeout=240):
    """Runs `kind` ("ours" or "seed") over `folder` in a fresh process; returns its JSON result."""
    done = subprocess.run([sys.executable, __file__, kind, str(folder)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {kind} {folder} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    kind, folder = sys.argv[1:3]
    print(json.dumps({"ours": stream_ours, "seed": load_all_seed}[kind](folder)))
