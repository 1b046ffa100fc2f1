"""Sampling speed: the cached fast sampler vs the naive full recompute per position.

Same prior (default size with its position embedding, one per grid size,
random weights unless --run gives a trained one), a batch of 16 samples, 32x32 and 64x64 code grids, the same uniforms for
both samplers. The naive sampler (the keras.io method, compiled into one
graph here, which only makes it faster) runs one full forward pass per code
position. At 32x32 it samples the whole grid; at 64x64 it is timed over its
first `--naive-rows-64` rows and extrapolated linearly to the grid, which
the output says. `identical` is true when the fast sampler drew exactly the
same codes wherever both sampled. Because the two compute the same sums in
different orders, float32 rounding can flip a draw whose uniform falls
within about 1e-7 of a boundary of the CDF, after which that one sample
goes its own way; so the fast sampler's codes are also redrawn from one full
forward pass over them (teacher forcing, cheap at any grid size), and the
differing draws are counted with their distance to the boundary.

    python benchmarks/bench_sampling.py [--json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import modules  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    out = out.numpy() if hasattr(out, "numpy") else out
    return out, time.perf_counter() - start


def teacher_forced_check(prior, codes, uniform):
    """Redraws every code of `codes` from one full forward pass over them, with the same uniforms.

    An exact sampler's codes are redrawn unchanged everywhere. Returns the
    number of codes that are not, and for each the distance of its uniform
    from the nearest CDF boundary (float32 rounding can only flip a draw
    that close to a boundary).
    """
    logits = tf.cast(prior(tf.constant(codes)), tf.float32)
    cdf = tf.cumsum(tf.nn.softmax(logits, axis=-1), axis=-1)
    target = uniform[..., None] * cdf[..., -1:]
    redrawn = tf.minimum(tf.reduce_sum(tf.cast(cdf < target, tf.int32), axis=-1), logits.shape[-1] - 1).numpy()
    where = np.argwhere(redrawn != codes)
    margins = [float(tf.reduce_min(tf.abs(cdf[b, i, j] - target[b, i, j]))) for b, i, j in where]
    return len(where), margins


def measure(prior, batch, size, naive_rows, log=print):
    uniform = tf.random.stateless_uniform((batch, size, size), seed=[0, size])
    fast = modules.make_fast_sampler(prior, batch, size, size, jit_compile=True)
    _, first = timed(fast, uniform)  # includes XLA compilation
    fast_codes, fast_s = timed(fast, uniform)
    plain = modules.make_fast_sampler(prior, batch, size, size, jit_compile=False)
    timed(plain, uniform)
    _, plain_s = timed(plain, uniform)
    positions = size * naive_rows
    naive = modules.make_naive_sampler(prior, batch, size, size)
    timed(lambda u: naive(u, positions=1), uniform)  # trace the graph once, outside the timing
    naive_codes, naive_s = timed(lambda u: naive(u, positions=positions), uniform)
    naive_full_s = naive_s * (size * size) / positions
    identical = bool(np.array_equal(fast_codes.reshape(batch, -1)[:, :positions],
                                    naive_codes.reshape(batch, -1)[:, :positions]))
    mismatches, margins = teacher_forced_check(prior, fast_codes, uniform)
    differing = np.argwhere(fast_codes.reshape(batch, -1)[:, :positions] != naive_codes.reshape(batch, -1)[:, :positions])
    row = {"grid": size, "fast_s": fast_s, "fast_first_call_s": first, "fast_no_xla_s": plain_s,
           "samples_identical": int(batch - len(np.unique(differing[:, 0]))),
           "first_difference": (None if not len(differing) else
                                {"sample": int(differing[0, 0]), "position": int(differing[0, 1])}),
           "teacher_forced_mismatches": mismatches, "teacher_forced_draws": int(fast_codes.size),
           "mismatch_cdf_margins": margins,
           "naive_s": naive_full_s, "naive_timed_positions": positions, "naive_extrapolated": positions < size * size,
           "speedup": naive_full_s / fast_s, "identical": identical}
    log(f"{size}x{size}: fast {fast_s:.3f} s (first call with XLA compile {first:.1f} s, without XLA {plain_s:.2f} s), "
        f"naive {naive_full_s:.1f} s" + (f" (timed over {positions} of {size * size} positions, extrapolated)"
                                         if positions < size * size else "")
        + f", speedup {naive_full_s / fast_s:.0f}x, identical codes: {identical} "
        f"({row['samples_identical']} of {batch} samples); redrawn from one full pass: {mismatches} of "
        f"{fast_codes.size} codes differ" + (f" (uniforms within {max(margins):.1e} of a CDF boundary)" if margins else ""))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="use this run's trained prior (pixelcnn_best.keras)")
    parser.add_argument("--batch", type=int, default=16, help="samples per batch (default 16)")
    parser.add_argument("--naive-rows-64", type=int, default=2, help="rows the naive sampler is timed over at 64x64")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    naive_rows = {32: 32, 64: args.naive_rows_64}
    if args.run:
        prior = keras.models.load_model(Path(args.run) / "pixelcnn_best.keras", safe_mode=True, compile=False)
        what = f"trained prior from {args.run}"
        # A prior with a position embedding models one grid size only.
        grids = [prior.grid_size[0]] if prior.grid_size else [32, 64]
        priors = {grid: prior for grid in grids}
    else:
        priors = {}
        for grid in (32, 64):  # the default size (K=512, 64 filters, 8 layers, kernel 5) with its position embedding
            keras.utils.set_random_seed(0)
            priors[grid] = modules.GatedPixelCNN(grid_size=(grid, grid))
            priors[grid](tf.zeros((1, grid, grid), tf.int32))
        what = "random-weight prior of the default size"
    some = next(iter(priors.values()))
    print(f"{what}: {some.count_params():,} parameters, batch {args.batch}, {os.cpu_count()} CPU cores")
    rows = [measure(prior, args.batch, grid, min(naive_rows.get(grid, grid), grid)) for grid, prior in priors.items()]
    speedup = {r["grid"]: r["speedup"] for r in rows}
    summary = {"speedup_32": speedup.get(32), "speedup_64": speedup.get(64),
               "identical": all(r["identical"] for r in rows), "batch": args.batch, "prior": what, "rows": rows}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
