"""dataset.py as a user runs it: --help, --json, --preview, errors without tracebacks."""

import dataset
from conftest import command, last_json, make_oasis_tree


def test_help_explains_every_flag():
    result = command(dataset, "--help")
    assert result.returncode == 0
    for flag in ("--data", "--image-size", "--fit", "--preview", "--seed", "--skip-bad", "--cache-dir", "--json"):
        assert flag in result.stdout


def test_preview_and_json_on_an_oasis_tree(tmp_path):
    root = make_oasis_tree(tmp_path / "data")
    out = tmp_path / "grid.png"
    result = command(dataset, "--data", root, "--image-size", "64", "--preview", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["source"] == "oasis"
    assert (summary["train"], summary["validate"], summary["test"]) == (12, 4, 4)
    assert summary["preview"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_file_is_one_line_error_or_a_named_warning(tmp_path):
    root = make_oasis_tree(tmp_path / "data", with_seg=False)
    bad = next(root.rglob("keras_png_slices_validate")) / "case_099_slice_0.nii.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    result = command(dataset, "--data", root, "--json")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "--skip-bad" in errors[0]
    result = command(dataset, "--data", root, "--skip-bad", "--json")
    assert result.returncode == 0, result.stderr
    assert str(bad) in result.stderr and last_json(result.stdout)["validate"] == 4
    result = command(dataset, "--data", tmp_path / "missing")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "data folder not found" in result.stderr


def test_fresh_machine_with_no_data_previews_the_phantoms(tmp_path, monkeypatch):
    """The README's promise: no download, no path to edit."""
    out = tmp_path / "phantoms.png"
    monkeypatch.chdir(tmp_path)  # no data/ folder here
    monkeypatch.setenv("BRAIN_VQVAE_CACHE", str(tmp_path / "cache"))
    result = command(dataset, "--preview", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["source"] == "phantoms"
    assert (summary["train"], summary["validate"], summary["test"]) == (1280, 128, 128)
    assert summary["subjects"] == {"train": 40, "validate": 4, "test": 4}
    assert out.is_file()
