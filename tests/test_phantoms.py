"""The embedded default: synthetic brain phantoms."""

import json

import numpy as np
from scipy import ndimage

import dataset
import phantoms


def test_phantoms_are_deterministic_and_subjects_differ():
    a = phantoms.phantom_slice(3, 15, size=96)
    assert a.dtype == np.uint8 and a.shape == (96, 96)
    np.testing.assert_array_equal(a, phantoms.phantom_slice(3, 15, size=96))
    assert np.abs(a.astype(int) - phantoms.phantom_slice(4, 15, size=96)).mean() > 5
    assert np.abs(a.astype(int) - phantoms.phantom_slice(3, 15, size=96, seed=1)).mean() > 5


def test_phantoms_look_like_skull_stripped_brains():
    for z in (4, 16, 28):
        image = phantoms.phantom_slice(1, z) / 255.0
        border = np.concatenate([image[:8].ravel(), image[-8:].ravel(), image[:, :8].ravel(), image[:, -8:].ravel()])
        assert border.max() == 0.0  # black background, no skull
        foreground = image > 0
        assert 0.1 < foreground.mean() < 0.7
        inside = image[foreground]
        # Three tissue classes: CSF (dark), grey matter, white matter (bright).
        assert np.mean(inside > 0.7) > 0.3  # white matter dominates the inside
        assert np.mean((inside > 0.35) & (inside < 0.62)) > 0.1  # grey matter ribbon
        assert np.mean(inside < 0.3) > 0.002  # CSF in sulci and ventricles


def test_phantom_anatomy_changes_with_slice_position():
    area = [np.mean(phantoms.phantom_slice(2, z, size=128) > 0) for z in range(32)]
    peak = int(np.argmax(area))
    assert 8 <= peak <= 22 and area[peak] > 1.4 * area[0] and area[peak] > 1.4 * area[31]

    def ventricle_pixels(z):  # dark pixels deep inside the brain, away from the cortex
        image = phantoms.phantom_slice(2, z, size=128) / 255.0
        depth = ndimage.distance_transform_edt(image > 0)
        return int(np.sum((depth > 0.45 * depth.max()) & (image < 0.3)))

    middle = ventricle_pixels(17)
    assert middle > 4 * ventricle_pixels(2) and middle > 4 * ventricle_pixels(30)


def test_phantom_set_is_written_once_in_the_oasis_layout(tmp_path):
    root = phantoms.ensure_phantoms(tmp_path, subjects=(2, 1, 1), n_slices=3, size=32, verbose=False)
    source = dataset.load_source(root)
    assert source.kind == "oasis"
    assert source.counts() == {"train": 6, "validate": 3, "test": 3}
    assert source.summary()["subjects"] == {"train": 2, "validate": 1, "test": 1}
    first = root / "keras_png_slices_train" / "case_001_slice_0.nii.png"
    stamp = first.stat().st_mtime_ns
    assert phantoms.ensure_phantoms(tmp_path, subjects=(2, 1, 1), n_slices=3, size=32, verbose=False) == root
    assert first.stat().st_mtime_ns == stamp  # reused, not rewritten
    params = json.loads((root.parent / "phantoms.json").read_text())
    assert params["subjects"] == [2, 1, 1]
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written left behind


def test_no_data_falls_back_to_phantoms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/keras_png_slices_data here
    source = dataset.load_source(cache_dir=tmp_path / "cache", phantom_subjects=(2, 1, 1))
    assert source.kind == "phantoms"
    assert source.counts() == {"train": 64, "validate": 32, "test": 32}
    assert "synthetic" in source.notes[0]
