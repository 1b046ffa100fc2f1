"""Prior quality: the gated PixelCNN vs a plain PixelCNN of the keras.io example, on the same codes.

The priors model the code grids of one trained VQ-VAE (a run folder,
default runs/latest), unconditionally, trained for the same wall-clock
budget (or, with --steps, the same number of steps) with the same batches
(Adam 1e-3, batch 32), then scored on the held-out validation codes in
bits per code, overall and split into background (the code of a black
patch) and brain. The gated prior runs as train.py trains it (position
embedding, code embedding started from the VQ-VAE's codebook) and, as
ablations, without the position embedding ("gated-nopos") and with a
random code embedding ("gated-random"). The plain model follows the
keras.io example (a masked 7x7 "A" convolution, residual blocks with
masked 3x3 "B" convolutions, two masked 1x1 layers), with an embedding in
place of the one-hot input and its depth chosen so both have a similar
parameter count. The plain model gets the same codebook start as the gated
prior (its input embedding and its output layer's per-code columns from the
codebook's principal components, scaled as `init_from_codebook` scales
them), so gated / plain compares the architectures, not the starts;
"plain-random" is the plain model from a random start, the baseline of
"gated-random".

    python -m benchmarks.bench_prior [--run runs/latest] [--minutes 5 | --steps N] [--size default|demo] [--json]
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import dataset
import modules
import runs
import config  # its presets' prior sizes only
import keras
import numpy as np
import tensorflow as tf


# The prior sizes train.py's presets use: on real data (default) and in the phantom quick start (demo).
SIZES = {name: {key: getattr(config.preset(preset).prior, key) for key in ("filters", "layers", "skip_filters")}
         for name, preset in (("default", "oasis-256"), ("demo", "phantoms"))}


class MaskedConv(keras.layers.Layer):
    """The keras.io PixelConvLayer: a convolution whose kernel is masked to the causal half."""

    def __init__(self, mask_type, filters, kernel_size, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.mask_type, self.conv = mask_type, keras.layers.Conv2D(filters, kernel_size, padding="same",
                                                                   activation=activation)

    def build(self, input_shape):
        self.conv.build(input_shape)
        kh, kw = self.conv.kernel.shape[:2]
        mask = np.zeros(self.conv.kernel.shape, np.float32)
        mask[: kh // 2] = 1.0
        mask[kh // 2, : kw // 2] = 1.0
        if self.mask_type == "B":
            mask[kh // 2, kw // 2] = 1.0
        self.mask = tf.constant(mask)

    def call(self, x):
        out = tf.nn.conv2d(x, self.conv.kernel * self.mask, 1, "SAME") + self.conv.bias
        return self.conv.activation(out)


def plain_pixelcnn(num_codes, grid, filters=128, blocks=8, embed=64):
    inputs = keras.Input(grid, dtype="int32")
    x = keras.layers.Embedding(num_codes, embed, name="embed")(inputs)
    x = MaskedConv("A", filters, 7, activation="relu")(x)
    for _ in range(blocks):
        y = keras.layers.Conv2D(filters, 1, activation="relu")(x)
        y = MaskedConv("B", filters // 2, 3, activation="relu")(y)
        y = keras.layers.Conv2D(filters, 1, activation="relu")(y)
        x = keras.layers.add([x, y])
    for _ in range(2):
        x = MaskedConv("B", filters, 1, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Conv2D(num_codes, 1, name="head")(x), name="plain_pixelcnn")


def plain_rows_seen(model):
    """How many rows above its own a logit of `plain_pixelcnn` sees: 3 (the 7x7 mask-A layer) + 1 per 3x3 block."""
    return sum(layer.conv.kernel.shape[0] // 2 for layer in model.layers if isinstance(layer, MaskedConv))


def make_plain_sampler(model, batch, height, width, temperature=1.0):
    """The naive sampler for `plain_pixelcnn`, computing each pass over only the rows a logit can see.

    Draws exactly the codes `modules.make_naive_sampler` draws from the same
    uniforms (a test checks it): a logit in row i depends on rows
    i - `plain_rows_seen` .. i alone, so each full pass runs on that band of
    rows instead of the whole grid (about 3x fewer operations at 32x32).

    Returns:
        `sample(uniform (B, H, W)) -> codes (B, H, W)`.
    """
    seen = plain_rows_seen(model)
    masked = [layer for layer in model.layers if isinstance(layer, MaskedConv)]
    sizes = {"filters": masked[0].conv.filters, "embed": model.get_layer("embed").output_dim,
             "blocks": len(masked) - 3}  # mask A, one per block, two 1x1 at the end
    band_model = plain_pixelcnn(model.get_layer("head").filters, (None, width), **sizes)
    band_model.set_weights(model.get_weights())
    positions = tf.range(height)[:, None] * width + tf.range(width)[None, :]

    @tf.function
    def run(uniform):
        codes = tf.zeros((batch, height, width), tf.int32)
        for t in tf.range(height * width):
            i, j = t // width, t % width
            top = tf.maximum(0, i - seen)
            logits = band_model(codes[:, top:i + 1])[:, i - top, j]
            code = modules.sample_codes(logits, uniform[:, i, j], temperature)
            codes = tf.where((positions == t)[None], code[:, None, None], codes)
        return codes

    return lambda uniform: run(tf.convert_to_tensor(uniform, tf.float32))


def codebook_features(codebook, width, std):
    """Per-code features (num_codes, width) from the codebook's principal components, with standard deviation `std`.

    The rule of `modules.GatedPixelCNN.init_from_codebook`, which keeps it
    inside the method: the centred codebook projected on its first `width`
    principal components (zeros past code_dim), scaled to `std`.
    """
    codebook = np.asarray(codebook, np.float64)
    centred = codebook - codebook.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    out = np.zeros((len(codebook), width))
    used = min(width, components.shape[0])
    out[:, :used] = centred @ components[:used].T
    return out * (std / max(out.std(), 1e-12))


# The shared rule, from modules once it exposes it there (same signature), else this file's copy.
CODEBOOK_FEATURES = getattr(modules, "codebook_features", codebook_features)


def init_plain_from_codebook(model, codebook):
    """The gated prior's codebook start for the plain model: its input embedding and its output layer's per-code
    columns, each scaled to the magnitude of its own random start (as `GatedPixelCNN.init_from_codebook`)."""
    codebook = np.asarray(codebook)
    embed, kernel = model.get_layer("embed").embeddings, model.get_layer("head").kernel
    if codebook.ndim != 2 or codebook.shape[0] != embed.shape[0]:
        raise ValueError(f"codebook must be (num_codes={embed.shape[0]}, code_dim). Received: {codebook.shape}")
    embed.assign(CODEBOOK_FEATURES(codebook, embed.shape[1], float(np.std(embed.numpy()))).astype(embed.dtype))
    cols = CODEBOOK_FEATURES(codebook, kernel.shape[2], float(np.std(kernel.numpy())))
    kernel.assign(cols.T.reshape(kernel.shape).astype(kernel.dtype))


def code_bits(model, codes, batch=64):
    """Negative log-likelihood of every code, in bits: (N, H, W)."""
    bits = []
    for start in range(0, len(codes), batch):
        chunk = tf.constant(codes[start:start + batch].astype(np.int32))
        logits = model(chunk, training=False)
        bits.append(keras.losses.sparse_categorical_crossentropy(chunk, logits, from_logits=True).numpy())
    return np.concatenate(bits) / math.log(2.0)


def background_code(vqvae, image_size):
    """The code of an all-black patch (the most common code of a black image)."""
    codes = vqvae.encode(tf.zeros((1, image_size, image_size, 1))).numpy().ravel()
    return int(np.bincount(codes).argmax())


def train_for(model, codes, minutes, steps=None, batch=32, seed=0, log=print, name="", labels=None,
              drop_condition=0.1):
    """Trains on shuffled batches for `minutes` of step time, or for exactly `steps` steps.

    With `labels` (one class per grid), the model is fed `{"codes", "label"}`
    and, as `train.py` does, each label is replaced by "unknown" (-1) with
    probability `drop_condition`; the batches are the same with or without.
    """
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stream = dataset.index_stream(len(codes), batch, shuffle=True, seed=seed, repeat=True, drop_remainder=True)
    table = tf.constant(codes.astype(np.int32))
    label_table = None if labels is None else tf.constant(np.asarray(labels), tf.int32)

    def gather(step, indices):
        grids = tf.gather(table, indices)
        if label_table is None:
            return grids, grids
        keep = tf.random.stateless_uniform(tf.shape(indices), seed=tf.stack([tf.cast(seed, tf.int64), step]))
        label = tf.where(keep >= drop_condition, tf.gather(label_table, indices), -1)
        return {"codes": grids, "label": label}, grids

    batches = iter(stream.batch(batch).enumerate().map(gather))
    trained, done = 0.0, 0
    while (done < steps) if steps else (trained < minutes * 60):
        x, y = next(batches)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        trained += time.perf_counter() - start
        done += 1
    log(f"  {name}: {done} steps in {trained / 60:.1f} min")
    return done, trained


def run_codes(run):
    """The run's VQ-VAE, its config and its cached codes of the train and validate splits."""
    folder = runs.Run(run)
    vqvae = folder.load_vqvae()
    return vqvae, folder.config("vqvae"), folder.codes(vqvae, folder.splits(folder.source()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/latest", help="run folder with a trained VQ-VAE (default runs/latest)")
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-time budget per prior (default 5)")
    names = ["gated", "gated-nopos", "gated-random", "plain", "plain-random"]
    parser.add_argument("--models", nargs="+", choices=names, default=names,
                        help="priors to train (default all): gated (as train.py trains it: position embedding, "
                             "code embedding and output columns started from the codebook), gated-nopos (without "
                             "the position embedding), gated-random (random start), plain (keras.io, with the "
                             "same codebook start as gated), plain-random (keras.io, random start). Ratios: gated, "
                             "gated-nopos / plain; gated-random / plain-random")
    parser.add_argument("--steps", type=int, default=None,
                        help="train every prior for exactly this many steps instead of --minutes (a budget free "
                             "of timing noise, for ablations)")
    parser.add_argument("--size", choices=["default", "demo"], default="default",
                        help="gated prior size: default (train.py's: 64 filters, 8 layers, 128 skip channels) or "
                             "demo (the phantom quick start's: 32, 6, 64). The plain model gets twice the gated "
                             "filters (keras.io uses 128) and the number of blocks that matches the parameters")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    try:
        vqvae, vq_config, codes = run_codes(args.run)
    except runs.RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    grid, k = codes["train"].shape[1:], vqvae.num_codes
    size = SIZES[args.size]
    models = {}
    codebook = vqvae.quantizer.codebook.numpy()
    for name, grid_size, from_codebook in (("gated", grid, True), ("gated-nopos", None, True),
                                            ("gated-random", grid, False)):
        keras.utils.set_random_seed(0)
        models[name] = modules.GatedPixelCNN(num_codes=k, grid_size=grid_size, **size)
        models[name](tf.zeros((1, *grid), tf.int32))
        if from_codebook:
            models[name].init_from_codebook(codebook)
    target = models["gated"].count_params()
    plain = {"filters": 2 * size["filters"], "embed": size["filters"]}
    blocks = min(range(1, 40), key=lambda b: abs(plain_pixelcnn(k, grid, blocks=b, **plain).count_params() - target))
    for name, from_codebook in (("plain", True), ("plain-random", False)):
        keras.utils.set_random_seed(0)
        models[name] = plain_pixelcnn(k, grid, blocks=blocks, **plain)
        if from_codebook:
            init_plain_from_codebook(models[name], codebook)
    models = {name: models[name] for name in args.models}
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
    print(f"codes of {args.run} ({vq_config['source']} data): {len(codes['train'])} train / "
          f"{len(codes['validate'])} validate grids of {grid[0]}x{grid[1]}, K={k}; {args.size} size, "
          f"{budget} per prior")
    black = codes["validate"] == background_code(vqvae, vq_config["data"]["image_size"])
    print(f"background (the code of a black patch): {black.mean():.1%} of the validation codes")
    results = {}
    for name, model in models.items():
        keras.utils.set_random_seed(0)
        steps, seconds = train_for(model, codes["train"], args.minutes, args.steps, name=name)
        bits = code_bits(model, codes["validate"])
        results[name] = {"params": model.count_params(), "steps": steps, "train_seconds": round(seconds, 1),
                         "val_bits_per_code": float(bits.mean()),
                         "background_bits": float(bits[black].mean()) if black.any() else None,
                         "brain_bits": float(bits[~black].mean()) if (~black).any() else None}
    print(f"{'prior':12s} {'params':>10s} {'steps':>6s} {'val bits/code':>14s} {'background':>11s} {'brain':>7s}")
    for name, r in results.items():
        print(f"{name:12s} {r['params']:10,d} {r['steps']:6d} {r['val_bits_per_code']:14.3f} "
              f"{r['background_bits'] or float('nan'):11.3f} {r['brain_bits'] or float('nan'):7.3f}")
    summary = {**results, "minutes": None if args.steps else args.minutes, "steps": args.steps, "size": args.size,
               "run": args.run, "source": vq_config["source"]}
    # Like for like: each gated prior over the plain one from the same start.
    for name, base, key in (("gated", "plain", "ratio"), ("gated-nopos", "plain", "ratio_nopos"),
                            ("gated-random", "plain-random", "ratio_random")):
        if name in results and base in results:
            ratio = results[name]["val_bits_per_code"] / results[base]["val_bits_per_code"]
            summary[key] = ratio
            print(f"{name} / {base} = {ratio:.3f}")
    print(f"(a uniform prior would score {math.log2(k):.2f} bits per code)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
