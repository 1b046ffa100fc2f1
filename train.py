"""Train the VQ-VAE on brain MRI slices, or the gated PixelCNN prior over its codes.

    python train.py --model vqvae                      # built-in phantoms: the `phantoms` preset
    python train.py --model vqvae --data PATH          # real slices: the `oasis-256` preset
    python train.py --model vqvae --data PATH --preset oasis-128 --set num_codes=256
    python train.py --model pixelcnn                   # the prior, in the VQ-VAE's run folder

A run starts from a named preset (`config.PRESETS`), changed field by field
by the flags and `--set key=value`; the whole resolved config is printed and
saved in the run folder, and a resumed run reads exactly that back.

Everything a run writes goes to its run folder (default runs/vqvae-<time>,
linked as runs/latest), which `runs.Run` owns: the config next to the
weights, best and last checkpoints (.keras, written atomically), a backup
that an interrupted run resumes from batch-exactly, CSV and TensorBoard
logs, a figure per epoch (reconstructions, or new samples for the prior) and
the training curves. A new VQ-VAE retires the prior of the old one. Under a
multi-worker strategy only the chief writes there.

TensorFlow is imported only once the flags are parsed, so `--help` is instant.
"""

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import config

RUNS = Path("runs")


class TrainingError(RuntimeError):
    """A run that cannot start or go on, said in one line with the fix."""


def save_curves(history_csv, path, keys=("loss", "ssim", "perplexity", "codes_used")):
    """Training and validation curves from the CSV log, one panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import dataset

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], style, label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return dataset.save_figure(fig, path, dpi=100)


# ---------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------


def new_run_dir(kind):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = RUNS / f"{kind}-{stamp}"
    k = 1
    while run.exists():
        k += 1
        run = RUNS / f"{kind}-{stamp}-{k}"
    return run


def link_latest(run):
    """Points runs/latest at `run` (a relative symlink, replaced atomically)."""
    latest = RUNS / "latest"
    if Path(run).resolve().parent != RUNS.resolve():
        return
    tmp = RUNS / f".latest-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(Path(run).name, tmp)
        os.replace(tmp, latest)
    except OSError:  # no symlinks here (some file systems): leave it
        pass


def history_rows(path, monitor="val_ssim"):
    """Rows of the CSV log with a finite `monitor` value (none if there is no log)."""
    if not Path(path).is_file():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if math.isfinite(float(r.get(monitor) or "nan"))]


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def fit_in_run(model, kind, run, make_train, val_ds, *, steps, epochs, resuming, monitor, mode, grid,
               learning_rate, patience=0, backup_every=50, verbose="auto", chief=True):
    """Fits `model` with the run folder's callbacks; returns the CSV rows with a finite `monitor`.

    `make_train(first_epoch, skip)` builds the training stream from epoch
    `first_epoch` on, its first `skip` batches left out. A resumed run loads
    its backup, trains the rest of the interrupted epoch, then the epochs
    after it: the same batches in the same order as an uninterrupted run,
    which it therefore equals bit for bit on CPU (only that epoch's logged
    training means cover fewer batches).

    Callbacks: NaN guard, best/last checkpoints written atomically, early
    stopping after `patience` epochs without a better `monitor` (0: never;
    its count carries over a resume), CSV and TensorBoard logs, `grid` (a
    per-epoch figure, or None) and, last, the backup. A run that stopped
    early ends with the best checkpoint's weights in `model`. Ends with the
    training curves. A non-chief worker keeps only
    what it needs to resume and to summarise (no TensorBoard, figures or
    progress bar).
    """
    import keras

    import runs

    history_csv = run / f"{kind}_history.csv"
    backup = run / f"{kind}_backup"
    checkpoint = runs.AtomicCheckpoint(run / f"{kind}_last.keras", run / f"{kind}_best.keras", monitor=monitor,
                                       mode=mode)
    earlier = [float(r[monitor]) for r in history_rows(history_csv, monitor)] if resuming else []
    if earlier:  # a resumed run only replaces the best checkpoint with a better one
        checkpoint.best_value = max(earlier) if mode == "max" else min(earlier)
    epoch, done = runs.Backup.resume_position(model, backup, steps) if resuming else (0, 0)
    nan_guard = runs.StopOnNaN()
    callbacks = [nan_guard, checkpoint, keras.callbacks.CSVLogger(history_csv, append=True)]
    stale = runs.StopWhenStale(monitor, mode, patience, earlier) if patience else None
    if stale is not None:
        callbacks.append(stale)
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(run / "logs" / kind, write_graph=False, profile_batch=0))
    if grid is not None:
        callbacks.append(grid)
    callbacks.append(runs.Backup(backup, every=max(1, min(steps, backup_every)), steps=steps))
    verbose = verbose if chief else 0
    if done:  # the rest of the interrupted epoch
        if chief:
            print(f"resuming epoch {epoch + 1} at step {done + 1} of {steps}")
        model.fit(make_train(epoch, done), epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps - done,
                  validation_data=val_ds, callbacks=[*callbacks, runs.StopAfterEpoch(epoch)], verbose=verbose,
                  shuffle=False)
        epoch += 1
    if epoch < epochs and nan_guard.where is None and not (stale and stale.stale):
        model.fit(make_train(epoch, 0), epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps,
                  validation_data=val_ds, callbacks=callbacks, verbose=verbose, shuffle=False)
    if nan_guard.where is not None:
        epoch, batch = nan_guard.where
        last = run / f"{kind}_last.keras"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no epoch had finished"
        raise TrainingError(f"the loss became NaN at epoch {epoch}, step {batch}; training stopped and {kept}. "
                            f"Lower --lr (now {learning_rate:g}) and run again with a new --run.")
    if stale is not None and stale.stale and checkpoint.best.is_file():
        model.load_weights(checkpoint.best)
        if chief:
            since = runs.epochs_since_best(stale.values, mode)
            print(f"{kind}: stopped early, {since} epochs without a better {monitor}; restored the best checkpoint "
                  f"(epoch {len(stale.values) - since}, {monitor} {(max if mode == 'max' else min)(stale.values):.4f})")
    shutil.rmtree(backup, ignore_errors=True)  # finished: nothing to resume
    keys = (("loss", "ssim", "ssim_brain", "perplexity", "codes_used") if kind == "vqvae"
            else ("loss", "bits_per_code"))
    if chief:
        save_curves(history_csv, run / f"{kind}_curves.png", keys)
    rows = history_rows(history_csv, monitor)
    if not rows:
        raise TrainingError(f"no epoch finished with a finite {monitor}; see {history_csv}.")
    return rows


def learning_rate(train_config, total_steps):
    """Adam's learning rate over `total_steps` for a `config.TrainConfig`.

    "constant": its `learning_rate` throughout; "cosine": a linear warm-up
    from 0 over `warmup_fraction` of the steps, then a cosine decay to 0 by
    the last step. The cosine is a function of the optimizer's own step
    counter, so a resumed run continues it exactly. Runs too short for a
    whole warm-up step start at the peak (a warm-up step runs at rate 0).
    """
    import keras

    peak = train_config.learning_rate
    if train_config.schedule == "constant":
        return peak
    warmup = round(total_steps * train_config.warmup_fraction)
    if warmup < 1:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(1, total_steps), alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, total_steps - warmup), alpha=0.0,
                                                  warmup_target=peak, warmup_steps=warmup)


def jit_flag(jit_compile):
    """`jit_compile` for `Model.compile`: the flag, or Keras's own choice ("auto") when it is not given."""
    return "auto" if jit_compile is None else jit_compile


def default_options():
    """The operational options of a run (what `--help` lists under "running"), with their defaults."""
    return argparse.Namespace(run=None, overwrite=False, verbose="auto", backup_every=50, strategy="auto",
                              cpu_replicas=0, mixed_precision=False, jit_compile=None)


# ---------------------------------------------------------------------------
# VQ-VAE training
# ---------------------------------------------------------------------------


def vqvae_record(cfg, source, counts):
    """What `vqvae_config.json` holds: the resolved config (versioned), the data's kind and the split sizes."""
    return {"model": "vqvae", **config.to_record(cfg), "source": source.kind, "counts": counts}


def train_vqvae(cfg, options=None, log=print):
    """Trains a VQ-VAE as `cfg` (a `config.Config`) says; returns the summary dict.

    Args:
        cfg: the config to train with; a run folder that holds an interrupted
            VQ-VAE resumes with its own saved config instead.
        options: how to run it (`default_options()`: run folder, devices,
            progress output, backups).
        log: where progress lines go.
    """
    import keras

    import dataset
    import devices
    import modules
    import runs

    options = options or default_options()
    start = time.perf_counter()
    folder = options.run or new_run_dir("vqvae")
    existing = runs.Run(folder)
    if existing.interrupted("vqvae") and not options.overwrite:  # its batch is the one to place
        cfg = existing.settings("vqvae")
    t = cfg.vqvae_train
    strategy, chief, task_id, policy = devices.setup(options.strategy, options.cpu_replicas, t.batch_size,
                                                     bool(options.run), options.mixed_precision)
    run = runs.Run(devices.worker_folder(folder, chief, task_id))
    resuming = run.prepare("vqvae", options.overwrite, log=log)
    if resuming:  # the saved config wins over the flags, data and split included
        cfg = run.settings("vqvae")
        log(f"resuming the interrupted run in {run.path} (its saved config wins over the flags)")
    d, t = cfg.data, cfg.vqvae_train
    source = dataset.load_source(d.data, seed=d.split_seed, on_bad="skip" if d.skip_bad else "error",
                                 slice_axis=d.slice_axis, slices=d.slices)
    for note in source.notes:
        log(f"note: {note}")
    devices.configure(t.seed, options.jit_compile)
    train = runs.limit_split(source.splits["train"], d.limit, d.split_seed)
    val = runs.limit_split(source.splits["validate"], d.limit, d.split_seed)
    if len(train) < t.batch_size:
        raise TrainingError(f"the train split has {len(train)} images, fewer than --batch-size {t.batch_size}. "
                            "Lower --batch-size or raise --limit.")
    if not resuming:
        cfg = config.replace(cfg, "data", data=None if source.kind == "phantoms" else str(source.root))
        run.save_config("vqvae", vqvae_record(cfg, source, {"train": len(train), "validate": len(val),
                                                             "test": len(source.splits["test"])}))
    steps = len(train) // t.batch_size
    size, crop = d.image_size, t.crop

    with strategy.scope(), devices.dtype_policy(policy):
        model = modules.VQVAE(**vars(cfg.vqvae), seed=t.seed)
        model.build((None, size, size, 1))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate(t, steps * t.epochs)),
                      jit_compile=jit_flag(options.jit_compile))
    log(devices.describe_devices(strategy, policy, model.jit_compile))
    log(config.describe(cfg, "vqvae"))

    def make_train(first_epoch, skip):
        return devices.distribute(strategy, lambda batch, context: dataset.make_dataset(
            train, image_size=size, batch_size=batch, shuffle=True, seed=t.seed,
            first_epoch=first_epoch, repeat=True, fit=d.fit, drop_remainder=True, input_context=context,
            crop=crop or None, crop_step=cfg.vqvae.downsample).skip(skip), t.batch_size)

    val_ds = dataset.make_dataset(val, image_size=size, batch_size=t.batch_size, fit=d.fit)
    grid_images = next(iter(dataset.make_dataset(val, image_size=size, batch_size=8, fit=d.fit))).numpy()

    crops = f" (trained on random {crop}x{crop} crops)" if crop else ""
    log(f"vqvae: {source.kind} data, train {len(train)} / validate {len(val)} images at {size} px{crops}, "
        f"{cfg.grid}x{cfg.grid} codes of K={cfg.vqvae.num_codes}, {model.count_params():,} parameters, "
        f"{t.epochs} epochs of {steps} steps, Adam {t.learning_rate:g} ({t.schedule}), run folder {run.path}")
    rows = fit_in_run(model, "vqvae", run.path, make_train, val_ds, steps=steps, epochs=t.epochs,
                      resuming=resuming, monitor="val_ssim", mode="max",
                      grid=runs.ReconstructionGrid(grid_images, run.path) if chief else None,
                      learning_rate=t.learning_rate, patience=t.patience, backup_every=options.backup_every,
                      verbose=options.verbose, chief=chief)
    best_row = max(rows, key=lambda r: float(r["val_ssim"]))
    summary = {
        "model": "vqvae", "run": str(run.path), "preset": cfg.preset, "source": source.kind,
        "epochs": int(rows[-1]["epoch"]) + 1, "stopped_early": int(rows[-1]["epoch"]) + 1 < t.epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "val_ssim": float(best_row["val_ssim"]), "val_ssim_brain": float(best_row["val_ssim_brain"]),
        "val_psnr": float(best_row["val_psnr"]), "val_psnr_brain": float(best_row["val_psnr_brain"]),
        "best_epoch": int(best_row["epoch"]) + 1,
        "perplexity": float(best_row["val_perplexity"]), "codes_used": float(best_row["val_codes_used"]),
        "checkpoint": str(run.checkpoint("vqvae")), "image_size": size, "crop": crop, "schedule": t.schedule,
        "train_images": len(train), "validate_images": len(val), "split_seed": d.split_seed,
        "replicas": strategy.num_replicas_in_sync, "precision": policy, "jit_compile": bool(model.jit_compile),
    }
    runs.write_json(run.file("vqvae", "summary.json"), summary)
    link_latest(run.path)
    return summary


# ---------------------------------------------------------------------------
# PixelCNN prior training
# ---------------------------------------------------------------------------


def unigram_bits(train_codes, val_codes, num_codes):
    """Bits per validation code of the context-free baseline: each code drawn from the training codes'
    frequencies (add-one smoothed). A prior that has learnt anything from context scores below it."""
    counts = np.bincount(train_codes.reshape(-1).astype(np.int64), minlength=num_codes) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[val_codes.reshape(-1).astype(np.int64)]))


def conditioning(mode, source, splits):
    """Slice and class counts to condition on, from `prior.condition` and what the data carry."""
    has_slices = all((s.slices >= 0).any() for s in splits.values())
    num_slices = int(max(s.slices.max() for s in splits.values())) + 1 if has_slices else 0
    num_classes = len(source.class_names)
    use_slice = mode in ("slice", "both") or (mode == "auto" and has_slices)
    use_label = mode in ("label", "both") or (mode == "auto" and num_classes > 0)
    if use_slice and not has_slices:
        raise TrainingError("prior.condition slice needs slice indices in the file names (OASIS case_X_slice_Y); "
                            "these files carry none. Pass --set prior.condition=none (or label).")
    if use_label and not num_classes:
        raise TrainingError("prior.condition label needs class sub-folders; this data has none. Pass --set "
                            "prior.condition=none.")
    return (num_slices if use_slice else 0), (num_classes if use_label else 0)


def prior_config(run, changes=(), flags=None):
    """The config a prior trains with in `run`: the VQ-VAE's saved one, its prior sections changed.

    Args:
        run: the `runs.Run` holding the trained VQ-VAE.
        changes: `--set key=value` items; only `prior.*` and `prior_train.*`
            keys (the data and the VQ-VAE are trained already).
        flags: `prior_train` fields the everyday flags set (epochs, ...).
    """
    cfg = run.settings("vqvae")
    for item in changes:
        section, _ = config.resolve_key(item.partition("=")[0].strip(), model="pixelcnn")
        if section not in ("prior", "prior_train"):
            raise TrainingError(f"--set {item}: the VQ-VAE in {run.path} is trained already; with --model pixelcnn "
                                "only prior.* and prior_train.* keys change anything.")
    cfg = config.override(cfg, changes, model="pixelcnn")
    if flags:
        cfg = config.replace(cfg, "prior_train", **flags)
    return config.validate(cfg)


def train_pixelcnn(run_path=None, changes=(), flags=None, options=None, log=print):
    """Trains the gated PixelCNN prior over the codes of the run's VQ-VAE; returns the summary dict.

    Args:
        run_path: the VQ-VAE's run folder (default runs/latest).
        changes: `--set` items for the prior (see `prior_config`).
        flags: `prior_train` fields set by the everyday flags.
        options: how to run it (`default_options()`).
        log: where progress lines go.
    """
    import keras
    import tensorflow as tf

    import dataset
    import devices
    import modules
    import runs

    options = options or default_options()
    start = time.perf_counter()
    vq_run = runs.Run(run_path or RUNS / "latest")
    vqvae = vq_run.load_vqvae()
    interrupted = vq_run.interrupted("pixelcnn") and not options.overwrite
    cfg = vq_run.settings("pixelcnn") if interrupted else prior_config(vq_run, changes, flags)
    t = cfg.prior_train
    strategy, chief, task_id, policy = devices.setup(options.strategy, options.cpu_replicas, t.batch_size,
                                                     bool(run_path), options.mixed_precision)
    run = runs.Run(devices.worker_folder(vq_run.path, chief, task_id))
    resuming = run.prepare("pixelcnn", options.overwrite, log=log)
    if resuming:  # the saved config wins over the flags
        cfg = run.settings("pixelcnn")
        t = cfg.prior_train
        log(f"resuming the interrupted prior in {run.path} (its saved config wins over the flags)")
    source = vq_run.source()
    devices.configure(t.seed, options.jit_compile)
    splits = vq_run.splits(source)
    if len(splits["train"]) < t.batch_size:
        raise TrainingError(f"the train split has {len(splits['train'])} images, fewer than --batch-size "
                            f"{t.batch_size}. Lower --batch-size or raise --limit.")
    codes = vq_run.codes(vqvae, splits, log=log, cache=run.path / "codes_cache.npz")
    grid_shape = tuple(codes["train"].shape[1:])
    if not resuming:
        num_slices, num_classes = conditioning(cfg.prior.condition, source, splits)
        p = cfg.prior
        hyper = {"num_codes": vqvae.num_codes, "filters": p.filters, "layers": p.layers,
                 "kernel_size": p.kernel_size, "skip_filters": p.skip_filters, "num_slices": num_slices,
                 "num_classes": num_classes, "grid_size": list(grid_shape) if p.position else None,
                 "dropout": p.dropout}
        run.save_config("pixelcnn", {
            "model": "pixelcnn", **config.to_record(cfg), "pixelcnn": hyper, "grid": list(grid_shape),
            "class_names": source.class_names, "counts": {name: len(c) for name, c in codes.items()},
            "vqvae_digest": vq_run.vqvae_digest()})
    elif run.config("pixelcnn").get("vqvae_digest") != vq_run.vqvae_digest():
        raise TrainingError(f"the interrupted prior in {run.path} was trained on another VQ-VAE than the one there "
                            "now. Pass --overwrite to train a new prior.")
    hyper = run.config("pixelcnn")["pixelcnn"]
    steps = len(codes["train"]) // t.batch_size

    with strategy.scope(), devices.dtype_policy(policy):
        prior = modules.GatedPixelCNN(**hyper)
        prior({"codes": tf.zeros((1, *grid_shape), tf.int32), "slice": tf.zeros((1,), tf.int32),
               "label": tf.zeros((1,), tf.int32)})
        if not resuming:  # a resumed run restores its own weights
            prior.init_from_codebook(keras.ops.convert_to_numpy(vqvae.quantizer.codes()))
        prior.compile(optimizer=keras.optimizers.Adam(learning_rate(t, steps * t.epochs)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[modules.BitsPerCode()], jit_compile=jit_flag(options.jit_compile))
    log(devices.describe_devices(strategy, policy, prior.jit_compile))
    log(config.describe(cfg, "pixelcnn"))

    def make_train(first_epoch, skip):
        return dataset.code_dataset(codes["train"], splits["train"], t.batch_size, shuffle=True, seed=t.seed,
                                    first_epoch=first_epoch, skip=skip, repeat=True,
                                    drop_condition=0.1 if prior.conditional else 0.0)

    val_ds = dataset.code_dataset(codes["validate"], splits["validate"], t.batch_size, shuffle=False)
    slices = np.linspace(0, hyper["num_slices"] - 1, 8).round().astype(np.int32) if hyper["num_slices"] else None
    grid = runs.SampleGrid(vqvae, grid_shape, run.path, slices=slices, seed=t.seed) if chief else None
    cond = [f"{n} {what}" for n, what in ((hyper["num_slices"], "slice positions"),
                                          (hyper["num_classes"], "classes")) if n]
    cond = ", ".join(cond + ["grid position"] * bool(hyper.get("grid_size"))) or "nothing"
    log(f"pixelcnn: {source.kind} data, train {len(codes['train'])} / validate {len(codes['validate'])} code grids "
        f"of {grid_shape[0]}x{grid_shape[1]} (K={hyper['num_codes']}), conditioned on {cond}, "
        f"{prior.count_params():,} parameters, {t.epochs} epochs of {steps} steps, Adam {t.learning_rate:g} "
        f"({t.schedule}), run folder {run.path}")
    rows = fit_in_run(prior, "pixelcnn", run.path, make_train, val_ds, steps=steps, epochs=t.epochs,
                      resuming=resuming, monitor="val_bits_per_code", mode="min", grid=grid,
                      learning_rate=t.learning_rate, patience=t.patience, backup_every=options.backup_every,
                      verbose=options.verbose, chief=chief)
    best_row = min(rows, key=lambda r: float(r["val_bits_per_code"]))
    summary = {
        "model": "pixelcnn", "run": str(run.path), "preset": cfg.preset, "source": source.kind,
        "epochs": int(rows[-1]["epoch"]) + 1, "stopped_early": int(rows[-1]["epoch"]) + 1 < t.epochs,
        "seconds": round(time.perf_counter() - start, 1),
        "val_bits_per_code": float(best_row["val_bits_per_code"]), "best_epoch": int(best_row["epoch"]) + 1,
        "uniform_bits_per_code": math.log2(hyper["num_codes"]),
        "unigram_bits_per_code": unigram_bits(codes["train"], codes["validate"], hyper["num_codes"]),
        "checkpoint": str(run.checkpoint("pixelcnn")), "grid": list(grid_shape), "schedule": t.schedule,
        "num_slices": hyper["num_slices"], "num_classes": hyper["num_classes"],
        "train_grids": len(codes["train"]), "validate_grids": len(codes["validate"]),
        "replicas": strategy.num_replicas_in_sync, "precision": policy, "jit_compile": bool(prior.jit_compile),
    }
    runs.write_json(run.file("pixelcnn", "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the VQ-VAE (--model vqvae) or the gated PixelCNN prior over its codes (--model "
                    "pixelcnn, in the VQ-VAE's run folder). A run starts from a named preset, changed by the "
                    "flags below and --set key=value; the resolved config is printed and saved in the run. "
                    "Every key and preset: docs/cli.md.")
    parser.add_argument("--model", choices=["vqvae", "pixelcnn"], default="vqvae", help="what to train (default: "
                        "vqvae)")
    parser.add_argument("--preset", choices=list(config.PRESETS), default=None,
                        help="vqvae: the named config to start from (default: phantoms on the built-in phantoms, "
                             "oasis-256 on any other data). phantoms: the 128 px CPU demo; oasis-256: "
                             "reconstruction, 64x64 codes; oasis-256-32: 32x32 codes of 256 px slices "
                             "(compression); oasis-128: generation on a CPU, 32x32 codes of 128 px slices. The "
                             "prior trains with its VQ-VAE's preset")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                        help="change one config field, e.g. --set num_codes=256 --set prior.layers=12 (repeatable; "
                             "section.field or a field name found in one section; train.X is the trained model's "
                             "training section; every key: docs/cli.md)")
    parser.add_argument("--data", default=None,
                        help="vqvae: an OASIS folder, any folder of slices or of volumes (default: "
                             "data/keras_png_slices_data if present, else the built-in phantoms); the prior uses "
                             "the VQ-VAE's data")
    parser.add_argument("--run", default=None,
                        help="run folder (vqvae default: runs/vqvae-<time>, linked as runs/latest; pixelcnn "
                             "default: runs/latest, the VQ-VAE's run). An interrupted run in it is resumed with "
                             "its saved config; a finished one is never overwritten without --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished model of this kind in --run")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate, the peak of a cosine schedule (default: the preset's, 1e-3)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of initialisation, data order, crops and codebook restarts; also of a generic "
                             "folder's split unless --split-seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="vqvae: train at this square size (default: the preset's, 256 or 128)")
    parser.add_argument("--limit", type=int, default=None, help="use at most N images per split (quick runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny smoke run: 1 epoch, at most 64 images per split (vqvae: at most 64 px)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="vqvae: leave out corrupt image files with a warning (stored in the run: the prior "
                             "and predict.py skip them too)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="vqvae: seed of a generic folder's train/validate/test split and of the --limit "
                             "subset (default: --seed); stored in the run")
    parser.add_argument("--slice-axis", choices=["axial", "coronal", "sagittal"], default=None,
                        help="vqvae, volume data: the axis volumes are sliced across, from each affine (default: "
                             "axial)")
    parser.add_argument("--slices", default=None,
                        help="vqvae, volume data: the slices kept, LO:HI or a fraction of the non-empty ones "
                             "(default: the non-empty slices)")
    parser.add_argument("--verbose", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="Keras progress output: auto, 0, 1 (bar) or 2 (a line per epoch) (default: auto)")
    parser.add_argument("--backup-every", type=int, default=50,
                        help="steps between mid-epoch backups an interrupted run resumes from (default: 50)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    scale = parser.add_argument_group("devices (docs/cli.md, \"Several machines\", has a TF_CONFIG example)")
    scale.add_argument("--strategy", choices=["auto", "one-device", "mirrored", "multi-worker"], default="auto",
                       help="tf.distribute strategy (default: auto: multi-worker when TF_CONFIG names several "
                            "workers, mirrored over the local GPUs when there are several, else one device). "
                            "--batch-size is the global batch")
    scale.add_argument("--cpu-replicas", type=int, default=0,
                       help="split the CPU into this many devices and mirror over them (tests and demos of "
                            "mirrored runs without GPUs) (default: 0)")
    scale.add_argument("--mixed-precision", action="store_true",
                       help="float16 compute on GPU (with loss scaling), bfloat16 on CPU; the quantizer's "
                            "distances and moving averages stay float32")
    scale.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                       help="XLA-compile the train step (default: Keras's choice, on for GPUs; off on CPU, where "
                            "it would give up bit-exact determinism)")
    args = parser.parse_args(argv)
    for name, low in (("epochs", 1), ("batch_size", 1), ("image_size", 32), ("limit", 1), ("backup_every", 1),
                      ("cpu_replicas", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}. Received: {value}")
    if args.lr is not None and args.lr <= 0:
        parser.error(f"--lr must be positive. Received: {args.lr}")
    try:  # a malformed or unknown --set key is a flag error, found before TensorFlow is imported
        config.override(config.Config(), args.changes, model=args.model)
    except config.ConfigError as err:
        parser.error(str(err))
    return args


def options_of(args):
    """The operational options (`default_options()`) the parsed flags ask for."""
    return argparse.Namespace(**{k: getattr(args, k) for k in vars(default_options())})


def training_flags(args):
    """The `TrainConfig` fields the everyday flags set."""
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed}
    if args.smoke:
        flags["epochs"] = 1
    return {k: v for k, v in flags.items() if v is not None}


def vqvae_config(args):
    """The `config.Config` a VQ-VAE trains with: the preset, then the flags, then `--set`, then `--smoke`."""
    import dataset

    name = args.preset
    if name is None:  # phantoms on the phantoms, oasis-256 on any real data
        name = "oasis-256" if args.data is not None or dataset.locate_default_data() is not None else "phantoms"
    cfg = config.preset(name)
    data = {"data": args.data, "image_size": args.image_size, "limit": args.limit, "split_seed": args.split_seed,
            "slice_axis": args.slice_axis, "slices": args.slices}
    cfg = config.replace(cfg, "data", **{k: v for k, v in data.items() if v is not None})
    if args.skip_bad:
        cfg = config.replace(cfg, "data", skip_bad=True)
    cfg = config.replace(cfg, "vqvae_train", **training_flags(args))
    cfg = config.override(cfg, args.changes, model="vqvae")
    if args.smoke:
        size = min(cfg.data.image_size, 64)
        cfg = config.replace(cfg, "data", image_size=size, limit=min(cfg.data.limit or 64, 64))
    if cfg.vqvae_train.crop >= cfg.data.image_size:  # a crop of the whole image is the whole image
        cfg = config.replace(cfg, "vqvae_train", crop=0)
    if cfg.data.split_seed is None:
        cfg = config.replace(cfg, "data", split_seed=cfg.vqvae_train.seed)
    return config.validate(cfg)


def main(argv=None):
    args = parse_args(argv)
    import devices  # first: it imports TensorFlow without its start-up noise
    import dataset
    import runs

    try:
        if args.model == "vqvae":
            summary = train_vqvae(vqvae_config(args), options_of(args))
        else:
            summary = train_pixelcnn(args.run, args.changes, training_flags(args), options_of(args))
    except (dataset.DataError, runs.RunError, config.ConfigError, devices.DeviceError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.model == "vqvae":
        print(f"vqvae: {summary['epochs']} epoch{'s' * (summary['epochs'] != 1)} in {summary['seconds']:.0f} s; "
              f"validation SSIM {summary['val_ssim']:.4f} (inside the brain {summary['val_ssim_brain']:.4f}; best, "
              f"epoch {summary['best_epoch']}), PSNR {summary['val_psnr']:.2f} dB (brain "
              f"{summary['val_psnr_brain']:.2f}), perplexity {summary['perplexity']:.1f}, codes used "
              f"{summary['codes_used']:.1%}; checkpoint {summary['checkpoint']}")
    else:
        print(f"pixelcnn: {summary['epochs']} epoch{'s' * (summary['epochs'] != 1)} in {summary['seconds']:.0f} s; "
              f"validation {summary['val_bits_per_code']:.3f} bits per code (best, epoch {summary['best_epoch']}; "
              f"context-free {summary['unigram_bits_per_code']:.3f}, uniform {summary['uniform_bits_per_code']:.1f}); "
              f"checkpoint {summary['checkpoint']}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
