"""The reconstruction benchmark's contract: its JSON keys, the brain code usage, its presets and the schedule."""

import sys

import numpy as np
import pytest

import dataset
import metrics
import modules
import train
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_vqvae  # noqa: E402


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert bench_vqvae.learning_rate(1e-3, 0.5, "constant") == 1e-3
    assert bench_vqvae.learning_rate(1e-3, 0.01, "cosine") == pytest.approx(5e-4)
    assert bench_vqvae.learning_rate(1e-3, 0.02, "cosine") == pytest.approx(1e-3)
    assert bench_vqvae.learning_rate(1e-3, 0.51, "cosine") == pytest.approx(5e-4)
    assert bench_vqvae.learning_rate(1e-3, 1.0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_a_short_run_reports_every_key_the_issue_names(tmp_path):
    root = dataset.ensure_phantoms(tmp_path, subjects=(4, 1, 1), n_slices=16, size=64, verbose=False)
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


def test_the_train_preset_is_what_train_py_builds_and_set_changes_it():
    # train.py's --loss auto: the brain recipe on a 32x32 code grid (256 px, downsample 8), the plain one at 64x64.
    coarse = bench_vqvae.model_options("train", downsample=8)
    assert (coarse["loss"], coarse["normalize_codes"], coarse["gradient"]) == ("ssim_l1", True, "rotation")
    fine = bench_vqvae.model_options("train", downsample=4)
    assert (fine["loss"], fine["normalize_codes"], fine["gradient"]) == ("mse", False, "straight_through")
    defaults = train.parse_args([])
    assert coarse["background_weight"] == defaults.background_weight and coarse["num_codes"] == defaults.codes
    assert "downsample" not in coarse and "seed" not in coarse
    assert bench_vqvae.model_options("model") == {}
    changed = bench_vqvae.model_options("train", ["loss=mse", "decoder_channels=96", "normalize_codes=false"], 8)
    assert changed["loss"] == "mse" and changed["decoder_channels"] == 96 and changed["normalize_codes"] is False
    modules.VQVAE(**changed)  # every key is a constructor argument


def test_train_py_resolves_loss_auto_by_the_code_grid_and_explicit_flags_win():
    options = lambda *argv, size=256: train.vqvae_options(train.parse_args(list(argv)), size)  # noqa: E731
    assert options("--downsample", "8")["loss"] == "ssim_l1" and options()["loss"] == "mse"
    assert options(size=128)["loss"] == "ssim_l1"  # the phantom demo: 128 px, downsample 4, a 32x32 grid
    brain = options("--loss", "ssim_l1")
    assert brain["normalize_codes"] is True and brain["gradient"] == "rotation"
    assert options("--downsample", "8", "--loss", "mse")["loss"] == "mse"
    assert options("--downsample", "8", "--no-normalize-codes")["normalize_codes"] is False
    assert options("--gradient", "rotation")["gradient"] == "rotation" and options()["normalize_codes"] is False


def test_train_py_widens_the_decoder_on_crops_at_coarse_grids_only():
    def decoder(*argv, size=256, kind="folder"):
        options = train.vqvae_options(train.parse_args(list(argv)), size, kind)
        return options["decoder_channels"], options["decoder_res_blocks"]

    assert decoder("--downsample", "8") == (96, 3)  # real data at 32x32: 64 px crops by default (README)
    assert decoder("--downsample", "8", "--channels", "32", "--res-blocks", "1") == (48, 2)
    assert decoder() == (None, None)  # 64x64: the encoder's, as measured
    assert decoder("--downsample", "8", "--crop", "0") == (None, None)  # whole images: as measured
    assert decoder(size=128, kind="phantoms") == (None, None)  # the demo keeps whole images and its decoder
    assert decoder("--downsample", "8", "--decoder-channels", "40", "--decoder-res-blocks", "0") == (40, 0)
    # The benchmark's preset follows, for the benchmark's own crop.
    assert bench_vqvae.model_options("train", downsample=8, crop=64)["decoder_channels"] == 96
    assert bench_vqvae.model_options("train", downsample=8)["decoder_channels"] is None


def test_brain_code_counts_come_from_the_codes_of_grid_cells_touching_the_brain(tmp_path):
    root = dataset.ensure_phantoms(tmp_path, subjects=(1, 1, 2), n_slices=8, size=64, verbose=False)
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
