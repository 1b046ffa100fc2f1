"""Image-quality metrics: the brain mask, the SSIM map, and SSIM/PSNR over the whole image and inside the brain."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import metrics

SIZE = 64


def ring_image():
    """64x64: a bright ring (radius 12 to 20) around a dark "ventricle" (0.02, below threshold), on black."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - 31.5, xx - 31.5)
    image = np.where(r < 12, 0.02, np.where(r < 20, 0.8, 0.0))
    # Some texture in the ring, so SSIM has structure to compare.
    image = image + (r >= 12) * (r < 20) * 0.1 * np.sin(xx / 2.0) * np.cos(yy / 3.0)
    return image.astype(np.float32)[None, ..., None], r


def test_brain_mask_includes_the_enclosed_hole_and_excludes_the_outside():
    image, r = ring_image()
    mask = metrics.brain_mask(image).numpy()[0, ..., 0]
    assert mask.dtype == bool and mask.shape == (SIZE, SIZE)
    assert mask[r < 20].all()  # the ring and the dark hole it encloses
    assert not mask[r > 21.5].any()  # the background (the 3x3 smoothing moves the edge by at most a pixel)
    # Without the ring, the same dark disc is background.
    assert not metrics.brain_mask(np.where(r < 12, 0.02, 0.0).astype(np.float32)[None, ..., None]).numpy().any()


def test_fill_holes_matches_scipy_on_random_masks():
    rng = np.random.default_rng(0)
    masks = np.concatenate([rng.random((6, 37, 29, 1)) > p for p in (0.3, 0.5, 0.6)])
    ours = metrics.fill_holes(masks).numpy()[..., 0]
    reference = np.stack([ndimage.binary_fill_holes(m[..., 0]) for m in masks])
    np.testing.assert_array_equal(ours, reference)
    assert (reference != masks[..., 0]).any()  # some holes were filled


def test_brain_mask_is_the_thresholded_smoothing_with_holes_filled():
    rng = np.random.default_rng(1)
    images = (rng.random((4, 40, 40, 1)) * (rng.random((4, 1, 1, 1)) * 0.2)).astype(np.float32)
    smoothed = tf.nn.avg_pool2d(images, 3, 1, "SAME").numpy()[..., 0]
    reference = np.stack([ndimage.binary_fill_holes(s > metrics.THRESHOLD) for s in smoothed])
    np.testing.assert_array_equal(metrics.brain_mask(images).numpy()[..., 0], reference)


@pytest.mark.parametrize("shape", [(3, 48, 40, 1), (2, 32, 32, 3), (1, 11, 11, 1)])
def test_the_ssim_map_averages_to_tf_image_ssim(shape):
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1).astype(np.float32)
    ssim_map = metrics.ssim_map(a, b)
    assert ssim_map.shape == (shape[0], shape[1] - 10, shape[2] - 10)
    np.testing.assert_allclose(tf.reduce_mean(ssim_map, axis=(1, 2)).numpy(), tf.image.ssim(a, b, 1.0).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(metrics.image_quality(a, b)["ssim"].numpy(), tf.image.ssim(a, b, 1.0).numpy(),
                               atol=1e-5)


def test_ssim_agrees_with_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((64, 64)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ours = float(metrics.image_quality(a[None, ..., None], b[None, ..., None])["ssim"][0])
    reference = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert ours == pytest.approx(reference, abs=1e-3)


def test_a_change_outside_the_brain_leaves_the_brain_scores_perfect():
    image, r = ring_image()
    changed = image.copy()
    changed[0, :8, :8, 0] = 0.7  # a corner far (over 5 pixels) from the brain
    scores = metrics.image_quality(image, changed)
    assert float(scores["ssim_brain"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(scores["psnr_brain"][0]) == np.inf
    assert float(scores["ssim"][0]) < 0.99 and np.isfinite(float(scores["psnr"][0]))


def test_a_change_inside_the_brain_scores_lower_inside_than_over_the_whole_image():
    image, r = ring_image()
    noise = np.random.default_rng(0).normal(0, 0.1, image.shape).astype(np.float32)
    changed = np.where((r < 20)[None, ..., None], image + noise, image)
    scores = metrics.image_quality(image, changed)
    assert float(scores["ssim_brain"][0]) < float(scores["ssim"][0]) < 1.0
    assert float(scores["psnr_brain"][0]) < float(scores["psnr"][0])


def test_brain_psnr_and_ssim_agree_with_numpy_over_the_mask():
    image, _ = ring_image()
    rng = np.random.default_rng(2)
    images = np.concatenate([image, image[:, ::-1] * 0.9])
    reconstructions = images + rng.normal(0, 0.05, images.shape).astype(np.float32) + 0.3 * (images == 0)
    scores = metrics.image_quality(images, reconstructions)
    mask = metrics.brain_mask(images).numpy()[..., 0]
    clipped = np.clip(reconstructions, 0, 1)
    for b in range(2):
        mse = np.mean(((images[b] - clipped[b])[..., 0][mask[b]]).astype(np.float64) ** 2)
        assert float(scores["psnr_brain"][b]) == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
        whole = np.mean((images[b] - clipped[b]).astype(np.float64) ** 2)
        assert float(scores["psnr"][b]) == pytest.approx(10 * np.log10(1 / whole), rel=1e-5)
        ssim_map = metrics.ssim_map(images[b:b + 1], clipped[b:b + 1]).numpy()[0]
        assert float(scores["ssim_brain"][b]) == pytest.approx(ssim_map[mask[b, 5:-5, 5:-5]].mean(), rel=1e-5)


def test_an_empty_brain_gives_nan_brain_scores_only():
    images = np.zeros((2, 32, 32, 1), np.float32)
    images[1, 8:24, 8:24] = 0.5
    scores = metrics.image_quality(images, images + 0.01)
    assert np.isnan(scores["ssim_brain"][0]) and np.isnan(scores["psnr_brain"][0])
    assert np.isfinite(scores["ssim_brain"][1]) and np.isfinite(scores["psnr_brain"][1])
    assert np.isfinite(scores["ssim"]).all() and np.isfinite(scores["psnr"]).all()
    assert all(value.dtype == tf.float32 and value.shape == (2,) for value in scores.values())


def test_reconstructions_are_clipped_to_the_unit_range():
    image, _ = ring_image()
    over = np.where(image > 0.5, 1.7, image).astype(np.float32)
    np.testing.assert_allclose(metrics.image_quality(image, over)["psnr_brain"].numpy(),
                               metrics.image_quality(image, np.clip(over, 0, 1))["psnr_brain"].numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_a_compiled_function_on_batches_of_any_size(jit_compile):
    image, _ = ring_image()
    images = np.concatenate([image, image * 0.5, np.zeros_like(image)])
    reconstructions = np.clip(images + np.random.default_rng(0).normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    spec = tf.TensorSpec((None, SIZE, SIZE, 1), tf.float32)
    compiled = tf.function(metrics.image_quality, input_signature=[spec, spec], jit_compile=jit_compile)
    eager = metrics.image_quality(images, reconstructions)
    for name, value in compiled(images, reconstructions).items():
        np.testing.assert_allclose(value.numpy(), eager[name].numpy(), rtol=1e-5, err_msg=name)


def test_bad_inputs_say_what_was_received():
    with pytest.raises(ValueError, match=r"Received: images of shape \(2, 8, 8, 1\)"):
        metrics.ssim_map(np.zeros((2, 8, 8, 1), np.float32), np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"Received: images of shape \(8, 8\)"):
        metrics.brain_mask(np.zeros((8, 8), np.float32))
