"""The gated PixelCNN prior: causality, the fast sampler, conditioning, saving, bits per code."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import modules

H, W, K = 6, 7, 12


def random_prior(num_slices=0, layers=3, seed=0, positional=False, dropout=0.0):
    keras.utils.set_random_seed(seed)
    prior = modules.GatedPixelCNN(num_codes=K, filters=8, layers=layers, kernel_size=5, skip_filters=16,
                                  num_slices=num_slices, grid_size=(H, W) if positional else None,
                                  dropout=dropout)
    prior(tf.zeros((1, H, W), tf.int32))
    rng = np.random.default_rng(seed)
    for weight in prior.weights:  # biases too, so no unit is silent
        weight.assign(rng.normal(0, 0.5, weight.shape).astype(np.float32))
    return prior


@pytest.mark.parametrize("positional", [False, True])
def test_logits_never_see_the_current_or_later_codes_and_see_earlier_ones(positional):
    prior = random_prior(positional=positional)
    codes = np.random.default_rng(1).integers(0, K, (1, H, W)).astype(np.int32)
    base = prior(codes).numpy()[0]
    influence = np.zeros((H * W, H * W), bool)  # influence[q, p]: changing code q changes logits at p
    for q in range(H * W):
        changed = codes.copy()
        changed[0, q // W, q % W] = (changed[0, q // W, q % W] + 1) % K
        diff = np.abs(prior(changed).numpy()[0] - base).max(axis=-1).reshape(-1)
        influence[q] = diff > 1e-5
    for q in range(H * W):
        assert not influence[q, : q + 1].any(), f"code {q} leaks into logits at or before its own position"
    for i in range(1, H):
        for j in range(W):
            p = i * W + j
            if j > 0:
                assert influence[p - 1, p], "left neighbour unseen"
            assert influence[p - W, p], "code above unseen"
            if j < W - 1:
                assert influence[p - W + 1, p], "code above-right unseen: blind spot"


def test_fast_sampler_draws_exactly_the_naive_samplers_codes():
    for num_slices, jit, positional in ((0, False, False), (4, False, False), (4, True, False), (0, False, True),
                                        (4, True, True)):
        prior = random_prior(num_slices=num_slices, seed=num_slices, positional=positional)
        uniform = tf.random.stateless_uniform((3, H, W), seed=[2, 3])
        slices = [0, 2, 3] if num_slices else -1
        naive = modules.sample_naive(prior, uniform, slice_index=slices).numpy()
        fast = modules.make_fast_sampler(prior, 3, H, W, jit_compile=jit)(uniform, slices).numpy()
        np.testing.assert_array_equal(fast, naive)
        assert len(np.unique(naive)) > 3  # a real draw, not a constant grid


@pytest.mark.parametrize("num_slices,positional", [(0, False), (4, False), (0, True), (4, True)])
def test_cached_steps_give_the_full_pass_logits_at_every_position(num_slices, positional):
    prior = random_prior(num_slices=num_slices, seed=num_slices + 1, positional=positional)
    codes = np.random.default_rng(1).integers(0, K, (2, H, W)).astype(np.int32)
    slices = np.array([1, 3], np.int32) if num_slices else -1
    full = prior({"codes": codes, "slice": np.broadcast_to(slices, (2,))}).numpy()
    state = prior.start_state(2, H, W, slices)
    for i in range(H):
        for j in range(W):
            logits, state = prior.step(state, i, j)
            assert logits.dtype == tf.float32 and logits.shape == (2, K)
            np.testing.assert_allclose(logits.numpy(), full[:, i, j], rtol=1e-5, atol=1e-5, err_msg=f"at {(i, j)}")
            state = prior.push_code(state, codes[:, i, j])
        state = prior.finish_row(state, i, codes[:, i])
    if positional:
        with pytest.raises(ValueError, match="models 6x7 code grids. Received: height=5, width=7"):
            prior.start_state(2, 5, W)


def test_cached_steps_compute_in_the_priors_dtype_policy():
    # Under mixed precision the cached steps run the prior's own bfloat16
    # layers, as its full pass does (not a float32 copy of its weights).
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        prior = random_prior(num_slices=4, positional=True)
    finally:
        keras.config.set_dtype_policy(previous)
    codes = np.random.default_rng(1).integers(0, K, (2, H, W)).astype(np.int32)
    full = prior({"codes": codes, "slice": np.array([0, 2], np.int32)}).numpy()
    state = prior.start_state(2, H, W, [0, 2])
    assert state["h_windows"][0].dtype == tf.bfloat16
    worst = 0.0
    for i in range(H):
        for j in range(W):
            logits, state = prior.step(state, i, j)
            worst = max(worst, float(np.abs(logits.numpy() - full[:, i, j]).max()))
            state = prior.push_code(state, codes[:, i, j])
        state = prior.finish_row(state, i, codes[:, i])
    assert worst <= 0.02 * np.abs(full).max()  # bfloat16 rounding in the order of sums only


def test_fast_sampler_is_reproducible_and_follows_the_uniforms():
    prior = random_prior()
    sample = modules.make_fast_sampler(prior, 2, H, W, jit_compile=False)
    uniform = tf.random.stateless_uniform((2, H, W), seed=[0, 1])
    np.testing.assert_array_equal(sample(uniform).numpy(), sample(uniform).numpy())
    other = tf.random.stateless_uniform((2, H, W), seed=[0, 2])
    assert not np.array_equal(sample(uniform).numpy(), sample(other).numpy())


def test_conditioning_changes_the_output_distribution():
    prior = random_prior(num_slices=4)
    codes = np.random.default_rng(1).integers(0, K, (2, H, W)).astype(np.int32)
    at = lambda s: prior({"codes": codes, "slice": np.full(2, s, np.int32)}).numpy()  # noqa: E731
    assert np.abs(at(0) - at(3)).max() > 1e-3
    np.testing.assert_allclose(at(-1), at(99), atol=1e-6)  # unknown and out of range share "unknown"


def test_position_embedding_reaches_its_own_row_and_not_the_rows_above():
    prior = random_prior(positional=True)
    codes = np.random.default_rng(1).integers(0, K, (1, H, W)).astype(np.int32)
    base = prior(codes).numpy()[0]
    table = prior.row_embed.embeddings
    table.assign(table + tf.one_hot(3, H)[:, None])  # move row 3's embedding only
    moved = np.abs(prior(codes).numpy()[0] - base).max(axis=-1)  # (H, W)
    assert moved[:3].max() < 1e-6  # rows above never see row 3's position
    assert moved[3].min() > 1e-4  # every position of row 3 does
    with pytest.raises(ValueError, match=r"models 6x7 code grids. Received: codes of shape \(1, 5, 7\)"):
        prior(np.zeros((1, 5, 7), np.int32))


def test_shapes_and_save_load_round_trip(tmp_path):
    prior = random_prior(num_slices=4, positional=True, dropout=0.1)
    inputs = {"codes": np.zeros((2, H, W), np.int32), "slice": np.array([1, 2], np.int32),
              "label": np.array([-1, -1], np.int32)}
    logits = prior(inputs).numpy()
    assert logits.shape == (2, H, W, K)
    prior.save(tmp_path / "prior.keras")
    loaded = keras.models.load_model(tmp_path / "prior.keras", safe_mode=True)
    assert isinstance(loaded, modules.GatedPixelCNN) and loaded.get_config() == prior.get_config()
    np.testing.assert_allclose(loaded(inputs).numpy(), logits, atol=1e-6)


def test_bits_per_code_of_a_uniform_prior_is_log2_k():
    prior = random_prior()
    head = prior.head[1]
    head.kernel.assign(tf.zeros_like(head.kernel))
    head.bias.assign(tf.zeros_like(head.bias))
    codes = np.random.default_rng(0).integers(0, K, (4, H, W)).astype(np.int32)
    metric = modules.BitsPerCode()
    metric.update_state(codes, prior(codes))
    assert float(metric.result()) == pytest.approx(math.log2(K), rel=1e-6)


def test_bad_prior_arguments_say_what_was_received():
    with pytest.raises(ValueError, match="Received: kernel_size=4"):
        modules.GatedPixelCNN(kernel_size=4)
    with pytest.raises(ValueError, match="Received: layers=0"):
        modules.GatedPixelCNN(layers=0)
    with pytest.raises(ValueError, match=r"Received: grid_size=\(4,\)"):
        modules.GatedPixelCNN(grid_size=(4,))
    with pytest.raises(ValueError, match=r"Received: dropout=1.0"):
        modules.GatedPixelCNN(dropout=1.0)


def test_dropout_acts_in_training_only_keeps_causality_and_draws_its_masks_from_the_step():
    prior, plain = random_prior(dropout=0.5), random_prior()
    codes = np.random.default_rng(2).integers(0, K, (2, H, W)).astype(np.int32)
    np.testing.assert_array_equal(prior(codes).numpy(), plain(codes).numpy())  # inference: no dropout
    prior.compile(optimizer=keras.optimizers.Adam())
    prior.optimizer.build(prior.trainable_variables)
    first = prior(codes, training=True).numpy()
    assert np.abs(first - plain(codes).numpy()).max() > 1e-3
    np.testing.assert_array_equal(prior(codes, training=True).numpy(), first)  # one step, one mask
    # A model resumed at the same optimizer step (its weights and counter loaded) draws the same masks.
    twin = random_prior(dropout=0.5)
    twin.compile(optimizer=keras.optimizers.Adam())
    twin.optimizer.build(twin.trainable_variables)
    np.testing.assert_array_equal(twin(codes, training=True).numpy(), first)
    prior.optimizer.iterations.assign(7)
    assert np.abs(prior(codes, training=True).numpy() - first).max() > 1e-3
    # Causality in training too: a code never reaches the logits at or before its own position.
    for q in range(H * W):
        changed = codes.copy()
        changed[:, q // W, q % W] = (changed[:, q // W, q % W] + 1) % K
        diff = np.abs(prior(changed, training=True).numpy() - prior(codes, training=True).numpy())
        assert diff.max(axis=(0, -1)).reshape(-1)[: q + 1].max() < 1e-5, q


def test_init_from_codebook_gives_similar_codes_similar_embeddings():
    prior = modules.GatedPixelCNN(num_codes=K, filters=8, layers=2, skip_filters=16)
    prior(tf.zeros((1, H, W), tf.int32))
    random_std = float(np.std(prior.embed.embeddings.numpy()))
    codebook = np.random.default_rng(0).normal(size=(K, 3)) * [5.0, 1.0, 0.2] + 7.0
    prior.init_from_codebook(codebook)
    embed = prior.embed.embeddings.numpy()
    # All principal components fit in 8 filters, so distances between codes are kept up to one scale.
    code_d = np.linalg.norm(codebook[:, None] - codebook[None], axis=-1)
    embed_d = np.linalg.norm(embed[:, None] - embed[None], axis=-1)
    np.testing.assert_allclose(embed_d, code_d * (embed_d.sum() / code_d.sum()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(embed.std(), random_std, rtol=1e-4)
    columns = prior.head[1].kernel.numpy()[0, 0].T  # (K, skip_filters): the output side too
    head_d = np.linalg.norm(columns[:, None] - columns[None], axis=-1)
    np.testing.assert_allclose(head_d, code_d * (head_d.sum() / code_d.sum()), rtol=1e-4, atol=1e-6)
    # Fewer filters than code dimensions: the leading components are kept.
    narrow = modules.GatedPixelCNN(num_codes=K, filters=2, layers=1, skip_filters=4)
    narrow(tf.zeros((1, H, W), tf.int32))
    narrow.init_from_codebook(codebook)
    first = narrow.embed.embeddings.numpy()[:, 0]
    assert abs(np.corrcoef(first, codebook[:, 0])[0, 1]) > 0.99


def test_init_from_codebook_rejects_a_wrong_codebook_or_an_unbuilt_prior():
    prior = modules.GatedPixelCNN(num_codes=K, filters=8, layers=1, skip_filters=8)
    with pytest.raises(ValueError, match="call the prior once"):
        prior.init_from_codebook(np.zeros((K, 3)))
    prior(tf.zeros((1, H, W), tf.int32))
    with pytest.raises(ValueError, match=r"Received: codebook of shape \(5, 3\)"):
        prior.init_from_codebook(np.zeros((5, 3)))


def test_the_benchmarks_banded_plain_sampler_draws_what_the_naive_sampler_draws():
    from benchmarks import bench_prior

    keras.utils.set_random_seed(3)
    height, width = 11, 6
    plain = bench_prior.plain_pixelcnn(K, (height, width), filters=16, blocks=2, embed=8)
    rng = np.random.default_rng(3)
    for weight in plain.weights:
        weight.assign(rng.normal(0, 0.5, weight.shape).astype(np.float32))
    assert bench_prior.plain_rows_seen(plain) == 5  # 3 + 1 per block: the band is shorter than the grid
    uniform = rng.random((4, height, width)).astype(np.float32)
    naive = modules.make_naive_sampler(lambda inputs: plain(inputs["codes"]), 4, height, width)(uniform).numpy()
    banded = bench_prior.make_plain_sampler(plain, 4, height, width)(uniform).numpy()
    np.testing.assert_array_equal(banded, naive)
    assert len(np.unique(naive)) > 3  # the draws are not degenerate


def test_top_k_and_nucleus_keep_exactly_the_most_likely_codes():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]], np.float32)
    logits = tf.math.log(probs)
    kept = lambda **kw: np.isfinite(modules.truncate_logits(logits, **kw).numpy())  # noqa: E731
    np.testing.assert_array_equal(kept(top_k=2), [[1, 0, 1, 0], [1, 1, 1, 1]])  # ties with the 2nd are kept
    np.testing.assert_array_equal(kept(top_p=0.8), [[1, 0, 1, 0], [1, 1, 1, 1]])  # 0.5 + 0.3 reach 0.8
    np.testing.assert_array_equal(kept(top_p=0.81), [[1, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(kept(top_p=0.1), [[1, 0, 0, 0], [1, 1, 1, 1]])  # the top code always stays
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.5), [[1, 0, 0, 0], [1, 1, 1, 1]])
    assert kept().all() and kept(top_k=9).all()
    # Drawn over many uniforms, the kept codes take the renormalised probabilities.
    uniform = (np.arange(4000, dtype=np.float32) + 0.5) / 4000
    drawn = modules.sample_codes(tf.repeat(logits[:1], 4000, axis=0), uniform, top_p=0.8).numpy()
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / 4000, [0.625, 0, 0.375, 0], atol=1e-3)


def test_both_samplers_truncate_alike():
    prior = random_prior(seed=5)
    uniform = tf.random.stateless_uniform((3, H, W), seed=[4, 4])
    for truncation in ({"top_k": 3}, {"top_p": 0.6}):
        naive = modules.make_naive_sampler(prior, 3, H, W, **truncation)(uniform).numpy()
        fast = modules.make_fast_sampler(prior, 3, H, W, jit_compile=False, **truncation)(uniform).numpy()
        np.testing.assert_array_equal(fast, naive)
        assert not np.array_equal(fast, modules.make_fast_sampler(prior, 3, H, W, jit_compile=False)(uniform).numpy())
