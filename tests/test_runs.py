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
import zipfile

import h5py
import numpy as np
import pytest

import config
import devices
import predict
import runs
import train
from conftest import PRIOR, REPO, TINY, brain_like, command, last_json, make_oasis_tree, one_error_line, run_cli, write_image



def checkpoint_state(path):
    """Every array in a .keras file's weights (model, quantizer state and optimizer), by name."""
    with zipfile.ZipFile(path) as archive:
        raw = archive.read("model.weights.h5")
    state = {}
    with h5py.File(io.BytesIO(raw), "r") as f:
        f.visititems(lambda name, item: state.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return state


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """A generic folder without subject ids: split by file, with a seed."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(60):
        write_image(root / f"img_{i:03d}.png", brain_like((32, 32), seed=i))
    return root


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
        assert json.loads((run / "vqvae_config.json").read_text())["data"]["split_seed"] == 7
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

    vqvae-crops trains on random crops and is resumed without `--set crop`:
    the run's config brings it back, and each image's crop depends only on
    (seed, epoch, image), so the resumed steps see the same pixels. Each run
    resumes with the other schedule asked for, which its stored one must
    override: a cosine (the crops' preset; asked of the prior) continues
    from the optimizer's step counter.
    """
    crops = model == "vqvae-crops"
    model = "pixelcnn" if model == "pixelcnn" else "vqvae"
    if model == "vqvae":
        common = ["--data", tiny_data, "--epochs", "2", "--backup-every", "1", "--seed", "4", *TINY]
    else:
        common = [*PRIOR, "--epochs", "2", "--backup-every", "1", "--seed", "4"]
    stored = "constant" if model == "vqvae" and not crops else "cosine"  # crops: the preset's cosine
    flags = [*common, "--set", f"schedule={stored}", *(["--set", "crop=16"] if crops else [])]
    section = "vqvae_train" if model == "vqvae" else "prior_train"
    folders = {}
    for name in ("whole", "killed"):
        folders[name] = tmp_path / name
        if model == "pixelcnn":  # the same VQ-VAE under both priors
            folders[name].mkdir()
            for f in ("vqvae_best.keras", "vqvae_config.json", "vqvae_summary.json"):
                shutil.copy(run_with_prior / f, folders[name] / f)
    done = command(train, *flags, "--run", folders["whole"])
    assert done.returncode == 0, done.stderr[-3000:]
    save = runs.Backup.save

    def save_then_die(self):  # 4 steps per epoch: killed after step 2 of the first epoch
        save(self)
        if runs.optimizer_steps(self.model) == 2:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(runs.Backup, "save", save_then_die)
        with pytest.raises(Killed):
            command(train, *flags, "--run", folders["killed"])
    meta = json.loads((folders["killed"] / f"{model}_backup" / "training_metadata.json").read_text())
    assert meta == {"epoch": 0, "batches_done": 2}
    record = json.loads((folders["killed"] / f"{model}_config.json").read_text())
    assert record["version"] == config.VERSION and record[section]["schedule"] == stored
    if stored == "cosine":  # spread over all 2 x 4 steps
        with zipfile.ZipFile(folders["whole"] / f"{model}_last.keras") as archive:
            rate = json.loads(archive.read("config.json"))["compile_config"]["optimizer"]["config"]["learning_rate"]
        assert rate["config"]["decay_steps"] + rate["config"]["warmup_steps"] == 8
    if model == "vqvae":
        assert record["vqvae_train"]["crop"] == (16 if crops else 0)
    # The stored schedule and batch win over the ones asked for; the devices are set up for the stored batch.
    flags = [*common, "--set", f"schedule={'constant' if stored == 'cosine' else 'cosine'}", "--batch-size", "16"]
    placed = []
    setup = devices.setup
    monkeypatch.setattr(devices, "setup", lambda *a, **k: placed.append(a[2]) or setup(*a, **k))
    done = command(train, *flags, "--run", folders["killed"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert placed == [8]
    assert "resuming epoch 1 at step 3 of 4" in done.stdout
    assert ("trained on random 16x16 crops" in done.stdout) == crops
    whole = checkpoint_state(folders["whole"] / f"{model}_last.keras")
    resumed = checkpoint_state(folders["killed"] / f"{model}_last.keras")
    assert whole.keys() == resumed.keys() and any("optimizer" in k for k in whole)
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    with open(folders["killed"] / f"{model}_history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]


def test_real_data_trains_on_crops_by_default_and_the_phantom_demo_on_whole_images():
    args = lambda *argv: train.parse_args(list(argv))  # noqa: E731
    real = train.vqvae_config(args("--data", "somewhere"))
    assert real.preset == "oasis-256" and real.vqvae_train.crop == 64 and real.vqvae_train.schedule == "cosine"
    assert real.vqvae_train.epochs == 480 and real.data.image_size == 256 and real.grid == 64
    demo = train.vqvae_config(args())
    assert demo.preset == "phantoms" and demo.vqvae_train.crop == 0 and demo.vqvae_train.schedule == "constant"
    assert demo.vqvae.loss == "ssim_l1" and demo.grid == 32
    small = train.vqvae_config(args("--data", "x", "--preset", "oasis-128", "--set", "train.crop=128", "--epochs", "3"))
    assert small.vqvae_train.crop == 0  # a crop of the whole image is the whole image
    assert small.vqvae_train.epochs == 3 and small.prior_train.epochs == 40 and small.vqvae.decoder_channels == 96
    assert train.vqvae_config(args("--smoke")).data.image_size == 64


def test_an_old_run_folder_is_one_line_saying_to_retrain(tmp_path, run_with_prior):
    old = tmp_path / "old"
    shutil.copytree(run_with_prior, old)
    for kind in ("vqvae", "pixelcnn"):  # as runs before the versioned config wrote them
        record = json.loads((old / f"{kind}_config.json").read_text())
        record.pop("version")
        (old / f"{kind}_config.json").write_text(json.dumps(record))
    (old / "vqvae_summary.json").unlink()  # and an interrupted VQ-VAE in it, which train.py would resume
    (old / "vqvae_backup").mkdir()
    (old / "vqvae_backup" / "training_metadata.json").write_text('{"epoch": 0, "batches_done": 1}')
    for script, argv in ((train, ["--run", old, *TINY]), (predict, ["--run", old]),
                         (predict, ["--run", old, "--generate", "2"]), (train, [*PRIOR, "--run", old])):
        line = one_error_line(command(script, *argv))
        assert "older version of this project" in line and "retrain" in line, line


def test_presets_round_trip_and_set_changes_one_field_with_a_clear_error_otherwise():
    for name in config.PRESETS:
        cfg = config.validate(config.preset(name))
        assert config.from_record(json.loads(json.dumps(config.to_record(cfg)))) == cfg
    cfg = config.override(config.preset("phantoms"), ["num_codes=64", "prior.layers=4", "epochs=3",
                                                      "decoder_channels=none", "normalize_codes=false"])
    assert (cfg.vqvae.num_codes, cfg.prior.layers, cfg.vqvae_train.epochs) == (64, 4, 3)
    assert cfg.vqvae.decoder_channels is None and cfg.vqvae.normalize_codes is False
    assert config.override(cfg, ["epochs=7"], model="pixelcnn").prior_train.epochs == 7
    for items, message in ((["bogus=1"], "unknown key"), (["num_codes=many"], "is not a"), (["num_codes"], "key=value"),
                           (["vqvae_train.crop=30"], None), (["loss=l2"], "must be one of"),
                           (["dropout=1"], "prior.dropout must be in")):
        with pytest.raises(config.ConfigError, match=message or "multiple of vqvae.downsample"):
            config.validate(config.override(config.preset("oasis-256"), items))


def test_crops_take_a_warm_up_then_cosine_learning_rate_and_whole_images_a_constant_one():
    constant, cosine = config.TrainConfig(schedule="constant"), config.TrainConfig(schedule="cosine")
    assert train.learning_rate(constant, 1000) == 1e-3
    schedule = train.learning_rate(cosine, 1000)  # 20 warm-up steps, then 980 of decay
    rates = np.array([float(schedule(step)) for step in range(0, 1001, 10)])
    np.testing.assert_allclose(rates[:3], [0.0, 5e-4, 1e-3], atol=1e-9)
    assert np.all(np.diff(rates[2:]) < 0) and rates[-1] < 1e-9
    np.testing.assert_allclose(float(schedule(510)), 5e-4, rtol=1e-5)  # half way through the decay
    short = train.learning_rate(cosine, 10)  # too short for a warm-up step: starts at the peak
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
                "msssim_diversity_real", "texture_fd", "texture_fd_floor", "c2st_accuracy", "c2st_recon_accuracy",
                "tissue_csf", "tissue_symmetry_floor", "tissue_worst_ratio"):
        assert np.isfinite(quality[key]), key
    assert quality["n_reference"] == 8 and "noisy below 100" in done.stdout and "tissue composition: csf" in done.stdout
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


def test_a_run_scores_its_samples_with_its_saved_reference_statistics_where_its_data_are_gone(
        run_with_prior, tiny_data, tmp_path, monkeypatch):
    import metrics

    monkeypatch.setattr(metrics, "EVAL_STEPS", 3)  # the evaluation network's training, shortened for the test
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(run_with_prior, run)
    shutil.copytree(tiny_data, data)
    record = json.loads((run / "vqvae_config.json").read_text())
    record["data"]["data"] = str(data)  # the run's data, at a place this test can remove
    (run / "vqvae_config.json").write_text(json.dumps(record))
    done = command(predict, "--run", run, "--save-reference", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = last_json(done.stdout)
    assert saved["n_reference"] == 16 and (run / "reference_statistics.npz").stat().st_size == saved["bytes"]
    assert "wrote the reference statistics of 16 real slices" in done.stdout
    generate = ["--run", run, "--generate", "8", "--no-xla", "--json"]
    done = command(predict, *generate, "--out", tmp_path / "with-data")
    assert done.returncode == 0, done.stderr[-3000:]
    with_data = last_json(done.stdout)
    assert "nearest_train_ssim_mean" in with_data and with_data["quality"]["c2st_accuracy"] is None
    assert "no two-sample tests" in done.stdout and "--reference-data" in with_data["quality"]["note"]
    shutil.rmtree(data)
    done = command(predict, *generate, "--out", tmp_path / "without-data")
    assert done.returncode == 0, done.stderr[-3000:]
    without = last_json(done.stdout)
    assert "memorisation check is skipped" in done.stdout and "nearest_train_ssim_mean" not in without
    assert without["quality"] == with_data["quality"]  # the same samples, the same statistics, no data needed
    assert np.isfinite([without["quality"][k] for k in ("fd", "fd_floor", "precision", "tissue_worst_ratio")]).all()
    # Any folder of real slices as the reference, with the saved training rows as the floor: two-sample tests too.
    folder = tmp_path / "reference"
    for i in range(7):
        write_image(folder / f"real_{i}.png", brain_like((40, 40), seed=50 + i))
    done = command(predict, *generate, "--out", tmp_path / "folder", "--reference-data", folder)
    assert done.returncode == 0, done.stderr[-3000:]
    quality = last_json(done.stdout)["quality"]
    assert quality["n_reference"] == 7 and 0 <= quality["c2st_accuracy"] <= 1 and 0 <= quality["c2st_recon_accuracy"] <= 1
    # A damaged file is one line naming it; without it (and without the data) the run says where its data went.
    pack = run / "reference_statistics.npz"
    pack.write_bytes(pack.read_bytes()[:2000])
    line = one_error_line(command(predict, *generate))
    assert "reference_statistics.npz is not a readable reference-statistics file" in line and "--save-reference" in line
    pack.unlink()
    assert "which is gone" in one_error_line(command(predict, *generate))
