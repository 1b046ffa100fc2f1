"""Shared helpers for the tests: tiny image trees written on the fly."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Optional real data (never required): the shared folder beside the checkout.
REAL_DATA = Path(os.environ.get("BRAIN_MRI_REAL_DATA", REPO.parent / "shared" / "data" / "alzheimer-mri-slices"))


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


def run_cli(*args, env=None, cwd=None, timeout=240):
    """Runs a project script as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


@pytest.fixture
def oasis_tree(tmp_path):
    return make_oasis_tree(tmp_path / "oasis")
