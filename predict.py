"""Reconstruct a whole split with a trained VQ-VAE and report SSIM honestly,
or generate new slices with the PixelCNN prior.

    python predict.py                          # runs/latest, test split
    python predict.py --run runs/X --split all --data /other/folder --save-images
    python predict.py --generate 16 [--slice 16] [--temperature 1.0]
    python predict.py --compress FOLDER_OR_FILE --out slices.bvq
    python predict.py --decompress slices.bvq --out DIR

Every image of the split is encoded to codes, decoded, and compared with the
original at the model's input resolution: SSIM (`tf.image.ssim`, max_val=1,
on [0, 1] images) and PSNR over the whole image and inside the brain (the
mask of `metrics.brain_mask`: a real slice is about 44% black background,
which reconstructs perfectly and flatters whole-image numbers), per image,
summarised as mean and standard deviation over the whole split (never one
sample). Writes a per-image CSV, a JSON summary and a figure of originals,
reconstructions and error maps; `--save-images` writes every reconstruction
as a PNG; `--export-codes` saves the code indices.

With `--generate N`, the prior samples N code grids with the cached fast
sampler, the VQ-VAE decodes them into PNGs and a grid, and a memorisation
check reports each sample's SSIM to its nearest training slice, next to the
same statistic for the VQ-VAE's reconstructions of held-out test slices
(the reference a prior that does not copy should match) and of training
slices (the ceiling a prior that copies would reach). Then the samples are
scored against as many real held-out slices (the run's test split, or
`--reference-data PATH`) with every metric of `metrics.sample_quality`:
Frechet distance and KID in the features of an evaluation network trained
(once per data set, cached) by rotation prediction on the training split,
precision, recall, density and coverage (k=5), MS-SSIM diversity beside the
real slices', a texture Frechet distance inside the brain, and two
classifier two-sample tests (against real slices, and against the VQ-VAE's
reconstructions of them: the prior alone). `--no-quality` skips them.
`--save-reference` stores the real slices' features in the run
(`reference_statistics.npz`), so `--generate` can score where the data are
not (every metric but the two-sample tests).

With `--compress`, every slice under a folder is encoded and its code grid
range-coded with the prior into one `.bvq` file (`codec.py`); `--decompress`
decodes such a file, checks the code grids against the encoder's digest, and
writes one PNG per slice, named and sized as the originals (pad fit; the
model's canvas with stretch or crop).
"""

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import devices  # noqa: F401  first: it imports TensorFlow without its start-up noise
import codec
import dataset
import metrics
import modules
import runs
import volumes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# `--save-reference` writes the run's real-slice statistics here; `--generate` scores against them.
REFERENCE_FILE = "reference_statistics.npz"

# The memorisation check compares images pairwise: at most this many pixels
# of pairs at once, so its memory does not grow with the number of samples.
PAIR_PIXELS = 1 << 24


class PredictError(RuntimeError):
    """A prediction that cannot run, said in one line with the fix."""


def save_png(image, path):
    """Writes a (H, W, 1) image in [0, 1] as an 8-bit grayscale PNG, atomically."""
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    Image.fromarray(np.round(np.clip(image[..., 0], 0.0, 1.0) * 255).astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


def load_vqvae(run, checkpoint=None):
    """The VQ-VAE to evaluate and its data config (`config.DataConfig`): the run's, or a `.keras` file's (its
    folder's config if any, else None)."""
    if checkpoint is None:
        return run.load_vqvae(), run.settings("vqvae").data, run.checkpoint("vqvae")
    path = Path(checkpoint)
    folder = runs.Run(path.parent)
    data = folder.settings("vqvae").data if folder.file("vqvae", "config.json").is_file() else None
    model = runs.load_checkpoint(path, modules.VQVAE, "VQ-VAE",
                                 "Pass the checkpoint of a trained VQ-VAE, or its run folder with --run.")
    return model, data, path


def resolve_split(run, data, args):
    """The `dataset.Split` to evaluate, its kind and notes: a split of the run's data, or every image of `--data`.

    `data` is the run's `config.DataConfig`, or None for a bare checkpoint.
    """
    on_bad = "skip" if args.skip_bad or (data is not None and data.skip_bad) else "error"
    if args.split == "all":
        if args.data is None:
            raise PredictError("--split all needs --data: the folder whose every image is reconstructed.")
        if Path(args.data).is_dir() and dataset.holds_volumes(args.data):  # sliced as the run's data were
            return volume_folder(args.data, data, on_bad), "volumes", []
        files = dataset.make_split(dataset.list_images(args.data))
        if not len(files):
            raise dataset.DataError(f"no images found: {args.data} holds no .png/.jpg/.jpeg files.")
        checked, notes = dataset.check_split("all", files, on_bad=on_bad)
        return checked, "folder", notes
    if data is None:
        raise PredictError(f"--split {args.split} needs the run's config (vqvae_config.json beside the checkpoint) "
                           "to know its split. Pass --run, or --split all --data FOLDER.")
    source = run.source(folder=args.data, on_bad=on_bad, split_seed=args.split_seed)
    return source.splits[args.split], source.kind, source.notes


def volume_folder(folder, data, on_bad="error"):
    """Every kept slice of the volumes under `folder`, sliced as the run's data were (its axis and kept slices)."""
    if dataset.list_images(folder):
        raise dataset.DataError(f"{folder} holds both volumes and 2D slices. Pass a folder of one kind.")
    paths = dataset.list_volumes(folder, unpaired="skip" if on_bad == "skip" else "error")
    return dataset.volume_split(paths, root=folder, slice_axis=data.slice_axis if data else "axial",
                                slices=data.slices if data else None, on_bad=on_bad)


def reconstruct_split(model, split, image_size, fit="pad", batch_size=16, export_codes=False, save_to=None,
                      strategy=None, verbose=True):
    """Reconstructs every image of `split`.

    Args:
        model: a VQ-VAE (built under `strategy`'s scope when one is given).
        split: a `dataset.Split`.
        batch_size: the global batch; a `strategy` with several replicas
            gives each its share.
        save_to: a folder to write each reconstruction into as a PNG named
            after its file, or None.
        strategy: a `tf.distribute` strategy to spread batches over (None:
            the default one-device strategy).

    Returns:
        A dict of per-image arrays in file order: "ssim", "psnr",
        "ssim_brain", "psnr_brain" (see `metrics.image_quality`), "codes"
        (N, h, w) when `export_codes`, and "examples" (a few originals and
        reconstructions).
    """
    strategy = strategy or tf.distribute.get_strategy()
    ds = dataset.make_dataset(split, image_size=image_size, batch_size=batch_size, fit=fit)
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        # A last batch smaller than the replica count would leave a replica an empty batch, which
        # TensorFlow 2.21's convolutions reject; it is padded with blank images, dropped after the step.
        ds = ds.map(lambda x: tf.pad(x, [[0, (-tf.shape(x)[0]) % replicas], [0, 0], [0, 0], [0, 0]]))

    def replica_step(images):
        codes = model.encode(images)
        reconstructions = model.decode(codes)
        return images, codes, reconstructions, metrics.image_quality(images, reconstructions)

    @tf.function(reduce_retracing=True)
    def step(images):
        outputs = strategy.run(replica_step, args=(images,))
        return tf.nest.map_structure(lambda x: strategy.gather(x, axis=0), outputs)

    bar = keras.utils.Progbar(len(split), unit_name="image", verbose=1 if verbose else 0)
    out = {key: [] for key in ("ssim", "psnr", "ssim_brain", "psnr_brain", "codes")}
    picks = set(np.linspace(0, len(split) - 1, num=min(8, len(split))).round().astype(int).tolist())
    examples, seen = ([], []), 0
    for batch in strategy.experimental_distribute_dataset(ds):
        n = min(batch_size, len(split) - seen)  # the images of this batch, without the padding
        images, codes, reconstructions, quality = (tf.nest.map_structure(lambda t: np.asarray(t)[:n], x)
                                                   for x in step(batch))
        for key, value in quality.items():
            out[key].append(value)
        if export_codes:
            out["codes"].append(codes.astype(np.uint16))
        for i in range(len(images)):
            if seen + i in picks:
                examples[0].append(images[i])
                examples[1].append(reconstructions[i])
            if save_to is not None:
                save_png(reconstructions[i], Path(save_to) / f"{dataset.item_name(split.paths[seen + i])}.png")
        seen += len(images)
        bar.add(len(images), values=[("ssim", float(np.mean(quality["ssim"]))),
                                     ("ssim_brain", float(np.nanmean(quality["ssim_brain"])))])
    result = {k: np.concatenate(v) for k, v in out.items() if v}
    result["examples"] = (np.stack(examples[0]), np.stack(examples[1]))
    return result


def device_strategy(batch_size, log=print):
    """Mirrors over the local GPUs when there are several, saying what each one gets; else one device."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) < 2:
        return tf.distribute.get_strategy()
    share = -(-batch_size // len(gpus))
    log(f"note: {len(gpus)} GPUs: each batch of {batch_size} images is divided over them, about {share} per GPU "
        f"(pass --batch-size {batch_size * len(gpus)} to give each {batch_size})")
    return tf.distribute.MirroredStrategy([d.name for d in gpus])


def nearest_ssim(images, split, image_size, fit, batch_size=64, pair_pixels=PAIR_PIXELS):
    """For each image, the highest SSIM to any image of `split`, and which file it is.

    Streams `split` once; every pair is compared exactly (no pre-filtering),
    in chunks of at most `pair_pixels` pixels of pairs, so memory stays
    bounded whatever the number of images.
    """
    images = tf.constant(images, tf.float32)
    n = len(images)
    chunk = max(1, pair_pixels // (batch_size * image_size * image_size))

    @tf.function(reduce_retracing=True)
    def against(queries, batch):
        q, m = tf.shape(queries)[0], tf.shape(batch)[0]
        a = tf.repeat(queries, m, axis=0)
        b = tf.tile(batch, [q, 1, 1, 1])
        # The SSIM map of `metrics` (tf.image.ssim's window, applied separably: several times faster).
        return tf.reshape(tf.reduce_mean(metrics.ssim_map(a, b), axis=[1, 2]), (q, m))

    best = np.full(n, -1.0)
    where = np.zeros(n, dtype=np.int64)
    seen = 0
    bar = keras.utils.Progbar(len(split), unit_name="image", interval=0.5)
    for batch in dataset.make_dataset(split, image_size=image_size, batch_size=batch_size, fit=fit):
        scores = np.concatenate([against(images[i:i + chunk], batch).numpy() for i in range(0, n, chunk)])
        top = scores.argmax(axis=1)
        better = scores[np.arange(n), top] > best
        best[better] = scores[np.arange(n), top][better]
        where[better] = seen + top[better]
        seen += len(batch)
        bar.add(len(batch))
    return best, [split.paths[i] for i in where]


def memorisation_check(samples, vqvae, source, data, seed=0, log=print):
    """Each sample's SSIM to its nearest training slice, beside like-for-like references.

    The samples are decoded by the VQ-VAE, so the references are decoded too:
    the VQ-VAE's reconstructions of held-out test slices (what a prior that
    does not copy its training set should score) and of training slices (the
    ceiling: a prior that reproduced training slices code for code would
    score this). As many of each as there are samples (at most the split),
    one pass over the training split for all three.

    Returns:
        `(summary dict, nearest per sample, nearest file per sample)`.
    """
    size, fit, n = data.image_size, data.fit, len(samples)
    train = source.splits["train"]
    rng = np.random.default_rng(seed)

    def reconstructions(split):
        picks = split.take(np.sort(rng.permutation(len(split))[:min(n, len(split))]))
        return np.concatenate([vqvae.reconstruct(b).numpy() for b in dataset.make_dataset(
            picks, image_size=size, batch_size=32, fit=fit)])

    test, ceiling = reconstructions(source.splits["test"]), reconstructions(train)
    by_file = source.split_by() == "file"
    log(f"memorisation check: SSIM of each of {n} generated slices to its nearest of {len(train)} training slices, "
        f"beside {len(test)} reconstructed test and {len(ceiling)} reconstructed training slices")
    nearest, files = nearest_ssim(np.concatenate([samples, test, ceiling]), train, size, fit)
    ours, reference, top = nearest[:n], nearest[n:n + len(test)], nearest[n + len(test):]
    summary = {"nearest_train_ssim_mean": float(ours.mean()), "nearest_train_ssim_max": float(ours.max()),
               "test_nearest_train_ssim_mean": float(reference.mean()),
               "train_nearest_train_ssim_mean": float(top.mean()), "split_by": "file" if by_file else "subject"}
    if by_file:
        summary["note"] = ("the split is by file (no subject ids in the names): held-out test slices have "
                           "neighbouring slices of the same subject in training, so the test reference is high")
    return summary, ours, files[:n]


def reference_split(source, data, args):
    """The real slices samples are scored against: every image under `--reference-data`, else the test split."""
    if not args.reference_data:
        return source.splits["test"]
    folder = Path(args.reference_data)
    if not folder.is_dir():
        raise PredictError(f"--reference-data: folder not found: {folder}. Pass a folder of real slices.")
    if dataset.holds_volumes(folder):
        return volume_folder(folder, data, "skip" if args.skip_bad else "error")
    split = dataset.make_split(dataset.list_images(folder))
    if not len(split):
        raise dataset.DataError(f"no images found: --reference-data {folder} holds no .png/.jpg/.jpeg files.")
    return dataset.check_split("reference", split, on_bad="skip" if args.skip_bad else "error")[0]


def save_reference(args, log=print):
    """Writes the run's reference statistics (`metrics.reference_statistics`) to `<run>/reference_statistics.npz`.

    The reference is the run's test split (or `--reference-data`), at most
    `--limit` slices, and the floor as many training slices; the file holds
    their features and the evaluation network, not images, so the run can
    score generated slices where its data are not (`--generate`).
    """
    start = time.perf_counter()
    run = runs.Run(args.run)
    data = run.settings("vqvae").data
    size, fit = data.image_size, data.fit
    source = run.source(on_bad="skip" if args.skip_bad else None)
    train, reference_images = run.splits(source, ("train",))["train"], reference_split(source, data, args)
    n = min(len(reference_images), len(train), args.limit or len(train))
    if n <= metrics.NEAREST_K:
        raise PredictError(f"reference statistics need more than {metrics.NEAREST_K} reference and training "
                           f"slices. Received: {len(reference_images)} reference, {len(train)} training")
    network = metrics.load_evaluation_network(train, size, fit, dataset.default_cache_dir(), log=log)
    what = f"--reference-data {args.reference_data}" if args.reference_data else "the test split"
    log(f"reference statistics: {n} slices of {what} (floor: {n} training slices) at {size} px")
    reference = runs.load_images(reference_images, n, size, fit, args.seed)
    train_reference = runs.load_images(train, n, size, fit, args.seed + 1)
    statistics = metrics.reference_statistics(reference, train_reference, network, seed=args.seed)
    path = metrics.save_reference(run.path / REFERENCE_FILE, statistics, network,
                                  description=f"{n} slices of {what} of {data.data or 'the phantoms'}, {n} training "
                                              f"slices, {size} px, fit {fit}")
    return {"reference_statistics": str(path), "n_reference": n, "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}


def generation_quality(samples, vqvae, run, source, data, args, log=print):
    """The sample-quality metrics of `metrics.sample_quality` for a run's generated slices.

    The reference is as many real slices as there are samples: the run's
    test split, or every image under `--reference-data` (fitted as the run
    fits its images); the floor compares as many training slices with it.
    The evaluation network is trained once on the run's training split and
    cached by the digest of its files.

    A run folder with `reference_statistics.npz` (`--save-reference`) brings
    its own evaluation network and real features: without `--reference-data`
    the samples are scored against them, with no data at hand and without
    the two-sample tests (they need real images); with `--reference-data`
    and no training slices (`source` None), the folder is the reference and
    the file's training rows the floor.
    """
    size, fit = data.image_size, data.fit
    pack = run.path / REFERENCE_FILE
    statistics = network = None
    if pack.is_file():
        try:
            statistics, network = metrics.load_reference(pack)
        except ValueError as err:
            raise PredictError(str(err)) from None
        if int(statistics["image_size"]) != size:
            raise PredictError(f"{pack} is of {int(statistics['image_size'])} px slices, the run's are {size} px. "
                               "Rebuild it with predict.py --save-reference.")
    if not np.isfinite(samples).all():
        raise PredictError("the generated slices hold NaN values: the VQ-VAE or the prior diverged. Retrain "
                           "it (train.py stops on a NaN loss), or pass --no-quality.")
    if statistics is not None and (source is None or not args.reference_data):
        reference = None
        if args.reference_data:
            reference_images = reference_split(None, data, args)
            reference = runs.load_images(reference_images, min(len(samples), len(reference_images)), size, fit,
                                         args.seed)
            statistics = metrics.with_reference(statistics, reference, network, seed=args.seed)
        n = min(len(samples), len(statistics["features"]), len(statistics["floor_features"]))
        if n <= metrics.NEAREST_K:
            log(f"warning: sample quality needs more than {metrics.NEAREST_K} generated slices; skipped")
            return None
        if n < metrics.FEW_SAMPLES:
            log(f"warning: {n} slices per set: the distribution metrics are noisy below {metrics.FEW_SAMPLES}; "
                "generate more for numbers to compare")
        log(f"sample quality: {n} generated slices against "
            + (f"{n} real slices of --reference-data" if reference is not None else f"the statistics of {pack}")
            + f" ({statistics['description']})")
        out = metrics.score_samples(samples, statistics, network, seed=args.seed)
        if reference is None:
            out.update({f"c2st{kind}_accuracy{end}": None for kind in ("", "_recon") for end in ("", "_low", "_high")})
            out["note"] = "scored against the run's reference statistics; the two-sample tests need real " \
                          "slices: pass --reference-data DIR"
        else:
            reference = metrics.to_8bit(reference)
            reconstructed = np.concatenate([vqvae.reconstruct(reference[i:i + 32]).numpy()
                                            for i in range(0, len(reference), 32)])
            out.update(metrics.two_sample_tests(metrics.to_8bit(samples)[:len(reference)], reference,
                                                metrics.to_8bit(reconstructed), seed=args.seed))
        return out
    train = run.splits(source, ("train",))["train"]
    reference_images = reference_split(source, data, args)
    n = min(len(samples), len(reference_images), len(train))
    if n <= metrics.NEAREST_K:
        log(f"warning: sample quality needs more than {metrics.NEAREST_K} generated and real slices; there are "
            f"{len(samples)} generated, {len(reference_images)} reference and {len(train)} training slices, so it "
            "is skipped (generate 100 or more for numbers to compare)")
        return None
    if network is None:
        network = metrics.load_evaluation_network(train, size, fit, dataset.default_cache_dir(), log=log)
    reference = runs.load_images(reference_images, n, size, fit, args.seed)
    train_reference = runs.load_images(train, n, size, fit, args.seed + 1)
    reconstructed = np.concatenate([vqvae.reconstruct(reference[i:i + 32]).numpy()
                                    for i in range(0, len(reference), 32)])
    log(f"sample quality: {n} generated slices against {n} real "
        f"{'reference' if args.reference_data else 'test'} slices (floor: as many training slices)")
    return metrics.sample_quality(samples, reference, train_reference, network, reconstructed, seed=args.seed, log=log)


def run_generation(args, log=print):
    """Samples new slices with the prior, decodes them, and checks them against the training set."""
    start = time.perf_counter()
    run = runs.Run(args.run)
    vqvae, data = run.load_vqvae(), run.settings("vqvae").data
    prior, config = run.load_prior(), run.config("pixelcnn")
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
                                        jit_compile=not args.no_xla, top_k=args.top_k, top_p=args.top_p)
    truncation = "".join([f", top-k {args.top_k}" if args.top_k else "",
                          f", nucleus {args.top_p:g}" if args.top_p < 1 else ""])
    slice_index = -1 if args.slice is None else args.slice
    log(f"generating {args.generate} slices: {height}x{width} codes (K={hyper['num_codes']}) at temperature "
        f"{args.temperature}{truncation}" + (f", slice {args.slice}" if args.slice is not None else "")
        + (f", class {args.label}" if args.label else "") + f", seed {args.seed}")
    images, sample_seconds, done = [], 0.0, 0
    bar = keras.utils.Progbar(args.generate, unit_name="sample")
    while done < args.generate:
        uniform = tf.random.stateless_uniform((batch, height, width), seed=[args.seed, done])
        t0 = time.perf_counter()
        codes = sampler(uniform, slice_index, label)
        sample_seconds += time.perf_counter() - t0
        images.append(vqvae.decode(codes).numpy())
        done += batch
        bar.update(min(done, args.generate))
    images = np.concatenate(images)[: args.generate]
    out = Path(args.out) if args.out else run.path / "generated"
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_png(image, out / f"generated_{i:04d}.png")
    summary = {"n_generated": int(len(images)), "out": str(out), "grid_shape": [height, width],
               "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "slice": args.slice,
               "label": args.label, "seed": args.seed,
               "sampling_seconds": round(sample_seconds, 2),
               "samples_per_s": round(len(images) / max(sample_seconds, 1e-9), 2)}
    titles = None
    source = None
    if not (args.no_memorisation_check and args.no_quality):
        try:
            source = run.source(on_bad="skip" if args.skip_bad else None)
        except (runs.RunError, dataset.DataError) as err:
            if not (run.path / REFERENCE_FILE).is_file():
                raise
            log(f"note: {err} The memorisation check is skipped (it needs the training slices); the samples are "
                f"scored with {run.path / REFERENCE_FILE}.")
            summary["memorisation_check"] = "skipped: the run's training slices are not at hand"
    if source is not None and not args.no_memorisation_check:
        check, nearest, files = memorisation_check(images, vqvae, source, data, seed=args.seed, log=log)
        tmp = out / f".nearest_train.csv.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["generated", "nearest_train_file", "ssim"])
            for i, (score, path) in enumerate(zip(nearest, files)):
                writer.writerow([f"generated_{i:04d}.png", path, f"{score:.6f}"])
        os.replace(tmp, out / "nearest_train.csv")
        summary.update({**check, "nearest_csv": str(out / "nearest_train.csv")})
        titles = [f"nearest train SSIM {s:.2f}" for s in nearest]
    if not args.no_quality:
        summary["quality"] = generation_quality(images, vqvae, run, source, data, args, log)
    title = f"{len(images)} generated slices ({height}x{width} codes, T={args.temperature}{truncation})"
    if args.slice is not None:
        title += f", slice {args.slice}"
    summary["figure"] = str(dataset.save_grid(images[:32], out / "generated.png", titles=titles and titles[:32],
                                              suptitle=title))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    runs.write_json(out / "summary.json", summary)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Reconstruct a whole split with a trained VQ-VAE and report mean and std SSIM and PSNR over "
                    "every image, over the whole image and inside the brain; write a per-image CSV, a JSON "
                    "summary and a comparison figure. Or, with --generate N, sample new slices with the run's "
                    "prior; with --compress / --decompress, code slices into a .bvq file with the VQ-VAE and "
                    "prior, and back.")
    parser.add_argument("--run", default="runs/latest", help="run folder of a trained VQ-VAE (default: runs/latest)")
    parser.add_argument("--checkpoint", default=None, help="a .keras VQ-VAE file instead of --run")
    parser.add_argument("--data", default=None,
                        help="data folder; default: the one the run was trained on (or the phantoms)")
    parser.add_argument("--split", choices=["test", "validate", "train", "all"], default="test",
                        help="which split of the run's data to reconstruct; 'all' is every image under --data "
                             "(a folder of your own) (default: test)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="only to check: the run's own split is always used, and any other seed is refused "
                             "(it would put training images in the test split)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size (default: the size the run was trained at, else 256)")
    parser.add_argument("--fit", choices=dataset.FIT_MODES, default=None,
                        help="how images of another size are fitted to --image-size (default: the run's, else pad)")
    parser.add_argument("--limit", type=int, default=None, help="reconstruct at most N images (a seeded subset)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images (or samples) per batch; with several GPUs, the global batch divided over them "
                             "(default: 16)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the --limit subset; generation: sampling seed (default: 0)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: <run>/predict_<split>, or <run>/generated)")
    parser.add_argument("--save-images", action="store_true",
                        help="also write every reconstruction as a PNG (in <out>/reconstructions, named after "
                             "its file)")
    parser.add_argument("--export-codes", metavar="FILE.npz", default=None,
                        help="save the code indices of the split (with subject, slice, label and path per image)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out corrupt image files with a warning (a run trained with --skip-bad does "
                             "so anyway)")
    gen = parser.add_argument_group("generation (--generate N)")
    gen.add_argument("--generate", type=int, default=None, metavar="N",
                     help="sample N new slices with the run's PixelCNN prior instead of reconstructing")
    gen.add_argument("--slice", type=int, default=None, help="axial slice position to generate at (OASIS 0-31)")
    gen.add_argument("--label", default=None, help="class to generate (a class folder name of the data)")
    gen.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the sampler (default: 1.0)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K",
                     help="draw each code only among the K most likely (0, the default: all)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P",
                     help="nucleus sampling: draw each code only among the fewest most likely codes holding "
                          "probability P (1.0, the default: all)")
    gen.add_argument("--no-xla", action="store_true", help="do not XLA-compile the sampler (slower, no compile wait)")
    gen.add_argument("--no-memorisation-check", action="store_true",
                     help="skip the SSIM-to-nearest-training-slice check")
    gen.add_argument("--reference-data", default=None, metavar="PATH",
                     help="score the samples against the real slices of this folder (all of it, fitted as the run "
                          "fits its images) instead of the run's test split")
    gen.add_argument("--save-reference", action="store_true",
                     help="write the run's reference statistics (features of the test split, or of "
                          "--reference-data, and of as many training slices, with the evaluation network; at most "
                          "--limit slices) to <run>/reference_statistics.npz; --generate then scores against them "
                          "without the data (no two-sample tests) unless --reference-data is given")
    gen.add_argument("--no-quality", action="store_true",
                     help="skip the sample-quality metrics (FD and KID in the evaluation network's features, "
                          "precision/recall/density/coverage, MS-SSIM diversity, texture FD, two-sample tests)")
    cod = parser.add_argument_group("codec (--compress / --decompress; needs the run's prior)")
    cod.add_argument("--compress", metavar="FOLDER_OR_FILE", default=None,
                     help="write the entropy-coded code grids of every slice under this folder (or of this one "
                          "slice) to --out FILE.bvq")
    cod.add_argument("--decompress", metavar="FILE.bvq", default=None,
                     help="decode a .bvq file with the run it was written with; one PNG per slice under --out "
                          "DIR, named and sized as the originals (pad fit)")
    cod.add_argument("--chunk", type=int, default=codec.CHUNK,
                     help="slices coded together (a batch of the prior's steps); stored in the file (default: "
                          f"{codec.CHUNK})")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    if sum(map(bool, (args.compress, args.decompress, args.save_reference, args.generate))) > 1:
        parser.error("pass one of --compress, --decompress, --save-reference and --generate")
    if (args.compress or args.decompress) and not args.out:
        parser.error(f"--{'compress' if args.compress else 'decompress'} needs --out "
                     f"({'the .bvq file to write' if args.compress else 'the folder to write PNGs to'})")
    if args.chunk < 1:
        parser.error(f"--chunk must be at least 1. Received: {args.chunk}")
    if args.generate is not None and args.generate < 1:
        parser.error(f"--generate must be at least 1. Received: {args.generate}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive. Received: {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be 0 (all codes) or more. Received: {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1]. Received: {args.top_p}")
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
    """Reconstructs a split as `args` say; returns the summary dict (also written as summary.json)."""
    start = time.perf_counter()
    run = runs.Run(args.run)
    strategy = device_strategy(args.batch_size, log)
    with strategy.scope():
        model, data, checkpoint = load_vqvae(run, args.checkpoint)
    if args.checkpoint:
        run = runs.Run(Path(args.checkpoint).parent)
    image_size = args.image_size or (data.image_size if data else 256)
    if image_size % model.downsample:
        raise PredictError(f"--image-size {image_size} is not a multiple of the model's downsampling "
                           f"({model.downsample}).")
    fit = args.fit or (data.fit if data else "pad")
    split, kind, notes = resolve_split(run, data, args)
    for note in notes:
        log(f"note: {note}")
    split = runs.limit_split(split, args.limit, args.seed)
    out = Path(args.out) if args.out else checkpoint.parent / f"predict_{args.split}"
    save_to = out / "reconstructions" if args.save_images else None
    (save_to or out).mkdir(parents=True, exist_ok=True)
    log(f"reconstructing {len(split)} {args.split} images ({kind} data) at {image_size} px ({fit}) with "
        f"{checkpoint}")
    result = reconstruct_split(model, split, image_size, fit, args.batch_size, export_codes=bool(args.export_codes),
                               save_to=save_to, strategy=strategy)

    keys = ("ssim", "psnr", "ssim_brain", "psnr_brain")
    tmp = out / f".reconstruction.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "subject", "slice", *keys])
        for i, path in enumerate(split.paths):
            writer.writerow([path, int(split.subjects[i]), int(split.slices[i]),
                             *(f"{result[key][i]:.6f}" for key in keys)])
    os.replace(tmp, out / "reconstruction.csv")
    ssim, psnr = result["ssim"], result["psnr"]
    brain = result["ssim_brain"][np.isfinite(result["ssim_brain"])]  # an image with no brain has no brain value
    brain_psnr = result["psnr_brain"][np.isfinite(result["psnr_brain"])]
    summary = {
        "n_images": int(len(ssim)), "ssim_mean": float(ssim.mean()), "ssim_std": float(ssim.std()),
        "ssim_min": float(ssim.min()), "ssim_brain_mean": float(brain.mean()) if len(brain) else None,
        "ssim_brain_std": float(brain.std()) if len(brain) else None, "n_brain_images": int(len(brain)),
        "psnr_mean": float(psnr.mean()), "psnr_std": float(psnr.std()),
        "psnr_brain_mean": float(brain_psnr.mean()) if len(brain_psnr) else None,
        "split": args.split, "source": kind, "image_size": int(image_size), "fit": fit,
        "checkpoint": str(checkpoint), "csv": str(out / "reconstruction.csv"),
    }
    brain_text = f", brain {summary['ssim_brain_mean']:.4f}" if len(brain) else ""
    summary["figure"] = str(runs.save_comparison(
        *result["examples"], out / "reconstruction.png",
        title=f"{args.split} split, {len(split)} images: SSIM {ssim.mean():.4f} +/- {ssim.std():.4f}{brain_text}, "
              f"PSNR {psnr.mean():.2f} dB"))
    if save_to is not None:
        summary["images"] = str(save_to)
    if args.export_codes:
        tmp = Path(args.export_codes).with_name(f".{Path(args.export_codes).stem}.tmp-{os.getpid()}.npz")
        np.savez_compressed(tmp, codes=result["codes"], subjects=split.subjects, slices=split.slices,
                            labels=split.labels, paths=np.array(split.paths))
        os.replace(tmp, args.export_codes)
        summary["codes"] = str(args.export_codes)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    runs.write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------
# The codec: --compress / --decompress
# ---------------------------------------------------------------------------


def content_box(height, width, size, fit):
    """Where `dataset.fit_image` puts a (height, width) image on its size x size canvas.

    Mirrors `fit_image` in float32: "pad" shrinks an image larger than the
    canvas (aspect kept) and centres it; "stretch" and "crop" fill the
    whole canvas.

    Args:
        height: the image's rows.
        width: its columns.
        size: the canvas side.
        fit: "pad", "stretch" or "crop".

    Returns:
        `(top, left, rows, columns)` of the image on the canvas.
    """
    if fit != "pad":
        return 0, 0, size, size
    hw = np.array([height, width], np.float32)
    scale = np.minimum(np.float32(1.0), np.float32(size) / hw.max())
    new = np.maximum(1, np.round(hw * scale).astype(int))
    return (size - new[0]) // 2, (size - new[1]) // 2, int(new[0]), int(new[1])


def _images_to_compress(target, config, data=None):
    """The images to compress and the names their PNGs get.

    Args:
        target: a folder (every image under it, recursively) or one image;
            or a folder of volumes, or one volume, sliced as the run's data
            were (its slice axis and kept slices).
        config: the prior's run config; its "class_names" label the files
            by their first folder below `target`, as training labelled them.
        data: the VQ-VAE's `config.DataConfig` (for volumes).

    Returns:
        `(split, names)`: the checked `dataset.Split`, and per file its path
        relative to `target`.

    Raises:
        dataset.DataError: a missing target, no images, a damaged image, or
            two files that would decompress to the same PNG.
    """
    target = Path(target)
    if (target.is_dir() and dataset.holds_volumes(target)) or (target.is_file() and volumes.is_volume(target)):
        root = target if target.is_dir() else target.parent
        if target.is_dir():
            split = volume_folder(target, data)
        else:
            path = str(target.with_suffix(".hdr")) if target.suffix.lower() == ".img" else str(target)
            split = dataset.volume_split([path], root=root, slice_axis=data.slice_axis if data else "axial",
                                         slices=data.slices if data else None)
        names = [(Path(volumes.parse_reference(p)[0]).relative_to(root).parent / f"{dataset.item_name(p)}.png")
                 .as_posix() for p in split.paths]
    else:
        split, names = _slices_to_compress(target, config)
    seen = {}
    for path, name in zip(split.paths, names):
        png = Path(name).with_suffix(".png").as_posix()
        if png in seen:
            raise dataset.DataError(f"{path} and {seen[png]} would both decompress to {png}. Rename one of them.")
        seen[png] = path
    return split, names


def _slices_to_compress(target, config):
    """The PNG/JPEG slices under `target` (or `target` itself), checked and labelled, and their relative names."""
    if target.is_dir():
        paths, root = dataset.list_images(target), target
        if not paths:
            raise dataset.DataError(f"no images found: {target} holds no .png/.jpg/.jpeg files. Pass a folder of "
                                    "slices or one slice.")
    elif target.is_file():
        paths, root = [str(target)], target.parent
    else:
        raise dataset.DataError(f"--compress: {target} does not exist. Pass a folder of slices or one slice.")
    classes = config.get("class_names", [])
    labels = [classes.index(c) if (c := dataset.class_of(p, root)) in classes else -1 for p in paths]
    split, _ = dataset.check_split("compress", dataset.make_split(paths, labels))
    return split, [Path(p).relative_to(root).as_posix() for p in split.paths]


def compress(run, split, names, out, chunk=codec.CHUNK, log=print):
    """Writes the entropy-coded code grids of a split's images to `out` (.bvq) with the run's VQ-VAE and prior.

    Args:
        run: a `runs.Run` with a trained VQ-VAE and prior.
        split: a checked `dataset.Split` of the images.
        names: per image, the name its PNG gets when decompressed.
        out: the .bvq file to write (atomically).
        chunk: slices coded together.
        log: callable taking a progress line.

    Returns:
        The summary dict (the keys of `--compress --json`), with the code grids under "codes".
    """
    start = time.perf_counter()
    vqvae, data = run.load_vqvae(), run.settings("vqvae").data
    prior, config = run.load_prior(), run.config("pixelcnn")
    hyper = config["pixelcnn"]
    image_size, fit = data.image_size, data.fit
    # The prior conditions on what the names and folders carry; out-of-range values mean "unknown" to it.
    slices = np.where((split.slices >= 0) & (split.slices < hyper["num_slices"]), split.slices, -1)
    labels = split.labels if hyper["num_classes"] else np.full(len(split), -1, np.int32)
    codes = runs.encode_split(vqvae, split, image_size, fit).astype(np.int32)
    height, width = codes.shape[1:]
    sizes = [list(dataset.image_shape(p)) for p in split.paths]
    log(f"entropy coding {len(split)} {height}x{width} code grids with the prior")
    bar = keras.utils.Progbar(len(codec.chunk_spans(len(split), chunk)) * height, unit_name="row", interval=0.5)
    payload, words, ideal = codec.encode_grids(prior, codes, slices, labels, chunk=chunk,
                                               progress=lambda: bar.add(1))
    header = {"vqvae_sha1": run.vqvae_digest(), "prior_sha1": runs.file_digest(run.checkpoint("pixelcnn")),
              "grid": [height, width], "num_codes": int(prior.num_codes), "image_size": image_size, "fit": fit,
              "chunk": chunk, "jit_compile": True, "names": list(names), "sizes": sizes,
              "slices": [int(v) for v in slices], "labels": [int(v) for v in labels], "chunk_words": words,
              "codes_sha256": codec.grids_digest(codes), "ideal_bits": round(ideal, 3)}
    size = codec.write(out, header, payload)
    pixels = sum(h * w for h, w in sizes)
    return {"n_slices": len(split), "bytes": size, "bits_per_pixel": 8 * size / pixels,
            "bits_per_code": 8 * size / codes.size, "payload_bits_per_code": 32 * payload.size / codes.size,
            "ideal_bits_per_code": ideal / codes.size, "raw_bits_per_code": float(np.log2(prior.num_codes)),
            "out": str(out), "seconds": round(time.perf_counter() - start, 2), "codes": codes}


def decompress(run, path, log=print):
    """Decodes a .bvq file with the run it was written with.

    Args:
        run: the `runs.Run` whose VQ-VAE and prior wrote the file.
        path: the .bvq file.
        log: callable taking a progress line.

    Returns:
        `(header, grids, images)`: the file's header, the decoded code grids
        (checked against the encoder's digest), and per slice its image,
        float32 (h, w) in [0, 1] at the original size (pad fit; the
        model's canvas otherwise).

    Raises:
        codec.CodecError: a damaged or foreign file, other checkpoints than
            the run's, or decoded codes that differ from the encoder's.
    """
    header, payload = codec.read(path)
    vqvae_digest = run.vqvae_digest() if run.checkpoint("vqvae").is_file() else None
    prior_path = run.checkpoint("pixelcnn")
    prior_digest = runs.file_digest(prior_path) if prior_path.is_file() else None
    if (vqvae_digest, prior_digest) != (header["vqvae_sha1"], header["prior_sha1"]):
        raise codec.CodecError(
            f"{path} was written with other checkpoints than {run.path}'s (VQ-VAE {header['vqvae_sha1'][:12]}, "
            f"prior {header['prior_sha1'][:12]}; the run has {(vqvae_digest or 'none')[:12]}, "
            f"{(prior_digest or 'none')[:12]}). Pass the --run it was compressed with.")
    for name in header["names"]:  # a name is a path below --out, nothing else
        if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).name:
            raise codec.CodecError(f"{path} names a slice {name!r}, which is not a path inside the output "
                                   "folder; it was not written by predict.py --compress.")
    vqvae, prior = run.load_vqvae(), run.load_prior()
    n, (height, width) = len(header["names"]), header["grid"]
    log(f"decoding {n} {height}x{width} code grids from {path}")
    bar = keras.utils.Progbar(len(codec.chunk_spans(n, header["chunk"])) * height, unit_name="row", interval=0.5)
    grids = codec.decode_grids(prior, payload, header["chunk_words"], n, (height, width), header["slices"],
                               header["labels"], chunk=header["chunk"], jit_compile=header["jit_compile"],
                               progress=lambda: bar.add(1))
    if codec.grids_digest(grids) != header["codes_sha256"]:
        raise codec.CodecError(
            f"{path}: the decoded codes differ from the encoder's (checksum mismatch); nothing was written. It was "
            f"written with {header['written_by']}; decode it where these match (here: {codec.environment()}).")
    decode, images = tf.function(vqvae.decode, reduce_retracing=True), []
    for first in range(0, n, 64):
        for k, image in enumerate(decode(grids[first:first + 64]).numpy()):
            original = tuple(header["sizes"][first + k])
            top, left, h, w = content_box(*original, header["image_size"], header["fit"])
            image = image[top:top + h, left:left + w]
            if header["fit"] == "pad" and (h, w) != original:  # shrunk to fit the canvas: back to its size
                image = tf.image.resize(image, original, antialias=True).numpy().clip(0.0, 1.0)
            images.append(image[..., 0])
    return header, grids, images


def run_compress(args, log=print):
    """`--compress`: every image under a folder (or one image) into one .bvq file; returns the summary."""
    if not Path(args.out).parent.is_dir() or Path(args.out).is_dir():
        raise PredictError(f"--out {args.out}: pass a file in an existing folder (the folder is not created).")
    run = runs.Run(args.run)
    split, names = _images_to_compress(args.compress, run.config("pixelcnn"), run.settings("vqvae").data)
    log(f"compressing {len(split)} images from {args.compress} with {run.path}")
    summary = compress(run, split, names, args.out, args.chunk, log)
    summary.pop("codes")
    return summary


def run_decompress(args, log=print):
    """`--decompress`: one PNG per slice of a .bvq file under `args.out`, all or nothing; returns the summary."""
    start = time.perf_counter()
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise PredictError(f"--out {args.out} is a file. Pass a folder for the PNGs.")
    header, _, images = decompress(runs.Run(args.run), args.decompress, log)
    out = Path(args.out)
    staging = out / f".decompress-{os.getpid()}"
    try:
        for name, image in zip(header["names"], images):
            target = staging / Path(name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            save_png(image[..., None], target)
        for done in sorted(staging.rglob("*.png")):
            final = out / done.relative_to(staging)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(done, final)
    except OSError as err:
        raise PredictError(f"cannot write the PNGs under {out} ({err.strerror}). Pass --out in a writable "
                           "place.") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"n_slices": len(images), "out": str(out), "checksum_ok": True,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None):
    args = parse_args(argv)
    command = (run_compress if args.compress else run_decompress if args.decompress
               else save_reference if args.save_reference else run_generation if args.generate
               else run_reconstruction)
    try:
        summary = command(args)
    except (dataset.DataError, PredictError, runs.RunError, codec.CodecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.compress:
        print(f"compressed {summary['n_slices']} slices into {summary['out']}: {summary['bytes']:,} bytes, "
              f"{summary['bits_per_pixel']:.4f} bits per pixel, {summary['bits_per_code']:.3f} bits per code "
              f"(prior's cross-entropy {summary['ideal_bits_per_code']:.3f}, raw {summary['raw_bits_per_code']:.0f}) "
              f"in {summary['seconds']:.1f} s")
    elif args.decompress:
        print(f"decompressed {summary['n_slices']} slices into {summary['out']} in {summary['seconds']:.1f} s; "
              "code checksum ok")
    elif args.save_reference:
        print(f"wrote the reference statistics of {summary['n_reference']} real slices to "
              f"{summary['reference_statistics']} ({summary['bytes']:,} bytes) in {summary['seconds']:.1f} s")
    elif args.generate:
        line = (f"generated {summary['n_generated']} slices in {summary['sampling_seconds']:.1f} s of sampling "
                f"({summary['samples_per_s']:.2f} samples/s) into {summary['out']}")
        if "nearest_train_ssim_mean" in summary:
            line += (f"; SSIM to nearest training slice {summary['nearest_train_ssim_mean']:.3f} (max "
                     f"{summary['nearest_train_ssim_max']:.3f}; reconstructed held-out test slices "
                     f"{summary['test_nearest_train_ssim_mean']:.3f}, reconstructed training slices "
                     f"{summary['train_nearest_train_ssim_mean']:.3f}; split by {summary['split_by']})")
        print(line)
        quality = summary.get("quality")
        if quality:
            print(f"sample quality over {quality['n_samples']} slices: FD {quality['fd']:.3f} (real/real floor "
                  f"{quality['fd_floor']:.3f}), KID {quality['kid']:.4f}, precision {quality['precision']:.3f}, "
                  f"recall {quality['recall']:.3f}, density {quality['density']:.3f}, coverage "
                  f"{quality['coverage']:.3f}, MS-SSIM diversity {quality['msssim_diversity']:.3f} (real "
                  f"{quality['msssim_diversity_real']:.3f}), texture FD {quality['texture_fd']:.2f} (floor "
                  f"{quality['texture_fd_floor']:.2f}), " + (
                      f"two-sample test accuracy {quality['c2st_accuracy']:.2f} against real, "
                      f"{quality['c2st_recon_accuracy']:.2f} against reconstructions (0.5 = indistinguishable)"
                      if quality["c2st_accuracy"] is not None else "no two-sample tests (no real slices at hand)"))
            shares = ", ".join(f"{name} {quality[f'tissue_{name}_mean']:.3f} (real "
                               f"{quality[f'tissue_{name}_mean_real']:.3f})" for name in metrics.TISSUE_FEATURES)
            print(f"tissue composition: {shares}; the worst feature is {quality['tissue_worst_ratio']:.2f}x the "
                  "real/real floor (Wasserstein distance)")
    else:
        brain = (f"; inside the brain SSIM {summary['ssim_brain_mean']:.4f} +/- {summary['ssim_brain_std']:.4f}, "
                 f"PSNR {summary['psnr_brain_mean']:.2f} dB" if summary["ssim_brain_mean"] is not None else "")
        print(f"reconstructed {summary['n_images']} {summary['split']} images: SSIM {summary['ssim_mean']:.4f} "
              f"+/- {summary['ssim_std']:.4f} (min {summary['ssim_min']:.4f}), PSNR {summary['psnr_mean']:.2f} "
              f"+/- {summary['psnr_std']:.2f} dB{brain}; figure {summary['figure']}, per-image CSV {summary['csv']}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
