"""Optional: real skull-stripped OASIS-derived slices, when the shared folder is present."""

import numpy as np
import pytest

import dataset
from conftest import REAL_DATA

pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data not present at {REAL_DATA}")


def test_real_slices_load_split_and_pad():
    source = dataset.load_source(REAL_DATA, seed=0)
    assert source.kind == "folder"
    assert sum(source.counts().values()) == len(dataset.list_images(REAL_DATA))
    assert len(source.class_names) == 4
    for split in source.splits.values():  # stratified: every class in every split
        assert set(split.labels.tolist()) == {0, 1, 2, 3}
    batch = next(iter(dataset.make_dataset(source.splits["test"], image_size=256, batch_size=8))).numpy()
    assert batch.shape == (8, 256, 256, 1)
    # 176x208 slices sit in the centre of the 256 canvas, unscaled: the margins are black.
    assert batch[:, :, :24].max() == 0.0 and batch[:, :, -24:].max() == 0.0
    assert batch[:, 100:156, 100:156].mean() > 0.2
    again = dataset.load_source(REAL_DATA, seed=0)
    assert again.splits["validate"].paths == source.splits["validate"].paths
    assert np.isin(source.splits["test"].paths, source.splits["train"].paths).sum() == 0
