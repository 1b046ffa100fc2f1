"""The data pipeline: layout detection, splits, decoding, fitting, shuffling, bad input."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import dataset
from conftest import brain_like, make_oasis_tree, png_bytes, write_image


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test keeps its list of decoded files in its own folder, never in the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("BRAIN_VQVAE_CACHE", str(cache))
    return cache


def batches(ds):
    return [b.numpy() if not isinstance(b, dict) else {k: v.numpy() for k, v in b.items()} for b in ds]


# --- layout and splits -----------------------------------------------------


def test_parse_name():
    assert dataset.parse_name("case_441_slice_7.nii.png") == (441, 7)
    assert dataset.parse_name("/x/y/CASE_002_SLICE_31.nii.png") == (2, 31)
    assert dataset.parse_name("nonDem12.jpg") == (-1, -1)


def test_nested_oasis_layout_is_found_and_masks_ignored(oasis_tree):
    source = dataset.load_source(oasis_tree)
    assert source.kind == "oasis"
    assert source.counts() == {"train": 12, "validate": 4, "test": 4}
    assert all("_seg_" not in p for s in source.splits.values() for p in s.paths)
    assert source.root == oasis_tree
    assert source.summary()["subjects"] == {"train": 3, "validate": 1, "test": 1}
    train = source.splits["train"]
    assert sorted(set(train.slices.tolist())) == [0, 1, 2, 3]
    assert sorted(set(train.subjects.tolist())) == [1, 2, 3]


def test_incomplete_oasis_layout_names_what_is_missing(tmp_path):
    write_image(tmp_path / "keras_png_slices_train" / "case_001_slice_0.nii.png", brain_like())
    with pytest.raises(dataset.DataError, match="keras_png_slices_validate"):
        dataset.load_source(tmp_path)


def test_folder_split_by_subject_never_leaks(tmp_path):
    for subject in range(1, 21):
        for z in range(5):
            write_image(tmp_path / f"case_{subject}_slice_{z}.nii.png", brain_like(seed=subject))
    source = dataset.load_source(tmp_path, seed=3)
    assert source.kind == "folder"
    subjects = {name: set(s.subjects.tolist()) for name, s in source.splits.items()}
    assert not subjects["train"] & subjects["validate"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["validate"] & subjects["test"]
    assert sum(source.counts().values()) == 100
    assert source.counts() == {"train": 80, "validate": 10, "test": 10}
    # Deterministic with the seed, different with another seed.
    again = dataset.load_source(tmp_path, seed=3)
    assert again.splits["test"].paths == source.splits["test"].paths
    other = dataset.load_source(tmp_path, seed=4)
    assert other.splits["test"].paths != source.splits["test"].paths


def test_folder_with_classes_spaces_jpeg_and_rgb(tmp_path):
    for cls, n in (("NonDemented", 30), ("MildDemented", 10)):
        for i in range(n):
            image = brain_like((24, 30), seed=i)
            if i % 2:
                write_image(tmp_path / cls / f"{i} ({i}).jpg", image, fmt="JPEG")
            else:
                write_image(tmp_path / cls / f"scan {i}.png", np.stack([image] * 3, -1))
    notes = []
    source = dataset.load_source(tmp_path, warn=notes.append)
    assert source.class_names == ["MildDemented", "NonDemented"]
    for split in source.splits.values():  # stratified: every class in every split
        assert set(split.labels.tolist()) == {0, 1}
    assert any("converted to grayscale" in note for note in source.notes)
    images = batches(dataset.make_dataset(source.splits["train"], image_size=32, batch_size=64))[0]
    assert images.shape == (32, 32, 32, 1)


def test_predefined_train_test_folders_are_respected(tmp_path):
    for split, n in (("train", 20), ("test", 6)):
        for i in range(n):
            write_image(tmp_path / split / "A" / f"{split}{i}.png", brain_like(seed=i))
            write_image(tmp_path / split / "B" / f"{split}{i}.png", brain_like(seed=i + 50))
    source = dataset.load_source(tmp_path)
    assert source.counts()["test"] == 12
    assert source.counts()["train"] + source.counts()["validate"] == 40
    assert source.counts()["validate"] > 0
    assert all("/test/" in p for p in source.splits["test"].paths)


# --- decoding and fitting --------------------------------------------------


def test_pipeline_shapes_dtypes_ranges_and_meta(oasis_tree):
    source = dataset.load_source(oasis_tree)
    ds = dataset.make_dataset(source.splits["train"], image_size=48, batch_size=5, with_meta=True)
    out = batches(ds)
    assert [len(b["image"]) for b in out] == [5, 5, 2]
    first = out[0]
    assert first["image"].dtype == np.float32 and first["image"].shape == (5, 48, 48, 1)
    assert first["image"].min() >= 0.0 and first["image"].max() <= 1.0 and first["image"].max() > 0.5
    assert first["subject"].dtype == np.int32 and first["subject"].tolist() == [1, 1, 1, 1, 2]
    assert first["slice"].tolist() == [0, 1, 2, 3, 0]
    assert first["label"].tolist() == [-1] * 5


def test_unknown_names_yield_minus_one(tmp_path):
    for i in range(10):
        write_image(tmp_path / f"img{i}.png", brain_like(seed=i))
    source = dataset.load_source(tmp_path)
    meta = batches(dataset.make_dataset(source.splits["train"], image_size=32, batch_size=8, with_meta=True))[0]
    assert set(meta["subject"].tolist()) == {-1} and set(meta["slice"].tolist()) == {-1}


def test_decode_is_exact_for_8_bit_16_bit_and_jpeg():
    a8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = dataset.decode_image(tf.constant(png_bytes(a8))).numpy()[..., 0]
    np.testing.assert_allclose(got, a8 / 255.0, atol=1e-6)
    a16 = (np.arange(256, dtype=np.uint16) * 257 + 3).reshape(16, 16)
    got = dataset.decode_image(tf.constant(png_bytes(a16))).numpy()[..., 0]
    np.testing.assert_allclose(got, a16 / 65535.0, atol=1e-6)  # full 16-bit precision kept
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(buf, format="JPEG")
    assert dataset.decode_image(tf.constant(buf.getvalue())).numpy().max() == pytest.approx(1.0)


def test_sixteen_bit_files_are_noted(tmp_path):
    for i in range(10):
        write_image(tmp_path / f"img{i}.png", (brain_like(seed=i).astype(np.uint16) * 257))
    source = dataset.load_source(tmp_path)
    assert any("16-bit" in note for note in source.notes)


def test_fit_pad_centres_small_images_and_shrinks_large_ones_keeping_aspect():
    small = tf.ones((10, 20, 1))
    out = dataset.fit_image(small, 32, "pad").numpy()[..., 0]
    assert out.shape == (32, 32)
    rows, cols = np.nonzero(out > 0.5)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (11, 20, 6, 25)  # centred, not scaled
    large = tf.ones((100, 200, 1))
    out = dataset.fit_image(large, 32, "pad").numpy()[..., 0]
    rows, cols = np.nonzero(out > 0.5)
    assert cols.max() - cols.min() + 1 == 32 and rows.max() - rows.min() + 1 == 16  # aspect kept
    assert dataset.fit_image(large, 32, "stretch").numpy().min() > 0.99  # fills the square
    assert dataset.fit_image(small, 32, "crop").numpy().min() > 0.99  # fills, cropping the sides
    with pytest.raises(ValueError, match="Received: fit='zoom'"):
        dataset.fit_image(small, 32, "zoom")


def test_mixed_sizes_are_fitted_and_noted(tmp_path):
    for i in range(10):
        write_image(tmp_path / f"img{i}.png", brain_like((20 + 4 * i, 40), seed=i))
    source = dataset.load_source(tmp_path)
    assert any("different image sizes" in note for note in source.notes)
    images = batches(dataset.make_dataset(source.splits["train"], image_size=32, batch_size=4))
    assert {b.shape[1:] for b in images} == {(32, 32, 1)}


# --- order, determinism, sharding ------------------------------------------


def _order(split, **kwargs):
    ds = dataset.make_dataset(split, image_size=16, batch_size=4, with_meta=True, **kwargs)
    return [int(s) * 100 + int(z) for b in ds for s, z in zip(b["subject"].numpy(), b["slice"].numpy())]


def test_seeded_per_epoch_shuffle_is_deterministic_and_resumable(oasis_tree):
    split = dataset.load_source(oasis_tree).splits["train"]
    plain = _order(split)
    epoch0 = _order(split, shuffle=True, seed=7)
    assert sorted(epoch0) == sorted(plain) and epoch0 != plain  # a permutation of every file
    assert _order(split, shuffle=True, seed=7) == epoch0  # same seed, same order
    assert _order(split, shuffle=True, seed=8) != epoch0
    epoch1 = _order(split, shuffle=True, seed=7, first_epoch=1)
    assert sorted(epoch1) == sorted(plain) and epoch1 != epoch0  # reshuffled each epoch
    # A repeating pipeline yields epoch 0 then epoch 1: resuming at epoch 1 matches.
    ds = dataset.make_dataset(split, image_size=16, batch_size=4, shuffle=True, seed=7, repeat=True, with_meta=True)
    stream = [int(s) * 100 + int(z) for b in ds.take(6) for s, z in zip(b["subject"].numpy(), b["slice"].numpy())]
    assert stream == epoch0 + epoch1


def test_random_crops_are_grid_aligned_windows_that_a_resumed_run_sees_again(oasis_tree):
    split = dataset.load_source(oasis_tree).splits["train"]
    n = len(split)

    def epochs(crop=None, **kwargs):
        ds = dataset.make_dataset(split, image_size=32, batch_size=n, shuffle=True, seed=3, repeat=True, crop=crop,
                                  crop_step=4, **kwargs)
        return [b.numpy() for b in ds.take(2)]

    whole, crops = epochs(), epochs(16)
    assert crops[0].shape == (n, 16, 16, 1)
    offsets = []
    for full, cut in zip(np.concatenate(whole), np.concatenate(crops)):
        found = [(t, left) for t in range(17) for left in range(17)
                 if np.array_equal(full[t:t + 16, left:left + 16], cut)]
        assert found, "a crop is not a window of its image"
        offsets.append(found)
    assert all(any(t % 4 == 0 and left % 4 == 0 for t, left in found) for found in offsets)
    assert len({found[0] for found in offsets}) > 3  # crops move over the image, not one fixed window
    same_order = dataset.make_dataset(split, image_size=32, batch_size=n, repeat=True, crop=16, crop_step=4)
    first, second = [b.numpy() for b in same_order.take(2)]
    assert not np.array_equal(first, second)  # an image's crop changes from epoch to epoch
    again = epochs(16)
    assert all(np.array_equal(a, b) for a, b in zip(again, crops))  # same seed, same crops
    resumed = epochs(16, first_epoch=1)[0]
    np.testing.assert_array_equal(resumed, crops[1])  # resuming at epoch 1 sees epoch 1's crops
    for bad in (20, 40, 0):
        with pytest.raises(ValueError, match=f"Received: crop={bad}"):
            dataset.make_dataset(split, image_size=32, batch_size=4, crop=bad, crop_step=8)


def test_input_context_shards_files_across_pipelines(oasis_tree):
    split = dataset.load_source(oasis_tree).splits["train"]
    shards = []
    for i in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i, num_replicas_in_sync=2)
        shards.append(_order(split, shuffle=True, seed=1, input_context=context))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(_order(split))


# --- bad input ---------------------------------------------------------------


def _tree_with(tmp_path, name, content):
    make_oasis_tree(tmp_path, subjects=(2, 1, 1), slices=2, nested=False, with_seg=False)
    bad = tmp_path / "keras_png_slices_data" / "keras_png_slices_train" / name
    bad.write_bytes(content)
    return tmp_path, bad


GOOD_PNG = png_bytes(brain_like())


@pytest.mark.parametrize("name,content,message", [
    ("case_009_slice_0.nii.png", b"", "empty file"),
    ("case_009_slice_0.nii.png", b"<html>not found</html>", "not an image"),
    ("case_009_slice_0.nii.png", GOOD_PNG[: len(GOOD_PNG) // 2], "truncated PNG"),
    ("case_009_slice_0.nii.png", GOOD_PNG[:20], "truncated PNG"),
    ("case_009_slice_0.nii.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 200, "JPEG"),
])
def test_bad_files_are_named_in_one_line(tmp_path, name, content, message):
    root, bad = _tree_with(tmp_path, name, content)
    with pytest.raises(dataset.DataError) as info:
        dataset.load_source(root)
    text = str(info.value)
    assert message in text and str(bad) in text and "\n" not in text
    warnings = []
    source = dataset.load_source(root, on_bad="skip", warn=warnings.append)
    assert source.counts()["train"] == 4
    assert len(warnings) == 1 and str(bad) in warnings[0]


def test_truncated_jpeg_is_caught(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(brain_like((64, 64))).save(buf, format="JPEG")
    root, bad = _tree_with(tmp_path, "case_009_slice_0.nii.jpg", buf.getvalue()[:-300])
    with pytest.raises(dataset.DataError, match="truncated JPEG"):
        dataset.load_source(root)


def test_missing_folder_empty_split_and_file_as_data(tmp_path):
    with pytest.raises(dataset.DataError, match="data folder not found.*--data"):
        dataset.load_source(tmp_path / "nope")
    (tmp_path / "file.png").write_bytes(GOOD_PNG)
    with pytest.raises(dataset.DataError, match="must be a folder"):
        dataset.load_source(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(dataset.DataError, match="no images found"):
        dataset.load_source(empty)
    root = make_oasis_tree(tmp_path / "o", nested=False, with_seg=False)
    for f in (root / "keras_png_slices_data" / "keras_png_slices_test").iterdir():
        f.unlink()
    with pytest.raises(dataset.DataError, match="empty split.*keras_png_slices_test"):
        dataset.load_source(root)


def test_macos_debris_and_non_image_extensions_are_ignored(oasis_tree):
    train = next(oasis_tree.rglob("keras_png_slices_train"))
    (train / "._case_001_slice_0.nii.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (train / "notes.txt").write_text("hello")
    (oasis_tree / "__MACOSX").mkdir()
    (oasis_tree / "__MACOSX" / "x.png").write_bytes(b"junk")
    assert dataset.load_source(oasis_tree).counts()["train"] == 12


# --- damaged pixel data: found by one cached decode ---------------------------


def damage_idat(data, n=200, start=10):
    """PNG bytes with `n` bytes of the first IDAT flipped and its CRC recomputed: only the zlib data is bad."""
    data, offset = bytearray(data), 8
    while True:
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        if kind == b"IDAT":
            body = offset + 8
            for i in range(body + start, min(body + start + n, body + length)):
                data[i] ^= 0xFF
            data[body + length:body + length + 4] = struct.pack(">I", zlib.crc32(data[offset + 4:body + length]))
            return bytes(data)
        offset += 12 + length


def damage_scan(data, n, start):
    """JPEG bytes with `n` bytes of the entropy-coded scan data (after the SOS header) flipped."""
    data = bytearray(data)
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    for i in range(scan + start, min(scan + start + n, len(data) - 2)):
        data[i] ^= 0xFF
    return bytes(data)


def count_decodes(monkeypatch):
    """Counts calls of `dataset.decode_image` (the decode the check and the pipeline share)."""
    calls, decode = [], dataset.decode_image
    monkeypatch.setattr(dataset, "decode_image", lambda contents: calls.append(1) or decode(contents))
    return calls


def test_damaged_png_data_is_named_before_training(tmp_path):
    root, bad = _tree_with(tmp_path, "case_009_slice_0.nii.png", damage_idat(GOOD_PNG))
    dataset.inspect_image(bad)  # its structure is intact: only a decode finds the damage
    with pytest.raises(tf.errors.InvalidArgumentError):  # what training would hit mid-epoch
        batches(dataset.make_dataset(dataset.make_split([str(bad)]), image_size=32, batch_size=1))
    with pytest.raises(dataset.DataError) as info:
        dataset.load_source(root)
    text = str(info.value)
    assert text.startswith(f"corrupt image: {bad} cannot be decoded") and "\n" not in text
    assert "Re-export it or delete it" in text and "--skip-bad" in text
    for _ in range(2):  # a bad file is never remembered as decoded: every run warns
        warnings = []
        source = dataset.load_source(root, on_bad="skip", warn=warnings.append)
        assert source.counts()["train"] == 4 and str(bad) not in source.splits["train"].paths
        assert len(warnings) == 1 and warnings[0].startswith(f"skipped corrupt image: {bad}")
        assert len(batches(dataset.make_dataset(source.splits["train"], image_size=32, batch_size=3))) == 2


def test_damaged_jpeg_is_rejected_exactly_when_the_pipeline_would_fail(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(brain_like((64, 64))).save(buf, format="JPEG")
    fatal = 0
    for n, start in ((200, 50), (1, 30)):  # TF decodes some damage with a warning only
        damaged = damage_scan(buf.getvalue(), n, start)
        root, bad = _tree_with(tmp_path / f"{n}-{start}", "case_009_slice_0.nii.jpg", damaged)
        dataset.inspect_image(bad)
        try:
            batches(dataset.make_dataset(dataset.make_split([str(bad)]), image_size=32, batch_size=1))
            pipeline_fails = False
        except tf.errors.InvalidArgumentError:
            pipeline_fails = True
        warnings = []
        source = dataset.load_source(root, on_bad="skip", warn=warnings.append)
        assert (str(bad) not in source.splits["train"].paths) == pipeline_fails
        assert len(warnings) == int(pipeline_fails)
        fatal += pipeline_fails
    assert fatal == 1


def test_decode_check_runs_once_per_file_and_again_when_it_changes(tmp_path, monkeypatch, private_cache):
    root = make_oasis_tree(tmp_path, subjects=(2, 1, 1), slices=2, nested=False, with_seg=False)
    calls = count_decodes(monkeypatch)
    dataset.load_source(root)
    assert len(calls) == 8
    remembered = [json.loads(f.read_text())["files"] for f in (private_cache / "decoded").glob("*.json")]
    assert sorted(map(len, remembered)) == [2, 2, 4]  # one list per split folder, naming its files
    assert {p for files in remembered for p in files} == {str(p) for p in root.rglob("*.png")}
    calls.clear()
    dataset.load_source(root)
    assert calls == []  # nothing decoded again
    changed = root / "keras_png_slices_data" / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    write_image(changed, brain_like((40, 40)))
    write_image(changed.with_name("case_005_slice_0.nii.png"), brain_like())
    dataset.load_source(root)
    assert len(calls) == 2  # the changed file and the new one


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                     b'{"version": 1, "files": {"a": 5}}'])
def test_corrupt_decoded_list_is_rebuilt(tmp_path, monkeypatch, private_cache, content):
    root = make_oasis_tree(tmp_path, subjects=(2, 1, 1), slices=2, nested=False, with_seg=False)
    dataset.load_source(root)
    list_files = sorted((private_cache / "decoded").glob("*.json"))
    assert list_files
    for list_file in list_files:
        list_file.write_bytes(content)
    calls = count_decodes(monkeypatch)
    assert dataset.load_source(root).counts() == {"train": 4, "validate": 2, "test": 2}
    assert len(calls) == 8  # everything checked again
    assert sum(len(json.loads(f.read_text())["files"]) for f in list_files) == 8
    calls.clear()
    dataset.load_source(root)
    assert calls == []


def test_save_figure_writes_the_png_atomically_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "figures" / "curve.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert dataset.save_figure(fig, path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number) and [p.name for p in path.parent.iterdir()] == ["curve.png"]
    fig, _ = plt.subplots()
    with pytest.raises(OSError):  # a folder where the file should go: nothing half-written is left
        dataset.save_figure(fig, tmp_path)
    assert not plt.fignum_exists(fig.number) and not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp*"))
