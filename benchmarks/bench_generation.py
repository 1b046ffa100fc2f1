"""Generated slices, measured: every sample-quality metric of `metrics.py` on baselines the metrics must rank.

On one data set (the real slices in ../shared/data/alzheimer-mri-slices when
present, else --data, else the built-in phantoms), in this process:

  1. a VQ-VAE is trained for a fixed budget (or taken from --run);
  2. the evaluation network is trained on the training split (cached by the
     digest of its files, as `predict.py` does);
  3. two priors of the VQ-VAE's training codes are trained for the same
     budget, with the same batches and the same codebook start: the gated
     PixelCNN as train.py builds it (unconditional unless --condition label,
     so both priors model the same thing) and the plain PixelCNN of the keras.io example
     (`bench_prior.plain_pixelcnn`, matched in parameters);
  4. every row below is scored against N real held-out (test) slices with
     `metrics.sample_quality`, with equal counts N:

       real train        N real training slices: the floor two real sets score
       reconstructed     the VQ-VAE's reconstructions of those same N training
                         slices: the decoder's ceiling (a perfect prior scores
                         this; unpaired with the reference, like the floor)
       gated             N samples of our gated prior, decoded (with
                         --condition label, conditioned on the class folder,
                         drawn at the training split's class frequencies)
       plain             N samples of the plain PixelCNN, decoded
       per-position      N grids whose codes are drawn independently from
                         each position's code frequencies in training: the
                         trivial prior every metric must rank last of the
                         priors
       patch-shuffled    the training slices of row 1 with their 32x32
                         patches (at 256 px; scaled with the image) shuffled:
                         local texture intact, global layout broken

     Every set is scored as 8-bit images (`metrics.to_8bit`). Beside the
     metrics, each row's mean distance in the evaluation features from a slice
     to its nearest training slice (all of them), against the same for the
     VQ-VAE's reconstructions of the held-out reference: a prior that copies
     its training set sits closer than that.

    python -m benchmarks.bench_generation [--data PATH] [--samples 500] [--minutes M | --steps S] [--json]

Ends with one JSON object (with --json) holding each row's metrics.
"""

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks import bench_prior  # the plain PixelCNN and its codebook start, the prior training loop
import dataset
import metrics
import modules
import runs
import keras
import numpy as np
import tensorflow as tf

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alzheimer-mri-slices"
ROWS = ("real train", "reconstructed", "gated", "plain", "per-position", "patch-shuffled")


def train_vqvae(source, image_size, downsample, minutes, steps, seed=0, log=print):
    """A VQ-VAE trained for `steps` batches of 16 (or `minutes` of step time) on the training split.

    Trained for a number of steps, it is cached beside the evaluation network
    under a digest of the training files and the settings, so a later run (a
    prior change, another sampler) starts from the same VQ-VAE in seconds.
    """
    keras.utils.set_random_seed(seed)
    model = modules.VQVAE(downsample=downsample, seed=seed)
    model.build((None, image_size, image_size, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    cached = None
    if steps:
        key = metrics.files_digest(source.splits["train"].paths, f"v1 vqvae size={image_size} downsample="
                                                                 f"{downsample} steps={steps} seed={seed}")[:16]
        cached = dataset.default_cache_dir() / "bench_generation" / f"vqvae-{key}.weights.h5"
        if cached.is_file():
            try:
                with warnings.catch_warnings():  # its optimizer state is not needed: the VQ-VAE only encodes now
                    warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                    model.load_weights(cached)
                log(f"  VQ-VAE ({image_size} px, {steps} steps) from the cache: {cached}")
                return model, {"steps": steps, "minutes": None, "cached": str(cached)}
            except Exception as err:  # a damaged cache file is retrained, never trusted
                log(f"  the cached VQ-VAE {cached} is unreadable ({type(err).__name__}); training it again")
    batches = iter(dataset.make_dataset(source.splits["train"], image_size=image_size, batch_size=16, shuffle=True,
                                        seed=seed, repeat=True, drop_remainder=True))
    trained, done = 0.0, 0
    bar = keras.utils.Progbar(steps, unit_name="step")  # an open-ended bar when the budget is minutes
    while (done < steps) if steps else (trained < minutes * 60):
        images = next(batches)
        start = time.perf_counter()
        logs = model.train_on_batch(images, return_dict=True)
        trained += time.perf_counter() - start
        done += 1
        bar.update(done, [(name, float(np.ravel(logs[name])[0])) for name in ("loss", "ssim")])
    log(f"  VQ-VAE ({image_size} px, {image_size // downsample}x{image_size // downsample} codes): {done} steps in "
        f"{trained / 60:.1f} min")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.tmp-{os.getpid()}.weights.h5")
        model.save_weights(partial)
        os.replace(partial, cached)  # atomic: a killed run leaves no half-written cache
    return model, {"steps": done, "minutes": round(trained / 60, 2)}


def per_position_sampler(codes, seed=0):
    """Samples grids whose codes are independent, each from its position's code frequencies in `codes`."""
    n, h, w = codes.shape
    flat = codes.reshape(n, h * w)
    rng = np.random.default_rng(seed)

    def sample(count):
        picks = rng.integers(0, n, (count, h * w))  # a random training grid's code, position by position
        return flat[picks, np.arange(h * w)[None, :]].reshape(count, h, w).astype(np.int32)

    return sample


def train_features(network, split, size, fit):
    """Evaluation features (float64) of every image of `split`, as 8-bit images, streamed in batches."""
    return np.concatenate([metrics.features(network, metrics.to_8bit(b.numpy()))
                           for b in dataset.make_dataset(split, image_size=size, batch_size=64, fit=fit)])


def decode(vqvae, codes, batch=64):
    return np.concatenate([vqvae.decode(tf.constant(codes[i:i + batch], tf.int32)).numpy()
                           for i in range(0, len(codes), batch)]).clip(0.0, 1.0)


def sample_prior(sampler, count, grid, batch, seed, labels=None):
    """`count` grids from `sampler`, `batch` at a time, from seeded uniforms (and, if given, one label per grid)."""
    out = []
    bar = keras.utils.Progbar(count, unit_name="sample")
    if labels is not None:  # padded to whole batches
        labels = np.resize(np.asarray(labels, np.int32), -(-count // batch) * batch)
    for start in range(0, count, batch):
        uniform = tf.random.stateless_uniform((batch, *grid), seed=[seed, start])
        condition = {} if labels is None else {"label": labels[start:start + batch]}
        out.append(sampler(uniform, **condition).numpy())
        bar.update(min(start + batch, count))
    return np.concatenate(out)[:count]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="folder of real slices (default: ../shared/data/alzheimer-mri-slices if present, "
                             "else the built-in phantoms)")
    parser.add_argument("--run", default=None,
                        help="take the VQ-VAE (and its data, size and split) from this run folder instead of "
                             "training one")
    parser.add_argument("--image-size", type=int, default=128, help="image side the VQ-VAE is trained at")
    parser.add_argument("--downsample", type=int, default=4, help="VQ-VAE downsampling: 4 gives a 32x32 grid at "
                                                                   "128 px")
    parser.add_argument("--vqvae-steps", type=int, default=1200, help="VQ-VAE training steps (batch 16)")
    parser.add_argument("--minutes", type=float, default=None, help="training wall-time budget per prior")
    parser.add_argument("--steps", type=int, default=1000,
                        help="training steps per prior (batch 32), when --minutes is not given")
    parser.add_argument("--size", choices=["default", "demo"], default="demo",
                        help="gated prior size: train.py's phantom-demo size (345 k parameters) or its real-data "
                             "size (1.66 M, about 5x slower per step on a CPU)")
    parser.add_argument("--condition", choices=["none", "label"], default="none",
                        help="gated prior only: condition it on the class folder, as train.py's --condition label "
                             "does (10%% of training labels dropped to 'unknown'); its samples are drawn at the "
                             "training split's class frequencies")
    parser.add_argument("--samples", type=int, default=500,
                        help="slices per row (and reference slices); at most the test split")
    parser.add_argument("--eval-steps", type=int, default=metrics.EVAL_STEPS,
                        help="training steps of the evaluation network")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help="comma-separated rows to score (the plain prior is trained and sampled only when its "
                             "row is asked for); a prior experiment needs 'real train,reconstructed,gated'")
    parser.add_argument("--temperatures", default="1",
                        help="comma-separated softmax temperatures of the gated prior's draws: one gated row per "
                             "value, from the same prior and the same uniforms (1 is always drawn, as the row 'gated')")
    parser.add_argument("--figure", default=None,
                        help="write 16 gated samples beside 8 real test slices here (e.g. samples/generated_real.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, sampling and subsets")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)
    asked = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(asked) - set(ROWS))
    if unknown or "gated" not in asked:
        parser.error(f"--rows takes a comma-separated subset of {', '.join(ROWS)} that holds 'gated'. "
                     f"Received: --rows {args.rows}")
    try:
        temperatures = sorted({1.0} | {float(t) for t in args.temperatures.split(",")}, reverse=True)
    except ValueError:
        temperatures = []
    if not temperatures or min(temperatures) <= 0:
        parser.error(f"--temperatures takes comma-separated positive numbers. Received: --temperatures "
                     f"{args.temperatures}")
    start_all = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    log = print

    if args.run:
        run = runs.Run(args.run)
        vqvae, settings = run.load_vqvae(), run.settings("vqvae")
        source, size, fit = run.source(), settings.data.image_size, settings.data.fit
        vq_info = {"run": args.run, "epochs": settings.vqvae_train.epochs}
    else:
        data = args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None)
        source = dataset.load_source(data, seed=args.seed)
        size, fit = args.image_size, "pad"
        vqvae, vq_info = train_vqvae(source, size, args.downsample, None, args.vqvae_steps, args.seed, log)
    name = "phantoms" if source.kind == "phantoms" else str(source.root)
    n = min(args.samples, len(source.splits["test"]), len(source.splits["train"]))
    log(f"data: {name} ({source.counts()}, split by {source.split_by()}); {size} px; {n} slices per row")

    network = metrics.load_evaluation_network(source.splits["train"], size, fit, dataset.default_cache_dir(),
                                              steps=args.eval_steps, seed=args.seed, log=log)
    reference = runs.load_images(source.splits["test"], n, size, fit, args.seed)
    real_train = runs.load_images(source.splits["train"], n, size, fit, args.seed + 1)
    reconstruct = tf.function(vqvae.reconstruct)
    recon = lambda x: np.concatenate([reconstruct(x[i:i + 64]).numpy() for i in range(0, len(x), 64)])  # noqa: E731
    reconstructed_reference = metrics.to_8bit(recon(reference))

    codes = runs.encode_split(vqvae, source.splits["train"], size, fit)
    grid, k = codes.shape[1:], vqvae.num_codes
    codebook = keras.ops.convert_to_numpy(vqvae.quantizer.codes())
    sizes = bench_prior.SIZES[args.size]
    train_labels, num_classes = None, 0
    if args.condition == "label":
        train_labels = source.splits["train"].labels
        num_classes = int(train_labels.max()) + 1
        if num_classes < 2 or (train_labels < 0).any():
            sys.exit(f"--condition label needs every training slice in a class sub-folder; {name} has "
                     f"{num_classes} classes. Use --condition none.")
    keras.utils.set_random_seed(args.seed)
    gated = modules.GatedPixelCNN(num_codes=k, grid_size=grid, num_classes=num_classes, **sizes)
    gated(tf.zeros((1, *grid), tf.int32))
    gated.init_from_codebook(codebook)
    priors = {"gated": gated}
    if "plain" in asked:  # matched in parameters to the gated prior
        plain_kw = {"filters": 2 * sizes["filters"], "embed": sizes["filters"]}
        blocks = min(range(1, 40), key=lambda b: abs(bench_prior.plain_pixelcnn(k, grid, blocks=b, **plain_kw)
                                                     .count_params() - gated.count_params()))
        keras.utils.set_random_seed(args.seed)
        priors["plain"] = bench_prior.plain_pixelcnn(k, grid, blocks=blocks, **plain_kw)
        bench_prior.init_plain_from_codebook(priors["plain"], codebook)
    budget = f"{args.minutes} min" if args.minutes else f"{args.steps} steps"
    log(f"priors: {len(codes)} training grids of {grid[0]}x{grid[1]}, K={k}; {budget} each")
    prior_info = {}
    for label, model in priors.items():
        keras.utils.set_random_seed(args.seed)
        steps, seconds = bench_prior.train_for(model, codes, args.minutes, None if args.minutes else args.steps,
                                               seed=args.seed, name=label,
                                               labels=train_labels if label == "gated" else None)
        prior_info[label] = {"params": model.count_params(), "steps": steps, "train_seconds": round(seconds, 1)}

    # Every prior reads the same uniforms (paired sampling): their rows differ by the prior alone.
    batch = min(n, 100)
    sample_labels = None  # class-conditioned: labels drawn at the training split's class frequencies
    if train_labels is not None:
        sample_labels = np.random.default_rng(args.seed).choice(train_labels, n)
        prior_info["gated"]["sample_labels"] = np.bincount(sample_labels, minlength=num_classes).tolist()
    sampled = {}
    for t in temperatures:
        row = "gated" if t == 1 else f"gated T={t:g}"
        t0 = time.perf_counter()
        sampled[row] = sample_prior(modules.make_fast_sampler(gated, batch, *grid, temperature=t), n, grid, batch,
                                    args.seed, sample_labels)
        prior_info[row] = {**prior_info["gated"], "temperature": t,
                           "sample_seconds": round(time.perf_counter() - t0, 1),
                           "sampler": "cached, XLA (with tracing)"}
    if "plain" in asked:
        t0 = time.perf_counter()
        plain_sampler = bench_prior.make_plain_sampler(priors["plain"], batch, *grid)  # the naive sampler's draws, on bands
        sampled["plain"] = sample_prior(plain_sampler, n, grid, batch, args.seed)
        prior_info["plain"].update(sample_seconds=round(time.perf_counter() - t0, 1),
                                   sampler="naive: a full pass (over the rows it sees) per code, with tracing")
    if "per-position" in asked:
        sampled["per-position"] = per_position_sampler(codes, args.seed)(n)

    images = {"real train": real_train, "reconstructed": recon(real_train).clip(0.0, 1.0),
              **{row: decode(vqvae, c) for row, c in sampled.items()},
              "patch-shuffled": metrics.shuffle_patches(real_train, max(4, size // 8), args.seed)}
    order = [row for row in ROWS if row in asked]
    order[order.index("gated") + 1:order.index("gated") + 1] = [r for r in sampled if r.startswith("gated T=")]
    images = {row: metrics.to_8bit(images[row]) for row in order}  # as metrics.sample_quality scores them
    log("memorisation: evaluation features of every training slice ...")
    known = train_features(network, source.splits["train"], size, fit)
    nearest = lambda x: float(metrics.nearest_distances(metrics.features(network, x), known).mean())  # noqa: E731
    nearest_reference = nearest(reconstructed_reference)
    rows = {}
    for row in order:
        t0 = time.perf_counter()
        log(f"scoring {row} ...")
        rows[row] = metrics.sample_quality(images[row], reference, real_train, network,
                                           reconstructed_reference=reconstructed_reference, seed=args.seed,
                                           log=log)
        rows[row]["nearest_train_distance"] = nearest(images[row])
        rows[row]["seconds"] = round(time.perf_counter() - t0, 1)
        log("  " + ", ".join(f"{key} {value:.4g}" for key, value in rows[row].items()
                             if isinstance(value, float)))

    vq_trained = f"{vq_info['steps']} steps" if "steps" in vq_info else f"{vq_info['epochs']} epochs"
    if args.figure:
        real8 = reference[np.linspace(0, n - 1, 8).round().astype(int)]
        g = rows["gated"]
        dataset.save_grid(np.concatenate([images["gated"][:16], real8]), args.figure, columns=8,
                          titles=[f"sample {i}" for i in range(16)] + ["real test"] * 8,
                          suptitle=f"Rows 1-2: gated PixelCNN samples; row 3: real test slices. {name.split('/')[-1]}, "
                                   f"{size} px, {grid[0]}x{grid[1]} codes, VQ-VAE {vq_trained}, "
                                   f"prior {prior_info['gated']['steps']} steps{', class-conditioned' if num_classes else ''}.\nFD {g['fd']:.2f} (real/real "
                                   f"{g['fd_floor']:.2f}), precision {g['precision']:.2f}, recall {g['recall']:.2f}, "
                                   f"MS-SSIM {g['msssim_diversity']:.3f} (real {g['msssim_diversity_real']:.3f}), "
                                   f"C2ST vs reconstructions {g['c2st_recon_accuracy']:.2f}, over {n} slices")

    columns = {"fd": "FD", "kid": "KID", "precision": "precision", "recall": "recall", "density": "density",
               "coverage": "coverage", "msssim_diversity": "MS-SSIM", "texture_fd": "texture FD",
               "c2st_accuracy": "C2ST", "c2st_recon_accuracy": "C2ST recon", "tissue_worst_ratio": "tissue x",
               "nearest_train_distance": "NN train"}
    print(f"{'row':15s} " + " ".join(f"{c:>10s}" for c in columns.values()))
    for row, r in rows.items():
        print(f"{row:15s} " + " ".join(f"{r[c]:10.4f}" for c in columns))
    print(f"real MS-SSIM diversity {rows['gated']['msssim_diversity_real']:.4f}; texture FD floor "
          f"{rows['gated']['texture_fd_floor']:.3f}; FD floor {rows['gated']['fd_floor']:.3f}; NN train of the "
          f"reconstructed reference {nearest_reference:.3f} (closer is copying); split by {source.split_by()}")
    summary = {"data": name, "image_size": size, "grid": list(grid), "n": n, "vqvae": vq_info, "priors": prior_info,
               "budget": budget, "size": args.size, "condition": args.condition, "rows": rows, "cpu_count": os.cpu_count(),
               "split_by": source.split_by(), "nearest_train_distance_reference": nearest_reference,
               "fd_ratio_gated_floor": rows["gated"]["fd"] / rows["gated"]["fd_floor"],
               "seconds": round(time.perf_counter() - start_all, 1)}
    if "plain" in rows:
        summary["fd_ratio_gated_plain"] = rows["gated"]["fd"] / rows["plain"]["fd"]
        print(f"gated / plain FD {summary['fd_ratio_gated_plain']:.3f}")
    print(f"gated / floor FD {summary['fd_ratio_gated_floor']:.2f}; {summary['seconds'] / 60:.1f} min in all")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
