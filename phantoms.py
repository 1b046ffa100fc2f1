"""The embedded default data: synthetic skull-stripped brain slices ("phantoms").

    root = phantoms.ensure_phantoms(cache_dir)      # written once, in the OASIS layout
    pixels = phantom_slice(subject=3, slice_index=14)

Each subject is a seeded random head (outline, ventricles, grey and white
matter, a bias field) sliced at 32 axial positions, so the real PNG path of
`dataset.py` is what runs on a machine with no data.
"""

import hashlib
import sys
import json
import os
import shutil
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

PHANTOM_VERSION = 1  # bump when the generator changes: cached sets are keyed by it
SPLITS = ("train", "validate", "test")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}


PHANTOM_SUBJECTS = (40, 4, 4)  # train, validate, test subjects; 32 slices each
PHANTOM_SLICES = 32
PHANTOM_SIZE = 256


def _smooth_noise(rng, size, scale):
    """Smooth random field in about [-1, 1]: upsampled coarse Gaussian noise."""
    coarse = rng.standard_normal((scale, scale)).astype(np.float32)
    field = tf.image.resize(coarse[None, :, :, None], (size, size), method="bicubic")
    return np.clip(field.numpy()[0, :, :, 0] / 1.5, -1.0, 1.0)


def phantom_subject(subject, seed=0):
    """Per-subject anatomy parameters (head shape, folding, ventricle size, contrast)."""
    rng = np.random.default_rng([seed, subject, 0])
    return {
        "ax": rng.uniform(0.60, 0.68), "ay": rng.uniform(0.76, 0.84),
        "cx": rng.uniform(-0.03, 0.03), "cy": rng.uniform(-0.03, 0.03),
        "tilt": rng.uniform(-0.08, 0.08),
        "modes": rng.normal(0.0, 0.015, size=4), "phases": rng.uniform(0, 2 * np.pi, size=4),
        "gyri": rng.integers(20, 28), "gyri_phase": rng.uniform(0, 2 * np.pi),
        "ventricles": rng.uniform(0.7, 1.5), "wm": rng.uniform(0.78, 0.86), "gm": rng.uniform(0.47, 0.55),
        "csf": rng.uniform(0.10, 0.18), "noise_seed": int(rng.integers(2**31)),
    }


def phantom_slice(subject, slice_index, *, n_slices=PHANTOM_SLICES, size=PHANTOM_SIZE, seed=0):
    """One synthetic skull-stripped axial brain slice, as uint8 (size, size).

    Anatomy varies with `slice_index` (0 = inferior, n_slices - 1 = superior):
    the brain outline grows then shrinks, the lateral ventricles appear and
    grow in the middle slices, deep grey nuclei sit beside them, the cortex
    is a folded grey ribbon over white matter with CSF-filled sulci, and the
    hemispheres are split by a fissure. Each subject has its own head shape,
    folding pattern, ventricle size and contrast. Background is exactly 0.

    Args:
        subject: subject id (any int); seeds the anatomy.
        slice_index: axial position, 0 .. n_slices - 1.
        n_slices: slices per subject.
        size: output side in pixels.
        seed: dataset seed.

    Returns:
        A uint8 array (size, size).
    """
    p = phantom_subject(subject, seed)
    rng = np.random.default_rng([seed, subject, slice_index + 1])
    t = slice_index / max(1, n_slices - 1)
    extent = np.sqrt(max(0.0, 1.0 - ((t - 0.45) / 0.62) ** 2))  # outline size along the axis
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")
    c, s = np.cos(p["tilt"]), np.sin(p["tilt"])
    xr, yr = c * (x - p["cx"]) + s * (y - p["cy"]), -s * (x - p["cx"]) + c * (y - p["cy"])
    # Egg-shaped head: the occipital (bottom) end is wider than the frontal.
    u = xr / (p["ax"] * extent * (1.0 + 0.07 * yr))
    v = yr / (p["ay"] * extent)
    rho0, theta = np.hypot(u, v), np.arctan2(v, u)
    boundary = 1.0 + sum(a * np.cos((k + 2) * theta + ph + 2.0 * t)
                         for k, (a, ph) in enumerate(zip(p["modes"], p["phases"])))
    rho = rho0 / boundary
    brain = rho < 1.0
    # Folded cortex: gyri are white-matter fingers into the grey ribbon, of
    # uneven depth and bending with depth; the sulci between them are thin
    # CSF clefts opening to the surface.
    bend = 0.9 * np.sin(3 * theta + p["gyri_phase"] + 3.0 * t) + 2.2 * (1.0 - rho) * np.sin(2 * theta + 5.0 * t)
    gyral = np.sin(p["gyri"] * theta + p["gyri_phase"] + bend + 6.0 * t)
    depth = 0.07 + 0.05 * np.sin(7 * theta + 2.0 * p["gyri_phase"] + 3.0 * t)
    white = rho < 0.79 + depth * gyral
    sulcus = (gyral < -0.88) & (rho > 0.79 - 0.6 * depth)
    # Interhemispheric fissure, front and back.
    fissure = (np.abs(u * p["ax"] * extent) < 0.012) & ((v > 0.40) | (v < -0.55))
    # Lateral ventricles: curved ellipses, largest in the middle slices.
    vsize = p["ventricles"] * np.exp(-(((t - 0.55) / 0.17) ** 2))
    ventricles = np.zeros_like(brain)
    deep_grey = np.zeros_like(brain)
    if vsize > 0.05:
        for side in (-1.0, 1.0):
            du = (u - side * (0.10 + 0.03 * vsize)) / (0.055 * vsize + 1e-6)
            dv = (v - 0.05 + 0.35 * (u - side * 0.1) ** 2) / (0.30 * min(1.0, vsize) + 1e-6)
            ventricles |= du**2 + dv**2 < 1.0
            gu, gv = (u - side * 0.30) / 0.11, (v + 0.02) / 0.20
            deep_grey |= (gu**2 + gv**2 < 1.0) & (t > 0.3) & (t < 0.7)

    image = np.where(white, p["wm"], p["gm"]).astype(np.float32)
    image[deep_grey & white] = 0.5 * (p["wm"] + p["gm"])
    image[sulcus | fissure | ventricles] = p["csf"]
    bias = 1.0 + 0.06 * _smooth_noise(np.random.default_rng(p["noise_seed"]), size, 4)
    texture = 0.03 * _smooth_noise(rng, size, 24)
    image = image * bias + texture * brain
    image = image + rng.normal(0.0, 0.015, image.shape).astype(np.float32)
    # Soft 1-pixel edge, then exact black outside the brain.
    edge = np.clip((1.0 - rho) * size * extent * 0.35, 0.0, 1.0)
    image = np.clip(image * edge, 0.0, 1.0) * brain
    return np.round(image * 255.0).astype(np.uint8)


def ensure_phantoms(cache_dir, *, subjects=PHANTOM_SUBJECTS, n_slices=PHANTOM_SLICES,
                    size=PHANTOM_SIZE, seed=0, verbose=True):
    """Writes the phantom set once, in the OASIS PNG layout, and returns its root.

    The set lives in `cache_dir/phantoms-v<version>-<hash of parameters>/`;
    it is built in a temporary folder and renamed into place, so an
    interrupted build never leaves a half set behind.

    Args:
        cache_dir: parent folder for generated sets.
        subjects: (train, validate, test) subject counts.
        n_slices: slices per subject.
        size: image side in pixels.
        seed: dataset seed.
        verbose: show a progress bar while writing.

    Returns:
        Path of the `keras_png_slices_data` folder.
    """
    from PIL import Image

    params = {"version": PHANTOM_VERSION, "subjects": list(subjects), "slices": n_slices,
              "size": size, "seed": seed}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(cache_dir) / f"phantoms-v{PHANTOM_VERSION}-{digest}"
    root = final / "keras_png_slices_data"
    if (final / "phantoms.json").is_file():
        return root
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    total = sum(subjects) * n_slices
    bar = None
    if verbose:
        import keras

        print(f"Writing {total} synthetic brain phantoms to {final} (once) ...", file=sys.stderr)
        bar = keras.utils.Progbar(total, unit_name="image", interval=0.5)
    subject_id = 1
    for split, count in zip(SPLITS, subjects):
        folder = tmp / "keras_png_slices_data" / OASIS_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            for z in range(n_slices):
                pixels = phantom_slice(subject_id, z, n_slices=n_slices, size=size, seed=seed)
                Image.fromarray(pixels).save(folder / f"case_{subject_id:03d}_slice_{z}.nii.png")
                if bar is not None:
                    bar.add(1)
            subject_id += 1
    (tmp / "phantoms.json").write_text(json.dumps(params, indent=2))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return root
