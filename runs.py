"""The run folder: one object that owns everything a run writes and reads back.

    run = Run("runs/latest")
    vqvae = run.load_vqvae()            # safe mode, one-line errors
    prior = run.load_prior()            # refuses a prior trained on another VQ-VAE
    source = run.source()               # the data and split the VQ-VAE was trained on

A run folder holds a VQ-VAE and, once trained, the prior over its codes:

    vqvae_config.json     the whole resolved config (`config.to_record`, versioned), the data's kind, split sizes
    vqvae_best.keras      the checkpoint the prior and predict.py use (vqvae_last.keras: the last epoch)
    vqvae_backup/         the mid-epoch backup an interrupted run resumes from
    pixelcnn_config.json  the prior's resolved config, and the digest of the vqvae_best.keras it was trained on
    pixelcnn_best.keras   ... and the same files as the VQ-VAE's
    codes_cache.npz       the VQ-VAE's codes of the train and validate splits

`train.py`, `predict.py` and the benchmarks all go through `Run`: there is
one checkpoint loader and one place that turns a run's config into its data.
A resumed run reads its whole config back from here; a record of another
version is refused with one line saying to retrain.
"""

import hashlib
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

import config
import dataset
import metrics
import modules

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

KINDS = {"vqvae": "VQ-VAE", "pixelcnn": "PixelCNN prior"}
MODEL_CLASSES = {"vqvae": "VQVAE", "pixelcnn": "GatedPixelCNN"}


class RunError(RuntimeError):
    """A run folder that cannot be used as asked, said in one line with the fix."""


# ---------------------------------------------------------------------------
# Files, written atomically
# ---------------------------------------------------------------------------


def write_json(path, payload):
    """Writes `payload` as JSON to `path` via a temporary file and a rename."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def read_json(path, what):
    """The JSON object in `path`; a missing or unreadable file is one RunError line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise RunError(f"cannot read the {what} {path} ({reason}). Delete the run folder or pass another --run.") \
            from None


def atomic_save(model, path):
    """Saves `model` to `path` (.keras) via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def file_digest(path):
    """SHA-1 of a file's bytes, read in blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path, cls, what, fix):
    """The `cls` model (a `what`) saved at `path`, loaded in safe mode.

    Args:
        path: a `.keras` file.
        cls: the class the file must hold (e.g. `modules.VQVAE`).
        what: how to name it in messages.
        fix: the sentence that ends every error (what to run instead).

    Returns:
        The model, uncompiled.

    Raises:
        RunError: one line naming the file: missing, corrupt or truncated
            (not a whole zip, or a member whose checksum fails), unreadable,
            or holding another kind of model.
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"no checkpoint {path}. {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        broken = "the archive"
    if broken is not None:
        raise RunError(f"checkpoint {path} is corrupt or truncated ({broken} does not read back whole). {fix}")
    try:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises many kinds for a foreign file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise RunError(f"cannot read checkpoint {path} ({reason}). {fix}") from None
    if not isinstance(model, cls):
        raise RunError(f"checkpoint {path} holds a {type(model).__name__}, not a {what}. {fix}")
    return model


def limit_split(split, limit, seed):
    """At most `limit` files of a split, a seeded random subset (kept in file order)."""
    if limit is None or limit >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
    return split.take(keep)


def load_images(split, n, image_size, fit, seed):
    """`n` images of `split` (a seeded random subset, kept in file order) as float32 (n, size, size, 1)."""
    picks = limit_split(split, n, seed)
    return np.concatenate([b.numpy() for b in dataset.make_dataset(picks, image_size=image_size, batch_size=64,
                                                                   fit=fit)])


def encode_split(vqvae, split, image_size, fit, batch_size=32):
    """Code indices (N, h, w) uint16 of every image of `split`, streamed in batches, with a progress bar."""
    ds = dataset.make_dataset(split, image_size=image_size, batch_size=batch_size, fit=fit)
    encode = tf.function(vqvae.encode, reduce_retracing=True)
    bar = keras.utils.Progbar(len(split), unit_name="image", interval=0.5)
    codes = []
    for images in ds:
        codes.append(encode(images).numpy().astype(np.uint16))
        bar.add(len(images))
    return np.concatenate(codes)


def save_comparison(images, reconstructions, path, title=""):
    """A figure of originals, reconstructions (titled with SSIM over the image and inside the brain) and
    |error| x4, one column per image; written atomically."""
    error = np.clip(np.abs(images - reconstructions) * 4.0, 0.0, 1.0)
    n = len(images)
    quality = {k: np.asarray(v) for k, v in metrics.image_quality(images, reconstructions).items()}
    titles = (["original"] * n
              + [f"SSIM {s:.3f} / brain {b:.3f}" for s, b in zip(quality["ssim"], quality["ssim_brain"])]
              + ["|error| x4"] * n)
    return dataset.save_grid(np.concatenate([images, reconstructions, error]), path, titles=titles,
                             suptitle=title, columns=n)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class Run:
    """One run folder: its configs, its data and split, and its checkpoints.

    Args:
        path: the folder (it need not exist yet for a new run).

    Example:
    >>> run = Run("runs/latest")
    >>> run.has("vqvae")            # a finished VQ-VAE is in it
    False
    """

    def __init__(self, path):
        self.path = Path(path)
        self._configs = {}
        self._settings = {}

    def __repr__(self):
        return f"Run({str(self.path)!r})"

    def file(self, kind, name):
        """`<run>/<kind>_<name>`, e.g. `file("vqvae", "best.keras")`."""
        return self.path / f"{kind}_{name}"

    def checkpoint(self, kind):
        return self.file(kind, "best.keras")

    def has(self, kind):
        """Whether a finished model of `kind` is in the folder."""
        return self.file(kind, "summary.json").is_file()

    def interrupted(self, kind):
        """Whether an interrupted model of `kind` left a backup to resume from."""
        return (self.file(kind, "backup") / "training_metadata.json").is_file()

    def backup_position(self, kind):
        """(epoch, batches of that epoch already trained) where an interrupted run resumes."""
        meta = read_json(self.file(kind, "backup") / "training_metadata.json", "backup")
        return int(meta["epoch"]), int(meta.get("batches_done", 0))

    # -- configs ------------------------------------------------------------

    def config(self, kind):
        """The saved record of `kind` (read once): its resolved config (`config.to_record`) and what training
        found (the data's kind, split sizes; for the prior its model arguments and the VQ-VAE's digest).

        A record of another layout version is one RunError line saying to retrain.
        """
        if kind not in self._configs:
            path = self.file(kind, "config.json")
            if not path.is_file():
                raise RunError(f"no {KINDS[kind]} config in {self.path} (no {path.name}). Train one with "
                               f"`python train.py --model {kind}`, or pass its run folder with --run.")
            record = read_json(path, f"{KINDS[kind]} config")
            try:
                config.check_version(record, where=f"the {KINDS[kind]} in {path}",
                                     retrain=f"retrain it with `python train.py --model {kind}` in a new --run folder.")
            except config.ConfigError as err:
                raise RunError(str(err)) from None
            self._configs[kind] = record
        return self._configs[kind]

    def settings(self, kind):
        """The `config.Config` that `kind` was trained with (read once)."""
        if kind not in self._settings:
            try:
                self._settings[kind] = config.from_record(self.config(kind), where=f"{self.file(kind, 'config.json')}")
            except config.ConfigError as err:
                raise RunError(str(err)) from None
        return self._settings[kind]

    def save_config(self, kind, record):
        write_json(self.file(kind, "config.json"), record)
        self._configs[kind] = record
        self._settings.pop(kind, None)

    # -- preparing a run for training --------------------------------------

    def prepare(self, kind, overwrite=False, log=print):
        """Makes the folder ready to train `kind`; returns True when an interrupted run resumes.

        A finished model is kept unless `overwrite`. Leftovers of a run that
        died before its first backup are cleared. A new VQ-VAE retires the
        prior and the codes of the old one: a prior is only valid for the
        VQ-VAE whose codes it was trained on.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"--run {self.path} is a file. Pass a folder for the run.")
        if self.has(kind) and not overwrite:
            raise RunError(f"run folder {self.path} already holds a trained {KINDS[kind]}. Pass another --run, or "
                           "--overwrite to replace it.")
        if self.interrupted(kind) and not overwrite:
            return True
        retire = [kind]
        if kind == "vqvae":
            retire.append("pixelcnn")
            if self.has("pixelcnn") or self.file("pixelcnn", "best.keras").exists():
                log(f"note: retiring the prior in {self.path}: it was trained on the VQ-VAE being replaced")
        for name in retire:
            for stale in [*self.path.glob(f"{name}_*"), self.path / "logs" / name]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
            self._configs.pop(name, None)
            self._settings.pop(name, None)
        if kind == "vqvae":
            (self.path / "codes_cache.npz").unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        return False

    # -- data ----------------------------------------------------------------

    def source(self, folder=None, on_bad=None, split_seed=None, warn=None):
        """The data source and split the VQ-VAE was trained on.

        Args:
            folder: another place for the same data (it moved), or None for
                the run's own.
            on_bad: "error" or "skip"; None takes the run's `--skip-bad`.
            split_seed: None, or the split seed asked for; anything but the
                run's own is refused (it would move training images into
                the test split).
            warn: callable for warnings about skipped files.

        Returns:
            A `dataset.DataSource`.
        """
        data, source = self.settings("vqvae").data, self.config("vqvae").get("source")
        own = data.split_seed
        if split_seed is not None and split_seed != own:
            raise RunError(f"--split-seed {split_seed}: the run {self.path} was split with seed {own}; another "
                           "split would put its training images in the test split. Drop --split-seed, or use "
                           "--split all --data FOLDER for other images.")
        if folder is None and source != "phantoms":
            folder = data.data
            if folder and not Path(folder).is_dir():
                raise RunError(f"the run was trained on {folder}, which is gone. Pass --data with that data's new "
                               "place.")
        if on_bad is None:
            on_bad = "skip" if data.skip_bad else "error"
        return dataset.load_source(folder, seed=own, on_bad=on_bad, warn=warn, slice_axis=data.slice_axis,
                                   slices=data.slices)

    def splits(self, source, names=("train", "validate")):
        """The splits the VQ-VAE trained and validated on (its `limit` applied)."""
        data = self.settings("vqvae").data
        return {name: limit_split(source.splits[name], data.limit, data.split_seed) for name in names}

    def codes(self, vqvae, splits, log=print, cache=None):
        """Code indices (N, h, w) uint16 of each split's images, encoded once and cached.

        The cache (`cache`, default `<run>/codes_cache.npz`) is keyed by the
        VQ-VAE checkpoint's digest, the files of the splits and how images
        are fitted, so it is rebuilt whenever any of them changes.
        """
        data = self.settings("vqvae").data
        key = hashlib.sha1(json.dumps({
            "vqvae": self.vqvae_digest(), "files": {name: split.paths for name, split in splits.items()},
            "image_size": data.image_size, "fit": data.fit,
        }, sort_keys=True).encode()).hexdigest()
        path = Path(cache or self.path / "codes_cache.npz")
        if path.is_file():
            try:
                with np.load(path) as cached:
                    if str(cached["key"]) == key:
                        return {name: cached[name] for name in splits}
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                pass  # unreadable cache: rebuild it
        codes = {}
        for name, split in splits.items():
            log(f"encoding the {name} split ({len(split)} images) with the VQ-VAE, once")
            codes[name] = encode_split(vqvae, split, data.image_size, data.fit)
        tmp = path.with_name(f".codes_cache.tmp-{os.getpid()}.npz")
        np.savez(tmp, key=np.array(key), **codes)
        os.replace(tmp, path)
        return codes

    # -- models --------------------------------------------------------------

    def load_vqvae(self):
        """The run's trained VQ-VAE (best checkpoint, safe mode)."""
        path = self.checkpoint("vqvae")
        if not path.is_file():
            raise RunError(f"no trained VQ-VAE in {self.path} (no {path.name}). Train one with "
                           "`python train.py --model vqvae`, or pass its run folder with --run.")
        return load_checkpoint(path, modules.VQVAE, "VQ-VAE", "Retrain the VQ-VAE with `python train.py --model "
                               f"vqvae --run {self.path} --overwrite`.")

    def vqvae_digest(self):
        """Digest of the VQ-VAE checkpoint the prior must be trained on."""
        return file_digest(self.checkpoint("vqvae"))

    def load_prior(self):
        """The run's trained prior, after checking it was trained on this run's VQ-VAE."""
        path = self.checkpoint("pixelcnn")
        retrain = f"`python train.py --model pixelcnn --run {self.path} --overwrite`"
        if not path.is_file():
            raise RunError(f"no trained prior in {self.path} (no {path.name}). Train one with "
                           f"`python train.py --model pixelcnn --run {self.path}`.")
        trained_on = self.config("pixelcnn").get("vqvae_digest")
        if trained_on is None:
            raise RunError(f"the prior in {self.path} does not record which VQ-VAE it was trained on (it predates "
                           f"that check), so it may not match the VQ-VAE there now. Retrain it with {retrain}.")
        if trained_on != self.vqvae_digest():
            raise RunError(f"the prior in {self.path} was trained on another VQ-VAE than the one there now "
                           f"(vqvae_best.keras changed); its codes would be garbage. Retrain it with {retrain}.")
        return load_checkpoint(path, modules.GatedPixelCNN, "gated PixelCNN prior", f"Retrain it with {retrain}.")


# ---------------------------------------------------------------------------
# Callbacks: what a training run writes into its folder as it goes
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
        atomic_save(self.model, self.last)
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        if better:
            self.best_value, self.best_epoch = float(value), epoch + 1
            atomic_save(self.model, self.best)


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
        write_json(self.folder / "training_metadata.json", {"epoch": epoch, "batches_done": done})

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
            raise RunError(f"cannot read the backup {path} ({str(err).splitlines()[0][:160]}). Delete "
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


def epochs_since_best(values, mode="min"):
    """Epochs logged after the best of `values` (the first best on ties); None when there are none."""
    if not values:
        return None
    best = int(np.argmax(values) if mode == "max" else np.argmin(values))  # the first best
    return len(values) - 1 - best


class StopWhenStale(keras.callbacks.Callback):
    """Early stopping that survives a resume: ends `fit` after `patience` epochs without a better `monitor`.

    Unlike `keras.callbacks.EarlyStopping`, its count is read from the values
    of every epoch logged so far (`earlier`: a resumed run's CSV log), so an
    interrupted run stops where an uninterrupted one does. It restores
    nothing itself: the best checkpoint (`AtomicCheckpoint`) is what is kept.

    Args:
        monitor: the logged value to watch (e.g. `val_bits_per_code`).
        mode: `min` or `max`: which way is better.
        patience: epochs without a better value before stopping (> 0).
        earlier: the values of the epochs already trained.
    """

    def __init__(self, monitor, mode, patience, earlier=()):
        super().__init__()
        if patience < 1:
            raise ValueError(f"patience must be at least 1 epoch. Received: patience={patience}")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.values = [float(v) for v in earlier]

    @property
    def stale(self):
        since = epochs_since_best(self.values, self.mode)
        return since is not None and since >= self.patience

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and math.isfinite(value):
            self.values.append(float(value))
        if self.stale:
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
        save_comparison(self.images, self.model.reconstruct(self.images).numpy(), path, title)


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
