"""The reconstruction benchmark's contract: its JSON keys, the brain code usage, its presets and the schedule."""

import dataclasses

import numpy as np
import pytest

import config
import dataset
import metrics
import modules
import phantoms
from benchmarks import bench_vqvae


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert bench_vqvae.learning_rate(1e-3, 0.5, "constant") == 1e-3
    assert bench_vqvae.learning_rate(1e-3, 0.01, "cosine") == pytest.approx(5e-4)
    assert bench_vqvae.learning_rate(1e-3, 0.02, "cosine") == pytest.approx(1e-3)
    assert bench_vqvae.learning_rate(1e-3, 0.51, "cosine") == pytest.approx(5e-4)
    assert bench_vqvae.learning_rate(1e-3, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_a_short_run_reports_every_key_the_issue_names(tmp_path):
    root = phantoms.ensure_phantoms(tmp_path, subjects=(4, 1, 1), n_slices=16, size=64, verbose=False)
    source = dataset.load_source(root)
    result = bench_vqvae.train_with_budget("ours-32", source, minutes=0.02, size=64, probe_every=0.5,
                                           log=lambda _: None, seed=3,
                                           options={"num_codes": 32, "code_dim": 8, "loss": "ssim_l1",
                                                    "normalize_codes": True, "gradient": "rotation"})
    for key in ("ssim_mean", "ssim_brain_mean", "psnr_brain_mean", "perplexity_brain", "bits_per_code", "steps",
                "minutes_to_0.90"):
        assert key in result
    assert result["bits_per_code"] == 5.0 and result["steps"] >= 1
    assert 1.0 <= result["perplexity_brain"] <= result["codes_used_brain"] <= 32
    assert np.isfinite(result["ssim_brain_mean"]) and result["options"]["gradient"] == "rotation"
    assert result["seed"] == 3


def test_a_preset_is_the_vqvae_train_py_builds_and_set_changes_it():
    # The brain recipe on a 32x32 code grid (oasis-256-32), the plain one at 64x64 (oasis-256).
    coarse = bench_vqvae.model_options("oasis-256-32")
    assert (coarse["loss"], coarse["normalize_codes"], coarse["gradient"]) == ("ssim_l1", True, "rotation")
    assert (coarse["decoder_channels"], coarse["decoder_res_blocks"]) == (96, 3)
    fine = bench_vqvae.model_options("oasis-256")
    assert (fine["loss"], fine["normalize_codes"], fine["gradient"]) == ("mse", False, "straight_through")
    assert fine == {k: v for k, v in dataclasses.asdict(config.preset("oasis-256").vqvae).items() if k != "downsample"}
    assert "downsample" not in coarse and "seed" not in coarse
    assert bench_vqvae.model_options("model") == {}
    changed = bench_vqvae.model_options("oasis-256-32", ["loss=mse", "decoder_channels=64", "normalize_codes=false"])
    assert changed["loss"] == "mse" and changed["decoder_channels"] == 64 and changed["normalize_codes"] is False
    modules.VQVAE(**changed)  # every key is a constructor argument


def test_brain_code_counts_come_from_the_codes_of_grid_cells_touching_the_brain(tmp_path):
    root = phantoms.ensure_phantoms(tmp_path, subjects=(1, 1, 2), n_slices=8, size=64, verbose=False)
    held_out = dataset.make_dataset(dataset.load_source(root).splits["test"], image_size=64, batch_size=5)
    model = modules.VQVAE(downsample=8, num_codes=16, code_dim=4, seed=0)
    model.build((None, 64, 64, 1))
    scores, counts = bench_vqvae.quality(model.reconstruct, held_out, model)
    expected, positions = np.zeros(16), 0
    for images in held_out:
        codes, brain = model.encode(images).numpy(), metrics.brain_mask(images).numpy()[..., 0]
        touched = brain.reshape(len(images), 8, 8, 8, 8).any(axis=(2, 4))
        expected += np.bincount(codes[touched], minlength=16)
        positions += touched.size
    assert counts.sum() == expected.sum() and 0 < expected.sum() < positions
    np.testing.assert_array_equal(counts, expected)
    plain = bench_vqvae.quality(model.reconstruct, held_out)
    np.testing.assert_allclose(scores["ssim"], plain["ssim"], atol=1e-5)
    assert len(scores["ssim"]) == 16
