"""tf.distribute, mixed precision and XLA on the CPU: mirrored and multi-worker == single device."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import modules
import devices
from conftest import run_cli

HERE = Path(__file__).resolve().parent


def quiet_env(**extra):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", **extra}


def test_mirrored_steps_match_a_single_device_on_the_same_global_batch(tmp_path):
    out = tmp_path / "mirrored.json"
    done = subprocess.run([sys.executable, str(HERE / "distributed_steps.py"), "mirrored", str(out)],
                          env=quiet_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["replicas"] == 2
    assert report["vqvae_updates"] == 3.0  # the codebook was updated (and codes restarted) on every step
    for model in ("vqvae", "prior"):
        assert report[model + "_moved"] > 1e-3, f"{model}: the steps did not move the weights"
        worst = max(report[model], key=report[model].get)
        assert report[model][worst] < 1e-5, f"{model}: {worst} differs by {report[model][worst]}"


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_loopback_end_with_the_weights_of_a_single_device(tmp_path):
    data = tmp_path / "slices"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(data / f"img_{i:02d}.png")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    procs = []
    try:
        for index in range(2):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "distributed_steps.py"), "worker", str(data), str(tmp_path / f"w{index}.npz")],
                env=quiet_env(TF_CONFIG=config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # never leave a worker behind, even on a timeout
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    # The reference: the same steps on one device, on the same global batches (its own process, no TF_CONFIG).
    env = quiet_env()
    env.pop("TF_CONFIG", None)
    done = subprocess.run([sys.executable, str(HERE / "distributed_steps.py"), "single", str(data),
                           str(tmp_path / "single.npz")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    w0, w1, ref = (np.load(tmp_path / f"{name}.npz") for name in ("w0", "w1", "single"))
    assert bool(w0["chief"]) and not bool(w1["chief"])
    assert int(w0["replicas"]) == 2
    weights = [k for k in w0.files if k.startswith("w")]
    assert len(weights) > 10 and sorted(weights) == sorted(k for k in ref.files if k.startswith("w"))
    for key in weights:
        np.testing.assert_allclose(w0[key], w1[key], atol=1e-6, err_msg=key)
    # Same start: the chief's broadcast initial weights are the reference's.
    for key in (k for k in ref.files if k.startswith("i")):
        np.testing.assert_array_equal(w0[key], ref[key], err_msg=key)
    moved = max(float(np.abs(ref["w" + key[1:]] - ref[key]).max()) for key in ref.files if key.startswith("i"))
    assert moved > 1e-2, "the steps did not move the weights"

    def worst(a, prefix=""):
        return max((float(np.abs(a[key] - ref[prefix + key]).max()), key) for key in weights)

    # Same end as one device (the tolerance of the mirrored test: only the order of sums differs).
    difference, key = worst(w0)
    assert difference < 1e-5, f"the workers differ from a single device in {key} by {difference}"
    # The comparison can fail: training on worker 0's shard alone, as a worker
    # without the all-reduce would, ends far from the single-device weights.
    difference, key = worst(ref, prefix="shard0_")
    assert difference > 100 * 1e-5, f"training on one shard alone came within {difference} of the global batch"


def test_mixed_precision_step_keeps_the_quantizer_in_float32():
    images = tf.random.stateless_uniform((4, 32, 32, 1), seed=[0, 1])
    with devices.dtype_policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        model = modules.VQVAE(downsample=4, channels=8, res_blocks=1, res_channels=8, num_codes=16, code_dim=4, seed=0)
        model.build((None, 32, 32, 1))
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        logs = model.train_on_batch(images, return_dict=True)
        z = model.encoder(images)
        quantized, indices = model.quantizer(z)
    assert keras.mixed_precision.dtype_policy().name == "float32"  # restored on the way out
    assert z.dtype == tf.bfloat16 and quantized.dtype == tf.bfloat16
    assert model.quantizer.codebook.dtype == "float32" and model.quantizer.ema_sums.dtype == "float32"
    assert indices.dtype == tf.int32 and tuple(indices.shape) == (4, 8, 8)
    flat = tf.reshape(tf.cast(z, tf.float32), (-1, 4))
    expected = tf.argmin(tf.reduce_sum((flat[:, None] - model.quantizer.codebook[None]) ** 2, -1), -1)
    np.testing.assert_array_equal(tf.reshape(indices, (-1,)).numpy(), expected.numpy())
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert float(model.quantizer.updates) == 1.0

    with devices.dtype_policy("mixed_bfloat16"):
        prior = modules.GatedPixelCNN(num_codes=16, filters=8, layers=2, skip_filters=8, grid_size=(8, 8))
        prior.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        codes = tf.reshape(indices, (4, 8, 8))
        loss = prior.train_on_batch(codes, codes)
        logits = prior(codes)
        sampled = modules.make_fast_sampler(prior, 2, 8, 8, jit_compile=False)(
            tf.random.stateless_uniform((2, 8, 8), seed=[0, 2]))
    assert logits.dtype == tf.float32 and np.isfinite(loss)
    assert sampled.shape == (2, 8, 8) and int(tf.reduce_max(sampled)) < 16


def test_strategy_errors_are_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(devices.DeviceError, match="needs the TF_CONFIG variable"):
        devices.make_strategy("multi-worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(devices.DeviceError, match="TF_CONFIG is not valid JSON"):
        devices.cluster_workers()


def test_train_cli_mirrored_over_two_cpu_devices_resumes_a_killed_run(tmp_path, oasis_tree):
    from test_train_predict import kill_after_epoch, last_json

    run = tmp_path / "run"
    args = ["train.py", "--model", "vqvae", "--data", str(oasis_tree), "--run", str(run), "--epochs", "6",
            "--image-size", "32", "--batch-size", "4", "--set", "channels=16", "--set", "res_channels=8",
            "--set", "num_codes=32", "--set", "code_dim=8", "--backup-every", "1", "--strategy", "mirrored", "--cpu-replicas", "2",
            "--verbose", "2", "--json"]
    first = kill_after_epoch([sys.executable, *args], run / "vqvae_backup" / "training_metadata.json", 2)
    assert 2 <= first < 6, "the run finished before it could be interrupted"
    done = run_cli(*args, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the interrupted run" in done.stdout and "MirroredStrategy, 2 replica(s) in sync" in done.stdout
    assert f"Epoch {first + 1}/6" in done.stdout and "Epoch 1/6" not in done.stdout
    summary = last_json(done.stdout)
    assert summary["epochs"] == 6 and summary["replicas"] == 2 and 0.0 <= summary["val_ssim"] <= 1.0
    assert (run / "vqvae_best.keras").is_file()
    done = run_cli("train.py", "--model", "vqvae", "--data", oasis_tree, "--smoke", "--run", tmp_path / "odd",
                   "--batch-size", "3", "--strategy", "mirrored", "--cpu-replicas", "2")
    assert done.returncode == 2 and "does not split evenly over 2 replicas" in done.stderr
