"""Memory of the pipeline must not grow with the number of files (the seed report's loader did)."""

import pytest

from benchmarks import memory_worker


def test_streaming_memory_is_flat_in_the_number_of_files(tmp_path):
    small = memory_worker.write_png_set(tmp_path / "small", 100)
    large = memory_worker.write_png_set(tmp_path / "large", 1000)
    ours_small = memory_worker.measure("ours", small)
    ours_large = memory_worker.measure("ours", large)
    assert ours_small["images"] == 100 and ours_large["images"] == 1000
    assert ours_large["peak_rss_mb"] <= 1.2 * ours_small["peak_rss_mb"]
    # The same measurement catches a loader that holds the data: the seed
    # report's approach grows by the 900 x 256 KB (230 MB) more it keeps.
    seed_small = memory_worker.measure("seed", small)
    seed_large = memory_worker.measure("seed", large)
    assert seed_large["images"] == 1000
    assert seed_large["peak_rss_mb"] - seed_small["peak_rss_mb"] > 150


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_streaming_memory_is_flat_in_the_number_of_volumes(tmp_path, suffix):
    # 40 volumes: more than a process keeps open (volumes.OPEN_VOLUMES), so its steady state is measured
    # (test_volumes checks the bound itself). 128x128x128 voxels, 8.4 MB a volume as float32 (the
    # benchmark's are 192x192x128).
    shape = (128, 128, 128)
    few = memory_worker.write_volume_set(tmp_path / "few", 3, shape=shape, suffix=suffix)
    many = memory_worker.write_volume_set(tmp_path / "many", 40, shape=shape, suffix=suffix)
    ours_few = memory_worker.measure("volumes", few)
    ours_many = memory_worker.measure("volumes", many)
    assert ours_few["images"] == 3 * 32 and ours_many["images"] == 40 * 32
    assert ours_many["peak_rss_mb"] <= 1.2 * ours_few["peak_rss_mb"]
    if suffix == ".nii":  # the positive control: holding the volumes grows by the 37 x 8.4 MB (310 MB) they take
        held_few = memory_worker.measure("volumes_held", few)
        held_many = memory_worker.measure("volumes_held", many)
        assert held_many["peak_rss_mb"] - held_few["peak_rss_mb"] > 200
