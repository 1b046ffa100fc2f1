"""Shared helpers for the tests: tiny image trees written on the fly, commands run in this process, and the
tiny VQ-VAE and prior trained once per session that most end-to-end tests start from."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Optional real data (never required): the shared folder beside the checkout.
REAL_DATA = Path(os.environ.get("BRAIN_MRI_REAL_DATA", REPO.parent / "shared" / "data" / "alzheimer-mri-slices"))


# The test files that take longest (measured with --durations), started first so that the workers of
# pytest-xdist finish together; any other file comes after them, in its usual order.
LONGEST_FIRST = ("test_generation_metrics", "test_runs", "test_distributed", "test_train_predict", "test_codec",
                 "test_volumes", "test_memory")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: a file keeps its order


@pytest.fixture(autouse=True)
def op_determinism_off_after_each_test():
    """Turns TensorFlow's op determinism off after each test, as a fresh process has it.

    train.py and predict.py run in this process turn it on for good
    (devices.configure), which roughly halves the speed of later training on
    the CPU and makes Keras drop XLA; without this, a test's speed and
    whether it compiles depended on which tests ran before it. Code that
    needs determinism turns it on itself.
    """
    yield
    from tensorflow.python.framework import config as tf_config  # the public API can only turn it on

    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


def brain_like(size=(32, 32), value=200, seed=0):
    """A small uint8 image: a bright disc with noise on black."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    return (disc * (value - 30 + rng.integers(0, 30, size))).astype(np.uint8)


def write_image(path, array, fmt=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_oasis_tree(root, subjects=(3, 1, 1), slices=4, size=(32, 32), nested=True, with_seg=True):
    """An OASIS-style tree (optionally nested twice, with mask folders)."""
    base = Path(root) / "keras_png_slices_data"
    if nested:
        base = base / "keras_png_slices_data"
    subject = 1
    for split, count in zip(("train", "validate", "test"), subjects):
        for _ in range(count):
            for z in range(slices):
                write_image(base / f"keras_png_slices_{split}" / f"case_{subject:03d}_slice_{z}.nii.png",
                            brain_like(size, seed=subject * 100 + z))
                if with_seg:
                    write_image(base / f"keras_png_slices_seg_{split}" / f"seg_{subject:03d}_slice_{z}.nii.png",
                                np.full(size, 3, np.uint8))
            subject += 1
    return Path(root)


# A VQ-VAE and a prior small enough to train in seconds on a 32 px tree.
TINY = ["--image-size", "32", "--batch-size", "8", "--set", "channels=16", "--set", "res_channels=8",
        "--set", "num_codes=32", "--set", "code_dim=8", "--verbose", "0"]
PRIOR = ["--model", "pixelcnn", "--set", "filters=8", "--set", "layers=2", "--set", "skip_filters=16",
         "--batch-size", "8", "--verbose", "0"]


def command(script, *args):
    """Runs `script.main(args)` as the command line would, in this process (no TensorFlow start per command);
    returns its exit code and what it printed, as `subprocess.run` would."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = script.main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def last_json(stdout):
    """The one-line JSON summary a command prints last."""
    return json.loads(stdout.strip().splitlines()[-1])


def one_error_line(result):
    """The single `error:` line of a command that failed as it should (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def run_cli(*args, env=None, cwd=None, timeout=240):
    """Runs a project script as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


@pytest.fixture
def oasis_tree(tmp_path):
    return make_oasis_tree(tmp_path / "oasis")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """An OASIS-style tree: 4 / 2 / 2 subjects of 8 slices, 32x32."""
    return make_oasis_tree(tmp_path_factory.mktemp("data"), subjects=(4, 2, 2), slices=8, size=(32, 32))


@pytest.fixture(scope="session")
def run_with_prior(tiny_data, tmp_path_factory):
    """A run folder with a one-epoch tiny VQ-VAE and prior, trained once per session. Tests copy it to change it.

    Whole-image MSE: after one epoch its reconstructions are nearly flat, which the memorisation test's
    like-for-like check relies on (the brain loss's one-epoch reconstructions are noise, ordered by chance).
    """
    import train

    run = tmp_path_factory.mktemp("runs") / "run"
    done = command(train, "--data", tiny_data, "--run", run, "--epochs", "1", "--set", "loss=mse", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    done = command(train, *PRIOR, "--run", run, "--epochs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    return run
