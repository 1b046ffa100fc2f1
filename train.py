"""Train the VQ-VAE on brain MRI slices, or the gated PixelCNN prior over its codes.

    python train.py --model vqvae                      # built-in phantoms, CPU demo defaults
    python train.py --model vqvae --data PATH --epochs 30
    python train.py --model pixelcnn                   # the prior, in the VQ-VAE's run folder
    python train.py --model vqvae --data PATH --strategy mirrored --mixed-precision   # all local GPUs

Everything a run writes goes to its run folder (default runs/vqvae-<time>,
linked as runs/latest), which `runs.Run` owns: the config next to the
weights, best and last checkpoints (.keras, written atomically), a backup
that an interrupted run resumes from batch-exactly, CSV and TensorBoard
logs, a figure per epoch (reconstructions, or new samples for the prior) and
the training curves. A new VQ-VAE retires the prior of the old one. Under a
multi-worker strategy only the chief writes there.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import dataset
import modules
import runs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

RUNS = Path("runs")
# The phantom demo trains smaller and shorter so it finishes in minutes on a CPU.
DEMO = {"image_size": 128, "epochs": 12, "prior_epochs": 10, "filters": 32, "layers": 6, "skip_filters": 64}
REAL = {"image_size": 256, "epochs": 30, "prior_epochs": 40, "filters": 64, "layers": 8, "skip_filters": 128}


class TrainingError(runs.RunError):
    """A run that cannot start or go on, said in one line with the fix."""


# ---------------------------------------------------------------------------
# Callbacks
# ---------------------------------------------------------------------------


class AtomicCheckpoint(keras.callbacks.Callback):
    """Writes `last` every epoch and `best` when `monitor` improves, each atomically."""

    def __init__(self, last, best, monitor="val_ssim", mode="max"):
        super().__init__()
        self.last, self.best, self.monitor, self.mode = Path(last), Path(best), monitor, mode
        self.best_value = None
        self.best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not finite_loss(logs):  # keep the last good checkpoint
            return
        runs.atomic_save(self.model, self.last)
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        if better:
            self.best_value, self.best_epoch = float(value), epoch + 1
            runs.atomic_save(self.model, self.best)


def finite_loss(logs):
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


def optimizer_steps(model):
    """Training steps the model's optimizer has taken (its `iterations`, under any strategy)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations.value))


class Backup(keras.callbacks.Callback):
    """Backups of the weights and optimizer state that an interrupted run resumes from, batch-exact.

    Writes `<folder>/latest.weights.h5` (atomically) every `every` steps and
    after each epoch's end-of-epoch work (so it goes last among the
    callbacks), never with a NaN loss. Where a resumed run starts is read
    from the optimizer's step counter inside the weights themselves
    (`resume_position`), so it can never disagree with them; the metadata
    file beside them says the same for people and scripts.

    Args:
        folder: the backup folder.
        every: steps between mid-epoch backups.
        steps: steps per epoch.
    """

    def __init__(self, folder, every, steps):
        super().__init__()
        self.folder, self.every, self.steps = Path(folder), every, steps
        self.weights = self.folder / "latest.weights.h5"
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        done = optimizer_steps(self.model) - self.epoch * self.steps
        if finite_loss(logs) and done % self.every == 0 and done < self.steps:  # a full epoch: at its end
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if finite_loss(logs):
            self.save()

    def save(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{os.getpid()}.weights.h5"
        self.model.save_weights(tmp)
        os.replace(tmp, self.weights)
        epoch, done = divmod(optimizer_steps(self.model), self.steps)
        runs.write_json(self.folder / "training_metadata.json", {"epoch": epoch, "batches_done": done})

    @staticmethod
    def resume_position(model, folder, steps):
        """Loads the backup in `folder` into `model` (built and compiled); returns (epoch, batches done in it)."""
        path = Path(folder) / "latest.weights.h5"
        try:
            with model.distribute_strategy.scope():  # the model's variables live under its strategy
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                model.load_weights(path)
        except Exception as err:  # h5py and Keras raise many kinds for a bad file
            raise TrainingError(f"cannot read the backup {path} ({str(err).splitlines()[0][:160]}). Delete "
                                f"{folder} to start the model again.") from None
        return divmod(optimizer_steps(model), steps)


class StopAfterEpoch(keras.callbacks.Callback):
    """Ends `fit` after epoch `last` (0-based): the partial first epoch of a resumed run."""

    def __init__(self, last):
        super().__init__()
        self.last = last

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.last:
            self.model.stop_training = True


class StopOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss and remembers where, for a clear message."""

    def __init__(self):
        super().__init__()
        self.where = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not finite_loss(logs) and self.where is None:
            self.where = (self.epoch + 1, batch + 1)
            self.model.stop_training = True


class ReconstructionGrid(keras.callbacks.Callback):
    """Draws originals, reconstructions and |error| of fixed validation images each epoch."""

    def __init__(self, images, folder, prefix="vqvae_recon"):
        super().__init__()
        self.images, self.folder, self.prefix = images, Path(folder), prefix

    def on_epoch_end(self, epoch, logs=None):
        path = self.folder / f"{self.prefix}_epoch{epoch + 1:03d}.png"
        ssim = (logs or {}).get("val_ssim")
        title = f"epoch {epoch + 1}" + (f", validation SSIM {ssim:.4f}" if ssim is not None else "")
        runs.save_comparison(self.images, self.model.reconstruct(self.images).numpy(), path, title)


def save_curves(history_csv, path, keys=("loss", "ssim", "perplexity", "codes_used")):
    """Training and validation curves from the CSV log, one panel per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def fit_in_run(model, kind, run, make_train, val_ds, *, steps, epochs, resuming, monitor, mode, grid, args,
               chief=True):
    """Fits `model` with the run folder's callbacks; returns the CSV rows with a finite `monitor`.

    `make_train(first_epoch, skip)` builds the training stream from epoch
    `first_epoch` on, its first `skip` batches left out. A resumed run loads
    its backup, trains the rest of the interrupted epoch, then the epochs
    after it: the same batches in the same order as an uninterrupted run,
    which it therefore equals bit for bit on CPU (only that epoch's logged
    training means cover fewer batches).

    Callbacks: NaN guard, best/last checkpoints written atomically, CSV and
    TensorBoard logs, `grid` (a per-epoch figure, or None) and, last, the
    backup. Ends with the training curves. A non-chief worker keeps only
    what it needs to resume and to summarise (no TensorBoard, figures or
    progress bar).
    """
    history_csv = run / f"{kind}_history.csv"
    backup = run / f"{kind}_backup"
    checkpoint = AtomicCheckpoint(run / f"{kind}_last.keras", run / f"{kind}_best.keras", monitor=monitor, mode=mode)
    earlier = [float(r[monitor]) for r in history_rows(history_csv, monitor)] if resuming else []
    if earlier:  # a resumed run only replaces the best checkpoint with a better one
        checkpoint.best_value = max(earlier) if mode == "max" else min(earlier)
    epoch, done = Backup.resume_position(model, backup, steps) if resuming else (0, 0)
    nan_guard = StopOnNaN()
    callbacks = [nan_guard, checkpoint, keras.callbacks.CSVLogger(history_csv, append=True)]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(run / "logs" / kind, write_graph=False, profile_batch=0))
    if grid is not None:
        callbacks.append(grid)
    callbacks.append(Backup(backup, every=max(1, min(steps, args.backup_every)), steps=steps))
    verbose = args.verbose if chief else 0
    if done:  # the rest of the interrupted epoch
        if chief:
            print(f"resuming epoch {epoch + 1} at step {done + 1} of {steps}")
        model.fit(make_train(epoch, done), epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps - done,
                  validation_data=val_ds, callbacks=[*callbacks, StopAfterEpoch(epoch)], verbose=verbose,
                  shuffle=False)
        epoch += 1
    if epoch < epochs and nan_guard.where is None:
        model.fit(make_train(epoch, 0), epochs=epochs, initial_epoch=epoch, steps_per_epoch=steps,
                  validation_data=val_ds, callbacks=callbacks, verbose=verbose, shuffle=False)
    if nan_guard.where is not None:
        epoch, batch = nan_guard.where
        last = run / f"{kind}_last.keras"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no epoch had finished"
        raise TrainingError(f"the loss became NaN at epoch {epoch}, step {batch}; training stopped and {kept}. "
                            f"Lower --lr (now {args.lr}) and run again with a new --run.")
    shutil.rmtree(backup, ignore_errors=True)  # finished: nothing to resume
    keys = (("loss", "ssim", "ssim_brain", "perplexity", "codes_used") if kind == "vqvae"
            else ("loss", "bits_per_code"))
    if chief:
        save_curves(history_csv, run / f"{kind}_curves.png", keys)
    rows = history_rows(history_csv, monitor)
    if not rows:
        raise TrainingError(f"no epoch finished with a finite {monitor}; see {history_csv}.")
    return rows


def configure(seed, jit_compile=False):
    """Seeds every generator; on CPU also makes TensorFlow's kernels deterministic.

    Keras turns XLA off under op determinism, so with `jit_compile` runs are
    seeded but not bit-exact.
    """
    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU") and not jit_compile:
        tf.config.experimental.enable_op_determinism()


# ---------------------------------------------------------------------------
# Devices: distribution strategy, precision, XLA
# ---------------------------------------------------------------------------


def split_cpu(replicas):
    """Splits the CPU into `replicas` logical devices (for mirrored runs without GPUs).

    Must run before TensorFlow first uses a device; a process that already
    has the same split is left as it is.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != replicas:
            raise TrainingError(f"--cpu-replicas {replicas}: TensorFlow already started with {have} CPU device(s) "
                                "in this process. Pass the flag to a fresh process.") from None


def cluster_workers():
    """Number of workers named in TF_CONFIG (0 when it is unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw)["cluster"]
    except (ValueError, KeyError, TypeError):
        raise TrainingError("TF_CONFIG is not valid JSON with a \"cluster\" entry; see the README's "
                            "\"Scaling out\" section for an example.") from None
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def make_strategy(name="auto", cpu_replicas=0):
    """The tf.distribute strategy for `--strategy` (auto, one-device, mirrored, multi-worker).

    auto: multi-worker when TF_CONFIG names more than one worker, mirrored
    when more than one GPU (or `cpu_replicas` > 1) is visible, else the
    default one-device strategy (GPU 0 if there is one, else the CPU).
    """
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
    # Physical devices only: listing logical ones would start the runtime,
    # after which a multi-worker strategy can no longer configure itself.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = ("multi-worker" if cluster_workers() > 1 else
                "mirrored" if len(gpus) > 1 or cpu_replicas > 1 else "one-device")
    if name == "one-device":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if not cluster_workers():
        raise TrainingError("--strategy multi-worker needs the TF_CONFIG variable naming the cluster and this "
                            "worker's task; see the README's \"Scaling out\" section.")
    return tf.distribute.MultiWorkerMirroredStrategy()


def task_of(strategy):
    """(task_type, task_id, is_chief) of this process; ("chief", 0, True) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return "chief", 0, True
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    return task_type, task_id, chief


def precision_policy(mixed):
    """The Keras dtype policy: mixed_float16 on GPU, mixed_bfloat16 on CPU, or float32."""
    if not mixed:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras's global dtype policy for the models built inside, then restores it."""
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def setup_devices(args):
    """Strategy, task and precision for a run, from the flags (checked against each other).

    Returns (strategy, chief, task_id, policy). Non-chief workers of a
    multi-worker run write their files under `<run>/.worker-<id>` instead of
    the run folder (see `worker_folder`).
    """
    strategy = make_strategy(args.strategy, args.cpu_replicas)
    _, task_id, chief = task_of(strategy)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and not args.run:
        raise TrainingError("a multi-worker run needs --run, the same folder on every worker.")
    batch = args.batch_size or (16 if args.model == "vqvae" else 32)
    if batch % strategy.num_replicas_in_sync:
        raise TrainingError(f"--batch-size {batch} (the global batch) does not split evenly over "
                            f"{strategy.num_replicas_in_sync} replicas. Pass a multiple of it.")
    return strategy, chief, task_id, precision_policy(args.mixed_precision)


def jit_flag(args):
    """`jit_compile` for `Model.compile`: the flag, or Keras's own choice ("auto") when it is not given."""
    return "auto" if args.jit_compile is None else args.jit_compile


def worker_folder(run, chief, task_id):
    """Where this process writes: the run folder for the chief, a private sub-folder for other workers."""
    return Path(run) if chief else Path(run) / f".worker-{task_id}"


def describe_devices(strategy, policy, jit_compile):
    """One line: devices, strategy, replicas, precision, XLA (the first line of every run)."""
    gpus = tf.config.list_physical_devices("GPU")
    kind = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else
            "MirroredStrategy" if isinstance(strategy, tf.distribute.MirroredStrategy) else "default (one device)")
    task_type, task_id, chief = task_of(strategy)
    where = f", task {task_type}:{task_id}{' (chief)' if chief else ''}" if cluster_workers() else ""
    return (f"devices: {len(gpus)} GPU(s), {len(tf.config.list_logical_devices('CPU'))} CPU device(s); strategy "
            f"{kind}{where}, {strategy.num_replicas_in_sync} replica(s) in sync; precision {policy}; XLA "
            f"{'on' if jit_compile else 'off'}")


def distribute(strategy, make, global_batch):
    """A training dataset built per input pipeline when the strategy spans workers.

    `make(batch_size, input_context)` builds the pipeline. With several
    workers each builds and decodes only its own shard of files
    (`distribute_datasets_from_function`); otherwise Keras splits each
    global batch over the local replicas itself.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make(global_batch, None)
    return strategy.distribute_datasets_from_function(lambda context: make(global_batch, context))


# ---------------------------------------------------------------------------
# VQ-VAE training
# ---------------------------------------------------------------------------


def vqvae_config(args, source, counts):
    """The run's configuration: every flag that shapes the model, its data and its split."""
    return {
        "model": "vqvae",
        "data": str(source.root), "source": source.kind, "fit": args.fit, "seed": args.seed,
        "split_seed": args.split_seed, "skip_bad": bool(args.skip_bad), "limit": args.limit,
        "slice_axis": args.slice_axis, "slices": args.slices,
        "image_size": args.image_size, "crop": args.crop, "batch_size": args.batch_size, "epochs": args.epochs,
        "learning_rate": args.lr, "schedule": args.schedule,
        "vqvae": vqvae_options(args, args.image_size, source.kind), "counts": counts,
    }


# `--loss auto`: the brain recipe (SSIM inside the brain + L1, l2-normalised lookup, rotation trick) on code
# grids of this many positions a side or fewer; above, the plain one (whole-image MSE, Euclidean lookup,
# straight-through). On real slices, 16 minutes on 2 cores (README, "Reconstruction inside the brain"):
# at 32x32 the brain recipe was better inside the brain (whole-image SSIM 0.009 lower), at 64x64 the plain
# one was better on both.
BRAIN_RECIPE_MAX_GRID = 32

# `--crop` on real data: train on random crops of this fraction of the image side. On real slices, 16 minutes
# on 2 cores, side by side with whole images (README, "Reconstruction inside the brain: training on random
# crops"): at 64x64, test SSIM inside the brain 0.942 with 128 px crops of the 256 px canvas, 0.950 with 96,
# 0.952 with 64, against 0.903 to 0.907 for whole images; at 32x32 (brain recipe), 0.777 with 64 px crops
# against 0.771 (plain) and 0.762 (brain recipe, an earlier session) on whole images, whole-image SSIM 0.90
# after 3 minutes instead of 9 to 11.
REAL_CROP_FRACTION = 0.25
MIN_CROP_GRID = 8

# Training on crops with code grids of BRAIN_RECIPE_MAX_GRID or coarser, the decoder defaults to this many
# times the encoder's channels and one more residual block. At 32x32 on real slices, 16 minutes on 2 cores with
# 64 px crops: test SSIM inside the brain 0.783 and whole-image 0.925 with 96 channels and 3 blocks, against
# 0.777 and 0.912 with the encoder's 64 and 2 (README, "Reconstruction inside the brain: training on random
# crops"). Not measured with crops at 64x64, where a wider decoder on whole images was not better.
WIDE_DECODER_SCALE = 1.5


def default_crop(kind, image_size, downsample):
    """`--crop` when it is not given: REAL_CROP_FRACTION of `image_size` on real data, else 0 (whole images).

    The crop is a multiple of `downsample` whose code grid is at least MIN_CROP_GRID a side (the smallest
    measured); the phantom demo keeps whole images.
    """
    if kind == "phantoms":
        return 0
    crop = int(image_size * REAL_CROP_FRACTION) // downsample * downsample
    return crop if crop // downsample >= MIN_CROP_GRID and crop < image_size else 0


# `--schedule auto`: a VQ-VAE trained on crops takes a linear warm-up over WARMUP_FRACTION of its steps, then a
# cosine decay of the learning rate to 0; whole images keep it constant. At 64x64 on real slices with 64 px crops,
# 16 minutes on 2 cores (README, "Reconstruction inside the brain: training on random crops"): test SSIM inside
# the brain 0.952, 0.952 and 0.951 for three seeds with the cosine, against 0.952 and 0.947 for two at a constant
# rate (whose last minutes wander), whole-image 0.980-0.981 against 0.979 and 0.978; at 32x32 (one seed) about even,
# 0.786 against 0.783 inside the brain, 0.924 against 0.925 over the image. On whole images, short of steps, a
# decaying rate lost.
WARMUP_FRACTION = 0.02


def resolve_schedule(schedule, model, crop):
    """`--schedule` for `model` ("vqvae" or "pixelcnn") trained on `crop`-px crops (0: whole images)."""
    if schedule != "auto":
        return schedule
    return "cosine" if model == "vqvae" and crop else "constant"


def learning_rate(peak, schedule, total_steps):
    """Adam's learning rate over `total_steps`: `peak` throughout ("constant"), or ("cosine") a linear warm-up
    from 0 over WARMUP_FRACTION of the steps, then a cosine decay from `peak` to 0 by the last step.

    The cosine is a function of the optimizer's own step counter, so a resumed run continues it exactly. Runs
    too short for a whole warm-up step start at `peak` (a warm-up step runs at rate 0).
    """
    if schedule == "constant":
        return peak
    warmup = round(total_steps * WARMUP_FRACTION)
    if warmup < 1:
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(1, total_steps), alpha=0.0)
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, total_steps - warmup), alpha=0.0,
                                                  warmup_target=peak, warmup_steps=warmup)


def crop_epochs(epochs, image_size, crop):
    """Epochs of `crop`-px crops (0: whole images) with about the compute of `epochs` whole-image epochs."""
    return epochs * round((image_size / crop) ** 2) if crop else epochs


def vqvae_options(args, image_size, kind="folder"):
    """The `modules.VQVAE` arguments the flags in `args` ask for at `image_size` (`parse_args([])`: the defaults).

    Resolves `--loss auto` and unset `--normalize-codes` / `--gradient` by
    the code grid (`BRAIN_RECIPE_MAX_GRID`), and unset `--decoder-channels` /
    `--decoder-res-blocks` by the grid and the crop (`--crop`, else
    `default_crop` for the data `kind`): a wider decoder on crops at coarse
    grids (`WIDE_DECODER_SCALE`), else the encoder's (None).
    """
    coarse = image_size // args.downsample <= BRAIN_RECIPE_MAX_GRID
    brain = args.loss == "ssim_l1" or (args.loss == "auto" and coarse)
    crop = default_crop(kind, image_size, args.downsample) if args.crop is None else args.crop
    wide = coarse and 0 < crop < image_size
    return {"downsample": args.downsample, "channels": args.channels, "res_blocks": args.res_blocks,
            "res_channels": args.res_channels, "num_codes": args.codes, "code_dim": args.code_dim,
            "beta": args.beta, "codebook": args.codebook, "decay": args.decay, "seed": args.seed,
            "loss": "ssim_l1" if brain else "mse", "background_weight": args.background_weight,
            "normalize_codes": brain if args.normalize_codes is None else args.normalize_codes,
            "gradient": ("rotation" if brain else "straight_through") if args.gradient is None else args.gradient,
            "decoder_channels": (round(args.channels * WIDE_DECODER_SCALE) if wide else None)
            if args.decoder_channels is None else args.decoder_channels,
            "decoder_res_blocks": (args.res_blocks + 1 if wide else None)
            if args.decoder_res_blocks is None else args.decoder_res_blocks}


def train_vqvae(args, log=print):
    """Trains a VQ-VAE as `args` say; returns the summary dict."""
    start = time.perf_counter()
    strategy, chief, task_id, policy = setup_devices(args)
    run = runs.Run(worker_folder(args.run or new_run_dir("vqvae"), chief, task_id))
    resuming = run.prepare("vqvae", args.overwrite, log=log)
    if resuming:  # the saved config wins over the flags, data and split included
        run.resume_args("vqvae", args)
        log(f"resuming the interrupted run in {run.path} (its saved config wins over the flags)")
    args.split_seed = args.seed if args.split_seed is None else args.split_seed
    source = dataset.load_source(args.data, seed=args.split_seed, on_bad="skip" if args.skip_bad else "error",
                                 slice_axis=args.slice_axis, slices=args.slices)
    demo = DEMO if source.kind == "phantoms" else REAL
    args.image_size = args.image_size or demo["image_size"]
    args.batch_size = args.batch_size or 16
    if args.smoke:
        args.image_size, args.epochs, args.limit = min(args.image_size, 64), 1, min(args.limit or 64, 64)
    if args.crop is None:
        args.crop = default_crop(source.kind, args.image_size, args.downsample)
    if args.crop >= args.image_size:  # a crop of the whole image is the whole image
        args.crop = 0
    # Default epochs keep about the compute of whole-image training: (side / crop)^2 epochs of crops for one.
    args.epochs = args.epochs or crop_epochs(demo["epochs"], args.image_size, args.crop)
    for note in source.notes:
        log(f"note: {note}")
    configure(args.seed, args.jit_compile)
    train = runs.limit_split(source.splits["train"], args.limit, args.split_seed)
    val = runs.limit_split(source.splits["validate"], args.limit, args.split_seed)
    if len(train) < args.batch_size:
        raise TrainingError(f"the train split has {len(train)} images, fewer than --batch-size {args.batch_size}. "
                            "Lower --batch-size or raise --limit.")
    if args.image_size % args.downsample:
        raise TrainingError(f"--image-size {args.image_size} is not a multiple of --downsample {args.downsample}.")
    if args.crop and (args.crop > args.image_size or args.crop % args.downsample):
        raise TrainingError(f"--crop {args.crop} must be a multiple of --downsample {args.downsample} and at most "
                            f"--image-size {args.image_size}.")
    args.schedule = resolve_schedule(args.schedule, "vqvae", args.crop)
    if not resuming:
        run.save_config("vqvae", vqvae_config(args, source, {"train": len(train), "validate": len(val),
                                                              "test": len(source.splits["test"])}))
    hyper = run.config("vqvae")["vqvae"]
    steps = len(train) // args.batch_size

    with strategy.scope(), dtype_policy(policy):
        model = modules.VQVAE(**hyper)
        model.build((None, args.image_size, args.image_size, 1))
        model.compile(optimizer=keras.optimizers.Adam(learning_rate(args.lr, args.schedule, steps * args.epochs)),
                      jit_compile=jit_flag(args))
    log(describe_devices(strategy, policy, model.jit_compile))

    def make_train(first_epoch, skip):
        return distribute(strategy, lambda batch, context: dataset.make_dataset(
            train, image_size=args.image_size, batch_size=batch, shuffle=True, seed=args.seed,
            first_epoch=first_epoch, repeat=True, fit=args.fit, drop_remainder=True, input_context=context,
            crop=args.crop or None, crop_step=args.downsample).skip(skip), args.batch_size)

    val_ds = dataset.make_dataset(val, image_size=args.image_size, batch_size=args.batch_size, fit=args.fit)
    grid_images = next(iter(dataset.make_dataset(val, image_size=args.image_size, batch_size=8, fit=args.fit))).numpy()

    crops = f" (trained on random {args.crop}x{args.crop} crops)" if args.crop else ""
    log(f"vqvae: {source.kind} data, train {len(train)} / validate {len(val)} images at {args.image_size} px{crops}, "
        f"{args.image_size // args.downsample}x{args.image_size // args.downsample} codes of K={hyper['num_codes']}, "
        f"{model.count_params():,} parameters, {args.epochs} epochs of {steps} steps, Adam {args.lr:g} "
        f"({args.schedule}), run folder {run.path}")
    rows = fit_in_run(model, "vqvae", run.path, make_train, val_ds, steps=steps, epochs=args.epochs,
                      resuming=resuming, monitor="val_ssim", mode="max",
                      grid=ReconstructionGrid(grid_images, run.path) if chief else None, args=args, chief=chief)
    best_row = max(rows, key=lambda r: float(r["val_ssim"]))
    summary = {
        "model": "vqvae", "run": str(run.path), "source": source.kind,
        "epochs": int(rows[-1]["epoch"]) + 1, "seconds": round(time.perf_counter() - start, 1),
        "val_ssim": float(best_row["val_ssim"]), "val_ssim_brain": float(best_row["val_ssim_brain"]),
        "val_psnr": float(best_row["val_psnr"]), "val_psnr_brain": float(best_row["val_psnr_brain"]),
        "best_epoch": int(best_row["epoch"]) + 1,
        "perplexity": float(best_row["val_perplexity"]), "codes_used": float(best_row["val_codes_used"]),
        "checkpoint": str(run.checkpoint("vqvae")), "image_size": args.image_size, "crop": args.crop,
        "schedule": args.schedule,
        "train_images": len(train), "validate_images": len(val), "split_seed": args.split_seed,
        "replicas": strategy.num_replicas_in_sync, "precision": policy, "jit_compile": bool(model.jit_compile),
    }
    runs.write_json(run.file("vqvae", "summary.json"), summary)
    link_latest(run.path)
    return summary


# ---------------------------------------------------------------------------
# PixelCNN prior training
# ---------------------------------------------------------------------------


def code_dataset(codes, split, batch_size, *, shuffle, seed=0, first_epoch=0, skip=0, repeat=False,
                 drop_condition=0.0):
    """(inputs, targets) batches of code grids with their slice and label, for `fit`.

    With `drop_condition`, each example's slice and label are replaced by
    "unknown" (-1) with that probability (independently, seeded by the
    example's place in the whole stream, so a resumed run drops the same
    ones). `skip` leaves out the first batches (a resumed epoch).
    """
    n = len(codes)
    table = (tf.constant(codes.astype(np.int32)), tf.constant(split.slices, tf.int32),
             tf.constant(split.labels, tf.int32))
    ds = dataset.index_stream(n, batch_size, shuffle=shuffle, seed=seed, first_epoch=first_epoch, repeat=repeat,
                              drop_remainder=repeat)
    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(n))

    def example(position, i):
        slice_, label = table[1][i], table[2][i]
        if drop_condition > 0:
            keep = tf.random.stateless_uniform((2,), seed=tf.stack([tf.cast(seed, tf.int64), position])) >= drop_condition
            slice_, label = tf.where(keep[0], slice_, -1), tf.where(keep[1], label, -1)
        return {"codes": table[0][i], "slice": slice_, "label": label}, table[0][i]

    per_epoch = (n // batch_size) * batch_size if repeat else n
    ds = ds.skip(skip * batch_size).enumerate(start=first_epoch * per_epoch + skip * batch_size).map(example)
    return ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)


class SampleGrid(keras.callbacks.Callback):
    """Samples new slices with the prior each epoch (fast sampler), decodes them, draws a grid."""

    def __init__(self, vqvae, grid_shape, folder, slices=None, labels=None, seed=0, n=8):
        super().__init__()
        self.vqvae, self.grid_shape, self.folder, self.n = vqvae, grid_shape, Path(folder), n
        self.slices = -1 if slices is None else slices
        self.labels = -1 if labels is None else labels
        self.uniform = tf.random.stateless_uniform((n, *grid_shape), seed=[seed, 1])
        self.sampler = None

    def on_epoch_end(self, epoch, logs=None):
        if self.sampler is None:
            self.sampler = modules.make_fast_sampler(self.model, self.n, *self.grid_shape)
        codes = self.sampler(self.uniform, self.slices, self.labels)
        images = self.vqvae.decode(codes).numpy()
        bits = (logs or {}).get("val_bits_per_code")
        title = f"epoch {epoch + 1}" + (f", validation {bits:.3f} bits per code" if bits is not None else "")
        titles = [f"slice {s}" for s in np.broadcast_to(self.slices, (self.n,))] if np.any(
            np.asarray(self.slices) >= 0) else None
        dataset.save_grid(images, self.folder / f"pixelcnn_samples_epoch{epoch + 1:03d}.png", titles=titles,
                          suptitle=title)


def unigram_bits(train_codes, val_codes, num_codes):
    """Bits per validation code of the context-free baseline: each code drawn from the training codes'
    frequencies (add-one smoothed). A prior that has learnt anything from context scores below it."""
    counts = np.bincount(train_codes.reshape(-1).astype(np.int64), minlength=num_codes) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[val_codes.reshape(-1).astype(np.int64)]))


def conditioning(mode, source, splits):
    """Slice and class counts to condition on, from `--condition` and what the data carry."""
    has_slices = all((s.slices >= 0).any() for s in splits.values())
    num_slices = int(max(s.slices.max() for s in splits.values())) + 1 if has_slices else 0
    num_classes = len(source.class_names)
    use_slice = mode in ("slice", "both") or (mode == "auto" and has_slices)
    use_label = mode in ("label", "both") or (mode == "auto" and num_classes > 0)
    if use_slice and not has_slices:
        raise TrainingError("--condition slice needs slice indices in the file names (OASIS case_X_slice_Y); "
                            "these files carry none. Use --condition none or label.")
    if use_label and not num_classes:
        raise TrainingError("--condition label needs class sub-folders; this data has none. Use --condition none.")
    return (num_slices if use_slice else 0), (num_classes if use_label else 0)


def train_pixelcnn(args, log=print):
    """Trains the gated PixelCNN prior over the codes of the run's VQ-VAE; returns the summary dict."""
    start = time.perf_counter()
    strategy, chief, task_id, policy = setup_devices(args)
    vq_run = runs.Run(args.run or RUNS / "latest")
    vqvae = vq_run.load_vqvae()
    run = runs.Run(worker_folder(vq_run.path, chief, task_id))
    resuming = run.prepare("pixelcnn", args.overwrite, log=log)
    if resuming:
        run.resume_args("pixelcnn", args)
        log(f"resuming the interrupted prior in {run.path} (its saved config wins over the flags)")
    source = vq_run.source(on_bad="skip" if args.skip_bad else None)
    defaults = DEMO if source.kind == "phantoms" else REAL
    args.epochs = args.epochs or defaults["prior_epochs"]
    args.batch_size = args.batch_size or 32
    for name in ("filters", "layers", "skip_filters"):
        setattr(args, name, getattr(args, name) or defaults[name])
    if args.smoke:
        args.epochs, args.limit = 1, min(args.limit or 64, 64)
    args.schedule = resolve_schedule(args.schedule, "pixelcnn", 0)
    configure(args.seed, args.jit_compile)
    splits = {name: runs.limit_split(split, args.limit, args.seed) for name, split in vq_run.splits(source).items()}
    if len(splits["train"]) < args.batch_size:
        raise TrainingError(f"the train split has {len(splits['train'])} images, fewer than --batch-size "
                            f"{args.batch_size}. Lower --batch-size or raise --limit.")
    codes = vq_run.codes(vqvae, splits, log=log, cache=run.path / "codes_cache.npz")
    grid_shape = tuple(codes["train"].shape[1:])
    if not resuming:
        num_slices, num_classes = conditioning(args.condition, source, splits)
        hyper = {"num_codes": vqvae.num_codes, "filters": args.filters, "layers": args.layers,
                 "kernel_size": args.kernel_size, "skip_filters": args.skip_filters, "num_slices": num_slices,
                 "num_classes": num_classes, "grid_size": None if args.no_position else list(grid_shape)}
        run.save_config("pixelcnn", {
            "model": "pixelcnn", "batch_size": args.batch_size, "epochs": args.epochs, "learning_rate": args.lr,
            "schedule": args.schedule, "seed": args.seed, "limit": args.limit, "pixelcnn": hyper,
            "grid": list(grid_shape),
            "class_names": source.class_names, "counts": {name: len(c) for name, c in codes.items()},
            "vqvae_digest": vq_run.vqvae_digest()})
    elif run.config("pixelcnn").get("vqvae_digest") != vq_run.vqvae_digest():
        raise TrainingError(f"the interrupted prior in {run.path} was trained on another VQ-VAE than the one there "
                            "now. Pass --overwrite to train a new prior.")
    hyper = run.config("pixelcnn")["pixelcnn"]
    steps = len(codes["train"]) // args.batch_size

    with strategy.scope(), dtype_policy(policy):
        prior = modules.GatedPixelCNN(**hyper)
        prior({"codes": tf.zeros((1, *grid_shape), tf.int32), "slice": tf.zeros((1,), tf.int32),
               "label": tf.zeros((1,), tf.int32)})
        if not resuming:  # a resumed run restores its own weights
            prior.init_from_codebook(keras.ops.convert_to_numpy(vqvae.quantizer.codes()))
        prior.compile(optimizer=keras.optimizers.Adam(learning_rate(args.lr, args.schedule, steps * args.epochs)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[modules.BitsPerCode()], jit_compile=jit_flag(args))
    log(describe_devices(strategy, policy, prior.jit_compile))

    def make_train(first_epoch, skip):
        return code_dataset(codes["train"], splits["train"], args.batch_size, shuffle=True, seed=args.seed,
                            first_epoch=first_epoch, skip=skip, repeat=True,
                            drop_condition=0.1 if prior.conditional else 0.0)

    val_ds = code_dataset(codes["validate"], splits["validate"], args.batch_size, shuffle=False)
    slices = np.linspace(0, hyper["num_slices"] - 1, 8).round().astype(np.int32) if hyper["num_slices"] else None
    grid = SampleGrid(vqvae, grid_shape, run.path, slices=slices, seed=args.seed) if chief else None
    cond = [f"{n} {what}" for n, what in ((hyper["num_slices"], "slice positions"),
                                          (hyper["num_classes"], "classes")) if n]
    cond = ", ".join(cond + ["grid position"] * bool(hyper.get("grid_size"))) or "nothing"
    log(f"pixelcnn: {source.kind} data, train {len(codes['train'])} / validate {len(codes['validate'])} code grids "
        f"of {grid_shape[0]}x{grid_shape[1]} (K={hyper['num_codes']}), conditioned on {cond}, "
        f"{prior.count_params():,} parameters, {args.epochs} epochs of {steps} steps, Adam {args.lr:g} "
        f"({args.schedule}), run folder {run.path}")
    rows = fit_in_run(prior, "pixelcnn", run.path, make_train, val_ds, steps=steps, epochs=args.epochs,
                      resuming=resuming, monitor="val_bits_per_code", mode="min", grid=grid, args=args, chief=chief)
    best_row = min(rows, key=lambda r: float(r["val_bits_per_code"]))
    summary = {
        "model": "pixelcnn", "run": str(run.path), "source": source.kind,
        "epochs": int(rows[-1]["epoch"]) + 1, "seconds": round(time.perf_counter() - start, 1),
        "val_bits_per_code": float(best_row["val_bits_per_code"]), "best_epoch": int(best_row["epoch"]) + 1,
        "uniform_bits_per_code": math.log2(hyper["num_codes"]),
        "unigram_bits_per_code": unigram_bits(codes["train"], codes["validate"], hyper["num_codes"]),
        "checkpoint": str(run.checkpoint("pixelcnn")), "grid": list(grid_shape), "schedule": args.schedule,
        "num_slices": hyper["num_slices"], "num_classes": hyper["num_classes"],
        "train_grids": len(codes["train"]), "validate_grids": len(codes["validate"]),
        "replicas": strategy.num_replicas_in_sync, "precision": policy, "jit_compile": bool(prior.jit_compile),
    }
    runs.write_json(run.file("pixelcnn", "summary.json"), summary)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the VQ-VAE (--model vqvae) or the gated PixelCNN prior over its codes (--model "
                    "pixelcnn, in the VQ-VAE's run folder). With no --data and no data/keras_png_slices_data, the "
                    "VQ-VAE trains on the built-in synthetic phantoms with CPU demo defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=["vqvae", "pixelcnn"], default="vqvae", help="what to train")
    parser.add_argument("--data", default=None,
                        help="vqvae: OASIS folder or any folder of slices (see dataset.py --help); the prior uses "
                             "the VQ-VAE's data")
    parser.add_argument("--run", default=None,
                        help="run folder. vqvae default: runs/vqvae-<time>, linked as runs/latest; pixelcnn "
                             "default: runs/latest (the VQ-VAE's run). An interrupted run in it is resumed; a "
                             "finished one is never overwritten without --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished model of this kind in --run")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (default: vqvae 30 on real data, 12 on phantoms, times (image-size / crop)^2 "
                             "when training on crops, so about the same compute: 480 at the real-data default; "
                             "pixelcnn 40 and 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch size (default: vqvae 16, "
                                                                      "pixelcnn 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the peak of a cosine schedule)")
    parser.add_argument("--schedule", choices=["auto", "constant", "cosine"], default="auto",
                        help="learning rate over the run: constant --lr, or cosine (a linear warm-up over the "
                             f"first {WARMUP_FRACTION * 100:g}%% of the steps, then a cosine decay to 0 at the last); "
                             "auto: cosine for a VQ-VAE trained on crops (measured better inside the brain at 64x64 "
                             "on real slices), constant otherwise (stored in the run)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of initialisation, data order and codebook restarts (not of the split)")
    parser.add_argument("--split-seed", type=int, default=None,
                        help="vqvae: seed of the train/validate/test split of a generic folder and of the --limit "
                             "subset (default: --seed); stored in the run, so the prior and predict.py use the "
                             "same split")
    parser.add_argument("--limit", type=int, default=None, help="use at most N images per split (quick runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny smoke run: 1 epoch, at most 64 images per split (vqvae: at most 64 px)")
    parser.add_argument("--backup-every", type=int, default=50,
                        help="steps between mid-epoch backups an interrupted run resumes from")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out corrupt image files with a warning (stored in the run: the prior and "
                             "predict.py skip them too)")
    parser.add_argument("--slice-axis", choices=["axial", "coronal", "sagittal"], default="axial",
                        help="vqvae, volume data (.nii, .nii.gz, Analyze .hdr/.img): the axis the volumes are sliced "
                             "across, found from each volume's affine (stored in the run)")
    parser.add_argument("--slices", default=None,
                        help="vqvae, volume data: the slices kept, LO:HI (along the axis, from the left, posterior or "
                             "inferior end) or a fraction (the central part of the non-empty slices); default: the "
                             "non-empty slices (stored in the run)")
    parser.add_argument("--verbose", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="Keras progress output: auto, 0, 1 (bar) or 2 (a line per epoch)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    scale = parser.add_argument_group("devices and scale-out (see the README's \"Scaling out\")")
    scale.add_argument("--strategy", choices=["auto", "one-device", "mirrored", "multi-worker"], default="auto",
                       help="tf.distribute strategy. auto: multi-worker when TF_CONFIG names several workers, "
                            "mirrored over all local GPUs when there are several, else one device. mirrored: "
                            "MirroredStrategy over the local GPUs (or the CPU devices of --cpu-replicas). "
                            "multi-worker: MultiWorkerMirroredStrategy from TF_CONFIG; pass the same flags and "
                            "--run on every worker. --batch-size is the global batch")
    scale.add_argument("--cpu-replicas", type=int, default=0,
                       help="split the CPU into this many logical devices and mirror over them (testing and "
                            "demos of --strategy mirrored on a machine without GPUs)")
    scale.add_argument("--mixed-precision", action="store_true",
                       help="mixed precision: float16 compute on GPU (with loss scaling), bfloat16 on CPU; the "
                            "quantizer's distances and moving averages stay float32")
    scale.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=None,
                       help="XLA-compile the train step (default: Keras's choice, on for GPUs; off on CPU, where "
                            "it would give up bit-exact determinism)")
    vq = parser.add_argument_group("VQ-VAE (--model vqvae)")
    vq.add_argument("--image-size", type=int, default=None,
                    help="train at this square size (default: 256 on real data, 128 on phantoms)")
    vq.add_argument("--fit", choices=dataset.FIT_MODES, default="pad", help="how other image sizes are fitted")
    vq.add_argument("--crop", type=int, default=None,
                    help="train on a random square crop of this side from each image (a multiple of --downsample; "
                         "0: whole images; validation and predict.py always use whole images): the model is fully "
                         "convolutional, so a step costs (image-size / crop)^2 times less. Default: a quarter "
                         "of the image size on real data when a crop holds at least 8x8 codes (measured with 64 px "
                         "crops at 256 px, 64x64 and 32x32 codes: more steps, better inside the brain), whole images "
                         "otherwise and on the phantoms (stored in the run)")
    vq.add_argument("--downsample", type=int, default=4,
                    help="encoder stride: 4 gives a 64x64 code grid at 256 px, 8 gives 32x32")
    vq.add_argument("--codes", type=int, default=512, help="K, the codebook size")
    vq.add_argument("--code-dim", type=int, default=64, help="D, the code vector size")
    vq.add_argument("--channels", type=int, default=64, help="convolution channels")
    vq.add_argument("--res-blocks", type=int, default=2,
                    help="residual blocks in the encoder, and in the decoder unless --decoder-res-blocks says")
    vq.add_argument("--res-channels", type=int, default=32, help="hidden channels of a residual block")
    vq.add_argument("--decoder-channels", type=int, default=None,
                    help=f"the decoder's convolution channels (default: --channels; {WIDE_DECODER_SCALE}x that "
                         f"when training on crops with code grids of {BRAIN_RECIPE_MAX_GRID}x{BRAIN_RECIPE_MAX_GRID} "
                         "or coarser: 96 at the real-data 32x32 default, measured better inside the brain there with "
                         "64 px crops at 256 px)")
    vq.add_argument("--decoder-res-blocks", type=int, default=None,
                    help="the decoder's residual blocks (default: --res-blocks; one more where --decoder-channels "
                         "defaults to a wider decoder)")
    vq.add_argument("--codebook", choices=["ema", "loss"], default="ema",
                    help="learn the codebook by moving averages (ema) or by gradient (loss)")
    vq.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    vq.add_argument("--decay", type=float, default=0.99, help="EMA decay of the codebook")
    vq.add_argument("--loss", choices=("auto", *modules.LOSSES), default="auto",
                    help="reconstruction loss: ssim_l1 (0.84 (1 - SSIM inside the brain) + 0.16 L1, "
                         "modules.brain_loss) or mse (over the whole image); auto: ssim_l1 on code grids of "
                         f"{BRAIN_RECIPE_MAX_GRID}x{BRAIN_RECIPE_MAX_GRID} or coarser, mse on finer ones (measured on "
                         "real slices: better inside the brain at 32x32, better on both SSIMs at 64x64)")
    vq.add_argument("--background-weight", type=float, default=1.0,
                    help="with --loss ssim_l1, the L1 weight of the pixels outside the brain (inside: 1); lower "
                         "values leave a faint haze on the black canvas that costs whole-image SSIM")
    vq.add_argument("--normalize-codes", action=argparse.BooleanOptionalAction, default=None,
                    help="l2-normalised code lookup (codes and encoder outputs on the unit sphere, as ViT-VQGAN); "
                         "--no-normalize-codes for the plain Euclidean lookup (default: on with the ssim_l1 loss)")
    vq.add_argument("--gradient", choices=modules.GRADIENTS, default=None,
                    help="gradient through the quantizer: rotation (the rotation trick, Fifty et al.) or "
                         "straight_through (default: rotation with the ssim_l1 loss)")
    prior = parser.add_argument_group("PixelCNN prior (--model pixelcnn)")
    prior.add_argument("--filters", type=int, default=None,
                       help="channels of the vertical and horizontal stacks (default 64; phantom demo 32)")
    prior.add_argument("--layers", type=int, default=None, help="gated layers (default 8; phantom demo 6)")
    prior.add_argument("--kernel-size", type=int, default=5, help="k (odd): vertical kernel (k//2+1) x k")
    prior.add_argument("--skip-filters", type=int, default=None,
                       help="channels of skip connections and head (default 128; phantom demo 64)")
    prior.add_argument("--condition", choices=["auto", "none", "slice", "label", "both"], default="auto",
                       help="condition on the axial slice position (OASIS names) and/or the class folder; auto "
                            "uses whatever the data carry")
    prior.add_argument("--no-position", action="store_true",
                       help="leave out the learnt row/column position embedding (on by default: it tells each "
                            "layer where in the slice it is, which shapes the brain outline)")
    args = parser.parse_args(argv)
    checks = [
        (args.batch_size is None or args.batch_size >= 1,
         f"--batch-size must be at least 1. Received: {args.batch_size}"),
        (args.layers is None or args.layers >= 1, f"--layers must be at least 1. Received: {args.layers}"),
        (args.kernel_size >= 3 and args.kernel_size % 2 == 1,
         f"--kernel-size must be odd and at least 3. Received: {args.kernel_size}"),
        (args.epochs is None or args.epochs >= 1, f"--epochs must be at least 1. Received: {args.epochs}"),
        (args.image_size is None or args.image_size >= 32,
         f"--image-size must be at least 32 (SSIM uses an 11-pixel window). Received: {args.image_size}"),
        (args.crop is None or args.crop == 0 or args.crop >= 16,
         f"--crop must be 0 (whole images) or at least 16 (SSIM uses an 11-pixel window). Received: {args.crop}"),
        (args.downsample >= 2 and args.downsample & (args.downsample - 1) == 0,
         f"--downsample must be a power of two (2, 4, 8, ...). Received: {args.downsample}"),
        (args.codes >= 2, f"--codes must be at least 2. Received: {args.codes}"),
        (args.code_dim >= 1, f"--code-dim must be at least 1. Received: {args.code_dim}"),
        (args.decoder_channels is None or args.decoder_channels >= 1,
         f"--decoder-channels must be at least 1. Received: {args.decoder_channels}"),
        (args.decoder_res_blocks is None or args.decoder_res_blocks >= 0,
         f"--decoder-res-blocks must be 0 or more. Received: {args.decoder_res_blocks}"),
        (0.0 <= args.decay < 1.0, f"--decay must be in [0, 1). Received: {args.decay}"),
        (args.lr > 0, f"--lr must be positive. Received: {args.lr}"),
        (args.limit is None or args.limit >= 1, f"--limit must be at least 1. Received: {args.limit}"),
        (args.backup_every >= 1, f"--backup-every must be at least 1. Received: {args.backup_every}"),
        (args.cpu_replicas >= 0, f"--cpu-replicas must be 0 or more. Received: {args.cpu_replicas}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = (train_vqvae if args.model == "vqvae" else train_pixelcnn)(args)
    except (dataset.DataError, runs.RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.model == "vqvae":
        print(f"vqvae: {summary['epochs']} epochs in {summary['seconds']:.0f} s; validation SSIM "
              f"{summary['val_ssim']:.4f} (inside the brain {summary['val_ssim_brain']:.4f}; best, epoch "
              f"{summary['best_epoch']}), PSNR {summary['val_psnr']:.2f} dB (brain {summary['val_psnr_brain']:.2f}), "
              f"perplexity {summary['perplexity']:.1f}, codes used {summary['codes_used']:.1%}; "
              f"checkpoint {summary['checkpoint']}")
    else:
        print(f"pixelcnn: {summary['epochs']} epochs in {summary['seconds']:.0f} s; validation "
              f"{summary['val_bits_per_code']:.3f} bits per code (best, epoch {summary['best_epoch']}; context-free "
              f"{summary['unigram_bits_per_code']:.3f}, uniform {summary['uniform_bits_per_code']:.1f}); checkpoint "
              f"{summary['checkpoint']}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
