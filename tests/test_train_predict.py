"""train.py and predict.py as a user runs them, on tiny data: the real loop, end to end.

Commands run in this process through their `main`, except where a process of its own is the point: the
first training run (so the same-seed check compares two processes), a SIGKILL, and `--help` before TensorFlow.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import dataset
import predict
import train
from conftest import REPO, TINY, command, last_json, run_cli

TINY = [*TINY[:-1], "2"]  # --verbose 2: a line per epoch, which the resume test reads


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run1"
    result = run_cli(REPO / "train.py", "--model", "vqvae", "--data", tiny_data, "--run", run, "--epochs", "2",
                     "--seed", "3", "--json", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, last_json(result.stdout), result


def test_training_writes_the_whole_run_folder(trained_run):
    run, summary, result = trained_run
    assert 0.0 < summary["val_ssim"] <= 1.0 and summary["epochs"] == 2 and summary["seconds"] > 0
    assert summary["checkpoint"] == str(run / "vqvae_best.keras")
    for name in ("vqvae_best.keras", "vqvae_last.keras", "vqvae_config.json", "vqvae_history.csv",
                 "vqvae_curves.png", "vqvae_recon_epoch001.png", "vqvae_recon_epoch002.png", "vqvae_summary.json"):
        assert (run / name).is_file(), name
    assert (run / "logs" / "vqvae").is_dir()  # TensorBoard
    assert not (run / "vqvae_backup").exists()  # removed once training finished
    config = json.loads((run / "vqvae_config.json").read_text())
    assert config["version"] == 2 and config["vqvae"]["num_codes"] == 32 and config["data"]["image_size"] == 32
    summary_line = [line for line in result.stdout.splitlines() if line.startswith("vqvae: 2 epochs")]
    assert summary_line and "validation SSIM" in summary_line[0] and "perplexity" in summary_line[0]


def test_a_finished_run_is_never_overwritten(trained_run, tiny_data):
    run, _, _ = trained_run
    stamp = (run / "vqvae_best.keras").stat().st_mtime_ns
    result = command(train, "--data", tiny_data, "--run", run, *TINY)
    assert result.returncode == 2 and "already holds a trained VQ-VAE" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / "vqvae_best.keras").stat().st_mtime_ns == stamp


def test_predict_reports_every_image_of_the_split(trained_run, tiny_data, tmp_path):
    run, _, _ = trained_run
    codes = tmp_path / "codes.npz"
    result = command(predict, "--run", run, "--json", "--export-codes", codes)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["n_images"] == 16 and summary["split"] == "test"
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    ssim = np.array([float(r["ssim"]) for r in rows])
    assert len(rows) == 16
    assert summary["ssim_mean"] == pytest.approx(ssim.mean(), abs=1e-5)
    assert summary["ssim_std"] == pytest.approx(ssim.std(), abs=1e-5)
    assert 0 < summary["ssim_mean"] <= 1 and summary["psnr_mean"] > 0
    saved = np.load(codes)
    assert saved["codes"].shape == (16, 8, 8) and saved["codes"].max() < 32
    assert sorted(set(saved["slices"].tolist())) == list(range(8))
    result = command(predict, "--run", run, "--split", "all", "--data", tiny_data, "--json")
    assert result.returncode == 0 and last_json(result.stdout)["n_images"] == 64


def test_unreadable_or_mismatched_checkpoints_give_one_line(tmp_path):
    missing = command(predict, "--run", tmp_path / "nothing")
    assert missing.returncode == 2 and "no trained VQ-VAE" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vqvae_best.keras").write_bytes(b"PK\x03\x04 truncated zip")
    result = command(predict, "--run", broken)
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr
    assert str(broken / "vqvae_best.keras") in result.stderr and "Traceback" not in result.stderr
    other = tmp_path / "other"
    other.mkdir()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]).save(other / "vqvae_best.keras")
    result = command(predict, "--run", other)
    assert result.returncode == 2 and "not a VQ-VAE" in result.stderr


@pytest.mark.skipif(bool(__import__("tensorflow").config.list_physical_devices("GPU")),
                    reason="bit-exact training is promised on CPU only")
def test_same_seed_same_training(tiny_data, tmp_path, trained_run):
    _, first, _ = trained_run  # trained in a process of its own
    result = command(train, "--data", tiny_data, "--run", tmp_path / "again", "--epochs", "2", "--seed", "3",
                     "--json", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    again = last_json(result.stdout)
    assert again["val_ssim"] == first["val_ssim"]
    a = keras.models.load_model(first["checkpoint"]).get_weights()
    b = keras.models.load_model(again["checkpoint"]).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def kill_after_epoch(cmd, metadata, epoch):
    """Starts a training run and SIGKILLs it once its backup records `epoch` finished epochs."""
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and process.poll() is None:
            try:
                if json.loads(metadata.read_text())["epoch"] >= epoch:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return json.loads(metadata.read_text())["epoch"]


def test_an_interrupted_run_resumes_from_its_backup_even_twice(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--run", str(run), "--epochs", "8", "--backup-every", "1", "--json", *TINY]
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    metadata = run / "vqvae_backup" / "training_metadata.json"
    first = kill_after_epoch(cmd, metadata, 2)
    assert 2 <= first < 8, "the run finished before it could be interrupted"
    second = kill_after_epoch(cmd, metadata, first + 2)  # the resumed run is killed too
    assert first + 2 <= second < 8
    result = command(train, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming the interrupted run" in result.stdout
    assert f"Epoch {second + 1}/8" in result.stdout and "Epoch 1/8" not in result.stdout
    summary = last_json(result.stdout)
    assert summary["epochs"] == 8
    with open(run / "vqvae_history.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs[-1] == 7 and len(epochs) == len(set(epochs))  # no epoch logged twice
    assert not (run / "vqvae_backup").exists()


def test_nan_loss_stops_with_a_clear_message(tiny_data, tmp_path, monkeypatch):
    # Images of NaN make the very first loss NaN.
    monkeypatch.setattr(dataset, "fit_image", lambda image, size, fit="pad": tf.fill((size, size, 1), np.nan))
    run = tmp_path / "nan"
    result = command(train, "--data", tiny_data, "--run", run, "--epochs", "2", *TINY)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss became NaN at epoch 1, step 1" in errors[0] and "Lower --lr" in errors[0]
    assert "Traceback" not in result.stderr
    assert (run / "vqvae_config.json").is_file()  # what was written is kept
    assert not (run / "vqvae_last.keras").exists()  # and no NaN model was saved as a checkpoint


def test_bad_flags_are_refused_in_one_line(tiny_data):
    for flags, message in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                           (["--set", "downsample=6"], "vqvae.downsample must be a power of two"),
                           (["--image-size", "8"], "--image-size must be at least 32"),
                           (["--set", "decay=1"], "vqvae.decay must be in [0, 1)"),
                           (["--set", "codes=9"], "unknown key")):
        result = command(train, "--data", tiny_data, *flags)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, flags


def test_help_explains_every_flag():
    for script, flags in ((train, ("--data", "--run", "--epochs", "--batch-size", "--image-size", "--limit",
                                   "--seed", "--preset", "--set", "--lr", "--smoke", "--json")),
                          (predict, ("--run", "--data", "--split", "--limit", "--export-codes", "--json"))):
        result = command(script, "--help")
        assert result.returncode == 0
        for flag in flags:
            assert flag in result.stdout, (script, flag)
        assert "(default: None)" not in result.stdout


def test_train_py_parses_its_flags_before_tensorflow_is_imported():
    for argv in (["--help"], ["--set", "num_codes"]):  # help, and a flag error
        code = ("import runpy, sys\n"
                f"sys.argv = ['train.py', *{argv!r}]\n"
                "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
        result = run_cli("-c", code)
        assert "tensorflow loaded: False" in result.stdout, (argv, result.stdout[-500:], result.stderr[-500:])


def test_prior_trains_in_the_run_and_generates_new_slices(trained_run, tmp_path):
    run, _, _ = trained_run
    result = command(train, "--model", "pixelcnn", "--run", run, "--epochs", "12", "--lr", "0.01",
                     "--set", "filters=8", "--set", "layers=2", "--set", "skip_filters=16", "--batch-size", "8", "--verbose", "2",
                     "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["epochs"] == 12 and summary["grid"] == [8, 8] and summary["num_slices"] == 8
    # A bound a broken prior fails: below the context-free baseline (each code drawn from the training
    # codes' frequencies), itself below uniform. A prior that ignores context, or is worse than uniform, fails.
    codes = np.load(run / "codes_cache.npz")
    counts = np.bincount(codes["train"].reshape(-1), minlength=32) + 1.0
    unigram = -np.mean(np.log2(counts / counts.sum())[codes["validate"].reshape(-1)])
    assert summary["unigram_bits_per_code"] == pytest.approx(unigram, rel=1e-6)
    assert 0 < summary["val_bits_per_code"] < unigram < summary["uniform_bits_per_code"]
    for name in ("pixelcnn_best.keras", "pixelcnn_last.keras", "pixelcnn_config.json", "pixelcnn_history.csv",
                 "pixelcnn_curves.png", "pixelcnn_samples_epoch012.png", "codes_cache.npz"):
        assert (run / name).is_file(), name
    out = tmp_path / "gen"
    result = command(predict, "--run", run, "--generate", "3", "--slice", "4", "--top-k", "8", "--out", out,
                     "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json(result.stdout)
    assert summary["n_generated"] == 3 and summary["slice"] == 4 and summary["samples_per_s"] > 0
    assert summary["top_k"] == 8 and summary["top_p"] == 1.0 and "top-k 8" in result.stdout
    assert 0 < summary["nearest_train_ssim_mean"] <= 1 and 0 < summary["test_nearest_train_ssim_mean"] <= 1
    assert sorted(p.name for p in out.glob("generated_*.png")) == [f"generated_{i:04d}.png" for i in range(3)]
    assert (out / "generated.png").is_file() and (out / "nearest_train.csv").is_file()
    result = command(predict, "--run", run, "--generate", "2", "--slice", "40")
    assert result.returncode == 2 and "--slice must be in 0..7" in result.stderr
    for flag, value in (("--top-p", "0"), ("--top-k", "-1")):
        result = command(predict, "--run", run, "--generate", "2", flag, value)
        assert result.returncode == 2 and f"{flag} must be" in result.stderr and f"Received: {value}" in result.stderr


def toy_model():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def test_early_stopping_ends_after_patience_epochs_and_leaves_the_best_weights(tmp_path):
    # Fitted to y = x and validated on y = -x: every epoch after the first validates worse.
    x = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
    make_train = lambda first_epoch, skip: (  # noqa: E731
        tf.data.Dataset.from_tensor_slices((x, x)).shuffle(32, seed=first_epoch).batch(8).repeat().skip(skip))
    val = tf.data.Dataset.from_tensor_slices((x, -x)).batch(32)
    model = toy_model()
    rows = train.fit_in_run(model, "toy", tmp_path, make_train, val, steps=4, epochs=20, resuming=False,
                            monitor="val_loss", mode="min", grid=None, learning_rate=0.1, patience=2, verbose=0)
    losses = [float(r["val_loss"]) for r in rows]
    assert len(rows) == 3 and losses[0] < losses[1] < losses[2], losses
    best = keras.models.load_model(tmp_path / "toy_best.keras")
    np.testing.assert_array_equal(model.get_weights()[0], best.get_weights()[0])
    assert not np.array_equal(model.get_weights()[0], keras.models.load_model(tmp_path / "toy_last.keras")
                              .get_weights()[0])


def test_early_stopping_counts_the_epochs_before_a_resume():
    from runs import StopWhenStale, epochs_since_best

    assert epochs_since_best([3.0, 2.0, 2.0, 2.5]) == 2 and epochs_since_best([1, 3, 3], mode="max") == 1
    assert epochs_since_best([]) is None
    stops = []
    for earlier in ([], [1.0, 1.2]):  # a fresh run, and one resumed after two logged epochs
        stale = StopWhenStale("val_loss", "min", patience=2, earlier=earlier)
        stale.set_model(toy_model())
        stale.on_epoch_end(0, {"val_loss": 1.3})
        stops.append(stale.model.stop_training)
    assert stops == [False, True]
    with pytest.raises(ValueError, match="Received: patience=0"):
        StopWhenStale("val_loss", "min", patience=0)
