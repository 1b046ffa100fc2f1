"""VQ-VAE quality benchmark on real slices, under a wall-clock training budget.

Trains, one after the other in this process and on the same data:

  * ours-64: this project's VQ-VAE, 64x64 code grid (downsample 4) at 256 px;
  * ours-32: the same with a 32x32 grid (downsample 8);
  * keras.io: the keras.io VQ-VAE example's architecture (two stride-2
    convolutions, no residual blocks, latent 16, K=64, loss-based codebook),
    64x64 grid, the plain model the seed report used.

Each trains for `--minutes` of wall time (batch 16, Adam 1e-3), with the mean
SSIM on a fixed held-out subset measured along the way (outside the budget)
to find when it first reached 0.90; at the end every held-out image is
reconstructed and mean +/- std SSIM reported, over the whole image and inside
the brain (`metrics.image_quality`; about 44% of a real slice is black
background that reconstructs perfectly and flatters the whole-image value),
with the code usage over the brain's positions (perplexity, codes used) and
the raw rate, log2 K bits per code.

Our models are built with `modules.VQVAE`'s own defaults (the model as it
was before the brain-masked loss), or with `--preset NAME` as one of
`train.py`'s presets builds them (read from `config.PRESETS`, so the two
cannot drift apart), then changed by `--set KEY=VALUE`. `--schedule cosine` tries a warm-up and
cosine learning rate over the budget; `--crop N` trains on random N x N crops of
the canvas (held-out scores stay on whole images). The data are the real OASIS-
derived slices in ../shared/data/alzheimer-mri-slices (or --data), split by
the project's pipeline (seed 0), 176x208 slices centred on a 256x256 canvas.

    python -m benchmarks.bench_vqvae [--minutes 10] [--models ours-64 ...] [--preset oasis-256] [--set KEY=VALUE ...]
                                     [--crop N] [--compare] [--json]
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import config
import dataset
import metrics
import modules
import runs
import keras
import numpy as np
import tensorflow as tf

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alzheimer-mri-slices"
DOWNSAMPLE = {"ours-64": 4, "ours-32": 8}  # 64x64 and 32x32 code grids at 256 px


@keras.saving.register_keras_serializable(package="bench")
class KerasIOQuantizer(keras.layers.Layer):
    """The keras.io example's quantizer: loss-based codebook, no EMA, no restarts."""

    def __init__(self, num_codes=64, code_dim=16, beta=0.25, **kwargs):
        super().__init__(**kwargs)
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta

    def build(self, input_shape):
        self.codebook = self.add_weight(shape=(self.code_dim, self.num_codes), initializer="random_uniform",
                                        name="codebook")

    def call(self, z):
        flat = tf.reshape(z, (-1, self.code_dim))
        distances = (tf.reduce_sum(flat**2, 1, keepdims=True) - 2 * flat @ self.codebook
                     + tf.reduce_sum(self.codebook**2, 0, keepdims=True))
        indices = tf.argmin(distances, 1)
        quantized = tf.reshape(tf.gather(tf.transpose(self.codebook), indices), tf.shape(z))
        self.add_loss(tf.reduce_mean((tf.stop_gradient(z) - quantized) ** 2)
                      + self.beta * tf.reduce_mean((z - tf.stop_gradient(quantized)) ** 2))
        return z + tf.stop_gradient(quantized - z)


def keras_io_model(size=256, latent=16, codes=64):
    inputs = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(latent, 1)(x)
    x = KerasIOQuantizer(codes, latent)(x)
    x = keras.layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2DTranspose(1, 3, padding="same")(x)
    return keras.Model(inputs, outputs, name="keras_io_vqvae")


def build(name, size, options=None, lr=1e-3, seed=0):
    if name == "keras.io":
        model = keras_io_model(size)
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
        return model, lambda images: tf.clip_by_value(model(images, training=False), 0.0, 1.0)
    model = modules.VQVAE(**{"downsample": DOWNSAMPLE[name], "seed": seed, **(options or {})})
    model.build((None, size, size, 1))
    model.compile(optimizer=keras.optimizers.Adam(lr))
    return model, model.reconstruct


def learning_rate(peak, fraction, schedule, warmup=config.TrainConfig.warmup_fraction):
    """The learning rate `fraction` of the way through the budget: constant, or linear warm-up then cosine to 0.

    The curve of `train.learning_rate` (the same warm-up fraction), over the wall-clock budget instead of steps
    (a budget of minutes has no step count to spread a step schedule over).
    """
    if schedule == "constant":
        return peak
    if fraction < warmup:
        return peak * fraction / warmup
    return peak * 0.5 * (1.0 + np.cos(np.pi * min(1.0, (fraction - warmup) / (1.0 - warmup))))


def quality(reconstruct, ds, model=None):
    """Per-image SSIM and PSNR over the whole image and inside the brain (`metrics.image_quality`).

    With one of our `model`s, also the code counts over the grid positions
    whose patch touches the brain of the originals, from the same brain mask
    and the codes the reconstructions were decoded from: returns
    (scores, counts), else scores.
    """
    def step(images):
        mask = metrics.brain_mask(images)
        if model is None:
            return metrics.image_quality(images, reconstruct(images), mask=mask), None
        codes = model.encode(images)
        touched = tf.nn.max_pool2d(tf.cast(mask, tf.float32), model.downsample, model.downsample, "VALID")[..., 0]
        counts = tf.math.bincount(tf.boolean_mask(codes, touched > 0), minlength=model.num_codes,
                                  maxlength=model.num_codes, dtype=tf.float64)
        return metrics.image_quality(images, model.decode(codes), mask=mask), counts

    step = tf.function(step)
    batches, counts = [], 0.0
    for images in ds:
        scores, batch_counts = step(images)
        batches.append({k: v.numpy() for k, v in scores.items()})
        counts = counts if batch_counts is None else counts + batch_counts.numpy()
    scores = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    return scores if model is None else (scores, counts)


def usage(counts):
    """Perplexity and number of codes used, from code counts."""
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum())), int((counts > 0).sum())


def train_with_budget(name, source, minutes, size=256, batch=16, probe_every=60.0, figure=None, log=print,
                      options=None, lr=1e-3, schedule="constant", label=None, crop=None, seed=0):
    keras.utils.set_random_seed(seed)
    model, reconstruct = build(name, size, options, lr, seed)
    label = label or name
    train = dataset.make_dataset(source.splits["train"], image_size=size, batch_size=batch, shuffle=True, seed=seed,
                                 repeat=True, drop_remainder=True, crop=crop)
    probe = dataset.make_dataset(source.splits["validate"].take(np.arange(0, len(source.splits["validate"]), 4)),
                                 image_size=size, batch_size=32).cache()
    held_out = dataset.make_dataset(source.splits["test"], image_size=size, batch_size=32)
    if name == "keras.io":
        train = train.map(lambda x: (x, x))
    iterator = iter(train)
    trained, steps, curve, reached = 0.0, 0, [], None
    next_probe = probe_every
    while trained < minutes * 60:
        start = time.perf_counter()
        model.optimizer.learning_rate.assign(learning_rate(lr, trained / (minutes * 60), schedule))
        model.train_on_batch(*([next(iterator)] if name != "keras.io" else next(iterator)))
        trained += time.perf_counter() - start
        steps += 1
        if trained >= next_probe or trained >= minutes * 60:
            probed = quality(reconstruct, probe)
            ssim, ssim_brain = float(probed["ssim"].mean()), float(np.nanmean(probed["ssim_brain"]))
            curve.append((round(trained, 1), ssim, ssim_brain))
            if reached is None and ssim >= 0.90:
                reached = trained
            log(f"  {label}: {trained / 60:5.1f} min trained, {steps} steps, probe SSIM {ssim:.4f}, "
                f"inside the brain {ssim_brain:.4f}")
            next_probe += probe_every
    if name == "keras.io":
        scores, perplexity, used = quality(reconstruct, held_out), None, None
        codes = next(layer for layer in model.layers if isinstance(layer, KerasIOQuantizer)).num_codes
    else:
        scores, counts = quality(reconstruct, held_out, model)
        (perplexity, used), codes = usage(counts), model.num_codes
    values, brain = scores["ssim"], scores["ssim_brain"][np.isfinite(scores["ssim_brain"])]
    brain_psnr = scores["psnr_brain"][np.isfinite(scores["psnr_brain"])]
    if figure:
        test = source.splits["test"]
        picks = test.take(np.linspace(0, len(test) - 1, 8).round().astype(int))
        images = next(iter(dataset.make_dataset(picks, image_size=size, batch_size=8))).numpy()
        runs.save_comparison(images, reconstruct(images).numpy(), figure,
                             title=f"{label} after {trained / 60:.0f} min of CPU training: held-out real slices "
                                   f"(test mean SSIM {values.mean():.4f}, inside the brain {brain.mean():.4f}, over "
                                   f"{len(values)} images)")
    return {"model": label, "architecture": name, "options": options or {}, "schedule": schedule, "lr": lr,
            "crop": crop, "seed": seed,
            "grid": "32x32" if name == "ours-32" else "64x64", "minutes": round(trained / 60, 2), "steps": steps,
            "images_seen": steps * batch, "params": model.count_params(), "bits_per_code": float(np.log2(codes)),
            "perplexity_brain": perplexity, "codes_used_brain": used,
            "minutes_to_0.90": None if reached is None else round(reached / 60, 2),
            "ssim_mean": float(values.mean()), "ssim_std": float(values.std()),
            "ssim_brain_mean": float(brain.mean()), "ssim_brain_std": float(brain.std()),
            "psnr_mean": float(scores["psnr"].mean()), "psnr_brain_mean": float(brain_psnr.mean()),
            "n_test": int(len(values)), "curve": curve}


def model_options(preset="model", settings=()):
    """One of our models' `modules.VQVAE` options: a preset changed by `KEY=VALUE` settings.

    preset "model" starts from the constructor's defaults (no options); a
    name of `config.PRESETS` from that preset's VQ-VAE, as train.py builds
    it, but for the downsampling (the model's name says it). A VALUE is
    read as JSON, else as a string: `loss=ssim_l1`.
    """
    options = {}
    if preset != "model":
        options = {k: v for k, v in dataclasses.asdict(config.preset(preset).vqvae).items() if k != "downsample"}
    for item in settings:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of real slices")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget per model")
    parser.add_argument("--models", nargs="+", default=["ours-64", "keras.io", "ours-32"],
                        choices=["ours-64", "ours-32", "keras.io"], help="which models to train")
    parser.add_argument("--figure", default=None,
                        help="save held-out reconstructions of the last model here (e.g. samples/reconstruction.png)")
    parser.add_argument("--preset", choices=["model", *config.PRESETS], default="model",
                        help="our models' starting options: modules.VQVAE's constructor defaults (model) or the "
                             "VQ-VAE of one of train.py's presets (oasis-256 for ours-64, oasis-256-32 for ours-32); "
                             "--set changes them. The learning rate is --schedule's and the crop --crop's (the oasis "
                             "presets train on 64 px crops with a cosine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a modules.VQVAE argument for our models (repeatable); VALUE is read as JSON, else "
                             "as a string: --set loss=ssim_l1 --set normalize_codes=true --set decoder_channels=96")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the peak of a schedule)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate over the budget: constant, or 2%% linear warm-up then cosine to 0")
    parser.add_argument("--crop", type=int, default=None,
                        help="train on random crops of this side (a multiple of 8) from the 256 px canvas instead of "
                             "whole images (more, cheaper steps); held-out scores are always on whole images")
    parser.add_argument("--label", default=None, help="suffix for the models' names in the table and JSON")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds every model's initialisation, codebook restarts, data order and crops (the "
                             "split and the scored slices stay the same)")
    parser.add_argument("--compare", action="store_true",
                        help="train each of our models twice, side by side: first as modules.VQVAE's defaults "
                             "(today's model, whole images), then with --preset, --set, --schedule and --crop")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    if args.crop is not None and not (16 <= args.crop <= 256 and args.crop % 8 == 0):
        parser.error(f"--crop must be a multiple of 8 from 16 to 256 (the canvas). Received: {args.crop}")
    if not Path(args.data).is_dir():
        print(f"error: real data not found at {args.data}; pass --data with a folder of slices", file=sys.stderr)
        return 2
    source = dataset.load_source(args.data, seed=0)
    print(f"data: {args.data}: {source.counts()}, 256x256 canvas, {args.minutes} min per model")
    jobs = []  # (architecture, options, schedule, learning rate, crop, label); today's model: Adam 1e-3, whole images
    for name in args.models:
        if name == "keras.io":
            jobs.append((name, None, "constant", 1e-3, None, name))
            continue
        if args.compare:
            jobs.append((name, None, "constant", 1e-3, None, f"{name}+today"))
        options = model_options(args.preset, args.set)
        jobs.append((name, options, args.schedule, args.lr, args.crop,
                     f"{name}+{args.label}" if args.label else name))
    results = [train_with_budget(name, source, args.minutes, figure=args.figure if i == len(jobs) - 1 else None,
                                 options=job_options, lr=lr, schedule=schedule, label=label, crop=crop,
                                 seed=args.seed)
               for i, (name, job_options, schedule, lr, crop, label) in enumerate(jobs)]
    print(f"{'model':16s} {'grid':>6s} {'params':>9s} {'steps':>6s} {'SSIM mean +/- std':>20s} "
          f"{'brain SSIM +/- std':>20s} {'brain PSNR':>10s} {'bits':>5s} {'brain ppl':>9s} {'to 0.90':>9s}")
    for r in results:
        to90 = "never" if r["minutes_to_0.90"] is None else f"{r['minutes_to_0.90']:.1f} min"
        ppl = "-" if r["perplexity_brain"] is None else f"{r['perplexity_brain']:.0f}"
        print(f"{r['model']:16s} {r['grid']:>6s} {r['params']:9,d} {r['steps']:6d} "
              f"{r['ssim_mean']:11.4f} +/- {r['ssim_std']:.4f} {r['ssim_brain_mean']:11.4f} +/- "
              f"{r['ssim_brain_std']:.4f} {r['psnr_brain_mean']:7.2f} dB {r['bits_per_code']:5.1f} {ppl:>9s} "
              f"{to90:>9s}")
    if args.json:
        print(json.dumps({"results": results, "cpu_count": __import__("os").cpu_count(), "data": args.data}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
