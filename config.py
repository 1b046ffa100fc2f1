"""Configuration: a typed config per model and per training, built from a named preset.

    cfg = config.preset("oasis-256")                      # a `Config`
    cfg = config.override(cfg, ["vqvae.num_codes=256"])   # what `--set` does
    config.from_record(config.to_record(cfg)) == cfg      # what a run folder stores

A preset names its use; every value in it is explicit (no rule that changes a
value with the data or the code grid). `train.py` starts from the preset,
applies its flags and `--set key=value` items field by field, saves the whole
resolved config in the run folder with `VERSION`, prints it, and a resumed run
reads exactly that back. Why each preset holds what it holds, with the
measurements, is in docs/design.md; every field and flag is in docs/cli.md.

This module imports nothing heavy, so `--help` and flag errors are instant.
"""

import dataclasses
import typing
from dataclasses import dataclass, field

# The version of the run record's layout. A run folder written by another
# version is refused with one line saying to retrain.
VERSION = 2


class ConfigError(ValueError):
    """A config that cannot be built or used, said in one line with the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from and how they are fitted and split.

    Args:
        data: a folder of slices or volumes; None: `data/keras_png_slices_data`
            if present, else the built-in phantoms.
        image_size: the square canvas images are fitted to.
        fit: how other sizes are fitted (`pad`, `stretch` or `crop`).
        split_seed: seed of a generic folder's split and of the `limit`
            subset; None: the training seed.
        limit: at most this many images per split.
        skip_bad: leave out corrupt files with a warning instead of stopping.
        slice_axis: volumes only: the axis they are sliced across.
        slices: volumes only: the slices kept (`LO:HI` or a fraction).
    """

    data: typing.Optional[str] = None
    image_size: int = 256
    fit: str = "pad"
    split_seed: typing.Optional[int] = None
    limit: typing.Optional[int] = None
    skip_bad: bool = False
    slice_axis: str = "axial"
    slices: typing.Optional[str] = None


@dataclass(frozen=True)
class VQVAEConfig:
    """The `modules.VQVAE` arguments (less the seed, which is the training's).

    Args:
        downsample: encoder stride; the code grid is image_size / downsample.
        channels: convolution channels of the encoder (and decoder).
        res_blocks: residual blocks of the encoder (and decoder).
        res_channels: hidden channels of a residual block.
        num_codes: K, the codebook size.
        code_dim: D, the code vector size.
        beta: commitment loss weight.
        codebook: `ema` (moving averages) or `loss` (gradient).
        decay: EMA decay of the codebook.
        loss: `mse` over the whole image, or `ssim_l1` (SSIM inside the brain
            plus L1, `modules.brain_loss`).
        background_weight: with `ssim_l1`, the L1 weight outside the brain.
        normalize_codes: l2-normalised code lookup.
        gradient: `straight_through` or `rotation` (the rotation trick).
        decoder_channels: the decoder's channels; None: `channels`.
        decoder_res_blocks: the decoder's residual blocks; None: `res_blocks`.
    """

    downsample: int = 4
    channels: int = 64
    res_blocks: int = 2
    res_channels: int = 32
    num_codes: int = 512
    code_dim: int = 64
    beta: float = 0.25
    codebook: str = "ema"
    decay: float = 0.99
    loss: str = "mse"
    background_weight: float = 1.0
    normalize_codes: bool = False
    gradient: str = "straight_through"
    decoder_channels: typing.Optional[int] = None
    decoder_res_blocks: typing.Optional[int] = None


@dataclass(frozen=True)
class PriorConfig:
    """The gated PixelCNN's shape and conditioning.

    Args:
        filters: channels of the vertical and horizontal stacks.
        layers: gated layers.
        kernel_size: k (odd): the vertical kernel is (k//2+1) x k.
        skip_filters: channels of the skip connections and the head.
        condition: `slice`, `label`, `both`, `none`, or `auto`: whatever the
            data carry (slice positions in OASIS names, class sub-folders).
        position: a learnt row/column embedding (where in the slice a code is).
        dropout: dropout rate on each gated layer's output in training (0: none).
    """

    filters: int = 64
    layers: int = 8
    kernel_size: int = 5
    skip_filters: int = 128
    condition: str = "auto"
    position: bool = True
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained.

    Args:
        epochs: passes over the training split (of crops, with `crop`).
        batch_size: the global batch.
        learning_rate: Adam's rate (the peak of the cosine schedule).
        schedule: `constant`, or `cosine`: a linear warm-up over
            `warmup_fraction` of the steps, then a cosine decay to 0.
        warmup_fraction: the warm-up's share of the steps (cosine only).
        crop: train on random square crops of this side (0: whole images).
        seed: initialisation, data order, crops and codebook restarts.
        patience: stop after this many epochs without a better validation
            score (0: train every epoch); the best checkpoint is kept.
    """

    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_fraction: float = 0.02
    crop: int = 0
    seed: int = 0
    patience: int = 0


@dataclass(frozen=True)
class Config:
    """Everything that shapes a run: its data, both models and how each is trained."""

    preset: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    vqvae_train: TrainConfig = field(default_factory=TrainConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    prior_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, batch_size=32, patience=5))

    @property
    def grid(self):
        """Code positions a side: image_size / downsample."""
        return self.data.image_size // self.vqvae.downsample

    def training(self, model):
        """The `TrainConfig` of `model` ("vqvae" or "pixelcnn")."""
        return self.vqvae_train if model == "vqvae" else self.prior_train


SECTIONS = ("data", "vqvae", "vqvae_train", "prior", "prior_train")

# The brain recipe of the coarse grids: SSIM inside the brain + L1, l2-normalised lookup, the rotation trick.
_BRAIN = dict(loss="ssim_l1", normalize_codes=True, gradient="rotation")
# The prior of the phantom demo: small enough to train in minutes on a CPU.
_DEMO_PRIOR = PriorConfig(filters=32, layers=6, skip_filters=64)

PRESETS = {
    # The quick start: 128 px phantoms, 32x32 codes, whole images, minutes on a CPU.
    "phantoms": Config(
        preset="phantoms", data=DataConfig(image_size=128), vqvae=VQVAEConfig(**_BRAIN),
        vqvae_train=TrainConfig(epochs=12), prior=_DEMO_PRIOR, prior_train=TrainConfig(epochs=10, batch_size=32)),
    # Reconstruction of real slices: 256 px, 64x64 codes, 64 px crops with a cosine rate.
    "oasis-256": Config(
        preset="oasis-256", data=DataConfig(image_size=256),
        vqvae_train=TrainConfig(epochs=480, schedule="cosine", crop=64)),
    # Compression at a quarter of the codes: 256 px, 32x32 codes, brain recipe, a wider decoder.
    "oasis-256-32": Config(
        preset="oasis-256-32", data=DataConfig(image_size=256),
        vqvae=VQVAEConfig(downsample=8, decoder_channels=96, decoder_res_blocks=3, **_BRAIN),
        vqvae_train=TrainConfig(epochs=480, schedule="cosine", crop=64)),
    # Generation on a CPU: 128 px, 32x32 codes the prior samples in seconds, brain recipe, a wider decoder.
    "oasis-128": Config(
        preset="oasis-128", data=DataConfig(image_size=128),
        vqvae=VQVAEConfig(decoder_channels=96, decoder_res_blocks=3, **_BRAIN),
        vqvae_train=TrainConfig(epochs=480, schedule="cosine", crop=32)),
}


def preset(name):
    """The `Config` of preset `name` (see `PRESETS`).

    Example:
    >>> preset("phantoms").data.image_size
    128
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset. Use one of {', '.join(PRESETS)}. Received: preset={name!r}")
    return PRESETS[name]


# ---------------------------------------------------------------------------
# Field-by-field overrides (`--set key=value`)
# ---------------------------------------------------------------------------


def keys():
    """Every settable key, `section.field`, in order."""
    return [f"{section}.{f.name}" for section in SECTIONS for f in dataclasses.fields(getattr(Config(), section))]


def _field_type(section, name):
    cls = type(getattr(Config(), section))
    return typing.get_type_hints(cls)[name]


def parse_value(text, kind):
    """`text` as a value of type `kind` (int, float, bool, str, or Optional of one; `none` for None)."""
    optional = typing.get_origin(kind) is typing.Union
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if text.lower() in ("none", "null"):
            return None
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("not true or false")
    return kind(text)


def _fields(section):
    return {f.name for f in dataclasses.fields(getattr(Config(), section))}


def resolve_key(key, model="vqvae"):
    """(section, field) of `key`.

    `key` is `section.field`; `train.field` (the training section of `model`,
    "vqvae" or "pixelcnn"); or a bare field name found in one section, a
    training field then meaning `model`'s.
    """
    train = "vqvae_train" if model == "vqvae" else "prior_train"
    section, dot, name = key.rpartition(".")
    if dot:
        section = train if section == "train" else section
        if section in SECTIONS and name in _fields(section):
            return section, name
    else:
        owners = [s for s in SECTIONS if key in _fields(s)]
        if set(owners) == {"vqvae_train", "prior_train"}:
            owners = [train]
        if len(owners) == 1:
            return owners[0], key
        if owners:
            raise ConfigError(f"--set {key}: the key is in {' and '.join(owners)}; name one, e.g. "
                              f"{owners[0]}.{key}. Received: key={key!r}")
    raise ConfigError(f"--set: unknown key (every key is in docs/cli.md). Received: key={key!r}")


def replace(cfg, section, **values):
    """`cfg` with fields of `section` replaced."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})


def override(cfg, items, model="vqvae"):
    """`cfg` with each `key=value` of `items` applied, in order (what `--set` does).

    `model` ("vqvae" or "pixelcnn") is the model being trained: bare training
    keys such as `epochs` and `train.*` keys change its training section.

    Example:
    >>> override(preset("phantoms"), ["num_codes=64", "prior.layers=4"]).vqvae.num_codes
    64
    """
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value. Received: {item!r}")
        section, name = resolve_key(key.strip(), model)
        try:
            value = parse_value(text.strip(), _field_type(section, name))
        except ValueError:
            raise ConfigError(f"--set {section}.{name}: {text!r} is not a {_field_type(section, name)}. "
                              f"Received: {item!r}") from None
        cfg = replace(cfg, section, **{name: value})
    return cfg


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


CHOICES = {
    ("data", "fit"): ("pad", "stretch", "crop"),
    ("data", "slice_axis"): ("axial", "coronal", "sagittal"),
    ("vqvae", "codebook"): ("ema", "loss"),
    ("vqvae", "loss"): ("mse", "ssim_l1"),
    ("vqvae", "gradient"): ("straight_through", "rotation"),
    ("prior", "condition"): ("auto", "none", "slice", "label", "both"),
    ("vqvae_train", "schedule"): ("constant", "cosine"),
    ("prior_train", "schedule"): ("constant", "cosine"),
}


def validate(cfg):
    """Raises `ConfigError` (one line, `Received: key=value`) for the first value `cfg` cannot train with."""
    for (section, name), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(allowed)}. Received: {name}={value!r}")
    d, v, p = cfg.data, cfg.vqvae, cfg.prior
    checks = [
        (d.image_size >= 32, "data.image_size must be at least 32 (SSIM uses an 11-pixel window)",
         "image_size", d.image_size),
        (d.limit is None or d.limit >= 1, "data.limit must be at least 1", "limit", d.limit),
        (v.downsample >= 2 and v.downsample & (v.downsample - 1) == 0,
         "vqvae.downsample must be a power of two (2, 4, 8, ...)", "downsample", v.downsample),
        (d.image_size % v.downsample == 0, f"data.image_size must be a multiple of vqvae.downsample "
                                           f"({v.downsample})", "image_size", d.image_size),
        (v.num_codes >= 2, "vqvae.num_codes must be at least 2", "num_codes", v.num_codes),
        (v.code_dim >= 1, "vqvae.code_dim must be at least 1", "code_dim", v.code_dim),
        (v.channels >= 1 and v.res_channels >= 1, "vqvae.channels and res_channels must be at least 1",
         "channels", v.channels),
        (v.res_blocks >= 0, "vqvae.res_blocks must be 0 or more", "res_blocks", v.res_blocks),
        (v.decoder_channels is None or v.decoder_channels >= 1, "vqvae.decoder_channels must be at least 1",
         "decoder_channels", v.decoder_channels),
        (v.decoder_res_blocks is None or v.decoder_res_blocks >= 0, "vqvae.decoder_res_blocks must be 0 or more",
         "decoder_res_blocks", v.decoder_res_blocks),
        (0.0 <= v.decay < 1.0, "vqvae.decay must be in [0, 1)", "decay", v.decay),
        (p.layers >= 1, "prior.layers must be at least 1", "layers", p.layers),
        (p.filters >= 1 and p.skip_filters >= 1, "prior.filters and skip_filters must be at least 1",
         "filters", p.filters),
        (p.kernel_size >= 3 and p.kernel_size % 2 == 1, "prior.kernel_size must be odd and at least 3",
         "kernel_size", p.kernel_size),
        (0.0 <= p.dropout < 1.0, "prior.dropout must be in [0, 1)", "dropout", p.dropout),
    ]
    for section in ("vqvae_train", "prior_train"):
        t = getattr(cfg, section)
        checks += [
            (t.epochs >= 1, f"{section}.epochs must be at least 1", "epochs", t.epochs),
            (t.batch_size >= 1, f"{section}.batch_size must be at least 1", "batch_size", t.batch_size),
            (t.learning_rate > 0, f"{section}.learning_rate must be positive", "learning_rate", t.learning_rate),
            (0.0 <= t.warmup_fraction < 1.0, f"{section}.warmup_fraction must be in [0, 1)", "warmup_fraction",
             t.warmup_fraction),
            (t.patience >= 0, f"{section}.patience must be 0 (never stop early) or more epochs", "patience",
             t.patience),
        ]
    crop = cfg.vqvae_train.crop
    checks.append((crop == 0 or (crop >= 16 and crop % v.downsample == 0),
                   f"vqvae_train.crop must be 0 (whole images) or a multiple of vqvae.downsample ({v.downsample}) "
                   "of at least 16 (SSIM uses an 11-pixel window)", "crop", crop))
    for ok, message, name, value in checks:
        if not ok:
            raise ConfigError(f"{message}. Received: {name}={value!r}")
    return cfg


# ---------------------------------------------------------------------------
# The run record
# ---------------------------------------------------------------------------


def to_record(cfg):
    """`cfg` as the JSON-ready dict a run folder stores (with `VERSION`)."""
    return {"version": VERSION, **dataclasses.asdict(cfg)}


def check_version(record, where="the run", retrain="retrain it in a new --run folder."):
    """Refuses a record of another layout version: one `ConfigError` line naming `where` and saying to retrain."""
    version = record.get("version") if isinstance(record, dict) else None
    if version != VERSION:
        raise ConfigError(f"{where} was written by an older version of this project (config version "
                          f"{version or 1}, this one reads {VERSION}); its settings cannot be read back: {retrain}")


def from_record(record, where="the run"):
    """The `Config` stored by `to_record`; another version is one `ConfigError` line saying to retrain."""
    check_version(record, where)
    try:
        return Config(preset=record["preset"],
                      **{s: type(getattr(Config(), s))(**record[s]) for s in SECTIONS})
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{where} holds a config this version cannot read ({err}). Retrain it in a new --run "
                          "folder.") from None


def describe(cfg, model):
    """A few lines that show the resolved config of `model` (printed at the start of training)."""
    sections = ("data", "vqvae", "vqvae_train") if model == "vqvae" else ("prior", "prior_train")

    def line(section):
        return f"  {section}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(getattr(cfg, section)).items())

    return "\n".join([f"config (preset {cfg.preset}):", *map(line, sections)])
