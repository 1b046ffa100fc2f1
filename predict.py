"""Reconstruct a whole split with a trained VQ-VAE and report SSIM honestly,
or generate new slices with the PixelCNN prior.

    python predict.py                          # runs/latest, test split
    python predict.py --run runs/X --split all --data /other/folder
    python predict.py --generate 16 [--slice 16] [--temperature 1.0]

Every image of the split is encoded to codes, decoded, and compared with the
original at the model's input resolution: SSIM (`tf.image.ssim`, max_val=1,
on [0, 1] images) and PSNR per image, summarised as mean and standard
deviation over the whole split (never one sample). Writes a per-image CSV, a
JSON summary and a figure of originals, reconstructions and error maps;
`--export-codes` saves the code indices for the prior.

With `--generate N`, the prior samples N code grids with the cached fast
sampler, the VQ-VAE decodes them into PNGs and a grid, and a memorisation
check reports each sample's SSIM to its nearest training slice next to the
same statistic for held-out test slices: a prior that copies training
slices scores well above the held-out reference.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import dataset
import modules

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from train import TrainingError, load_checkpoint, read_json, save_comparison, write_json  # noqa: E402


class PredictError(RuntimeError):
    """A prediction that cannot run, said in one line with the fix."""


def load_vqvae(run=None, checkpoint=None):
    """Loads a trained VQ-VAE (safe mode) and its run config.

    Args:
        run: run folder holding `vqvae_best.keras` and `vqvae_config.json`.
        checkpoint: a `.keras` file instead (its folder's config is used if present).

    Returns:
        `(model, config, path)`.

    Raises:
        PredictError: no checkpoint there.
        TrainingError: an unreadable or mismatched checkpoint or config.
    """
    path = Path(checkpoint) if checkpoint else Path(run) / "vqvae_best.keras"
    if not path.is_file():
        where = f"checkpoint {path}" if checkpoint else f"run folder {run} (no vqvae_best.keras)"
        raise PredictError(f"no trained VQ-VAE at {where}. Train one with `python train.py --model vqvae`, "
                           "or pass --run with a finished run folder.")
    config_path = path.parent / "vqvae_config.json"
    config = read_json(config_path, "run config") if config_path.is_file() else {}
    fix = "Pass the run folder (--run) or checkpoint of a trained VQ-VAE, or retrain it."
    model = load_checkpoint(path, modules.VQVAE, "VQ-VAE", fix)
    return model, config, path


def resolve_split(config, data, split, seed, skip_bad):
    """The `dataset.Split` to evaluate: a split of the run's data (or `data`), or every image under `data`."""
    on_bad = "skip" if skip_bad else "error"
    if split == "all":
        if data is None:
            raise PredictError("--split all needs --data: the folder whose every image is reconstructed.")
        files = dataset.make_split(dataset.list_images(data))
        if not len(files):
            raise dataset.DataError(f"no images found: {data} holds no .png/.jpg/.jpeg files.")
        checked, notes = dataset.check_split("all", files, on_bad=on_bad)
        return checked, "folder", notes
    if data is None and config.get("source") != "phantoms":
        data = config.get("data")
        if data and not Path(data).is_dir():
            raise PredictError(f"the run was trained on {data}, which is gone. Pass --data with that data's new "
                               "place (or another folder to evaluate on).")
    source = dataset.load_source(data, seed=config.get("seed", seed) if seed is None else seed, on_bad=on_bad)
    return source.splits[split], source.kind, source.notes


def reconstruct_split(model, split, image_size, fit="pad", batch_size=16, export_codes=False, verbose=True):
    """Reconstructs every image of `split`.

    Returns:
        A dict of per-image arrays: "ssim", "psnr", and "codes" (N, h, w)
        when `export_codes`, plus "examples" (a few originals and reconstructions).
    """
    ds = dataset.make_dataset(split, image_size=image_size, batch_size=batch_size, fit=fit)

    @tf.function(reduce_retracing=True)
    def step(images):
        codes = model.encode(images)
        reconstructions = model.decode(codes)
        ssim, psnr = modules.image_quality(images, reconstructions)
        return codes, reconstructions, ssim, psnr

    bar = keras.utils.Progbar(len(split), unit_name="image", verbose=1 if verbose else 0)
    out = {"ssim": [], "psnr": [], "codes": []}
    picks = set(np.linspace(0, len(split) - 1, num=min(8, len(split))).round().astype(int).tolist())
    examples, seen = ([], []), 0
    for images in ds:
        codes, reconstructions, ssim, psnr = step(images)
        out["ssim"].append(ssim.numpy())
        out["psnr"].append(psnr.numpy())
        if export_codes:
            out["codes"].append(codes.numpy().astype(np.uint16))
        for i in range(len(images)):
            if seen + i in picks:
                examples[0].append(images[i].numpy())
                examples[1].append(reconstructions[i].numpy())
        seen += len(images)
        bar.add(len(images), values=[("ssim", float(np.mean(ssim)))])
    result = {k: np.concatenate(v) for k, v in out.items() if v}
    result["examples"] = (np.stack(examples[0]), np.stack(examples[1]))
    return result


def load_prior(run):
    """The run's trained PixelCNN prior (safe mode) and its config."""
    path = Path(run) / "pixelcnn_best.keras"
    if not path.is_file():
        raise PredictError(f"no trained prior in {run} (no pixelcnn_best.keras). Train one with "
                           "`python train.py --model pixelcnn` (same --run).")
    config = read_json(Path(run) / "pixelcnn_config.json", "prior config")
    fix = "Retrain the prior with `python train.py --model pixelcnn --overwrite` (same --run)."
    return load_checkpoint(path, modules.GatedPixelCNN, "gated PixelCNN prior", fix), config


def nearest_ssim(images, split, image_size, fit, batch_size=64, label="training"):
    """For each image, the highest SSIM to any image of `split`, and which file it is.

    Streams `split` once; every pair is compared exactly (no pre-filtering).
    """
    images = tf.constant(images, tf.float32)
    n = len(images)

    @tf.function(reduce_retracing=True)
    def against(batch):
        m = tf.shape(batch)[0]
        a = tf.repeat(images, m, axis=0)
        b = tf.tile(batch, [n, 1, 1, 1])
        return tf.reshape(tf.image.ssim(a, b, max_val=1.0), (n, m))

    best = np.full(n, -1.0)
    where = np.zeros(n, dtype=np.int64)
    seen = 0
    bar = keras.utils.Progbar(len(split), unit_name="image", interval=0.5)
    for batch in dataset.make_dataset(split, image_size=image_size, batch_size=batch_size, fit=fit):
        scores = against(batch).numpy()
        top = scores.argmax(axis=1)
        better = scores[np.arange(n), top] > best
        best[better] = scores[np.arange(n), top][better]
        where[better] = seen + top[better]
        seen += len(batch)
        bar.add(len(batch))
    return best, [split.paths[i] for i in where]


def run_generation(args, log=print):
    """Samples new slices with the prior, decodes them, and checks them against the training set."""
    from PIL import Image

    start = time.perf_counter()
    run = Path(args.run)
    vqvae, vq_config, _ = load_vqvae(run)
    prior, config = load_prior(run)
    height, width = config["grid"]
    hyper = config["pixelcnn"]
    if args.slice is not None and not hyper["num_slices"]:
        raise PredictError("--slice needs a prior conditioned on slice position; this one is not "
                           "(its data carry no OASIS slice indices).")
    if args.slice is not None and not 0 <= args.slice < hyper["num_slices"]:
        raise PredictError(f"--slice must be in 0..{hyper['num_slices'] - 1}. Received: {args.slice}")
    label = -1
    if args.label is not None:
        names = config.get("class_names", [])
        if not hyper["num_classes"] or args.label not in names:
            raise PredictError(f"--label must be one of the prior's classes {names}. Received: {args.label!r}")
        label = names.index(args.label)
    batch = min(args.generate, args.batch_size)
    sampler = modules.make_fast_sampler(prior, batch, height, width, temperature=args.temperature,
                                        jit_compile=not args.no_xla)
    slice_index = -1 if args.slice is None else args.slice
    log(f"generating {args.generate} slices: {height}x{width} codes (K={hyper['num_codes']}) at temperature "
        f"{args.temperature}" + (f", slice {args.slice}" if args.slice is not None else "")
        + (f", class {args.label}" if args.label else "") + f", seed {args.seed}")
    images, sample_seconds, done = [], 0.0, 0
    while done < args.generate:
        uniform = tf.random.stateless_uniform((batch, height, width), seed=[args.seed, done])
        t0 = time.perf_counter()
        codes = sampler(uniform, slice_index, label)
        sample_seconds += time.perf_counter() - t0
        images.append(vqvae.decode(codes).numpy())
        done += batch
    images = np.concatenate(images)[: args.generate]
    out = Path(args.out) if args.out else run / "generated"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8)).save(out / f"generated_{i:04d}.png")
    summary = {"n_generated": int(len(images)), "out": str(out), "grid_shape": [height, width],
               "temperature": args.temperature, "slice": args.slice, "label": args.label, "seed": args.seed,
               "sampling_seconds": round(sample_seconds, 2),
               "samples_per_s": round(len(images) / max(sample_seconds, 1e-9), 2)}
    titles = None
    if not args.no_memorisation_check:
        data = None if vq_config["source"] == "phantoms" else vq_config["data"]
        source = dataset.load_source(data, seed=vq_config["seed"])
        log(f"memorisation check: SSIM of each generated slice to its nearest of {len(source.splits['train'])} "
            "training slices, and the same for as many held-out test slices")
        nearest, files = nearest_ssim(images, source.splits["train"], vq_config["image_size"], vq_config["fit"])
        test = source.splits["test"]
        test = test.take(np.linspace(0, len(test) - 1, min(len(images), len(test))).round().astype(int))
        test_images = np.concatenate([b.numpy() for b in dataset.make_dataset(
            test, image_size=vq_config["image_size"], batch_size=32, fit=vq_config["fit"])])
        reference, _ = nearest_ssim(test_images, source.splits["train"], vq_config["image_size"], vq_config["fit"])
        with open(out / "nearest_train.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["generated", "nearest_train_file", "ssim"])
            for i, (score, path) in enumerate(zip(nearest, files)):
                writer.writerow([f"generated_{i:04d}.png", path, f"{score:.6f}"])
        summary.update({"nearest_train_ssim_mean": float(nearest.mean()), "nearest_train_ssim_max": float(nearest.max()),
                        "test_nearest_train_ssim_mean": float(reference.mean()),
                        "nearest_csv": str(out / "nearest_train.csv")})
        titles = [f"nearest train SSIM {s:.2f}" for s in nearest]
    title = f"{len(images)} generated slices ({height}x{width} codes, T={args.temperature})"
    if args.slice is not None:
        title += f", slice {args.slice}"
    summary["figure"] = str(dataset.save_grid(images[:32], out / "generated.png", titles=titles and titles[:32],
                                              suptitle=title))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "summary.json", summary)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Reconstruct a whole split with a trained VQ-VAE; report mean and std SSIM and PSNR over "
                    "every image, write a per-image CSV, a JSON summary and a comparison figure.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", default="runs/latest", help="run folder of a trained VQ-VAE")
    parser.add_argument("--checkpoint", default=None, help="a .keras VQ-VAE file instead of --run")
    parser.add_argument("--data", default=None,
                        help="data folder; default: the one the run was trained on (or the phantoms)")
    parser.add_argument("--split", choices=["test", "validate", "train", "all"], default="test",
                        help="which split to reconstruct; 'all' is every image under --data")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size (default: the size the run was trained at, else 256)")
    parser.add_argument("--limit", type=int, default=None, help="reconstruct at most N images (a seeded subset)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--seed", type=int, default=None,
                        help="split seed for generic folders (default: the run's); generation: sampling seed (0)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/predict_<split>)")
    parser.add_argument("--export-codes", metavar="FILE.npz", default=None,
                        help="save the code indices of the split (with subject, slice, label and path per image)")
    parser.add_argument("--skip-bad", action="store_true", help="leave out corrupt image files with a warning")
    gen = parser.add_argument_group("generation (--generate N)")
    gen.add_argument("--generate", type=int, default=None, metavar="N",
                     help="sample N new slices with the run's PixelCNN prior instead of reconstructing")
    gen.add_argument("--slice", type=int, default=None, help="axial slice position to generate at (OASIS 0-31)")
    gen.add_argument("--label", default=None, help="class to generate (a class folder name of the data)")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the sampler")
    gen.add_argument("--no-xla", action="store_true", help="do not XLA-compile the sampler (slower, no compile wait)")
    gen.add_argument("--no-memorisation-check", action="store_true",
                     help="skip the SSIM-to-nearest-training-slice check")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    if args.generate is not None and args.generate < 1:
        parser.error(f"--generate must be at least 1. Received: {args.generate}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive. Received: {args.temperature}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1. Received: {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1. Received: {args.limit}")
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size must be at least 32. Received: {args.image_size}")
    if args.export_codes:
        args.export_codes = str(Path(args.export_codes).with_suffix(".npz"))
        if not Path(args.export_codes).parent.is_dir():
            parser.error(f"--export-codes: folder {Path(args.export_codes).parent} does not exist. Create it first.")
    return args


def run_reconstruction(args, log=print):
    start = time.perf_counter()
    model, config, checkpoint = load_vqvae(args.run, args.checkpoint)
    image_size = args.image_size or config.get("image_size") or 256
    if image_size % model.downsample:
        raise PredictError(f"--image-size {image_size} is not a multiple of the model's downsampling "
                           f"({model.downsample}).")
    fit = config.get("fit", "pad")
    split, kind, notes = resolve_split(config, args.data, args.split, args.seed, args.skip_bad)
    for note in notes:
        log(f"note: {note}")
    if args.limit is not None and args.limit < len(split):
        split = split.take(np.sort(np.random.default_rng(0).permutation(len(split))[: args.limit]))
    log(f"reconstructing {len(split)} {args.split} images ({kind} data) at {image_size} px with {checkpoint}")
    result = reconstruct_split(model, split, image_size, fit, args.batch_size, export_codes=bool(args.export_codes))

    out = Path(args.out) if args.out else checkpoint.parent / f"predict_{args.split}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reconstruction.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "subject", "slice", "ssim", "psnr"])
        for row in zip(split.paths, split.subjects, split.slices, result["ssim"], result["psnr"]):
            writer.writerow([row[0], int(row[1]), int(row[2]), f"{row[3]:.6f}", f"{row[4]:.4f}"])
    ssim, psnr = result["ssim"], result["psnr"]
    figure = save_comparison(*result["examples"], out / "reconstruction.png",
                             title=f"{args.split} split, {len(split)} images: SSIM {ssim.mean():.4f} "
                                   f"+/- {ssim.std():.4f}, PSNR {psnr.mean():.2f} dB")
    summary = {
        "n_images": int(len(ssim)), "ssim_mean": float(ssim.mean()), "ssim_std": float(ssim.std()),
        "ssim_min": float(ssim.min()), "psnr_mean": float(psnr.mean()), "psnr_std": float(psnr.std()),
        "split": args.split, "source": kind, "image_size": int(image_size), "checkpoint": str(checkpoint),
        "csv": str(out / "reconstruction.csv"), "figure": str(figure),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.export_codes:
        np.savez_compressed(args.export_codes, codes=result["codes"], subjects=split.subjects,
                            slices=split.slices, labels=split.labels, paths=np.array(split.paths))
        summary["codes"] = str(args.export_codes)
    write_json(out / "summary.json", summary)
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.generate:
            args.seed = 0 if args.seed is None else args.seed
            summary = run_generation(args)
        else:
            summary = run_reconstruction(args)
    except (dataset.DataError, PredictError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.generate:
        line = (f"generated {summary['n_generated']} slices in {summary['sampling_seconds']:.1f} s of sampling "
                f"({summary['samples_per_s']:.2f} samples/s) into {summary['out']}")
        if "nearest_train_ssim_mean" in summary:
            line += (f"; SSIM to nearest training slice {summary['nearest_train_ssim_mean']:.3f} (max "
                     f"{summary['nearest_train_ssim_max']:.3f}; held-out test slices: "
                     f"{summary['test_nearest_train_ssim_mean']:.3f})")
        print(line)
    else:
        print(f"reconstructed {summary['n_images']} {summary['split']} images: SSIM {summary['ssim_mean']:.4f} "
              f"+/- {summary['ssim_std']:.4f} (min {summary['ssim_min']:.4f}), PSNR {summary['psnr_mean']:.2f} "
              f"+/- {summary['psnr_std']:.2f} dB; figure {summary['figure']}, per-image CSV {summary['csv']}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
