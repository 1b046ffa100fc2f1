"""The VQ-VAE's parts: quantizer maths, codebook learning, shapes, saving, and that training learns."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dataset
import phantoms
import metrics
import modules


def quantizer(k=3, d=2, **kwargs):
    vq = modules.VectorQuantizer(num_codes=k, code_dim=d, **kwargs)
    vq.build((None, d))
    return vq


def test_hand_set_codebook_gives_known_indices():
    vq = quantizer(ema=False)
    vq.codebook.assign(np.array([[0, 0], [1, 0], [0, 1]], np.float32))
    z = np.array([[[0.9, 0.1], [0.1, 0.8], [0.0, 0.05], [0.6, 0.55]]], np.float32)  # (1, 4, 2)
    quantized, indices = vq(z)
    assert indices.numpy().tolist() == [[1, 2, 0, 1]]
    np.testing.assert_allclose(quantized.numpy()[0, 1], [0, 1], atol=1e-6)


def test_straight_through_gradient_reaches_the_input():
    vq = quantizer(ema=False)
    z = tf.constant(np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32))
    weights = tf.constant(np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(z)
        quantized, _ = vq(z)
        out = tf.reduce_sum(quantized * weights)
    np.testing.assert_allclose(tape.gradient(out, z).numpy(), weights.numpy(), atol=1e-6)  # identity


def rotation_matrix(z, q):
    """R = I - 2 w w^T + 2 q^ u^T of the rotation trick, one (D, D) matrix per row, in NumPy."""
    u = z / np.linalg.norm(z, axis=-1, keepdims=True)
    q_hat = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w = (u + q_hat) / np.linalg.norm(u + q_hat, axis=-1, keepdims=True)
    eye = np.eye(z.shape[-1])[None]
    return eye - 2 * w[:, :, None] * w[:, None, :] + 2 * q_hat[:, :, None] * u[:, None, :]


def test_rotation_trick_returns_the_codes_and_rotates_the_gradient():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    q = rng.normal(size=(6, 4)).astype(np.float32) * 3.0
    upstream = rng.normal(size=(6, 4)).astype(np.float32)
    z_var = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z_var)
        out = modules.rotate_to(z_var, tf.constant(q))
        target = tf.reduce_sum(out * upstream)
    np.testing.assert_array_equal(out.numpy(), q)  # the codes themselves, not a rounding of them
    rotation = rotation_matrix(z.astype(np.float64), q.astype(np.float64))
    np.testing.assert_allclose(np.einsum("nki,nkj->nij", rotation, rotation), np.broadcast_to(np.eye(4), (6, 4, 4)),
                               atol=1e-9)  # orthogonal
    u, q_hat = (v / np.linalg.norm(v, axis=-1, keepdims=True) for v in (z, q))
    np.testing.assert_allclose(np.einsum("nij,nj->ni", rotation, u), q_hat, atol=1e-6)  # z's direction onto q's
    scale = np.linalg.norm(q, axis=-1, keepdims=True) / np.linalg.norm(z, axis=-1, keepdims=True)
    expected = scale * np.einsum("nij,ni->nj", rotation, upstream)  # (|q| / |z|) R^T g
    np.testing.assert_allclose(tape.gradient(target, z_var).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_quantizer_with_rotation_gives_the_codes_and_a_rotated_gradient():
    rng = np.random.default_rng(0)
    codebook = np.array([[1, 0], [0, 1], [-1, -1]], np.float32)
    z = tf.constant(rng.normal(size=(5, 2)).astype(np.float32))
    weights = rng.normal(size=(5, 2)).astype(np.float32)
    grads, values = {}, {}
    for gradient in modules.GRADIENTS:
        vq = quantizer(ema=False, gradient=gradient)
        vq.codebook.assign(codebook)
        with tf.GradientTape() as tape:
            tape.watch(z)
            values[gradient], indices = vq(z)
            out = tf.reduce_sum(values[gradient] * weights)
        grads[gradient] = tape.gradient(out, z).numpy()
    np.testing.assert_array_equal(values["rotation"].numpy(), values["straight_through"].numpy())
    np.testing.assert_allclose(grads["straight_through"], weights, atol=1e-6)
    q = codebook[indices.numpy()]
    scale = np.linalg.norm(q, axis=-1, keepdims=True) / np.linalg.norm(z.numpy(), axis=-1, keepdims=True)
    expected = scale * np.einsum("nij,ni->nj", rotation_matrix(z.numpy(), q), weights)
    np.testing.assert_allclose(grads["rotation"], expected, rtol=1e-4, atol=1e-5)


def test_rotation_of_a_zero_vector_still_gives_the_code():
    out = modules.rotate_to(tf.zeros((1, 3)), tf.constant([[0.0, 2.0, 0.0]]))
    np.testing.assert_array_equal(out.numpy(), [[0.0, 2.0, 0.0]])


def test_normalized_lookup_picks_by_angle_and_keeps_unit_codes():
    z = tf.constant([[0.3, 0.4]])  # Euclidean: nearest to (1, 0); by angle: nearest to (0, 5)
    for normalize, expected in ((False, 0), (True, 1)):
        vq = quantizer(k=2, d=2, ema=False, normalize=normalize)
        vq.codebook.assign(np.array([[1, 0], [0, 5]], np.float32))
        _, indices = vq(z)
        assert int(indices[0]) == expected
    np.testing.assert_allclose(vq.lookup(tf.constant([1])).numpy(), [[0.0, 1.0]], atol=1e-6)
    trained = quantizer(k=4, d=3, normalize=True, decay=0.5, seed=0)
    batch = tf.constant(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32) * 5.0)
    trained(batch, training=True)
    trained(batch * 0.1, training=True)
    np.testing.assert_allclose(np.linalg.norm(trained.codes().numpy(), axis=1), 1.0, atol=1e-5)


def test_brain_loss_weighs_errors_inside_the_brain_more():
    brain = tf.pad(tf.fill((1, 16, 16, 1), 0.6), [[0, 0], [8, 8], [8, 8], [0, 0]])  # 32x32, brain in the middle
    assert float(modules.brain_loss(brain, brain)) == pytest.approx(0.0, abs=1e-6)
    spot = tf.pad(tf.fill((1, 4, 4, 1), 0.3), [[0, 0], [14, 14], [14, 14], [0, 0]])
    corner = tf.pad(tf.fill((1, 4, 4, 1), 0.3), [[0, 0], [0, 28], [0, 28], [0, 0]])
    for background in (0.1, 1.0):
        inside = float(modules.brain_loss(brain, brain + spot, background=background))
        outside = float(modules.brain_loss(brain, brain + corner, background=background))
        assert inside > 5 * outside > 0


def test_vqvae_options_train_and_round_trip():
    model = modules.VQVAE(downsample=2, channels=8, res_channels=4, num_codes=8, code_dim=4, seed=0, loss="ssim_l1",
                          normalize_codes=True, gradient="rotation", decoder_channels=12, decoder_res_blocks=1)
    # A slice on a wide black canvas: the encoder's outputs far from the slice are exactly zero at the start.
    images = tf.pad(tf.random.uniform((2, 16, 16, 1), seed=1), [[0, 0], [16, 16], [16, 16], [0, 0]])
    model.build(images.shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = [w.numpy().copy() for w in model.trainable_weights]
    for _ in range(2):
        logs = model.train_on_batch(images, return_dict=True)
    assert np.isfinite(logs["loss"])
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))  # every weight, encoder included, learns
    np.testing.assert_allclose(model.decode(model.encode(images)).numpy(), model.reconstruct(images).numpy(),
                               atol=1e-6)
    assert model.decoder.get_layer("from_codes").filters == 12
    assert modules.VQVAE.from_config(model.get_config()).get_config() == model.get_config()
    assert len(model.decoder.layers) == 1 + 1 + 1 + 1  # from_codes, one residual block, relu, up0
    with pytest.raises(ValueError, match="Received: loss='l2'"):
        modules.VQVAE(loss="l2")
    with pytest.raises(ValueError, match="Received: gradient='gumbel'"):
        modules.VectorQuantizer(gradient="gumbel")


def test_encoder_gets_gradients_in_a_vqvae():
    model = modules.VQVAE(downsample=2, channels=8, res_channels=4, num_codes=8, code_dim=4, seed=0)
    images = tf.random.uniform((2, 16, 16, 1), seed=1)
    model.build(images.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(images, training=True) - images) ** 2)
    grads = tape.gradient(loss, model.encoder.trainable_variables)
    assert all(g is not None for g in grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0


def test_one_ema_update_matches_numpy():
    k, d, decay, eps = 4, 3, 0.9, 1e-5
    vq = quantizer(k, d, decay=decay, epsilon=eps, dead_threshold=0.0)
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(k, d)).astype(np.float32)
    counts = rng.uniform(1, 5, size=k).astype(np.float32)
    sums = codebook * counts[:, None]
    vq.codebook.assign(codebook)
    vq.ema_counts.assign(counts)
    vq.ema_sums.assign(sums)
    vq.initialized.assign(1.0)
    z = rng.normal(size=(20, d)).astype(np.float32)
    _, indices = vq(z, training=True)

    nearest = np.argmin(((z[:, None, :] - codebook[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(indices.numpy(), nearest)
    onehot = np.eye(k, dtype=np.float32)[nearest]
    new_counts = decay * counts + (1 - decay) * onehot.sum(0)
    new_sums = decay * sums + (1 - decay) * onehot.T @ z
    n = new_counts.sum()
    smoothed = (new_counts + eps) / (n + k * eps) * n
    np.testing.assert_allclose(vq.ema_counts.numpy(), new_counts, rtol=1e-5)
    np.testing.assert_allclose(vq.ema_sums.numpy(), new_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vq.codebook.numpy(), new_sums / smoothed[:, None], rtol=1e-4, atol=1e-6)


def test_dead_codes_are_reseeded_from_encoder_outputs():
    k, d = 8, 2
    vq = quantizer(k, d, dead_threshold=0.5, seed=3)
    z = np.random.default_rng(0).normal(size=(64, d)).astype(np.float32)
    vq(z, training=True)  # first batch: every code is seeded from the batch
    matches = (np.abs(vq.codebook.numpy()[:, None, :] - z[None]) < 1e-6).all(-1).any(1)
    assert matches.all()
    # Far away codes nobody picks: after enough steps they are restarted onto the data.
    far = np.full((k, d), 100.0, np.float32)
    far[0] = 0.0
    vq.codebook.assign(far)
    vq.ema_sums.assign(far * vq.ema_counts.numpy()[:, None])
    for _ in range(60):
        vq(z, training=True)
    assert np.abs(vq.codebook.numpy()).max() < 10.0
    assert len(np.unique(vq(z)[1].numpy())) > 1


def tiny_vqvae(**kwargs):
    keras.utils.set_random_seed(0)
    model = modules.VQVAE(downsample=4, channels=8, res_blocks=1, res_channels=8, num_codes=16, code_dim=4, seed=0,
                          **kwargs)
    model.build((None, 32, 32, 1))
    return model


def test_vq_loss_is_against_the_codes_the_step_used_not_the_updated_codebook():
    # On the first training step every code is re-seeded from the batch, so
    # the codebook after the step is unrelated to the one the step used.
    images = tf.random.stateless_uniform((4, 32, 32, 1), seed=[0, 1])
    model = tiny_vqvae()
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    z = model.encoder(images).numpy().reshape(-1, 4)
    used = model.quantizer.codebook.numpy()
    q_used = used[np.argmin(((z[:, None] - used[None]) ** 2).sum(-1), axis=1)]
    logs = model.train_on_batch(images, return_dict=True)
    after = model.quantizer.codebook.numpy()
    assert np.abs(after - used).max() > 1e-2  # the step moved the codebook (every code restarted)
    q_after = after[np.argmin(((z[:, None] - used[None]) ** 2).sum(-1), axis=1)]
    expected = 0.25 * np.mean((z - q_used) ** 2)
    assert logs["vq_loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(logs["vq_loss"] - 0.25 * np.mean((z - q_after) ** 2)) > 1e-3 * expected


def test_the_quantizer_returns_its_loss_and_adds_none():
    vq = quantizer(ema=False, beta=0.5)
    vq.codebook.assign(np.array([[0, 0], [1, 0], [0, 1]], np.float32))
    z = np.array([[0.9, 0.1], [0.1, 0.8]], np.float32)
    quantized, indices, loss = vq(z, training=True, return_loss=True)
    # Commitment (beta) plus, without EMA, the codebook loss, against rows 1 and 2 of the codebook before the step.
    q = np.array([[1, 0], [0, 1]], np.float32)
    assert float(loss) == pytest.approx(1.5 * np.mean((z - q) ** 2), rel=1e-6)
    np.testing.assert_allclose(quantized.numpy(), q, atol=1e-6)
    assert vq.losses == []


def test_a_frozen_quantizer_keeps_its_codebook_and_statistics():
    images = tf.random.stateless_uniform((4, 32, 32, 1), seed=[0, 1])
    model = tiny_vqvae()
    model.quantizer.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    vq = model.quantizer
    state = {name: getattr(vq, name).numpy().copy()
             for name in ("codebook", "ema_counts", "ema_sums", "usage", "initialized", "updates")}
    encoder_before = [w.numpy().copy() for w in model.encoder.weights]
    model.train_on_batch(images)
    for name, before in state.items():
        np.testing.assert_array_equal(getattr(vq, name).numpy(), before, err_msg=name)
    # The rest of the model still trains.
    assert any(np.abs(w.numpy() - b).max() > 0 for w, b in zip(model.encoder.weights, encoder_before))


def test_training_and_validation_logs_include_brain_ssim_and_psnr():
    images = tf.random.stateless_uniform((4, 32, 32, 1), seed=[0, 1])
    images = tf.concat([images[:3], tf.zeros((1, 32, 32, 1))], axis=0)  # the last one has no brain
    model = tiny_vqvae()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = model.train_on_batch(images, return_dict=True)
    assert {"ssim", "psnr", "ssim_brain", "psnr_brain"} <= set(logs)
    model.reset_metrics()
    logs = model.test_on_batch(images, return_dict=True)
    reconstructions = model(images)
    quality = metrics.image_quality(images, reconstructions)
    # Per-image means; the empty brain is left out of the brain means.
    assert logs["ssim"] == pytest.approx(float(np.mean(quality["ssim"])), rel=1e-5)
    assert logs["ssim_brain"] == pytest.approx(float(np.mean(quality["ssim_brain"][:3])), rel=1e-5)
    assert logs["psnr_brain"] == pytest.approx(float(np.mean(quality["psnr_brain"][:3])), rel=1e-5)
    assert np.isnan(quality["ssim_brain"][3])


def test_perplexity_of_a_uniform_assignment_equals_k():
    usage = modules.CodebookUsage(16)
    usage.update_state(np.tile(np.arange(16), 5))
    result = usage.result()
    assert float(result["perplexity"]) == pytest.approx(16.0, rel=1e-5)
    assert float(result["codes_used"]) == 1.0
    usage.reset_state()
    usage.update_state(np.zeros(10, np.int32))
    assert float(usage.result()["perplexity"]) == pytest.approx(1.0)
    assert float(usage.result()["codes_used"]) == pytest.approx(1 / 16)


@pytest.mark.parametrize("downsample,grid", [(2, 32), (4, 16), (8, 8)])
def test_shapes_for_each_downsampling_factor(downsample, grid):
    model = modules.VQVAE(downsample=downsample, channels=8, res_channels=4, num_codes=8, code_dim=4)
    images = tf.random.uniform((2, 64, 64, 1))
    model.build(images.shape)
    codes = model.encode(images)
    assert codes.shape == (2, grid, grid) and codes.dtype == tf.int32
    assert model.decode(codes).shape == (2, 64, 64, 1)
    assert model(images).shape == (2, 64, 64, 1)


def test_bad_arguments_say_what_was_received():
    with pytest.raises(ValueError, match="Received: downsample=3"):
        modules.VQVAE(downsample=3)
    with pytest.raises(ValueError, match="Received: input_shape"):
        modules.VectorQuantizer(num_codes=4, code_dim=3).build((None, 5))
    with pytest.raises(ValueError, match="Received: codebook='kmeans'"):
        modules.VQVAE(codebook="kmeans")


def test_quantizer_config_round_trips():
    vq = modules.VectorQuantizer(num_codes=7, code_dim=3, beta=0.3, ema=False, decay=0.9, seed=5, name="q")
    again = modules.VectorQuantizer.from_config(vq.get_config())
    assert again.get_config() == vq.get_config()


def tiny_phantoms(tmp_path, size=32):
    root = phantoms.ensure_phantoms(tmp_path, subjects=(4, 1, 1), n_slices=16, size=size, verbose=False)
    return dataset.load_source(root)


def test_save_load_round_trip_and_encode_decode(tmp_path):
    source = tiny_phantoms(tmp_path)
    images = next(iter(dataset.make_dataset(source.splits["train"], image_size=32, batch_size=8)))
    model = modules.VQVAE(downsample=4, channels=16, res_channels=8, num_codes=16, code_dim=8, seed=0)
    model.build(images.shape)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(images, epochs=2, batch_size=8, verbose=0)  # EMA state and codebook move off their init
    path = tmp_path / "vqvae.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, modules.VQVAE) and loaded.get_config() == model.get_config()
    np.testing.assert_array_equal(loaded.encode(images).numpy(), model.encode(images).numpy())
    np.testing.assert_allclose(loaded.reconstruct(images).numpy(), model.reconstruct(images).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.quantizer.ema_counts.numpy(), model.quantizer.ema_counts.numpy())
    # The round trip through codes is the model's reconstruction.
    np.testing.assert_allclose(model.decode(model.encode(images)).numpy(), model.reconstruct(images).numpy(),
                               atol=1e-5)


def test_short_training_on_tiny_phantoms_raises_ssim(tmp_path):
    keras.utils.set_random_seed(0)
    source = tiny_phantoms(tmp_path)
    train = dataset.make_dataset(source.splits["train"], image_size=32, batch_size=8, shuffle=True, repeat=True,
                                 drop_remainder=True)
    val = dataset.make_dataset(source.splits["validate"], image_size=32, batch_size=8)
    model = modules.VQVAE(downsample=4, channels=32, res_channels=16, num_codes=64, code_dim=16, seed=0)
    model.build((None, 32, 32, 1))
    model.compile(optimizer=keras.optimizers.Adam(2e-3))
    before = model.evaluate(val, verbose=0, return_dict=True)["ssim"]
    model.fit(train, epochs=10, steps_per_epoch=8, verbose=0, shuffle=False)
    after = model.evaluate(val, verbose=0, return_dict=True)
    assert after["ssim"] > before + 0.35 and after["ssim"] > 0.5
    assert after["codes_used"] > 0.2 and after["perplexity"] > 5
