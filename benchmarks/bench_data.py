"""Input-pipeline benchmark: streaming tf.data vs the seed report's load-everything loader.

On generated sets of 256x256 PNG files (1,000 and 10,000 by default) it
measures, each in a fresh process so peak memory is its own:

  * ours:  `dataset.make_dataset` over the files, one shuffled epoch, batch 32:
           images/s and peak RSS (plus the time of the header check).
  * seed:  the seed report's approach, every image decoded into one float32
           NumPy array: images/s of the load and peak RSS.
  * train: images/s a VQ-VAE training step consumes on this machine (batch 32,
           256 px), the bar the pipeline must beat by 5x.

With `--volumes 4 32`, the same for folders of that many NIfTI volumes
(192x192x128 int16 phantom heads, 18.9 MB each as float32), uncompressed
and gzipped: the one-off inspection (each volume read once in full), then
one shuffled epoch of every slice streamed from the files; against the
same with each slice's volume opened afresh (the reader before volumes were
kept open with their gzip seek points) and against reading every volume
into memory.

Usage:
    python -m benchmarks.bench_data [--sizes 1000 10000] [--volumes 4 32] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One copy of the PNG-set writer and the peak-memory reading, shared with the memory test.
from benchmarks.memory_worker import load_all_volumes, peak_rss_mb, write_png_set, write_volume_set


def stream_epoch(dataset, split, batch_size):
    """One shuffled epoch of the pipeline over `split`: images, images/s and the peak RSS after it."""
    ds = dataset.make_dataset(split, image_size=256, batch_size=batch_size, shuffle=True, seed=0)
    start = time.perf_counter()
    n = sum(int(batch.shape[0]) for batch in ds)
    seconds = time.perf_counter() - start
    return {"images": n, "images_per_s": n / seconds, "peak_rss_mb": peak_rss_mb()}


def worker_ours(folder, batch_size=32):
    import dataset

    baseline = peak_rss_mb()  # TensorFlow's own footprint, before any file is touched
    start = time.perf_counter()
    split, _ = dataset.check_split("bench", dataset.make_split(dataset.list_images(folder)))
    check_s = time.perf_counter() - start
    return {**stream_epoch(dataset, split, batch_size), "check_s": check_s, "rss_after_import_mb": baseline}


def worker_volumes(folder, batch_size=32, reopened=False):
    """Our loader over volumes: inspection (timed apart), then one shuffled epoch of every kept slice.

    With `reopened`, the baseline: each slice's volume opened afresh (header parsed, a .nii.gz
    decompressed by Python's gzip from its start up to the slice), as the reader did before volumes
    were kept open. nibabel must not find indexed_gzip then: reopening through it is slower still.
    """
    if reopened:
        sys.modules["indexed_gzip"] = None  # before nibabel is imported
    import dataset
    import volumes

    if reopened:
        volumes._open, volumes._ensure_index = volumes._load, lambda *args: None

    baseline = peak_rss_mb()
    start = time.perf_counter()
    split = dataset.volume_split(volumes.list_volumes(folder), root=folder, cache_dir=Path(folder) / ".cache",
                                 progress=False)
    inspect_s = time.perf_counter() - start
    return {**stream_epoch(dataset, split, batch_size), "inspect_s": inspect_s, "rss_after_import_mb": baseline}


def worker_volumes_held(folder):
    start = time.perf_counter()
    result = load_all_volumes(folder)
    return {**result, "images_per_s": result["images"] / (time.perf_counter() - start)}


def worker_seed(folder):
    """The seed report's loader: decode every image into one array up front."""
    import numpy as np
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))
    start = time.perf_counter()
    images = np.array([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])[..., None]
    seconds = time.perf_counter() - start
    return {"images": len(images), "images_per_s": len(images) / seconds, "peak_rss_mb": peak_rss_mb()}


def worker_train(steps=6, batch_size=32):
    """Images/s of a VQ-VAE training step (the keras.io example's model: the
    lightest VQ-VAE we compare against, so the bar it sets is the hardest)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import numpy as np
    import tensorflow as tf

    latent, k = 16, 64
    inputs = keras.Input((256, 256, 1))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    z = keras.layers.Conv2D(latent, 1)(x)
    codebook = tf.Variable(tf.random.uniform((latent, k)), name="codebook")
    decoder = keras.Sequential([
        keras.Input((64, 64, latent)),
        keras.layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2DTranspose(1, 3, padding="same"),
    ])
    encoder = keras.Model(inputs, z)
    optimizer = keras.optimizers.Adam(1e-3)
    variables = encoder.trainable_variables + decoder.trainable_variables + [codebook]

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            z = encoder(images)
            flat = tf.reshape(z, (-1, latent))
            distances = (tf.reduce_sum(flat**2, 1, keepdims=True) - 2 * flat @ codebook
                         + tf.reduce_sum(codebook**2, 0, keepdims=True))
            quantized = tf.reshape(tf.gather(tf.transpose(codebook), tf.argmin(distances, 1)), tf.shape(z))
            vq = tf.reduce_mean((tf.stop_gradient(z) - quantized) ** 2) + 0.25 * tf.reduce_mean(
                (z - tf.stop_gradient(quantized)) ** 2)
            recon = decoder(z + tf.stop_gradient(quantized - z))
            loss = tf.reduce_mean((images - recon) ** 2) + vq
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    images = tf.constant(np.random.default_rng(0).random((batch_size, 256, 256, 1), dtype=np.float32))
    step(images)  # trace and warm up
    start = time.perf_counter()
    for _ in range(steps):
        step(images)
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch_size / seconds}


def run_worker(*args):
    """Runs one measurement in a fresh process; returns its JSON result."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench_data", "--worker", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000],
                        help="numbers of generated 256x256 PNG files (default 1000 10000)")
    parser.add_argument("--workdir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--skip-seed", action="store_true", help="do not run the load-everything baseline")
    parser.add_argument("--volumes", type=int, nargs="*", default=[],
                        help="also measure folders of this many NIfTI volumes, .nii and .nii.gz (e.g. 4 32; "
                             "default: none)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        result = {"ours": lambda: worker_ours(rest[0]), "seed": lambda: worker_seed(rest[0]),
                  "volumes": lambda: worker_volumes(rest[0]), "volumes_held": lambda: worker_volumes_held(rest[0]),
                  "volumes_reopened": lambda: worker_volumes(rest[0], reopened=True),
                  "train": worker_train}[kind]()
        print(json.dumps(result))
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    rows, summary = [], {"cpu_count": os.cpu_count()}
    try:
        train = run_worker("train")
        summary["train_images_per_s"] = train["images_per_s"]
        for n in args.sizes:
            folder = write_png_set(workdir / f"n{n}", n)
            ours = run_worker("ours", folder)
            rows.append(("ours (streaming tf.data)", n, ours["images_per_s"], ours["peak_rss_mb"]))
            summary[f"ours_{n}"] = ours
            if not args.skip_seed:
                seed = run_worker("seed", folder)
                rows.append(("seed report (all in one array)", n, seed["images_per_s"], seed["peak_rss_mb"]))
                summary[f"seed_{n}"] = seed
            shutil.rmtree(folder)
        for n in args.volumes:
            for suffix in (".nii", ".nii.gz"):
                folder = write_volume_set(workdir / f"v{n}{suffix}", n, suffix=suffix)
                ours = run_worker("volumes", folder)
                rows.append((f"ours, {suffix} volumes", n, ours["images_per_s"], ours["peak_rss_mb"]))
                summary[f"volumes_{suffix[1:]}_{n}"] = ours
                base = run_worker("volumes_reopened", folder)
                rows.append(("  baseline: reopened per slice", n, base["images_per_s"], base["peak_rss_mb"]))
                summary[f"volumes_reopened_{suffix[1:]}_{n}"] = base
                if not args.skip_seed:
                    held = run_worker("volumes_held", folder)
                    rows.append((f"all {suffix} volumes in memory", n, held["images_per_s"], held["peak_rss_mb"]))
                    summary[f"volumes_held_{suffix[1:]}_{n}"] = held
                shutil.rmtree(folder)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    small, large = min(args.sizes), max(args.sizes)
    summary["ours_rss_ratio"] = summary[f"ours_{large}"]["peak_rss_mb"] / summary[f"ours_{small}"]["peak_rss_mb"]
    if not args.skip_seed:
        summary["seed_rss_ratio"] = summary[f"seed_{large}"]["peak_rss_mb"] / summary[f"seed_{small}"]["peak_rss_mb"]
    summary["pipeline_vs_training"] = summary[f"ours_{large}"]["images_per_s"] / summary["train_images_per_s"]

    if args.volumes:
        few, many = min(args.volumes), max(args.volumes)
        for suffix in ("nii", "nii.gz"):
            ratio = summary[f"volumes_{suffix}_{many}"]["peak_rss_mb"] / summary[f"volumes_{suffix}_{few}"]["peak_rss_mb"]
            summary[f"volumes_{suffix}_rss_ratio"] = ratio
            summary[f"volumes_{suffix}_vs_training"] = (summary[f"volumes_{suffix}_{many}"]["images_per_s"]
                                                       / summary["train_images_per_s"])
            summary[f"volumes_{suffix}_vs_reopened"] = (summary[f"volumes_{suffix}_{many}"]["images_per_s"]
                                                       / summary[f"volumes_reopened_{suffix}_{many}"]["images_per_s"])

    print(f"{'loader':32s} {'files':>7s} {'images/s':>10s} {'peak RSS MB':>12s}")
    for name, n, rate, rss in rows:
        print(f"{name:32s} {n:7d} {rate:10.0f} {rss:12.0f}")
    for n in args.sizes:
        ours = summary[f"ours_{n}"]
        print(f"ours, {n} files: {ours['peak_rss_mb'] - ours['rss_after_import_mb']:.0f} MB above "
              f"TensorFlow's own {ours['rss_after_import_mb']:.0f} MB")
    print(f"VQ-VAE training step consumes {summary['train_images_per_s']:.1f} images/s (batch 32, 256 px)")
    print(f"ours: RSS {large}/{small} files = {summary['ours_rss_ratio']:.2f}x; "
          f"pipeline = {summary['pipeline_vs_training']:.1f}x training consumption; "
          f"header check of {large} files took {summary[f'ours_{large}']['check_s']:.2f} s")
    for suffix in ("nii", "nii.gz") if args.volumes else ():
        print(f"ours, .{suffix} volumes: RSS {many}/{few} volumes = {summary[f'volumes_{suffix}_rss_ratio']:.2f}x; "
              f"pipeline = {summary[f'volumes_{suffix}_vs_training']:.1f}x training consumption and "
              f"{summary[f'volumes_{suffix}_vs_reopened']:.2f}x the reopening baseline; inspecting "
              f"{many} volumes took {summary[f'volumes_{suffix}_{many}']['inspect_s']:.1f} s (once)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
