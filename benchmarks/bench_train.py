"""Training throughput at 256 px: VQ-VAE and prior, with and without XLA, on 1 vs 2 devices, beside the input pipeline.

Each setting runs in its own process (the CPU can only be split into
logical devices before TensorFlow starts), trains the full-size models
(the VQ-VAE of `train.py` on real data: 64x64 codes, K=512; the default
gated prior: 64 filters, 8 layers, over 64x64 code grids) on one in-memory
batch of 16 so that only the train step is timed, and reports images (or
code grids) per second from the median time of `--steps` single steps
(`train_on_batch`, which returns when the step is done) after two warm-up
steps that absorb tracing and compilation.
The input pipeline's rate is measured on its own, decoding and fitting
256 px slices from disk (the real slices when present, else the phantoms).

    python -m benchmarks.bench_train [--steps 10] [--json]

Settings: "1 device" is the default strategy; "2 replicas" is a
MirroredStrategy over the CPU split into two logical devices (on this
2-core machine both share the same cores, so it shows the overhead of
synchronised replicas rather than a speed-up; on GPUs each replica is a
device of its own); "XLA" compiles the train step; "bf16" is mixed
precision as `--mixed-precision` sets it on a CPU.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alzheimer-mri-slices"

SETTINGS = [  # (name, replicas, xla, mixed)
    ("1 device", 1, False, False),
    ("1 device + XLA", 1, True, False),
    ("2 replicas", 2, False, False),
    ("1 device + bf16", 1, False, True),
]


def child(model_name, replicas, xla, mixed, steps, batch):
    """Times `steps` train steps of one model in one setting; prints a JSON line."""
    import devices

    strategy = devices.make_strategy("mirrored" if replicas > 1 else "one-device", cpu_replicas=replicas)
    import keras
    import modules
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    policy = "mixed_bfloat16" if mixed else "float32"
    with strategy.scope(), devices.dtype_policy(policy):
        if model_name == "vqvae":
            model = modules.VQVAE(downsample=4, seed=0)
            model.build((None, 256, 256, 1))
            model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
            batch_data = (tf.random.stateless_uniform((batch, 256, 256, 1), seed=[0, 1]),)
        else:
            model = modules.GatedPixelCNN(grid_size=(64, 64))
            model(tf.zeros((1, 64, 64), tf.int32))
            model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            codes = tf.random.stateless_uniform((batch, 64, 64), seed=[0, 1], maxval=512, dtype=tf.int32)
            batch_data = (codes, codes)
    for _ in range(2):  # warm-up: tracing, XLA compilation
        model.train_on_batch(*batch_data)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(*batch_data)  # returns only when the step is done
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))  # per step: one slow step (a scheduler hiccup) does not decide
    # The optimizer's own count proves every step ran (2 warm-up steps + `steps`).
    print(json.dumps({"images_per_s": batch / seconds, "step_s": seconds, "steps": steps,
                      "step_s_min_max": [min(times), max(times)],
                      "optimizer_iterations": int(model.optimizer.iterations.numpy()),
                      "replicas": strategy.num_replicas_in_sync, "xla": bool(model.jit_compile),
                      "precision": policy}))


def input_rate(data, n=1024, batch=16):
    """Images per second of the training pipeline alone at 256 px."""
    import dataset

    source = dataset.load_source(str(data) if data and Path(data).is_dir() else None, seed=0)
    ds = dataset.make_dataset(source.splits["train"], image_size=256, batch_size=batch, shuffle=True, repeat=True,
                              drop_remainder=True)
    it = iter(ds)
    for _ in range(4):
        next(it)
    start = time.perf_counter()
    for _ in range(n // batch):
        next(it)
    return n / (time.perf_counter() - start), source.kind


def run_setting(model_name, replicas, xla, mixed, steps, batch):
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--child", model_name, "--replicas", str(replicas), "--steps", str(steps),
           "--batch", str(batch)] + ["--xla"] * xla + ["--mixed"] * mixed
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": tail[0][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per setting")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="slices for the input-pipeline rate (default: the shared real slices, else phantoms)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    parser.add_argument("--child", choices=["vqvae", "prior"], help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mixed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.replicas, args.xla, args.mixed, args.steps, args.batch)
        return 0

    import tensorflow as tf

    print(f"training throughput at 256 px, {args.steps} timed steps per setting, "
          f"{os.cpu_count()} CPU cores, {len(tf.config.list_physical_devices('GPU'))} GPU(s)")
    results = {}
    for model_name, batch in (("vqvae", 16), ("prior", 16)):
        for name, replicas, xla, mixed in SETTINGS:
            r = run_setting(model_name, replicas, xla, mixed, args.steps, batch)
            results[(model_name, name)] = r
            rate = f"{r['images_per_s']:8.2f} images/s" if "error" not in r else f"failed: {r['error']}"
            print(f"  {model_name:6s} {name:18s} {rate}", flush=True)
    pipeline, kind = input_rate(args.data)
    print(f"  input pipeline ({kind} slices, decode + fit at 256 px): {pipeline:8.1f} images/s")

    def rate(model_name, name):
        return results[(model_name, name)].get("images_per_s", float("nan"))

    fastest = max(r.get("images_per_s", 0.0) for r in results.values())
    summary = {
        "vqvae_images_per_s": rate("vqvae", "1 device"),
        "prior_images_per_s": rate("prior", "1 device"),
        "input_images_per_s": pipeline,
        "xla_speedup": rate("vqvae", "1 device + XLA") / rate("vqvae", "1 device"),
        "prior_xla_speedup": rate("prior", "1 device + XLA") / rate("prior", "1 device"),
        "replicas2_speedup": rate("vqvae", "2 replicas") / rate("vqvae", "1 device"),
        "prior_replicas2_speedup": rate("prior", "2 replicas") / rate("prior", "1 device"),
        "bf16_speedup": rate("vqvae", "1 device + bf16") / rate("vqvae", "1 device"),
        "prior_bf16_speedup": rate("prior", "1 device + bf16") / rate("prior", "1 device"),
        "input_source": kind, "input_over_fastest_step": pipeline / fastest,
        "settings": {f"{m} / {n}": r for (m, n), r in results.items()},
    }
    print(f"ratios against 1 device: XLA {summary['xla_speedup']:.2f}x (prior {summary['prior_xla_speedup']:.2f}x), "
          f"2 replicas {summary['replicas2_speedup']:.2f}x (prior {summary['prior_replicas2_speedup']:.2f}x), "
          f"bf16 {summary['bf16_speedup']:.2f}x (prior {summary['prior_bf16_speedup']:.2f}x); the input pipeline "
          f"runs at {pipeline / fastest:.0f}x the fastest train step ({fastest:.1f} images/s)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
