"""Memory of the pipeline must not grow with the number of files (the seed report's loader did)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_data  # noqa: E402


def test_streaming_memory_is_flat_in_the_number_of_files(tmp_path):
    small = bench_data.write_png_set(tmp_path / "small", 200)
    large = bench_data.write_png_set(tmp_path / "large", 2000)
    ours_small = bench_data.run_worker("ours", small)
    ours_large = bench_data.run_worker("ours", large)
    assert ours_large["images"] == 2000
    assert ours_large["peak_rss_mb"] <= 1.2 * ours_small["peak_rss_mb"]
    # The same measurement catches a loader that holds the data: the seed
    # report's approach grows by the 2000 x 256 KB it keeps.
    seed_small = bench_data.run_worker("seed", small)
    seed_large = bench_data.run_worker("seed", large)
    assert seed_large["peak_rss_mb"] - seed_small["peak_rss_mb"] > 300
