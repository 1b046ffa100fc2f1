"""Image-quality metrics of reconstructions: SSIM and PSNR over the whole image and inside the brain.

This file has one job: score reconstructions against their originals, per
image, in a way that runs on batches inside a `tf.function` (training and
validation metrics, XLA included) as well as eagerly.

About half of a brain slice's canvas is black background (44% to 49% on
the real slices), which any model reconstructs almost perfectly: averaged
over the whole canvas, SSIM read 0.977 on real slices where the brain alone
read 0.939. So next to the whole-image scores, `image_quality` reports
scores inside ONE brain mask, `brain_mask`, computed from the original
image only (never from the reconstruction, so a model cannot move it):

  1. a 3x3 box smoothing (averaging the pixels inside the image only),
  2. foreground = smoothed intensity above `THRESHOLD` (0.05 of [0, 1]),
  3. holes filled: background is only what connects to the image border
     through below-threshold pixels (4-connected), so dark ventricles and
     sulci enclosed by brain count as brain.

Why 0.05 and the smoothing: on the real slices (JPEG), background pixels
reach 0.047 from compression noise while 99.9% of brain pixels are above
0.055; thresholded alone at 0.05 a slice still has about 30 specks of
background noise as separate "brain" components, and after the 3x3
smoothing every one of 60 slices checked gives exactly one component. The
smoothing moves the outline out by at most one pixel (one pixel at a hard
edge; brain 51.8% of the canvas vs 50.9% unsmoothed on the real slices).
The phantoms' background is exactly 0.

SSIM is the per-pixel SSIM map of `tf.image.ssim` (11x11 Gaussian window,
sigma 1.5, K1 = 0.01, K2 = 0.03, max_val 1): its mean over the map is
`tf.image.ssim` (to float rounding, within 1e-6; the window is applied as
two 1-D passes, about 10x faster on a CPU than `tf.image.ssim`'s 11x11
one). The map is "VALID" sized, (H - 10) x (W - 10): map pixel (i, j) is
the window centred on image pixel (i + 5, j + 5), so the brain SSIM
averages the map over the mask cropped by 5 pixels on every side.

PSNR inside the brain is 10 log10(1 / MSE) with the MSE over mask pixels.
An image whose mask is empty (an all-background slice) has NaN brain
scores, as does an image whose brain lies entirely within 5 pixels of the
border for the brain SSIM; identical images give PSNR inf, as
`tf.image.psnr` does.
"""

import hashlib
import json
import os
import weakref
from pathlib import Path

import numpy as np
from scipy import ndimage, stats
from skimage.feature import graycomatrix, graycoprops
from skimage.filters import threshold_multiotsu

import dataset
import volumes

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

THRESHOLD = 0.05  # foreground: smoothed intensity above this, in [0, 1]
SMOOTHING = 3  # side of the box filter applied before thresholding
FILTER_SIZE, FILTER_SIGMA = 11, 1.5  # SSIM's Gaussian window, as tf.image.ssim
K1, K2 = 0.01, 0.03  # SSIM's stabilising constants, as tf.image.ssim
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # tf.image.ssim_multiscale's, finest first


def _as_images(x, name):
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 4:
        raise ValueError(f"{name} must be a batch (B, H, W, C). Received: {name} of shape {tuple(x.shape)}")
    return tf.cast(x, tf.float32)


def _spread_along_rows(reached, open_):
    """Spreads `reached` along every run of `open_` pixels of the last axis.

    Both are bool (N, H, W). A run is a maximal stretch of open pixels in one
    row; if any of its pixels is reached, all of it becomes reached. Each run
    gets a unique id (closed pixels so far in its row, plus an offset per
    row), and one segment max per run tells whether it holds a reached pixel.
    """
    shape = tf.shape(open_)
    rows, width = shape[0] * shape[1], shape[2]
    closed = tf.cast(tf.logical_not(open_), tf.int32)
    offset = tf.reshape(tf.range(rows) * (width + 1), (shape[0], shape[1], 1))
    run = tf.cumsum(closed, axis=-1) + offset
    hit = tf.math.unsorted_segment_max(tf.cast(reached, tf.int32), run, rows * (width + 1))
    return tf.logical_and(open_, tf.gather(hit, run) > 0)


def fill_holes(foreground):
    """Fills the holes of a batch of binary masks, as `scipy.ndimage.binary_fill_holes`.

    A hole is a region of background pixels not connected to the image
    border through background pixels (4-connectivity). Background is grown
    from the border, alternately along whole runs of rows and of columns,
    until it stops growing (two rounds on real brain slices); everything it
    did not reach is foreground.

    Args:
        foreground: bool (B, H, W, 1).

    Returns:
        bool (B, H, W, 1): `foreground` with its holes filled.

    Example:
    >>> ring = tf.pad(tf.pad(tf.zeros((1, 2, 2, 1), tf.bool), [[0, 0], [1, 1], [1, 1], [0, 0]],
    ...               constant_values=True), [[0, 0], [1, 1], [1, 1], [0, 0]])
    >>> int(tf.reduce_sum(tf.cast(fill_holes(ring), tf.int32)))
    16
    """
    foreground = tf.convert_to_tensor(foreground)[..., 0]
    open_ = tf.logical_not(foreground)
    open_columns = tf.transpose(open_, (0, 2, 1))
    height, width = tf.shape(foreground)[1], tf.shape(foreground)[2]
    rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
    border = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)

    def grow(reached, _):
        grown = _spread_along_rows(reached, open_)
        grown = tf.transpose(_spread_along_rows(tf.transpose(grown, (0, 2, 1)), open_columns), (0, 2, 1))
        return grown, tf.reduce_any(grown != reached)

    background, _ = tf.while_loop(lambda _, growing: growing, grow,
                                  (tf.logical_and(open_, border[None]), tf.constant(True)))
    return tf.logical_not(background)[..., None]


def brain_mask(images, threshold=THRESHOLD):
    """The brain of each image: smoothed intensity above `threshold`, holes filled.

    The one mask every brain score uses (see the module docstring for why
    this threshold and smoothing). Multi-channel images are thresholded on
    their channel mean.

    Args:
        images: original images (B, H, W, C) in [0, 1].
        threshold: foreground threshold on the 3x3-smoothed intensity.

    Returns:
        bool (B, H, W, 1).

    Example:
    >>> # A bright 8x8 "brain" around a dark 4x4 "ventricle", on black: 16x16.
    >>> brain = tf.pad(tf.zeros((1, 4, 4, 1)), [[0, 0], [2, 2], [2, 2], [0, 0]], constant_values=0.8)
    >>> mask = brain_mask(tf.pad(brain, [[0, 0], [4, 4], [4, 4], [0, 0]]))
    >>> tuple(mask.shape), bool(mask[0, 8, 8, 0]), bool(mask[0, 1, 1, 0])
    ((1, 16, 16, 1), True, False)
    """
    images = _as_images(images, "images")
    intensity = tf.reduce_mean(images, axis=-1)
    # A SMOOTHING x SMOOTHING box mean over the pixels inside the image only
    # (as avg_pool2d's "SAME"), as products with banded 0/1 matrices: several
    # times faster than pooling on a CPU.
    rows, cols = _box_matrix(tf.shape(images)[1]), _box_matrix(tf.shape(images)[2])
    sums = tf.einsum("hu,buv,vw->bhw", rows, intensity, cols)
    counts = tf.reduce_sum(rows, axis=1)[:, None] * tf.reduce_sum(cols, axis=0)[None, :]
    return fill_holes((sums / counts > threshold)[..., None])


def _box_matrix(n):
    """(n, n) float32 with ones where |i - j| <= SMOOTHING // 2: `M @ x` sums each pixel's neighbours along an axis."""
    offset = tf.range(n)[:, None] - tf.range(n)[None, :]
    return tf.cast(tf.abs(offset) <= SMOOTHING // 2, tf.float32)


def _gaussian_window():
    """The 1-D factor of tf.image.ssim's window: its 11x11 kernel is the outer product of this with itself."""
    coords = tf.range(FILTER_SIZE, dtype=tf.float32) - (FILTER_SIZE - 1) / 2.0
    return tf.nn.softmax(tf.square(coords) * (-0.5 / FILTER_SIGMA**2))


def _window_matrix(n):
    """(n, n - 10) float32: column j holds the Gaussian window over rows j .. j + 10, so `x @ M` filters "VALID"."""
    offset = tf.range(n)[:, None] - tf.range(n - FILTER_SIZE + 1)[None, :]
    inside = tf.logical_and(offset >= 0, offset < FILTER_SIZE)
    return tf.where(inside, tf.gather(_gaussian_window(), tf.clip_by_value(offset, 0, FILTER_SIZE - 1)), 0.0)


def ssim_map(images, reconstructions, max_val=1.0):
    """Per-pixel SSIM, the map `tf.image.ssim` averages, (B, H - 10, W - 10).

    Local means, variances and covariance are Gaussian-weighted over an
    11x11 window (sigma 1.5) that stays inside the image ("VALID"), so map
    pixel (i, j) is the window centred on image pixel (i + 5, j + 5).
    Channels are averaged. `ops.mean(ssim_map(a, b), axis=(1, 2))` equals
    `tf.image.ssim(a, b, max_val)` to float rounding.

    Args:
        images: originals (B, H, W, C), H and W at least 11.
        reconstructions: same shape.
        max_val: the dynamic range of the pixel values.

    Returns:
        float32 (B, H - 10, W - 10).
    """
    luminance, contrast_structure = _ssim_terms(_as_images(images, "images"),
                                                _as_images(reconstructions, "reconstructions"), max_val)
    return tf.reduce_mean(luminance * contrast_structure, axis=-1)


def _ssim_terms(x, y, max_val=1.0):
    """SSIM's luminance and contrast-structure maps, (B, H - 10, W - 10, C), per channel."""
    if x.shape[1] is not None and x.shape[2] is not None and min(x.shape[1], x.shape[2]) < FILTER_SIZE:
        raise ValueError(f"SSIM needs images of at least {FILTER_SIZE}x{FILTER_SIZE} pixels. "
                         f"Received: images of shape {tuple(x.shape)}")
    # One pass of the window over the four local statistics: the separable
    # window as two products with banded matrices, about twice as fast on a
    # CPU as depthwise convolutions forward and backward.
    stacked = tf.concat([x, y, x * y, tf.square(x) + tf.square(y)], axis=-1)
    local = tf.einsum("bhwc,wv->bhvc", stacked, _window_matrix(tf.shape(x)[2]))
    local = tf.einsum("bhvc,hu->buvc", local, _window_matrix(tf.shape(x)[1]))
    mean_x, mean_y, mean_xy, mean_squares = tf.split(local, 4, axis=-1)
    # As tf.image.ssim's _ssim_helper, term for term.
    c1, c2 = (K1 * max_val) ** 2, (K2 * max_val) ** 2
    num0 = mean_x * mean_y * 2.0
    den0 = tf.square(mean_x) + tf.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    contrast_structure = (mean_xy * 2.0 - num0 + c2) / (mean_squares - den0 + c2)
    return luminance, contrast_structure


def ms_ssim(images, others, power_factors=MSSSIM_WEIGHTS, max_val=1.0):
    """Multi-scale SSIM per image pair, as `tf.image.ssim_multiscale`, with the separable window (several times faster).

    Scale by scale (each a 2x2 average of the last, odd sides padded
    symmetrically as tf does): the mean contrast-structure term, and at the
    coarsest scale the mean SSIM; each clipped at 0, raised to its power
    factor and multiplied; averaged over channels. Equals
    `tf.image.ssim_multiscale(images, others, max_val, power_factors)` to
    float rounding (tested).

    Args:
        images, others: (B, H, W, C) in [0, max_val]; the coarsest scale
            must be at least 11 pixels (see `msssim_scales`).
        power_factors: one weight per scale, finest first.

    Returns:
        float32 (B,).
    """
    x, y = _as_images(images, "images"), _as_images(others, "others")
    factors = tf.constant(power_factors, tf.float32)
    terms = []
    for k in range(len(power_factors)):
        if k > 0:
            pad = [[0, 0], [0, x.shape[1] % 2], [0, x.shape[2] % 2], [0, 0]]
            x, y = (tf.nn.avg_pool2d(tf.pad(t, pad, mode="SYMMETRIC"), 2, 2, "VALID") for t in (x, y))
        luminance, contrast_structure = _ssim_terms(x, y, max_val)
        if k < len(power_factors) - 1:
            terms.append(tf.nn.relu(tf.reduce_mean(contrast_structure, axis=(1, 2))))
        else:
            terms.append(tf.nn.relu(tf.reduce_mean(luminance * contrast_structure, axis=(1, 2))))
    return tf.reduce_mean(tf.reduce_prod(tf.pow(tf.stack(terms, axis=-1), factors), axis=-1), axis=-1)


def _masked_mean(values, mask):
    """Mean of `values` (B, ...) over `mask` pixels, per image; NaN where the mask is empty."""
    mask = tf.cast(mask, tf.float32)
    axes = list(range(1, values.shape.rank))
    count = tf.reduce_sum(mask, axis=axes)
    total = tf.reduce_sum(values * mask, axis=axes)
    return tf.where(count > 0, total / tf.maximum(count, 1.0), float("nan"))


def image_quality(images, reconstructions, mask=None):
    """Per-image SSIM and PSNR of reconstructions clipped to [0, 1], whole image and inside the brain.

    Args:
        images: originals (B, H, W, C) in [0, 1], H and W at least 11.
        reconstructions: same shape, any float dtype; clipped to [0, 1].
        mask: `brain_mask(images)` if the caller has it already (None:
            computed here).

    Returns:
        A dict of float32 (B,) tensors:
        "ssim": mean of the SSIM map (`tf.image.ssim` with max_val 1),
        "psnr": `tf.image.psnr` with max_val 1,
        "ssim_brain": mean of the SSIM map over `brain_mask(images)`
            cropped to the map (5 pixels off every side),
        "psnr_brain": 10 log10(1 / MSE over the brain mask).
        The brain scores are NaN where the mask (or its cropped part) is
        empty.

    Example:
    >>> images = tf.random.stateless_uniform((2, 32, 32, 1), seed=[0, 1])
    >>> scores = image_quality(images, images)
    >>> sorted(scores), [round(float(s), 4) for s in scores["ssim"]]
    (['psnr', 'psnr_brain', 'ssim', 'ssim_brain'], [1.0, 1.0])
    """
    images = _as_images(images, "images")
    reconstructions = tf.clip_by_value(_as_images(reconstructions, "reconstructions"), 0.0, 1.0)
    mask = brain_mask(images) if mask is None else mask
    ssim = ssim_map(images, reconstructions)  # (B, H - 10, W - 10)
    crop = (FILTER_SIZE - 1) // 2
    ssim_mask = mask[:, crop:-crop, crop:-crop, 0]
    squared_error = tf.reduce_mean(tf.square(images - reconstructions), axis=-1, keepdims=True)
    return {
        "ssim": tf.reduce_mean(ssim, axis=(1, 2)),
        "psnr": tf.image.psnr(images, reconstructions, max_val=1.0),
        "ssim_brain": _masked_mean(ssim, ssim_mask),
        "psnr_brain": 10.0 * tf.math.log(1.0 / _masked_mean(squared_error, mask)) / tf.math.log(10.0),
    }


# ---------------------------------------------------------------------------
# Generated slices against real ones
# ---------------------------------------------------------------------------
#
# No pretrained network may be downloaded here, so the learned features come
# from an evaluation network of our own: a small CNN trained, only on a data
# set's training split, to tell which of four rotations was applied to a
# slice (RotNet, Gidaris et al. 2018). That task needs no labels, works on any
# folder of slices, and can only be solved by knowing what a brain looks like
# the right way up: its global layout (which end is frontal, where the
# ventricles and the cerebellum sit) as well as its texture. The network is
# never shown a VQ-VAE reconstruction or a sample. Its features are the
# concatenation of a texture part (the spatial mean of an intermediate layer)
# and a layout part (a dense embedding of the last 4x4 feature map), 256
# numbers per slice.

EVAL_SIZE = 128  # slices are resized (area) to this side for the evaluation network and the C2ST
EVAL_STEPS = 600  # training steps of the evaluation network (batch 32)
EVAL_VERSION = 1  # part of the cache key: bump when the network or its training changes
NEAREST_K = 5  # k of precision, recall, density and coverage
FEW_SAMPLES = 100  # below this many samples the distribution metrics are noisy: warn


def to_eval_size(images, size=EVAL_SIZE):
    """Images (B, H, W, 1) in [0, 1] resized to `size` x `size`: area averaging down, bilinear up."""
    images = _as_images(images, "images")
    if images.shape[1] == size and images.shape[2] == size:
        return images
    method = "area" if images.shape[1] >= size else "bilinear"
    return tf.image.resize(images, (size, size), method=method)


def _rotations(images, seed):
    """Each image rotated by a random multiple of 90 degrees; returns (rotated, k)."""
    k = tf.random.stateless_uniform((tf.shape(images)[0],), seed, 0, 4, dtype=tf.int32)
    turns = tf.stack([tf.image.rot90(images, i) for i in range(4)])  # (4, B, H, W, 1), square images
    return tf.gather_nd(tf.transpose(turns, (1, 0, 2, 3, 4)), tf.stack([tf.range(tf.shape(k)[0]), k], 1)), k


def evaluation_network(size=EVAL_SIZE, seed=0):
    """The evaluation network: a rotation classifier whose "features" output is 256 numbers per slice.

    Args:
        size: input side (slices are resized to it with `to_eval_size`).
        seed: seed of the initial weights.

    Returns:
        A `keras.Model` mapping (B, size, size, 1) to
        {"logits": (B, 4), "features": (B, 256)}.
    """
    init = keras.initializers.HeNormal(seed=seed)
    inputs = keras.Input((size, size, 1))
    x = inputs
    for i, filters in enumerate((32, 64, 128, 128, 64)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", kernel_initializer=init,
                                name=f"conv{i + 1}")(x)
        if i == 2:
            texture = keras.layers.GlobalAveragePooling2D(name="texture")(x)
    x = keras.layers.AveragePooling2D(x.shape[1] // 4, name="to_4x4")(x) if x.shape[1] > 4 else x
    layout = keras.layers.Dense(128, activation="relu", kernel_initializer=init, name="layout")(
        keras.layers.Flatten()(x))
    logits = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                name="rotation")(layout)
    features = keras.layers.Concatenate(name="features")([texture, layout])
    return keras.Model(inputs, {"logits": logits, "features": features}, name="evaluation_network")


def files_digest(paths, extra=""):
    """SHA-256 over the names and bytes of `paths` (in order) and `extra`: the cache key of a trained network.

    A volume slice reference (`volume.nii.gz#axial=87`) counts as its name and
    its volume's bytes (each volume read once).
    """
    digest = hashlib.sha256(extra.encode())
    volume_digests = {}
    for path in paths:
        name = os.path.basename(path).encode()
        if volumes.is_reference(path):
            volume = volumes.parse_reference(path)[0]
            if volume not in volume_digests:
                volume_digests[volume] = hashlib.sha256(b"".join(
                    Path(f).read_bytes() for f in volumes.files_of(volume))).hexdigest().encode()
            contents = volume_digests[volume]
        else:
            with open(path, "rb") as f:
                contents = f.read()
        digest.update(b"%d:%s%d:" % (len(name), name, len(contents)))  # lengths frame each file
        digest.update(contents)
    return digest.hexdigest()


def train_evaluation_network(images, steps=EVAL_STEPS, batch_size=32, seed=0, log=print):
    """Trains `evaluation_network()` to predict rotations of the images a dataset yields.

    Args:
        images: a repeating `tf.data.Dataset` of image batches (B, H, W, 1)
            in [0, 1] (the training split; shuffled).
        steps: training steps.
        batch_size: only for the log line; the dataset sets the batch.
        seed: seed of the weights and of the rotations.
        log: callable for progress lines.

    Returns:
        `(model, rotation accuracy over the last 50 steps)`.
    """
    model = evaluation_network(seed=seed)
    optimizer = keras.optimizers.Adam(1e-3)

    @tf.function
    def step(batch, i):
        # A random shift of up to 8 pixels, so the borders of the canvas carry no cue.
        batch = to_eval_size(batch)
        shift = tf.random.stateless_uniform((2,), [seed, 2 * i + 1], -8, 9, dtype=tf.int32)
        batch = tf.roll(batch, shift, axis=(1, 2))
        rotated, k = _rotations(batch, [seed, 2 * i])
        with tf.GradientTape() as tape:
            logits = model(rotated, training=True)["logits"]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(k, logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), k), tf.float32))

    bar = keras.utils.Progbar(steps, unit_name="step", interval=1.0)
    accuracy, it = [], iter(images)
    for i in range(steps):
        accuracy.append(float(step(next(it), tf.constant(i, tf.int64))))
        bar.update(i + 1)
    return model, float(np.mean(accuracy[-50:]))


def load_evaluation_network(split, image_size, fit, cache_dir, steps=None, seed=0, log=print):
    """The evaluation network of a training split: loaded from `cache_dir`, else trained once and saved there.

    The cache key is a digest of the training files (names and bytes), the
    size and fit they are loaded at, the training steps, the seed and
    `EVAL_VERSION`; a changed file retrains it.

    Args:
        split: the training `dataset.Split`.
        image_size, fit: how the slices are loaded (as the VQ-VAE saw them).
        cache_dir: folder of cached networks.
        steps, seed: training steps (default `EVAL_STEPS`) and seed.
        log: callable for progress lines.

    Returns:
        A `keras.Model` (see `evaluation_network`).
    """
    steps = steps or EVAL_STEPS
    key = files_digest(split.paths, f"v{EVAL_VERSION} size={image_size} fit={fit} steps={steps} seed={seed}")[:16]
    path = Path(cache_dir) / "evaluation_network" / f"{key}.weights.h5"
    model = evaluation_network(seed=seed)
    if path.is_file():
        try:
            model.load_weights(path)
            return model
        except Exception as err:  # a damaged cache file is rebuilt, never trusted
            log(f"warning: cached evaluation network {path} is unreadable ({type(err).__name__}); retraining it")
    log(f"training the evaluation network (rotation prediction, {steps} steps) on {len(split)} training slices; "
        f"cached as {path}")
    keras.utils.set_random_seed(seed)
    stream = dataset.make_dataset(split, image_size=image_size, batch_size=32, shuffle=True, seed=seed, repeat=True,
                                  drop_remainder=len(split) >= 32, fit=fit)
    model, accuracy = train_evaluation_network(stream, steps=steps, seed=seed, log=log)
    log(f"evaluation network: rotation accuracy {accuracy:.3f} over its last 50 training batches")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, path)
    with open(path.with_suffix("").with_suffix(".json"), "w") as f:
        json.dump({"files": len(split), "image_size": image_size, "fit": fit, "steps": steps, "seed": seed,
                   "rotation_accuracy": accuracy, "version": EVAL_VERSION}, f)
    return model


_FEATURE_FUNCTIONS = weakref.WeakKeyDictionary()  # evaluation network -> its compiled feature function


def features(network, images, batch_size=64):
    """The evaluation network's features of images (N, H, W, 1) in [0, 1]: float64 (N, 256).

    The compiled feature function is made once per network and reused, so
    scoring many sets (a benchmark's rows, a test's series) traces it once.
    """
    run = _FEATURE_FUNCTIONS.get(network)
    if run is None:
        model = weakref.ref(network)  # the function must not keep its own key alive
        run = tf.function(lambda x: model()(to_eval_size(x), training=False)["features"], reduce_retracing=True)
        _FEATURE_FUNCTIONS[network] = run
    images = np.asarray(images, np.float32)
    return np.concatenate([run(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
                          ).astype(np.float64)


def frechet_distance(x, y):
    """Frechet distance between Gaussians fitted to feature sets x (N, D) and y (M, D).

    ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)), the trace of the
    square root taken as the sum of square roots of the eigenvalues of
    S_x^(1/2) S_y S_x^(1/2) (symmetric, so exact eigh; no complex sqrtm).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two sets of at least 2 feature vectors of one width. Received: shapes {x.shape}, "
                         f"{y.shape}")
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    values, vectors = np.linalg.eigh(sx)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sy @ root), 0, None)).sum()
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy) - 2.0 * cross)


def kernel_inception_distance(x, y, subset_size=1000, subsets=100, seed=0):
    """KID: the unbiased estimate of the squared MMD with the cubic polynomial kernel (Binkowski et al. 2018).

    k(a, b) = (a . b / D + 1)^3. With two sets of one size no larger than
    `subset_size` the estimate uses all of them once; otherwise it averages `subsets`
    random subsets of `subset_size` each (as clean-fid and torchmetrics).
    Unbiased: its expectation is 0 when x and y come from one distribution,
    so it can be negative.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set. Received: {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    whole = m == len(x) == len(y)
    values = []
    for _ in range(1 if whole else subsets):
        a = x if whole else x[rng.choice(len(x), m, replace=False)]
        b = y if whole else y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = [(p @ q.T / x.shape[1] + 1.0) ** 3 for p, q in ((a, a), (b, b), (a, b))]
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2.0 * kxy.mean())
    return float(np.mean(values))


def _distances(x, y):
    squared = (x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.clip(squared, 0, None))


def precision_recall_density_coverage(real, fake, k=NEAREST_K):
    """Precision and recall (Kynkaanniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each real (fake) point's neighbourhood is the ball reaching its k-th
    nearest other real (fake) point. Precision: share of fakes inside some
    real ball. Recall: share of reals inside some fake ball. Density: fakes'
    average count of real balls containing them, over k. Coverage: share of
    real balls holding at least one fake. Strict inequalities, as the `prdc`
    package (which the tests check this against).

    Returns:
        dict of floats: precision, recall, density, coverage.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} feature vectors per set. Received: {len(real)} real, {len(fake)} "
                         "fake")
    real_radii = np.sort(_distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(_distances(fake, fake), axis=1)[:, k]
    cross = _distances(real, fake)  # (real, fake)
    inside = cross < real_radii[:, None]
    return {"precision": float(inside.any(axis=0).mean()),
            "recall": float((cross < fake_radii[None, :]).any(axis=1).mean()),
            "density": float(inside.sum(axis=0).mean() / k),
            "coverage": float((cross.min(axis=1) < real_radii).mean())}


def msssim_scales(size, filter_size=FILTER_SIZE):
    """How many MS-SSIM scales fit images of side `size` (each halving; the coarsest at least the window)."""
    scales = 1
    while scales < len(MSSSIM_WEIGHTS) and size // 2 ** scales >= filter_size:
        scales += 1
    return scales


def msssim_diversity(images, pairs=1000, seed=0, batch_size=64):
    """Mean MS-SSIM (`ms_ssim`, as `tf.image.ssim_multiscale`) over random pairs of different images: near 1 = collapsed.

    All pairs when there are no more than `pairs` of them, else `pairs`
    random ones. The scales that fit the image size are used (5 from 176 px
    up; 4 at 128 px), with tf's weights renormalised over them.

    Returns:
        `(mean MS-SSIM, number of pairs)`.
    """
    images = np.asarray(images, np.float32)
    n = len(images)
    if n < 2:
        raise ValueError(f"MS-SSIM diversity needs at least 2 images. Received: {n}")
    if n * (n - 1) // 2 <= pairs:
        first, second = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, pairs)
        second = (first + rng.integers(1, n, pairs)) % n  # never the same image
    weights = np.array(MSSSIM_WEIGHTS[:msssim_scales(min(images.shape[1:3]))])
    weights = tuple(float(w) for w in weights / weights.sum())
    values = [_pair_ms_ssim(images[first[i:i + batch_size]], images[second[i:i + batch_size]], weights).numpy()
              for i in range(0, len(first), batch_size)]
    return float(np.concatenate(values).mean()), int(len(first))


@tf.function  # not reduce_retracing: ms_ssim needs the static image size (a full and a last batch: two traces)
def _pair_ms_ssim(a, b, weights):
    """`ms_ssim` compiled once for the process (traced per batch shape and weights, not per call)."""
    return ms_ssim(a, b, power_factors=weights)


# The texture features: a radiomics-style description of the brain, no learned network.
TEXTURE_LEVELS = 32  # grey levels of the co-occurrence matrices
TEXTURE_FILTERS = ("original", "log1", "log2")  # the image and its Laplacian of Gaussian at sigma 1 and 2 pixels
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation")


def _filtered(image, name):
    if name == "original":
        return image
    return ndimage.gaussian_laplace(image.astype(np.float64), sigma=float(name[3:]))


class TextureFeatures:
    """Radiomics-style texture features inside the brain mask, in the manner of the Frechet Radiomic Distance.

    Per slice and per filter (the image, its Laplacian of Gaussian at sigma
    1 and 2 pixels): first-order statistics of the brain pixels (mean, std,
    skewness, kurtosis, 10th/50th/90th percentiles, histogram entropy) and
    grey-level co-occurrence features (scikit-image; contrast,
    dissimilarity, homogeneity, energy, correlation, averaged over four
    directions, at distances 1 and 2) of brain pixel pairs only; plus the
    brain's share of the canvas. 55 numbers. The grey levels' range per
    filter is fitted on the reference (real) slices, and the features are
    z-scored by the reference's mean and standard deviation before a
    Frechet distance, so every feature weighs the same. Not comparable with
    published FRD values (other features, filters, normalisation, images).

    Example:
    >>> texture = TextureFeatures().fit(real_images)
    >>> frechet_distance(texture(real_images), texture(generated_images))
    """

    def __init__(self):
        self.ranges = self.mean = self.std = None

    def fit(self, images):
        images = np.asarray(images, np.float32)
        masks = _masks(images)
        self.ranges = {}
        for name in TEXTURE_FILTERS:
            inside = np.concatenate([_filtered(im[..., 0], name)[m] for im, m in zip(images, masks)])
            self.ranges[name] = (np.percentile(inside, 0.5), np.percentile(inside, 99.5)) if len(inside) else (0, 1)
        raw = self._raw(images, masks)
        self.mean, self.std = raw.mean(0), raw.std(0)
        self.std[self.std < 1e-6] = 1.0  # a feature constant over the reference is centred, not blown up
        return self

    def _raw(self, images, masks):
        rows = []
        for image, mask in zip(images, masks):
            row = [mask.mean()]
            for name in TEXTURE_FILTERS:
                values = _filtered(image[..., 0], name)
                inside = values[mask]
                if len(inside) < 2:  # no brain: the features of a flat patch
                    inside = np.zeros(2)
                std = inside.std()
                centred = (inside - inside.mean()) / (std + 1e-12)
                lo, hi = self.ranges[name]
                levels = np.clip(((values - lo) / max(hi - lo, 1e-12) * TEXTURE_LEVELS).astype(int), 0,
                                 TEXTURE_LEVELS - 1) + 1
                levels[~mask] = 0  # level 0: outside the brain, dropped from the matrix below
                histogram = np.bincount(levels[mask], minlength=TEXTURE_LEVELS + 1)[1:] / max(mask.sum(), 1)
                nonzero = histogram[histogram > 0]
                row += [inside.mean(), std, (centred ** 3).mean(), (centred ** 4).mean(),
                        *np.percentile(inside, (10, 50, 90)), -(nonzero * np.log2(nonzero)).sum()]
                glcm = graycomatrix(levels.astype(np.uint8), [1, 2], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                                    levels=TEXTURE_LEVELS + 1, symmetric=True)[1:, 1:].astype(np.float64)
                glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), 1.0)
                for prop in GLCM_PROPS:
                    row += list(np.nan_to_num(graycoprops(glcm, prop)).mean(axis=1))
            rows.append(row)
        return np.asarray(rows, np.float64)

    def __call__(self, images):
        if self.ranges is None:
            raise RuntimeError("TextureFeatures must be fitted on reference slices first: call .fit(real_images)")
        images = np.asarray(images, np.float32)
        return (self._raw(images, _masks(images)) - self.mean) / self.std


TISSUES = ("csf", "grey", "white")  # the intensity classes of a T1 brain, darkest first
TISSUE_FEATURES = (*TISSUES, "brain_area", "symmetry")


class TissueComposition:
    """What a slice is made of: tissue fractions inside the brain, brain area and left-right symmetry.

    Fitted once on real training slices: multi-Otsu thresholds
    (scikit-image, three classes) of their brain pixels' intensities split
    brain pixels into CSF, grey and white matter (a T1 slice: dark, mid,
    bright); enclosed dark regions (ventricles, sulci) are brain, as in
    `brain_mask`. Per slice, five numbers (`TISSUE_FEATURES`):

      csf, grey, white: each class's share of the brain's pixels;
      brain_area: the brain's share of the canvas;
      symmetry: the share of brain pixels whose mirror pixel, across the
        vertical line through the brain's centroid, is brain of the same
        class (1 for a perfectly symmetric slice).

    Sets are compared feature by feature (`compare`): the 1-D Wasserstein
    distance between two sets' distributions, read against the same
    distance between two real sets (the floor). Every set is read on the
    fitted thresholds, so a shifted white-matter intensity shows as wrong
    fractions, as it would to a radiologist's eye.

    Example:
    >>> tissue = TissueComposition().fit(real_train)
    >>> tissue.compare(real_test, generated, floor=real_train)["symmetry"]
    """

    def __init__(self):
        self.thresholds = None

    def fit(self, images):
        images = np.asarray(images, np.float32)
        masks = _masks(images)
        inside = images[..., 0][masks]
        if len(np.unique(inside)) < 3:
            raise ValueError(f"TissueComposition needs brain pixels of at least 3 intensities to fit 3 classes. "
                             f"Received: {len(images)} images with {len(inside)} brain pixels")
        self.thresholds = tuple(float(t) for t in threshold_multiotsu(inside, classes=3))
        return self

    def classes(self, images):
        """Per pixel: 0 outside the brain, else 1 + the tissue class (1 CSF, 2 grey, 3 white). uint8 (N, H, W)."""
        if self.thresholds is None:
            raise RuntimeError("TissueComposition must be fitted on real training slices first: call .fit(images)")
        images = np.asarray(images, np.float32)
        labels = 1 + np.digitize(images[..., 0], self.thresholds).astype(np.uint8)
        return np.where(_masks(images), labels, 0).astype(np.uint8)

    def __call__(self, images):
        """The five features of each slice, float64 (N, 5) in `TISSUE_FEATURES` order (all 0 for no brain)."""
        labels = self.classes(images)
        width = labels.shape[2]
        columns = np.arange(width)
        rows = []
        for label in labels:
            brain = label > 0
            area = int(brain.sum())
            if area == 0:  # zeros, not NaN: a model that draws blank slices is flagged, not skipped
                rows.append([0.0] * len(TISSUE_FEATURES))
                continue
            shares = [float((label == c).sum()) / area for c in (1, 2, 3)]
            mirror = int(round(2 * (brain * columns).sum() / area)) - columns  # column j's mirror column
            inside = (mirror >= 0) & (mirror < width)
            mirrored = np.zeros_like(label)
            mirrored[:, inside] = label[:, mirror[inside]]
            rows.append([*shares, area / brain.size, float((brain & (mirrored == label)).sum()) / area])
        return np.asarray(rows, np.float64)

    def compare(self, reference, images, floor):
        """Per feature, the Wasserstein distance of `images` from `reference`, and of `floor` from it.

        Args:
            reference: real held-out slices (N, H, W, 1) in [0, 1].
            images: the slices to judge (generated or reconstructed).
            floor: other real slices (e.g. training ones): what two real
                sets score.

        Returns:
            A dict: `<feature>` and `<feature>_floor` for each of
            `TISSUE_FEATURES`, `<feature>_mean` and `<feature>_mean_real`
            (the two sets' means), and `worst_ratio`: the largest
            distance / floor over the features.
        """
        return self.compare_rows(self(reference), self(images), self(floor))

    @staticmethod
    def compare_rows(real, judged, other):
        """`compare` on feature rows already computed (N, 5): reference, judged and floor."""
        out, ratios = {}, []
        for k, name in enumerate(TISSUE_FEATURES):
            a, b, c = real[:, k], judged[:, k], other[:, k]
            distance, base = stats.wasserstein_distance(a, b), stats.wasserstein_distance(a, c)
            out.update({name: float(distance), f"{name}_floor": float(base), f"{name}_mean": float(np.mean(b)),
                        f"{name}_mean_real": float(np.mean(a))})
            ratios.append(distance / max(base, 1e-12))
        out["worst_ratio"] = float(max(ratios))
        return out


def _masks(images):
    """`brain_mask` of a large array of images, 64 at a time, as bool (N, H, W)."""
    return np.concatenate([brain_mask(images[i:i + 64]).numpy()[..., 0] for i in range(0, len(images), 64)])


def shuffle_patches(images, patch, seed=0):
    """Each image with its `patch` x `patch` tiles in a random order: local texture kept, layout broken.

    The control every sample-quality metric that claims to see global
    layout must flag (an autoregressive prior fails this way). One
    permutation per image; pixels past the last whole tile stay in place.
    """
    rng = np.random.default_rng(seed)
    n, size = len(images), images.shape[1]
    per_side = size // patch
    tiles = images[:, :per_side * patch, :per_side * patch].reshape(n, per_side, patch, per_side, patch, 1)
    tiles = tiles.transpose(0, 1, 3, 2, 4, 5).reshape(n, per_side * per_side, patch, patch, 1)
    tiles = np.stack([t[rng.permutation(len(t))] for t in tiles])
    out = images.copy()
    out[:, :per_side * patch, :per_side * patch] = tiles.reshape(n, per_side, per_side, patch, patch, 1).transpose(
        0, 1, 3, 2, 4, 5).reshape(n, per_side * patch, per_side * patch, 1)
    return out


def wilson_interval(successes, trials, z=1.96):
    """The Wilson score interval of a binomial proportion (95% by default)."""
    if trials == 0:
        return float("nan"), float("nan")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(centre - half), float(centre + half)


def _c2st_network(seed):
    init = keras.initializers.HeNormal(seed=seed)
    inputs = keras.Input((EVAL_SIZE, EVAL_SIZE, 1))
    x = inputs
    for filters in (16, 32, 64, 64, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", kernel_initializer=init)(x)
    x = keras.layers.Dropout(0.3, seed=seed)(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(1, kernel_initializer=init)(x), name="c2st")


def classifier_two_sample_test(a, b, epochs=20, batch_size=32, seed=0):
    """How well a small CNN tells images `a` from images `b`: held-out accuracy with a 95% interval.

    Equal counts (the larger set is cut to the smaller). Two-fold: each set
    is split in halves; a CNN trained on the first halves of both is scored
    on the second halves and one trained on the second halves on the first,
    so every image is scored once by a network that never saw it. 0.5 means
    indistinguishable; 1.0, told apart every time.

    Returns:
        dict: accuracy, low, high (Wilson 95% interval), n (images scored).
    """
    n = min(len(a), len(b))
    if n < 4:
        raise ValueError(f"the classifier two-sample test needs at least 4 images per set. Received: {len(a)}, "
                         f"{len(b)}")
    rng = np.random.default_rng(seed)
    a = to_eval_size(np.asarray(a, np.float32)[rng.permutation(len(a))[:n]]).numpy()
    b = to_eval_size(np.asarray(b, np.float32)[rng.permutation(len(b))[:n]]).numpy()
    half = n // 2
    correct = 0
    for fold, (train, test) in enumerate(((slice(0, half), slice(half, n)), (slice(half, n), slice(0, half)))):
        keras.utils.set_random_seed(seed + fold)
        x = np.concatenate([a[train], b[train]])
        y = np.concatenate([np.zeros(len(a[train])), np.ones(len(b[train]))]).astype(np.float32)
        model = _c2st_network(seed + fold)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.BinaryCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
        scores = model.predict(np.concatenate([a[test], b[test]]), batch_size=64, verbose=0)[:, 0]
        truth = np.concatenate([np.zeros(len(a[test])), np.ones(len(b[test]))])
        correct += int(((scores > 0) == truth).sum())
    low, high = wilson_interval(correct, 2 * n)
    return {"accuracy": correct / (2 * n), "low": low, "high": high, "n": 2 * n}


def to_8bit(images):
    """Images clipped to [0, 1] and rounded to multiples of 1/255 (float32): what an 8-bit PNG holds."""
    return np.round(np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0) / 255.0


def nearest_distances(x, y, batch=512):
    """For each feature vector of x (N, D), the Euclidean distance to its nearest of y (M, D): float64 (N,)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return np.concatenate([_distances(x[i:i + batch], y).min(1) for i in range(0, len(x), batch)] or [np.zeros(0)])


REFERENCE_KEYS = ("features", "floor_features", "texture_ranges", "texture_mean", "texture_std", "texture",
                  "texture_floor", "tissue_thresholds", "tissue", "tissue_floor", "msssim_diversity_real", "image_size")


def reference_statistics(reference, train_reference, network, seed=0):
    """What the sample-quality metrics need of two real sets, as arrays: features, not images.

    What FID tools ship as precomputed statistics, for every metric of
    `score_samples`: the evaluation network's features of both sets (the
    k-NN metrics need the points, not only their mean and covariance), the
    texture features' fit and rows, the tissue thresholds (fitted on
    `train_reference`) and rows, and the real MS-SSIM diversity. Saved beside
    a model with `save_reference`, so a run folder can score its samples with
    no real images at hand.

    Args:
        reference: real held-out slices (N, H, W, 1) in [0, 1], 8-bit values.
        train_reference: as many real training slices (the floor).
        network: the evaluation network.
        seed: seed of the MS-SSIM pairs.

    Returns:
        A dict of numpy arrays.
    """
    reference, train_reference = to_8bit(reference), to_8bit(train_reference)
    fitted = TextureFeatures().fit(reference)
    statistics = {
        "texture_ranges": np.asarray([fitted.ranges[name] for name in TEXTURE_FILTERS], np.float64),
        "texture_mean": fitted.mean, "texture_std": fitted.std,
        "tissue_thresholds": np.asarray(TissueComposition().fit(train_reference).thresholds, np.float64),
        "msssim_diversity_real": np.float64(msssim_diversity(reference, seed=seed)[0]),
        "image_size": np.int64(reference.shape[1])}
    # The rows are computed with the fits as saved (float64), as `score_samples` recomputes them.
    texture, tissue = _texture_of(statistics), _tissue_of(statistics)
    return {**statistics, "features": features(network, reference), "floor_features": features(network, train_reference),
            "texture": texture(reference), "texture_floor": texture(train_reference),
            "tissue": tissue(reference), "tissue_floor": tissue(train_reference)}


def with_reference(statistics, reference, network, seed=0):
    """`statistics` with another real reference set, scored under the same fits and against the same floor.

    For scoring against a folder of real slices when no training slices are
    at hand: the texture and tissue fits and the training (floor) rows stay
    those of `statistics`; the reference rows and the real MS-SSIM
    diversity become those of `reference`.

    Args:
        statistics: a `reference_statistics` dict.
        reference: real slices (N, H, W, 1) in [0, 1] at the statistics' size.
        network: the evaluation network of `statistics`.
        seed: seed of the MS-SSIM pairs.

    Returns:
        A new dict of the same keys.
    """
    reference = to_8bit(reference)
    if reference.shape[1] != int(statistics["image_size"]):
        raise ValueError(f"the reference statistics are of {int(statistics['image_size'])} px slices; the "
                         f"reference is {reference.shape[1]} px. Received: shape {tuple(reference.shape)}")
    texture, tissue = _texture_of(statistics), _tissue_of(statistics)
    return {**statistics, "features": features(network, reference), "texture": texture(reference),
            "tissue": tissue(reference), "msssim_diversity_real": np.float64(msssim_diversity(reference, seed=seed)[0])}


def _tissue_of(statistics):
    tissue = TissueComposition()
    tissue.thresholds = tuple(float(t) for t in statistics["tissue_thresholds"])
    return tissue


def _texture_of(statistics):
    texture = TextureFeatures()
    texture.ranges = {name: tuple(r) for name, r in zip(TEXTURE_FILTERS, statistics["texture_ranges"])}
    texture.mean, texture.std = statistics["texture_mean"], statistics["texture_std"]
    return texture


def score_samples(samples, statistics, network, seed=0):
    """Every sample-quality metric but the two-sample tests, of samples against `reference_statistics`.

    With more samples or more reference rows than the other, both are cut
    to the smaller count (seeded subsets; the texture and tissue fits stay
    those of the whole reference). `sample_quality` is this on sets of one
    size, plus the two-sample tests, which need real images.

    Args:
        samples: generated slices (N, H, W, 1) in [0, 1], at the reference's
            size (scored as 8-bit images).
        statistics: a `reference_statistics` dict (or `load_reference`'s).
        network: the evaluation network the statistics were computed with.
        seed: seed of the subsets and MS-SSIM pairs.

    Returns:
        A dict: fd, fd_floor, kid, kid_floor, precision, recall, density,
        coverage, msssim_diversity, msssim_diversity_real, msssim_pairs,
        texture_fd, texture_fd_floor, tissue_<key> (see
        `TissueComposition.compare`), n_samples, n_reference.
    """
    s = statistics
    samples = np.asarray(samples, np.float32)
    if not np.isfinite(samples).all():
        raise ValueError(f"samples: {int((~np.isfinite(samples)).reshape(len(samples), -1).any(axis=1).sum())} of "
                         f"{len(samples)} images hold NaN or inf values; a diverged model cannot be scored")
    if samples.shape[1] != int(s["image_size"]):
        raise ValueError(f"the reference statistics are of {int(s['image_size'])} px slices; the samples are "
                         f"{samples.shape[1]} px. Received: samples of shape {tuple(samples.shape)}")
    n = min(len(samples), len(s["features"]), len(s["floor_features"]))
    if n <= NEAREST_K:
        raise ValueError(f"sample quality needs more than {NEAREST_K} samples and reference rows. Received: "
                         f"{len(samples)} samples, {len(s['features'])} reference and {len(s['floor_features'])} "
                         "training rows")
    rng = np.random.default_rng(seed)
    pick = lambda count: np.sort(rng.permutation(count)[:n])  # noqa: E731
    samples = to_8bit(samples)[pick(len(samples))]
    rows, floor_rows = pick(len(s["features"])), pick(len(s["floor_features"]))
    real, floor, fake = s["features"][rows], s["floor_features"][floor_rows], features(network, samples)
    texture = _texture_of(s)
    real_texture = s["texture"][rows]
    tissue = _tissue_of(s)
    diversity, pairs = msssim_diversity(samples, seed=seed)
    out = {"fd": frechet_distance(real, fake), "fd_floor": frechet_distance(real, floor),
           "kid": kernel_inception_distance(real, fake, seed=seed),
           "kid_floor": kernel_inception_distance(real, floor, seed=seed),
           **precision_recall_density_coverage(real, fake),
           "msssim_diversity": diversity, "msssim_diversity_real": float(s["msssim_diversity_real"]),
           "msssim_pairs": pairs,
           "texture_fd": frechet_distance(real_texture, texture(samples)),
           "texture_fd_floor": frechet_distance(real_texture, s["texture_floor"][floor_rows])}
    compared = tissue.compare_rows(s["tissue"][rows], tissue(samples), s["tissue_floor"][floor_rows])
    out.update({f"tissue_{key}": value for key, value in compared.items()})
    out.update({"n_samples": n, "n_reference": n})
    return out


def save_reference(path, statistics, network, description=""):
    """Writes `reference_statistics` and the evaluation network's weights to one .npz file, atomically.

    `description` (e.g. which split of which data) is stored with them.
    """
    path = Path(path)
    weights = {f"network_{i}": w for i, w in enumerate(network.get_weights())}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, version=np.int64(EVAL_VERSION), description=np.str_(description), **statistics, **weights)
    os.replace(tmp, path)
    return path


def load_reference(path):
    """`(statistics, evaluation network)` from a `save_reference` file; a damaged one is one ValueError line."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        version = int(arrays.pop("version"))
    except Exception as err:
        raise ValueError(f"{path} is not a readable reference-statistics file ({type(err).__name__}: {err}). "
                         "Rebuild it with predict.py --save-reference.") from None
    if version != EVAL_VERSION:
        raise ValueError(f"{path} was written for evaluation network version {version}, this is {EVAL_VERSION}. "
                         "Rebuild it with predict.py --save-reference.")
    missing = [key for key in REFERENCE_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete reference-statistics file. Rebuild it "
                         "with predict.py --save-reference.")
    arrays["description"] = str(arrays.get("description", ""))
    count = sum(key.startswith("network_") for key in arrays)
    network = evaluation_network()
    try:
        network.set_weights([arrays.pop(f"network_{i}") for i in range(count)])
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: its evaluation network does not fit this version's ({err}). Rebuild it with "
                         "predict.py --save-reference.") from None
    return arrays, network


def sample_quality(samples, reference, train_reference, network, reconstructed_reference=None, seed=0,
                   c2st_epochs=20, log=print):
    """Every sample-quality metric of generated slices against real ones, with equal counts.

    Every set is clipped to [0, 1] and scored as 8-bit images (rounded to
    multiples of 1/255), as generated slices are saved and real ones stored.

    Args:
        samples: generated slices (N, H, W, 1) in [0, 1].
        reference: real held-out slices, at the same size and fit.
        train_reference: real training slices: the floor is `reference`
            against these (what two real sets score).
        network: the evaluation network (`load_evaluation_network`).
        reconstructed_reference: the VQ-VAE's reconstructions of
            `reference`, for the C2ST of the prior alone (optional).
        seed: seed of the subsets, pairs and classifiers.
        c2st_epochs: training epochs of each two-sample classifier.
        log: callable for warnings.

    Returns:
        A dict: fd, fd_floor, kid, kid_floor, precision, recall, density, coverage,
        msssim_diversity, msssim_diversity_real, texture_fd,
        texture_fd_floor, tissue_<key> for each key of
        `TissueComposition.compare` (thresholds fitted on `train_reference`),
        c2st_accuracy (and _low, _high),
        c2st_recon_accuracy (and _low, _high; None without reconstructions),
        n_samples, n_reference, msssim_pairs.
    """
    for name, images in (("samples", samples), ("reference", reference), ("train_reference", train_reference),
                         ("reconstructed_reference", reconstructed_reference)):
        if images is not None and not np.isfinite(images).all():
            bad = int((~np.isfinite(np.asarray(images)).reshape(len(images), -1).all(axis=1)).sum())
            raise ValueError(f"{name}: {bad} of {len(images)} images hold NaN or inf values; a diverged model "
                             "cannot be scored")
    # Every set is scored as 8-bit images (as PNGs are saved and real slices stored; resizing makes fractions),
    # so no metric can tell two sets apart by their bit depth, and a set scored as its own floor scores it exactly.
    samples, reference, train_reference, reconstructed_reference = (
        None if x is None else to_8bit(x) for x in (samples, reference, train_reference, reconstructed_reference))
    n = min(len(samples), len(reference), len(train_reference))
    if n <= NEAREST_K:
        raise ValueError(f"sample quality needs more than {NEAREST_K} samples and reference slices. Received: "
                         f"{len(samples)} samples, {len(reference)} reference, {len(train_reference)} training")
    if n < FEW_SAMPLES:
        log(f"warning: {n} slices per set: the distribution metrics (FD, KID, precision/recall, the C2ST) are noisy "
            f"below {FEW_SAMPLES}; generate more for numbers to compare")
    rng = np.random.default_rng(seed)
    samples, reference, train_reference = (np.asarray(x, np.float32)[np.sort(rng.permutation(len(x))[:n])]
                                           for x in (samples, reference, train_reference))
    out = score_samples(samples, reference_statistics(reference, train_reference, network, seed=seed), network,
                        seed=seed)
    out.update(two_sample_tests(samples, reference, reconstructed_reference, epochs=c2st_epochs, seed=seed))
    return out


def two_sample_tests(samples, reference, reconstructed_reference=None, epochs=20, seed=0):
    """The classifier two-sample tests of `sample_quality`: samples against real slices and against reconstructions.

    Returns:
        A dict: c2st_accuracy (and _low, _high), c2st_recon_accuracy (and
        _low, _high; None without `reconstructed_reference`).
    """
    out = {"c2st_recon_accuracy": None, "c2st_recon_accuracy_low": None, "c2st_recon_accuracy_high": None}
    for key, other in (("c2st", reference), ("c2st_recon", reconstructed_reference)):
        if other is not None:
            c2st = classifier_two_sample_test(np.asarray(samples, np.float32), np.asarray(other, np.float32),
                                              epochs=epochs, seed=seed)
            out.update({f"{key}_accuracy": c2st["accuracy"], f"{key}_accuracy_low": c2st["low"],
                        f"{key}_accuracy_high": c2st["high"]})
    return out
