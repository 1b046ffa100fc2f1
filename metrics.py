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

import tensorflow as tf

THRESHOLD = 0.05  # foreground: smoothed intensity above this, in [0, 1]
SMOOTHING = 3  # side of the box filter applied before thresholding
FILTER_SIZE, FILTER_SIGMA = 11, 1.5  # SSIM's Gaussian window, as tf.image.ssim
K1, K2 = 0.01, 0.03  # SSIM's stabilising constants, as tf.image.ssim


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
    intensity = tf.reduce_mean(images, axis=-1, keepdims=True)
    # avg_pool2d's "SAME" averages over the pixels inside the image only.
    smoothed = tf.nn.avg_pool2d(intensity, SMOOTHING, 1, "SAME")
    return fill_holes(smoothed > threshold)


def _gaussian_window():
    """The 1-D factor of tf.image.ssim's window: its 11x11 kernel is the outer product of this with itself."""
    coords = tf.range(FILTER_SIZE, dtype=tf.float32) - (FILTER_SIZE - 1) / 2.0
    return tf.nn.softmax(tf.square(coords) * (-0.5 / FILTER_SIGMA**2))


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
    x, y = _as_images(images, "images"), _as_images(reconstructions, "reconstructions")
    if x.shape[1] is not None and x.shape[2] is not None and min(x.shape[1], x.shape[2]) < FILTER_SIZE:
        raise ValueError(f"SSIM needs images of at least {FILTER_SIZE}x{FILTER_SIZE} pixels. "
                         f"Received: images of shape {tuple(x.shape)}")
    channels = x.shape[-1]
    # One pass of the window over the four local statistics, as depthwise 1-D convolutions.
    stacked = tf.concat([x, y, x * y, tf.square(x) + tf.square(y)], axis=-1)
    window = _gaussian_window()
    along_width = tf.tile(tf.reshape(window, (1, FILTER_SIZE, 1, 1)), (1, 1, 4 * channels, 1))
    along_height = tf.tile(tf.reshape(window, (FILTER_SIZE, 1, 1, 1)), (1, 1, 4 * channels, 1))
    local = tf.nn.depthwise_conv2d(stacked, along_width, [1, 1, 1, 1], "VALID")
    local = tf.nn.depthwise_conv2d(local, along_height, [1, 1, 1, 1], "VALID")
    mean_x, mean_y, mean_xy, mean_squares = tf.split(local, 4, axis=-1)
    # As tf.image.ssim's _ssim_helper, term for term.
    c1, c2 = (K1 * max_val) ** 2, (K2 * max_val) ** 2
    num0 = mean_x * mean_y * 2.0
    den0 = tf.square(mean_x) + tf.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    contrast_structure = (mean_xy * 2.0 - num0 + c2) / (mean_squares - den0 + c2)
    return tf.reduce_mean(luminance * contrast_structure, axis=-1)


def _masked_mean(values, mask):
    """Mean of `values` (B, ...) over `mask` pixels, per image; NaN where the mask is empty."""
    mask = tf.cast(mask, tf.float32)
    axes = list(range(1, values.shape.rank))
    count = tf.reduce_sum(mask, axis=axes)
    total = tf.reduce_sum(values * mask, axis=axes)
    return tf.where(count > 0, total / tf.maximum(count, 1.0), float("nan"))


def image_quality(images, reconstructions):
    """Per-image SSIM and PSNR of reconstructions clipped to [0, 1], whole image and inside the brain.

    Args:
        images: originals (B, H, W, C) in [0, 1], H and W at least 11.
        reconstructions: same shape, any float dtype; clipped to [0, 1].

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
    mask = brain_mask(images)
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
