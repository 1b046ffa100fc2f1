"""The reconstruction benchmark's contract: its JSON keys, the brain code usage and the learning-rate schedule."""

import sys

import numpy as np
import pytest

import dataset
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
    result = bench_vqvae.train_with_budget("ours-32", source, minutes=0.02, size=64, probe_every=0.5, log=lambda _: None,
                                           options={"num_codes": 32, "code_dim": 8, "loss": "ssim_l1",
                                                    "normalize_codes": True, "gradient": "rotation"})
    for key in ("ssim_mean", "ssim_brain_mean", "psnr_brain_mean", "perplexity_brain", "bits_per_code", "steps",
                "minutes_to_0.90"):
        assert key in result
    assert result["bits_per_code"] == 5.0 and result["steps"] >= 1
    assert 1.0 <= result["perplexity_brain"] <= result["codes_used_brain"] <= 32
    assert np.isfinite(result["ssim_brain_mean"]) and result["options"]["gradient"] == "rotation"
