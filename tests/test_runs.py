"""The run record: one owner of a run folder, and the defects a review found in how runs were kept.

Each test here failed on the code before `runs.Run` (stale priors, the split
seed, --skip-bad downstream, truncated checkpoints, inexact resume, the
memorisation check's reference). The commands run in this process through
their `main` (the same code path as the command line, without paying for a
TensorFlow start per command); what needs a process of its own runs in one.
"""

import csv
import functools
import io
import json
import shutil
import sys
import zipfile
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import predict
import runs
import train
from conftest import REPO, brain_like, make_oasis_tree, run_cli, write_image

TINY = ["--image-size", "32", "--batch-size", "8", "--channels", "16", "--res-channels", "8", "--codes", "32",
        "--code-dim", "8", "--verbose", "0"]
PRIOR = ["--model", "pixelcnn", "--filters", "8", "--layers", "2", "--skip-filters", "16", "--batch-size", "8",
         "--verbose", "0"]


CAPTURE = {}


@pytest.fixture(autouse=True)
def capture_commands(capsys):
    CAPTURE["sys"] = capsys
    yield
    CAPTURE.clear()


def command(script, *args):
    """Runs `script.main(args)` as the command line would; returns its exit code and what it printed."""
    capsys = CAPTURE.get("sys")
    if capsys is not None:
        capsys.readouterr()
    try:
        code = script.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def one_error_line(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def checkpoint_state(path):
    """Every array in a .keras file's weights (model, quantizer state and optimizer), by name."""
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("model.weights.h5")
    state = {}
    with h5py.File(io.BytesIO(raw), "r") as f:
        f.visititems(lambda name, item: state.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return state


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_oasis_tree(tmp_path_factory.mktemp("data"), subjects=(4, 2, 2), slices=8, size=(32, 32))


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """A generic folder without subject ids: split by file, with a seed."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(60):
        write_image(root / f"img_{i:03d}.png", brain_like((32, 32), seed=i))
    return root


@pytest.fixture(scope="module")
def run_with_prior(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    # Whole-image MSE: after one epoch its reconstructions are nearly flat, which the memorisation test's
    # like-for-like check relies on (the brain loss's one-epoch reconstructions are noise, ordered by chance).
    assert command(train, "--data", tiny_data, "--run", run, "--epochs", "1", "--loss", "mse", *TINY).returncode == 0
    assert command(train, *PRIOR, "--run", run, "--epochs", "1").returncode == 0
    return run


def test_a_retrained_vqvae_retires_its_prior(run_with_prior, tiny_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_prior, run)
    done = command(train, "--data", tiny_data, "--run", run, "--epochs", "1", "--seed", "5",
                   "--overwrite", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "retiring the prior" in done.stdout
    assert not list(run.glob("pixelcnn_*")) and not (run / "codes_cache.npz").exists()
    line = one_error_line(command(predict, "--run", run, "--generate", "2"))
    assert "no trained prior" in line and "--model pixelcnn" in line


def test_a_prior_trained_on_another_vqvae_is_refused(run_with_prior, tiny_data, tmp_path):
    # The VQ-VAE is replaced behind the run's back (copied over from another run).
    other = tmp_path / "other"
    done = command(train, "--data", tiny_data, "--run", other, "--epochs", "1", "--seed", "9", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(run_with_prior, run)
    shutil.copy(other / "vqvae_best.keras", run / "vqvae_best.keras")
    line = one_error_line(command(predict, "--run", run, "--generate", "2"))
    assert "trained on another VQ-VAE" in line and "--model pixelcnn" in line and "--overwrite" in line
    with pytest.raises(runs.RunError, match="another VQ-VAE"):
        runs.Run(run).load_prior()
    runs.Run(run_with_prior).load_prior()  # the untouched run loads


def test_the_split_seed_is_its_own_and_predict_keeps_the_runs_split(flat_folder, tmp_path):
    tests = []
    for seed in (1, 2):
        run = tmp_path / f"seed{seed}"
        done = command(train, "--data", flat_folder, "--run", run, "--epochs", "1", "--seed", str(seed),
                       "--split-seed", "7", *TINY)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((run / "vqvae_config.json").read_text())["split_seed"] == 7
        done = command(predict, "--run", run, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        with open(last_json(done.stdout)["csv"]) as f:
            tests.append(sorted(row["file"] for row in csv.DictReader(f)))
    assert tests[0] == tests[1]  # a seed sweep evaluates on one test set
    line = one_error_line(command(predict, "--run", tmp_path / "seed1", "--split-seed", "3"))
    assert "split with seed 7" in line


def test_skip_bad_reaches_the_prior_and_generation(tmp_path):
    data = make_oasis_tree(tmp_path / "data", subjects=(4, 2, 2), slices=8, size=(32, 32), nested=False)
    bad = data / "keras_png_slices_data" / "keras_png_slices_train" / "case_001_slice_3.nii.png"
    bad.write_bytes(b"not an image at all")
    run = tmp_path / "run"
    assert "not an image" in one_error_line(command(train, "--data", data, "--run", run, *TINY))
    done = command(train, "--data", data, "--run", run, "--epochs", "1", "--skip-bad", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    done = command(train, *PRIOR, "--run", run, "--epochs", "1")  # no --skip-bad: the run's is used
    assert done.returncode == 0, done.stderr[-3000:]
    done = command(predict, "--run", run, "--generate", "2", "--no-xla", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(bad) in done.stderr  # a warning names the file each time it is left out


def test_a_truncated_checkpoint_is_named_corrupt_or_truncated(run_with_prior, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_with_prior, run)
    path = run / "vqvae_best.keras"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = one_error_line(command(predict, "--run", run))
    assert "corrupt or truncated" in line and str(path) in line


class Killed(BaseException):
    """Stands for a SIGKILL right after a backup: nothing after it runs (not even Keras's clean-up)."""


@pytest.mark.parametrize("model", ["vqvae", "vqvae-crops", "pixelcnn"])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(model, run_with_prior, tiny_data, tmp_path,
                                                                     monkeypatch):
    """Same final weights, optimizer state and codebook, bit for bit (CPU).

    vqvae-crops trains on random crops and is resumed without `--crop`: the
    run's config brings the flag back, and each image's crop depends only
    on (seed, epoch, image), so the resumed steps see the same pixels.
    Each run resumes with the other `--schedule` flag, which its stored
    schedule must override: a cosine (crops' default; asked of the prior)
    continues from the optimizer's step counter.
    """
    resume_without = []
    if model == "vqvae-crops":
        model, resume_without = "vqvae", ["--crop", "16"]
    if model == "vqvae":
        flags = ["--data", tiny_data, "--epochs", "2", "--backup-every", "1", "--seed", "4", *resume_without, *TINY]
    else:
        flags = [*PRIOR, "--epochs", "2", "--backup-every", "1", "--seed", "4", "--schedule", "cosine"]
    stored = "constant" if model == "vqvae" and not resume_without else "cosine"
    folders = {}
    for name in ("whole", "killed"):
        folders[name] = tmp_path / name
        if model == "pixelcnn":  # the same VQ-VAE under both priors
            folders[name].mkdir()
            for f in ("vqvae_best.keras", "vqvae_config.json", "vqvae_summary.json"):
                shutil.copy(run_with_prior / f, folders[name] / f)
    done = command(train, *flags, "--run", folders["whole"])
    assert done.returncode == 0, done.stderr[-3000:]
    save = train.Backup.save

    def save_then_die(self):  # 4 steps per epoch: killed after step 2 of the first epoch
        save(self)
        if train.optimizer_steps(self.model) == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(train.Backup, "save", save_then_die)
        with pytest.raises(Killed):
            command(train, *flags, "--run", folders["killed"])
    meta = json.loads((folders["killed"] / f"{model}_backup" / "training_metadata.json").read_text())
    assert meta == {"epoch": 0, "batches_done": 2}
    assert json.loads((folders["killed"] / f"{model}_config.json").read_text())["schedule"] == stored
    if stored == "cosine":  # spread over all 2 x 4 steps
        with zipfile.ZipFile(folders["whole"] / f"{model}_last.keras") as archive:
            rate = json.loads(archive.read("config.json"))["compile_config"]["optimizer"]["config"]["learning_rate"]
        assert rate["config"]["decay_steps"] + rate["config"]["warmup_steps"] == 8
    if resume_without:
        assert json.loads((folders["killed"] / "vqvae_config.json").read_text())["crop"] == 16
        at = flags.index("--crop")
        flags = flags[:at] + flags[at + 2:]
    flags += ["--schedule", "constant" if stored == "cosine" else "cosine"]  # the run's stored schedule wins
    done = command(train, *flags, "--run", folders["killed"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming epoch 1 at step 3 of 4" in done.stdout
    assert ("trained on random 16x16 crops" in done.stdout) == bool(resume_without)
    whole = checkpoint_state(folders["whole"] / f"{model}_last.keras")
    resumed = checkpoint_state(folders["killed"] / f"{model}_last.keras")
    assert whole.keys() == resumed.keys() and any("optimizer" in k for k in whole)
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    with open(folders["killed"] / f"{model}_history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]


def test_real_data_trains_on_crops_by_default_and_old_runs_resume_on_whole_images(tmp_path):
    assert train.default_crop("oasis", 256, 4) == 64  # the best measured configurations (README)
    assert train.default_crop("folder", 256, 8) == 64
    assert train.default_crop("phantoms", 128, 2) == 0  # the demo keeps whole images
    assert train.default_crop("folder", 128, 2) == 32
    assert train.default_crop("folder", 64, 4) == 0  # a 4x4 grid of codes per crop: whole images
    assert train.default_crop("folder", 48, 2) == 0
    run = runs.Run(tmp_path / "old")
    run.path.mkdir()
    old_config = {"model": "vqvae", "data": "x", "seed": 0, "image_size": 256, "batch_size": 16, "epochs": 3,
                  "learning_rate": 1e-3, "vqvae": {"downsample": 4}}
    runs.write_json(run.file("vqvae", "config.json"), old_config)
    args = run.resume_args("vqvae", train.parse_args([]))
    assert args.crop == 0  # a run from before crops is not switched to them halfway
    assert args.schedule == "constant"  # nor to a decaying learning rate


def test_crops_take_a_warm_up_then_cosine_learning_rate_and_whole_images_a_constant_one():
    assert train.resolve_schedule("auto", "vqvae", 64) == "cosine"  # measured better on crops (README)
    assert train.resolve_schedule("auto", "vqvae", 0) == "constant"
    assert train.resolve_schedule("auto", "pixelcnn", 0) == "constant"
    assert train.resolve_schedule("cosine", "vqvae", 0) == "cosine"  # the flag wins
    assert train.learning_rate(1e-3, "constant", 1000) == 1e-3
    schedule = train.learning_rate(1e-3, "cosine", 1000)  # 20 warm-up steps, then 980 of decay
    rates = np.array([float(schedule(step)) for step in range(0, 1001, 10)])
    np.testing.assert_allclose(rates[:3], [0.0, 5e-4, 1e-3], atol=1e-9)
    assert np.all(np.diff(rates[2:]) < 0) and rates[-1] < 1e-9
    np.testing.assert_allclose(float(schedule(510)), 5e-4, rtol=1e-5)  # half way through the decay
    short = train.learning_rate(1e-3, "cosine", 10)  # too short for a warm-up step: starts at the peak
    assert float(short(0)) == pytest.approx(1e-3) and 0 < float(short(9)) < 1e-4


def test_nearest_ssim_in_bounded_chunks_equals_all_pairs_at_once(tiny_data):
    import dataset
    import predict

    split = dataset.load_source(tiny_data).splits["train"]
    images = np.random.default_rng(0).uniform(0, 1, (5, 32, 32, 1)).astype(np.float32)
    images[2] = next(iter(dataset.make_dataset(split.take([7]), image_size=32, batch_size=1))).numpy()[0]
    whole, files = predict.nearest_ssim(images, split, 32, "pad", batch_size=16)
    chunked, files2 = predict.nearest_ssim(images, split, 32, "pad", batch_size=16, pair_pixels=32 * 32 * 16)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    assert files == files2 and files[2] == split.paths[7] and whole[2] == pytest.approx(1.0, abs=1e-6)


def test_generation_reports_like_for_like_memorisation_references(run_with_prior, tmp_path):
    done = command(predict, "--run", run_with_prior, "--generate", "3", "--no-xla", "--out",
                   tmp_path / "gen", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    for key in ("nearest_train_ssim_mean", "test_nearest_train_ssim_mean", "train_nearest_train_ssim_mean"):
        assert 0 < summary[key] <= 1, key
    # Reconstructed training slices are the ceiling: at least as near the training set as reconstructed
    # test slices (equal, to rounding, for this one-epoch VQ-VAE whose reconstructions are nearly flat).
    assert summary["train_nearest_train_ssim_mean"] >= summary["test_nearest_train_ssim_mean"] - 1e-4
    assert summary["split_by"] == "subject" and "reconstructed held-out test slices" in done.stdout


def test_predict_on_a_users_folder_saves_every_reconstruction(run_with_prior, flat_folder, tmp_path):
    out = tmp_path / "out"
    done = command(predict, "--run", run_with_prior, "--split", "all", "--data", flat_folder,
                   "--fit", "stretch", "--save-images", "--out", out, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["n_images"] == 60 and summary["fit"] == "stretch"
    assert sorted(p.name for p in (out / "reconstructions").glob("*.png")) == [f"img_{i:03d}.png" for i in range(60)]
    for key in ("ssim_mean", "ssim_brain_mean", "ssim_brain_std", "psnr_brain_mean"):
        assert summary[key] is not None and np.isfinite(summary[key]), key
    with open(summary["csv"]) as f:
        rows = list(csv.DictReader(f))
    brain = np.array([float(r["ssim_brain"]) for r in rows])
    assert summary["ssim_brain_mean"] == pytest.approx(np.nanmean(brain), abs=1e-5)



MIRRORED_PREDICT = """
import sys, json
import numpy as np, tensorflow as tf
sys.path.insert(0, {repo!r})
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import predict, runs
run = runs.Run({run!r})
source = run.source()
split = source.splits["test"]
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with mirrored.scope():
    model = run.load_vqvae()
spread = predict.reconstruct_split(model, split, 32, batch_size=5, export_codes=True, strategy=mirrored,
                                   verbose=False)
single = predict.reconstruct_split(run.load_vqvae(), split, 32, batch_size=5, export_codes=True, verbose=False)
print(json.dumps({{k: float(np.max(np.abs(spread[k].astype(float) - single[k].astype(float))))
                  for k in ("ssim", "ssim_brain", "psnr", "codes")}} | {{"n": len(spread["ssim"])}}))
"""


def test_predict_spreads_a_batch_over_replicas_with_the_same_results(run_with_prior):
    done = run_cli("-c", MIRRORED_PREDICT.format(repo=str(REPO), run=str(run_with_prior)))
    assert done.returncode == 0, done.stderr[-3000:]
    diff = last_json(done.stdout)
    assert diff.pop("n") == 16  # 16 test images in batches of 5: the last one uneven over 2 replicas
    assert diff["codes"] == 0 and max(diff.values()) < 1e-4, diff


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_generation_scores_sample_quality_against_the_test_split_or_a_reference_folder(run_with_prior, tmp_path,
                                                                                       monkeypatch):
    import metrics

    monkeypatch.setattr(metrics, "EVAL_STEPS", 3)  # the evaluation network's training, shortened for the test
    # The plumbing is under test here; the two-sample test's power is tested in test_generation_metrics.
    monkeypatch.setattr(metrics, "sample_quality", functools.partial(metrics.sample_quality, c2st_epochs=1))
    args = ["--run", run_with_prior, "--generate", "8", "--no-xla", "--no-memorisation-check", "--json"]
    done = command(predict, *args, "--out", tmp_path / "gen")
    assert done.returncode == 0, done.stderr[-3000:]
    quality = last_json(done.stdout)["quality"]
    for key in ("fd", "fd_floor", "kid", "precision", "recall", "density", "coverage", "msssim_diversity",
                "msssim_diversity_real", "texture_fd", "texture_fd_floor", "c2st_accuracy", "c2st_recon_accuracy"):
        assert np.isfinite(quality[key]), key
    assert quality["n_reference"] == 8 and "noisy below 100" in done.stdout
    assert "sample quality over 8 slices: FD" in done.stdout
    # Any folder of real slices as the reference; a missing one is one line.
    folder = tmp_path / "reference"
    for i in range(7):
        write_image(folder / f"real_{i}.png", brain_like((40, 40), seed=50 + i))
    done = command(predict, *args, "--out", tmp_path / "gen2", "--reference-data", folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert last_json(done.stdout)["quality"]["n_reference"] == 7
    line = one_error_line(command(predict, *args, "--reference-data", tmp_path / "nowhere"))
    assert "--reference-data" in line and "nowhere" in line
    done = command(predict, *args, "--no-quality", "--out", tmp_path / "gen3")
    assert done.returncode == 0 and "quality" not in last_json(done.stdout)
