"""Rate-distortion of the .bvq codec against JPEG, JPEG 2000, WebP and AVIF on held-out slices.

For each operating point (a run folder with a VQ-VAE and its prior, named by
its code grid: `--runs`, which all hold one data set and split; or the 32x32
and 64x64 grids of `--grids`, trained here with `train.py` and cached, on
--data, else the real slices in ../shared/data/alzheimer-mri-slices when
present, else the built-in phantoms), on the held-out test split:

  * ours: the test slices compressed into one .bvq file by `predict.compress`
    (the code path of `predict.py --compress`) and decoded back by
    `predict.decompress` (the code grids checked against the encoder's); the
    rate is the whole file's bytes, header included, over the slices'
    original pixels. Beside it the raw-index rate (log2 K bits per code) and
    the prior's ideal rate (its cross-entropy), so the coder's overhead shows.
  * JPEG, JPEG 2000, WebP and AVIF (Pillow) at several quality settings each,
    one file per slice (8-bit grayscale, original size), the bytes of the
    actual files.

Every decoded slice is scored against its original at the original size with
`metrics.image_quality`: SSIM and PSNR over the whole slice and inside the
brain (about 44% of a real slice is black background). A classical codec's
bytes at our brain-masked SSIM are interpolated on its curve (bits per pixel
linear in brain SSIM between the two settings around it); `ratio_vs_best_
classical_G` is our bytes over the best classical codec's there (< 0.5 is the
issue's target). Where our SSIM lies below a codec's lowest setting, that
codec's smallest file is used and the row says so (the ratio is then a lower
bound). Speed: slices per second of our encode (VQ-VAE + prior + coder) and
decode (coder + prior + decoder).

    python -m benchmarks.bench_codec [--data PATH] [--runs RUN [RUN ...] | --grids 32 64 --epochs E --prior-epochs P]
                                     [--limit N] [--json]

Writes a rate-distortion plot (`--figure`, default samples/rate_distortion.png)
and ends with one JSON object (with --json).
"""

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import config
import dataset
import metrics
import predict
import runs
import train
import numpy as np
import tensorflow as tf

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alzheimer-mri-slices"
# Quality settings per codec, from the lowest rate up (Pillow's own scales).
CLASSICAL = {
    "JPEG": ("JPEG", "quality", [2, 5, 10, 20, 30, 50, 75, 90]),
    "JPEG 2000": ("JPEG2000", "rate", [400, 200, 120, 80, 50, 30, 20, 10, 5]),
    "WebP": ("WEBP", "quality", [0, 5, 10, 20, 35, 50, 70, 90]),
    "AVIF": ("AVIF", "quality", [0, 5, 10, 20, 35, 50, 70, 90]),
}


def encode_classical(image, codec_name, setting):
    """The bytes of one 8-bit grayscale (h, w) image compressed by Pillow, and the image decoded from them."""
    from PIL import Image

    fmt, kind, _ = CLASSICAL[codec_name]
    options = {"quality": setting}
    if fmt == "JPEG2000":  # a compression ratio, not a quality
        options = {"quality_mode": "rates", "quality_layers": [setting], "irreversible": True}
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    data = buffer.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return len(data), decoded


def score(originals, decoded):
    """Mean SSIM and PSNR, whole slice and inside the brain, of decoded 8-bit slices against the 8-bit originals."""
    totals = {}
    shapes = sorted({o.shape for o in originals})
    for shape in shapes:  # one batch per slice size
        picks = [i for i, o in enumerate(originals) if o.shape == shape]
        a = np.stack([originals[i] for i in picks])[..., None].astype(np.float32) / 255.0
        b = np.stack([decoded[i] for i in picks])[..., None].astype(np.float32) / 255.0
        for key, values in metrics.image_quality(tf.constant(a), tf.constant(b)).items():
            totals.setdefault(key, []).append(values.numpy())
    out = {}
    for key, parts in totals.items():
        values = np.concatenate(parts)
        out[f"{key}_mean"] = float(np.nanmean(values))
    return out


def originals_of(split):
    """The split's slices at their original size, as the model's pipeline decodes them, 8-bit (h, w)."""
    images = []
    for path in split.paths:
        image = dataset.load_image(path)[..., 0]
        images.append(np.round(image * 255).astype(np.uint8))
    return images


# The preset train.py trains each code grid of a 256 px canvas with.
GRID_PRESETS = {32: "oasis-256-32", 64: "oasis-256"}


def run_config(grid, data, epochs, prior_epochs):
    """The `config.Config` a run of `grid` is trained with here: train.py's preset for that grid.

    `epochs` count whole images: on crops, (256 / crop)^2 times as many epochs of crops, about the same
    compute. The phantoms (no `data`) train on whole images at a constant rate, as train.py's demo does.
    """
    cfg = config.preset(GRID_PRESETS[grid])
    if data is None:
        cfg = config.replace(cfg, "vqvae_train", crop=0, schedule="constant")
    crop = cfg.vqvae_train.crop
    cfg = config.replace(cfg, "data", data=data)
    cfg = config.replace(cfg, "vqvae_train", epochs=epochs * (256 // crop) ** 2 if crop else epochs)
    cfg = config.replace(cfg, "prior_train", epochs=prior_epochs)
    return config.validate(config.replace(cfg, "data", split_seed=cfg.vqvae_train.seed))


def ensure_run(folder, cfg, log=print):
    """A run folder with a VQ-VAE and prior trained as `cfg` says, through train.py's own functions.

    Reused when already there (the cache key holds the config), resumed when interrupted.
    """
    run = runs.Run(folder)
    options = train.default_options()
    options.run, options.verbose = str(folder), 2
    if not run.has("vqvae"):
        t = cfg.vqvae_train
        log(f"training the VQ-VAE of {folder} (preset {cfg.preset}, {t.epochs} epochs"
            + (f" of {t.crop} px crops)" if t.crop else ")"))
        train.train_vqvae(cfg, options, log=log)
    if not run.has("pixelcnn"):
        log(f"training the prior of {folder} ({cfg.prior_train.epochs} epochs)")
        train.train_pixelcnn(folder, flags={"epochs": cfg.prior_train.epochs}, options=options, log=log)
    return run


def at_quality(curve, target):
    """Bits per pixel a codec needs at brain SSIM `target`, interpolated on its (bpp, ssim) curve.

    Returns `(bpp, where)`: where is "interpolated", "below range" (the
    target is under the codec's lowest setting: its smallest file) or
    "above range" (beyond its best setting: its largest file, a lower
    bound on what it would need).
    """
    points = sorted(curve, key=lambda p: p[1])
    ssims = [p[1] for p in points]
    if target <= ssims[0]:
        return min(p[0] for p in points), "below range"
    if target > ssims[-1]:
        return max(p[0] for p in points), "above range"
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if s0 <= target <= s1:
            return b0 + (b1 - b0) * (target - s0) / max(s1 - s0, 1e-12), "interpolated"
    raise AssertionError("unreachable")


def measure_ours(run, split, log=print):
    """Compresses and decompresses the split with the run; the row of our codec, named by its code grid."""
    names = [f"{i:05d}_{dataset.item_name(p)}.png" for i, p in enumerate(split.paths)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.bvq"
        t0 = time.perf_counter()
        summary = predict.compress(run, split, names, path, log=log)
        encode_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        header, grids, images = predict.decompress(run, path, log=log)
        decode_seconds = time.perf_counter() - t0
    exact = bool(np.array_equal(grids, summary["codes"]))
    n, codes = len(images), summary["codes"].size
    label = "x".join(map(str, header["grid"]))
    return {"codec": f"ours {label}", "setting": label, "bits_per_pixel": summary["bits_per_pixel"],
            "bytes_per_slice": summary["bytes"] / n, "bits_per_code": summary["bits_per_code"],
            "payload_bits_per_code": summary["payload_bits_per_code"],
            "ideal_bits_per_code": summary["ideal_bits_per_code"], "raw_bits_per_code": summary["raw_bits_per_code"],
            "coder_overhead": summary["payload_bits_per_code"] / summary["ideal_bits_per_code"] - 1.0,
            "raw_bits_per_pixel": summary["raw_bits_per_code"] * codes / sum(i.size for i in images),
            "ideal_bits_per_pixel": summary["ideal_bits_per_code"] * codes / sum(i.size for i in images),
            "encode_slices_per_s": n / encode_seconds, "decode_slices_per_s": n / decode_seconds,
            "decode_seconds_per_slice": decode_seconds / n, "round_trip_exact": exact,
            "grid": label}, [np.round(i * 255).astype(np.uint8) for i in images]


def grid_of(run):
    """The code grid of a run's VQ-VAE, "32x32" (its image size over its downsampling)."""
    side = run.settings("vqvae").grid
    return f"{side}x{side}"


def data_of(run):
    """The data a run was trained on: its folder, or "phantoms"."""
    return "phantoms" if run.config("vqvae").get("source") == "phantoms" else run.settings("vqvae").data.data


def suffix(grid):
    """The JSON key suffix of an operating point: "32" for a 32x32 grid, "32x48" for a non-square one."""
    h, w = grid.split("x")
    return h if h == w else grid


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in CLASSICAL:
        points = sorted((r["bits_per_pixel"], r["ssim_brain_mean"]) for r in rows if r["codec"] == name)
        ax.plot(*zip(*points), "o-", label=name, markersize=3)
    for r in rows:
        if r["codec"].startswith("ours"):
            ax.plot(r["bits_per_pixel"], r["ssim_brain_mean"], "*", markersize=14, label=f"{r['codec']} (.bvq)")
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (actual files)")
    ax.set_ylabel("SSIM inside the brain")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Rate-distortion on held-out slices")
    fig.tight_layout()
    return dataset.save_figure(fig, path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="folder of slices (default: the real slices in ../shared when present, else the "
                             "phantoms)")
    parser.add_argument("--runs", nargs="+", metavar="RUN", default=None,
                        help="run folders, each with a trained VQ-VAE and prior, on one data set and split; each is "
                             "an operating point named by its code grid (default: the --grids trained here with "
                             "train.py and cached)")
    parser.add_argument("--grids", nargs="+", type=int, choices=(32, 64), default=None,
                        help="without --runs: the code grids to train here and measure (32: --downsample 8, 64: "
                             "--downsample 4, at 256 px; default: both)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="VQ-VAE epochs when training the runs here, in whole images: on train.py's default "
                             "crops, (256 / crop)^2 times as many epochs of crops, about the same compute")
    parser.add_argument("--prior-epochs", type=int, default=10, help="prior epochs when training the runs here")
    parser.add_argument("--cache", default=None,
                        help="where runs trained here are kept (default: the project's cache folder, "
                             "$BRAIN_VQVAE_CACHE or ~/.cache/brain-vqvae)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N test slices (a seeded subset)")
    parser.add_argument("--figure", default=str(REPO / "samples" / "rate_distortion.png"),
                        help="rate-distortion plot")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    if args.runs and (args.data or args.grids):
        print(f"error: --runs measures the runs on their own data and grids; leave out "
              f"{'--data' if args.data else '--grids'}, or leave out --runs to train runs here", file=sys.stderr)
        return 2
    data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
    if data is not None and not Path(data).is_dir():
        print(f"error: no data at {data}; pass --data with a folder of slices", file=sys.stderr)
        return 2
    if args.runs:
        folders = [Path(f) for f in args.runs]
        for folder in folders:
            for kind, name in (("vqvae", "VQ-VAE"), ("pixelcnn", "prior")):
                if not runs.Run(folder).has(kind):
                    print(f"error: {folder} holds no trained {name}; train one there with "
                          f"`python train.py --model {kind} --run {folder}`", file=sys.stderr)
                    return 2
        trained = [runs.Run(f) for f in folders]
        grids = [grid_of(run) for run in trained]
        for i, grid in enumerate(grids):
            if grid in grids[:i]:
                print(f"error: the runs {folders[grids.index(grid)]} and {folders[i]} are both on the {grid} code "
                      "grid; pass one run per operating point", file=sys.stderr)
                return 2
    else:
        grids = sorted(set(args.grids or (32, 64)))
        configs = [run_config(g, data and str(Path(data).resolve()), args.epochs, args.prior_epochs) for g in grids]
        key = hashlib.sha1(json.dumps([config.to_record(c) for c in configs]).encode()).hexdigest()[:12]
        cache = Path(args.cache or dataset.default_cache_dir())
        folders = [cache / "codec_runs" / key / f"grid{g}" for g in grids]
        try:
            trained = [ensure_run(f, c) for f, c in zip(folders, configs)]
        except (dataset.DataError, runs.RunError, config.ConfigError, train.TrainingError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    # Every operating point on the same slices, checked before anything is measured.
    splits = [runs.limit_split(run.source().splits["test"], args.limit, 0) for run in trained]
    for folder, split in zip(folders[1:], splits[1:]):
        if split.paths != splits[0].paths:
            print(f"error: the runs {folders[0]} and {folder} have different test splits; train both on the same "
                  "data with the same --split-seed", file=sys.stderr)
            return 2
    originals = originals_of(splits[0])
    rows, ours = [], {}
    for run, split in zip(trained, splits):
        row, decoded = measure_ours(run, split)
        grid = row["grid"]
        row.update(score(originals, decoded))
        rows.append(row)
        ours[grid] = row
        print(f"ours {grid}: {row['bits_per_pixel']:.4f} bpp ({row['bytes_per_slice']:.0f} bytes per slice), "
              f"brain SSIM {row['ssim_brain_mean']:.4f}, coder overhead {row['coder_overhead']:.2%}, decode "
              f"{row['decode_seconds_per_slice']:.3f} s per slice, exact {row['round_trip_exact']}")
    for name, (_, _, settings) in CLASSICAL.items():
        for setting in settings:
            sizes, decoded = zip(*(encode_classical(o, name, setting) for o in originals))
            pixels = sum(o.size for o in originals)
            row = {"codec": name, "setting": setting, "bits_per_pixel": 8 * sum(sizes) / pixels,
                   "bytes_per_slice": sum(sizes) / len(sizes), **score(originals, list(decoded))}
            rows.append(row)
            print(f"{name} {setting}: {row['bits_per_pixel']:.4f} bpp, brain SSIM {row['ssim_brain_mean']:.4f}")
    # The keys of both operating points always: null where that grid was not measured.
    keys = ("ratio_vs_best_classical", "decode_seconds_per_slice")
    summary = {"n_slices": len(originals), "data": data_of(trained[0]), "rows": rows,
               **{f"{key}_{g}": None for g in (32, 64) for key in keys}}
    for grid, row in ours.items():
        best = None
        for name in CLASSICAL:
            curve = [(r["bits_per_pixel"], r["ssim_brain_mean"]) for r in rows if r["codec"] == name]
            bpp, where = at_quality(curve, row["ssim_brain_mean"])
            row[f"{name}_bits_per_pixel_at_our_quality"] = bpp
            row[f"{name}_where"] = where
            if best is None or bpp < best[1]:
                best = (name, bpp, where)
        row["best_classical"], row["best_classical_where"] = best[0], best[2]
        summary[f"ratio_vs_best_classical_{suffix(grid)}"] = row["bits_per_pixel"] / best[1]
        summary[f"decode_seconds_per_slice_{suffix(grid)}"] = row["decode_seconds_per_slice"]
    summary["coder_overhead"] = max(r["coder_overhead"] for r in ours.values())
    summary["figure"] = str(plot(rows, args.figure))
    for grid, row in ours.items():
        ratio = summary[f"ratio_vs_best_classical_{suffix(grid)}"]
        print(f"ours {grid}: {ratio:.3f} x the bytes of the best classical codec at the same brain SSIM "
              f"({row['best_classical']}, {row['best_classical_where']})")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
