"""Peak memory of loading a PNG or volume set, each measurement in a fresh process (tests/test_memory.py and
benchmarks/bench_data.py share it).

    python -m benchmarks.memory_worker ours FOLDER
        Streams one shuffled epoch of `dataset.make_dataset` over the PNGs in
        FOLDER (batch 32, 256 px) and prints {"images", "peak_rss_mb"} as JSON.
    python -m benchmarks.memory_worker seed FOLDER
        The seed report's loader, the positive control: decodes every image
        into one float32 NumPy array up front, and prints the same JSON.
    python -m benchmarks.memory_worker volumes FOLDER
        Inspects the NIfTI volumes in FOLDER and streams one shuffled epoch
        of a quarter of their slices through `dataset.make_dataset`.
    python -m benchmarks.memory_worker volumes_held FOLDER
        The positive control: every volume read into memory as float32.

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
    from PIL import Image

    import phantoms

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for k in range(pool):
        buf = io.BytesIO()
        Image.fromarray(phantoms.phantom_slice(k // 32 + 1, k % 32, size=size)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    for i in range(n):
        (folder / f"case_{i // 32 + 1:05d}_slice_{i % 32}.nii.png").write_bytes(blobs[i % pool])
    return folder


def write_volume_set(folder, n, shape=(192, 192, 128), pool=4, suffix=".nii"):
    """Writes `n` NIfTI volumes (int16, `suffix` .nii or .nii.gz; copies of `pool` distinct phantom heads).

    Each is a stack of the 2D phantom generator's axial slices; 192x192x128
    is 18.9 MB a volume as float32.
    """
    import nibabel
    import numpy as np

    import phantoms

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heads = []
    for k in range(pool):
        shown = np.stack([phantoms.phantom_slice(k + 1, z, n_slices=shape[2], size=shape[0])
                          for z in range(shape[2])]).astype(np.int16) * 16
        heads.append(nibabel.Nifti1Image(np.ascontiguousarray(np.transpose(shown[:, ::-1, ::-1], (2, 1, 0))),
                                         np.diag([1.0, 1.0, 1.2, 1.0])))
    for i in range(n):
        nibabel.save(heads[i % pool], str(folder / f"subject_{i:03d}{suffix}"))
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
    import dataset

    split, _ = dataset.check_split("memory", dataset.make_split(dataset.list_images(folder)))
    ds = dataset.make_dataset(split, image_size=256, batch_size=batch_size, shuffle=True, seed=0)
    n = sum(int(batch.shape[0]) for batch in ds)
    return {"images": n, "peak_rss_mb": peak_rss_mb()}


def stream_volumes(folder, batch_size=32):
    """Our loader over volumes: the volumes inspected, then one shuffled epoch of a quarter of their slices."""
    import dataset
    import volumes

    split = dataset.volume_split(volumes.list_volumes(folder), root=folder, slices="0.25",
                                 cache_dir=Path(folder) / ".cache", progress=False)
    ds = dataset.make_dataset(split, image_size=256, batch_size=batch_size, shuffle=True, seed=0)
    n = sum(int(batch.shape[0]) for batch in ds)
    return {"images": n, "peak_rss_mb": peak_rss_mb()}


def load_all_volumes(folder):
    """The positive control: every volume read into memory as float32, as a student loader would."""
    import nibabel

    held = [nibabel.load(str(f)).get_fdata(dtype="float32") for f in sorted(Path(folder).glob("*.nii*"))]
    return {"images": sum(v.shape[2] for v in held), "peak_rss_mb": peak_rss_mb()}


def load_all_seed(folder):
    """The seed report's loader: every image decoded into one float32 array."""
    import numpy as np
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))
    images = np.array([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])[..., None]
    return {"images": len(images), "peak_rss_mb": peak_rss_mb()}


def measure(kind, folder, timeout=240):
    """Runs `kind` ("ours", "seed", "volumes" or "volumes_held") over `folder` in a fresh process; returns its JSON."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_worker", kind, str(folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {kind} {folder} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    kind, folder = sys.argv[1:3]
    workers = {"ours": stream_ours, "seed": load_all_seed, "volumes": stream_volumes, "volumes_held": load_all_volumes}
    print(json.dumps(workers[kind](folder)))
