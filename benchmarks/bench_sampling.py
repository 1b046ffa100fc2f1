"""Sampling speed: the cached fast sampler vs the naive full recompute per position, like for like.

Same prior (default size with its position embedding, one per grid size,
random weights unless --run gives a trained one), a batch of 16 samples,
32x32 and 64x64 code grids, the same uniforms for every sampler. Each
sampler is timed twice, compiled with XLA and as a plain graph without it,
and the headline speedups compare like with like: `speedup_32` /
`speedup_64` are naive-with-XLA over fast-with-XLA, `speedup_*_no_xla` the
same without XLA on both sides, `speedup_*_best` each sampler at its faster
setting (XLA does not speed up every model on every CPU); `speedup_*_mixed`
(naive without XLA over fast with XLA, this bench's headline before) is kept
under that name only for comparison with older numbers.

The naive sampler (the keras.io method, compiled into one graph here,
which only makes it faster) runs one full forward pass over the whole grid
per code position, the same work at every position, so it is timed over the
first `--naive-rows-32` / `--naive-rows-64` rows and extrapolated linearly
to the grid (the output says so). A first call of one position traces and,
with XLA, compiles it outside the timing. Its XLA variant is
`modules.make_naive_sampler(..., jit_compile=True)`.

Exactness. The fast and naive samplers compute the same sums in different
orders, so float32 rounding can flip a draw whose uniform falls within about
1e-7 of a boundary of the CDF, after which that one sample goes its own way.
Every fast-sampled code is therefore also redrawn from one full forward pass
over the fast sampler's codes with the same uniforms (teacher forcing: the
naive sampler's computation for every position at once, cheap at any grid
size): `mismatched_codes_32` of `n_codes_32` codes differ (the XLA fast
sampler's), each listed in the rows with its uniform's distance to the
boundary. `identical` is true only when no code differs on any grid, under
teacher forcing over the whole grid and against the naive sampler's own
codes wherever it sampled.

    python -m benchmarks.bench_sampling [--run RUN] [--batch 16] [--grids 32 64]
        [--naive-rows-32 8] [--naive-rows-64 1] [--json]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import modules
import runs
import keras
import numpy as np
import tensorflow as tf

def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    out = out.numpy() if hasattr(out, "numpy") else out
    return out, time.perf_counter() - start


def make_naive(prior, batch, size, jit_compile):
    return modules.make_naive_sampler(prior, batch, size, size, jit_compile=jit_compile)


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


def time_fast(prior, batch, size, uniform, jit_compile):
    fast = modules.make_fast_sampler(prior, batch, size, size, jit_compile=jit_compile)
    _, first = timed(fast, uniform)  # traces (and with XLA compiles)
    codes, seconds = timed(fast, uniform)
    return codes, seconds, first


def time_naive(prior, batch, size, uniform, positions, jit_compile):
    naive = make_naive(prior, batch, size, jit_compile)
    _, first = timed(lambda u: naive(u, positions=1), uniform)  # trace (and compile) once, outside the timing
    codes, seconds = timed(lambda u: naive(u, positions=positions), uniform)
    return codes, seconds * (size * size) / positions, first


def compare_with_naive(fast_codes, naive_codes, positions):
    """Whether the fast codes equal the naive ones over the first `positions`: samples equal, first difference."""
    batch = len(fast_codes)
    fast, naive = fast_codes.reshape(batch, -1)[:, :positions], naive_codes.reshape(batch, -1)[:, :positions]
    differing = np.argwhere(fast != naive)
    return {"equal": not len(differing),
            "samples_equal": int(batch - len(np.unique(differing[:, 0]))),
            "first_difference": (None if not len(differing) else
                                 {"sample": int(differing[0, 0]), "position": int(differing[0, 1])})}


def measure(prior, batch, size, naive_rows, log=print):
    uniform = tf.random.stateless_uniform((batch, size, size), seed=[0, size])
    positions = size * naive_rows
    row = {"grid": size, "naive_timed_positions": positions, "naive_extrapolated": positions < size * size}
    codes = {}
    for xla, tag in ((True, "xla"), (False, "no_xla")):
        codes[tag], row[f"fast_{tag}_s"], row[f"fast_{tag}_first_call_s"] = time_fast(prior, batch, size, uniform, xla)
        naive_codes, row[f"naive_{tag}_s"], row[f"naive_{tag}_first_call_s"] = time_naive(
            prior, batch, size, uniform, positions, xla)
        row[f"speedup_{tag}"] = row[f"naive_{tag}_s"] / row[f"fast_{tag}_s"]
        row[f"naive_{tag}_codes"] = compare_with_naive(codes[tag], naive_codes, positions)
        mismatches, margins = teacher_forced_check(prior, codes[tag], uniform)
        row[f"teacher_forced_{tag}"] = {"mismatched_codes": mismatches, "codes": int(codes[tag].size),
                                       "cdf_margins": margins}
    row["speedup_mixed"] = row["naive_no_xla_s"] / row["fast_xla_s"]
    # Each at its faster setting: XLA does not speed up every model on every CPU.
    row["speedup_best"] = min(row["naive_xla_s"], row["naive_no_xla_s"]) / min(row["fast_xla_s"], row["fast_no_xla_s"])
    tf_xla = row["teacher_forced_xla"]
    row["identical"] = bool(tf_xla["mismatched_codes"] == 0 and row["naive_xla_codes"]["equal"]
                            and row["naive_no_xla_codes"]["equal"])
    timed_over = (f" (timed over the first {positions} of {size * size} positions, extrapolated)"
                  if positions < size * size else "")
    log(f"{size}x{size}{timed_over}:")
    for tag, name in (("xla", "with XLA"), ("no_xla", "without XLA")):
        naive_codes = row[f"naive_{tag}_codes"]
        log(f"  {name:11s}: fast {row[f'fast_{tag}_s']:.3f} s (first call {row[f'fast_{tag}_first_call_s']:.1f} s), "
            f"naive {row[f'naive_{tag}_s']:.1f} s, speedup {row[f'speedup_{tag}']:.0f}x; same codes as the naive "
            f"sampler in {naive_codes['samples_equal']} of {batch} samples over its {positions} positions")
    log(f"  each at its faster setting: {row['speedup_best']:.0f}x; mixed (naive without XLA / fast with XLA, "
        f"not like for like): {row['speedup_mixed']:.0f}x")
    for tag, name in (("xla", "with XLA"), ("no_xla", "without XLA")):
        check = row[f"teacher_forced_{tag}"]
        log(f"  fast {name} redrawn from one full pass: {check['mismatched_codes']} of {check['codes']} codes differ"
            + (f" (uniforms within {max(check['cdf_margins']):.1e} of a CDF boundary)" if check["cdf_margins"] else ""))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="With --json the last line on stdout is one JSON object: speedup_32/speedup_64 (naive with XLA / "
               "fast with XLA), speedup_32_no_xla/speedup_64_no_xla (both without XLA), "
               "speedup_32_best/speedup_64_best (each sampler at its faster setting), "
               "speedup_32_mixed/speedup_64_mixed (naive without XLA / fast with XLA, the old headline), "
               "mismatched_codes_32/n_codes_32 (and _64: fast-with-XLA codes that teacher forcing redraws "
               "differently, of all codes), identical, batch, prior, rows (per grid, every "
               "timing). A grid not measured gives null.")
    parser.add_argument("--run", default=None,
                        help="use this run folder's trained prior (pixelcnn_best.keras) instead of random weights; "
                             "a prior with a position embedding is measured at its own grid size only")
    parser.add_argument("--batch", type=int, default=16, help="samples drawn at once (default 16)")
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64],
                        help="code grid sizes to measure, each a square grid (default 32 64); ignored with --run "
                             "when the prior has a position embedding")
    parser.add_argument("--naive-rows-32", type=int, default=8,
                        help="rows the naive samplers are timed over at 32x32, extrapolated linearly to the grid "
                             "(default 8, 256 of 1,024 positions; 32 times the whole grid)")
    parser.add_argument("--naive-rows-64", type=int, default=1,
                        help="rows the naive samplers are timed over at 64x64, extrapolated likewise (default 1, "
                             "64 of 4,096 positions); other grids use --naive-rows-32")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.naive_rows_32 < 1 or args.naive_rows_64 < 1 or min(args.grids) < 1:
        parser.error("--batch, --grids and --naive-rows-* must be positive")
    if args.run:
        try:
            prior = runs.Run(args.run).load_prior()
        except runs.RunError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        what = f"trained prior from {args.run}"
        # A prior with a position embedding models one grid size only.
        grids = [prior.grid_size[0]] if prior.grid_size else args.grids
        priors = {grid: prior for grid in grids}
    else:
        priors = {}
        for grid in args.grids:  # the default size (K=512, 64 filters, 8 layers, kernel 5) with its position embedding
            keras.utils.set_random_seed(0)
            priors[grid] = modules.GatedPixelCNN(grid_size=(grid, grid))
            priors[grid](tf.zeros((1, grid, grid), tf.int32))
        what = "random-weight prior of the default size"
    some = next(iter(priors.values()))
    print(f"{what}: {some.count_params():,} parameters, batch {args.batch}, {os.cpu_count()} CPU cores")
    naive_rows = {grid: args.naive_rows_64 if grid == 64 else args.naive_rows_32 for grid in priors}
    rows = {grid: measure(prior, args.batch, grid, min(naive_rows[grid], grid)) for grid, prior in priors.items()}

    def per_grid(grid, value):
        return value(rows[grid]) if grid in rows else None

    summary = {}
    for grid in (32, 64):
        summary[f"speedup_{grid}"] = per_grid(grid, lambda r: r["speedup_xla"])
        summary[f"speedup_{grid}_no_xla"] = per_grid(grid, lambda r: r["speedup_no_xla"])
        summary[f"speedup_{grid}_best"] = per_grid(grid, lambda r: r["speedup_best"])
        summary[f"speedup_{grid}_mixed"] = per_grid(grid, lambda r: r["speedup_mixed"])
        summary[f"mismatched_codes_{grid}"] = per_grid(grid, lambda r: r["teacher_forced_xla"]["mismatched_codes"])
        summary[f"n_codes_{grid}"] = per_grid(grid, lambda r: r["teacher_forced_xla"]["codes"])
    summary.update({"speedup_basis": "naive / fast, both with XLA (speedup_*_no_xla: both without; "
                                     "speedup_*_best: each at its faster setting)",
                    "identical": all(r["identical"] for r in rows.values()),
                    "batch": args.batch, "prior": what, "rows": list(rows.values())})
    for grid, r in rows.items():
        print(f"{grid}x{grid}: speedup {r['speedup_xla']:.0f}x with XLA on both, {r['speedup_no_xla']:.0f}x without; "
              f"{r['teacher_forced_xla']['mismatched_codes']} of {r['teacher_forced_xla']['codes']} codes differ "
              f"from a full-pass redraw")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
