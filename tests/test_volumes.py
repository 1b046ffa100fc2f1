"""Volumes as a data source: axis from the affine, one way up, per-volume scaling, split by subject, bad files."""

import math

import nibabel as nib
import numpy as np
import pytest

import dataset
import phantoms
import volumes
from conftest import PRIOR, TINY, command, last_json

import predict
import train


def display_to_ras(shown):
    """The RAS+ array (x, y, z) whose axial slices, shown radiologically, are `shown` (z, rows, cols).

    Shown: row 0 is the most anterior, column 0 the patient's right; so y runs
    up the rows and x runs right-to-left along the columns.
    """
    return np.transpose(np.asarray(shown)[:, ::-1, ::-1], (2, 1, 0))


def phantom_volume(subject, n_slices=12, size=32, seed=0):
    """A 3D phantom (RAS+ array), stacked from the 2D phantom generator's axial slices, with its display."""
    shown = np.stack([phantoms.phantom_slice(subject, k, n_slices=n_slices, size=size, seed=seed)
                      for k in range(n_slices)]).astype(np.float32)
    return display_to_ras(shown), shown


def rotation_z(degrees):
    t = math.radians(degrees)
    r = np.eye(4)
    r[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    return r


def save(data, path, affine=None, kind=nib.Nifti1Image):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.2, 1.0]) if affine is None else affine
    nib.save(kind(np.asarray(data), affine), str(path))
    return path


def reoriented(data, affine, codes, extra=np.eye(4)):
    """The same image stored in another axis order and direction (`codes`, e.g. "PIR"), with a rotated affine."""
    img = nib.Nifti1Image(data, affine)
    start = nib.io_orientation(affine)
    turned = img.as_reoriented(nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(codes))))
    assert "".join(nib.aff2axcodes(turned.affine)) == codes
    return np.asarray(turned.dataobj), extra @ turned.affine


def scaled(values, volume):
    inside = volume[volume != 0]
    lo, hi = np.percentile(inside, volumes.PERCENTILES)
    return np.clip((values - lo) / (hi - lo), 0, 1)


@pytest.mark.parametrize("codes", ["PIR", "LAS", "SLP"])
def test_axial_slices_come_from_the_affine_whatever_the_array_order(tmp_path, codes):
    data, shown = phantom_volume(1)
    canonical = save(data, tmp_path / "ras.nii")
    stored, affine = reoriented(data, np.diag([1.0, 1.0, 1.2, 1.0]), codes, extra=rotation_z(12))
    other = save(stored, tmp_path / f"{codes}.nii.gz", affine)
    assert stored.shape != data.shape or codes == "LAS"
    for k in (0, 5, 11):
        want = scaled(shown[k], data)
        got = volumes.read_slice(volumes.reference(str(canonical), "axial", k))[..., 0]
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(volumes.read_slice(volumes.reference(str(other), "axial", k)), got[..., None])
    assert volumes.slice_shape(volumes.reference(str(other), "axial", 3)) == (32, 32)


@pytest.mark.parametrize("axis, voxel, corner", [
    ("axial", (9, 7, 2), "anterior at the top, the patient's right on the left"),
    ("coronal", (9, 3, 4), "superior at the top, the patient's right on the left"),
    ("sagittal", (5, 7, 4), "superior at the top, anterior on the left"),
])
def test_every_axis_is_shown_the_same_way_up(tmp_path, axis, voxel, corner):
    # A RAS+ box (x 10 right-left, y 8 posterior-anterior, z 5 inferior-superior) of 1s with one bright voxel at
    # the right, anterior and superior corner of the slice through it: shown, it must sit at the top-left.
    data = np.ones((10, 8, 5), np.float32)
    data[voxel] = 50.0
    path = save(data, tmp_path / "box.nii", np.eye(4))
    stored, affine = reoriented(data, np.eye(4), "ILP")
    turned = save(stored, tmp_path / "box_ilp.nii", affine)
    k = voxel[volumes.ACROSS[axis]]
    for volume in (path, turned):
        image = volumes.read_slice(volumes.reference(str(volume), axis, k))[..., 0]
        assert np.unravel_index(image.argmax(), image.shape) == (0, 0), (axis, corner, volume.name)
    shape = {"axial": (8, 10), "coronal": (5, 10), "sagittal": (5, 8)}[axis]
    assert image.shape == shape and volumes.slice_shape(volumes.reference(str(turned), axis, k)) == shape


def test_intensity_is_scaled_per_volume_with_outliers_clipped_and_nans_as_background(tmp_path):
    rng = np.random.default_rng(0)
    data = np.zeros((16, 16, 6), np.float32)
    data[4:12, 4:12, 1:5] = rng.uniform(50, 150, (8, 8, 4))
    data[4:12, 4:12, 3] += 200.0  # a brighter slice stays brighter: no per-slice scaling
    data[5, 5, 2] = 1e6  # one hot voxel: clipped, not the scale
    data[0, 0, 2] = np.nan
    path = save(data, tmp_path / "v.nii")
    info = volumes.info_of(str(path))
    assert 50 < info.lo < 52 and 340 < info.hi < 350 and (info.first, info.last) == (1, 4)
    dim, bright = (volumes.read_slice(volumes.reference(str(path), "axial", k))[..., 0] for k in (2, 3))
    # Shown radiologically, array (x, y) = (5, 5) is row 16 - 1 - 5, column 16 - 1 - 5.
    assert dim[10, 10] == 1.0 and 0.1 < np.median(dim[5:11, 5:11]) < 0.25 and 0.75 < np.median(bright[5:11, 5:11])
    assert np.isfinite(dim).all() and dim[15, 15] == 0.0  # NaN read as background


def test_integer_volumes_with_scaling_and_4d_volumes_read_without_overflow(tmp_path):
    data = np.zeros((8, 8, 4, 2), np.int16)
    data[2:6, 2:6, :, 0] = 30000
    data[2:6, 2:6, 1, 0] = 32000
    data[..., 1] = -5  # the second volume is never used
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(4.0, 0.0)  # stored values up to 128,000: beyond int16
    nib.save(img, str(tmp_path / "v4d.nii"))
    info = volumes.info_of(str(tmp_path / "v4d.nii"))
    assert info.lo == pytest.approx(120000) and info.hi == pytest.approx(128000)
    image = volumes.read_slice(volumes.reference(str(tmp_path / "v4d.nii"), "axial", 1))
    assert image.shape == (8, 8, 1) and image.max() == 1.0 and image.min() == 0.0


def test_kept_slices_and_their_levels(tmp_path):
    data = np.zeros((8, 8, 80), np.float32)
    data[2:6, 2:6, 8:72] = 1.0 + np.arange(64)[None, None, :] / 64  # 64 non-empty slices, 8 empty at each end
    info = volumes.info_of(str(save(data, tmp_path / "v.nii", np.eye(4))))
    kept = info.kept()
    assert kept == list(range(8, 72))
    assert [volumes.level(k, kept) for k in kept] == [i // 2 for i in range(64)]
    assert info.kept("0.5") == list(range(24, 56)) and info.kept("10:20") == list(range(10, 20))
    assert info.kept("70:") == list(range(70, 80))
    for bad in ("20:10", "0", "1.5", "a:b"):
        with pytest.raises(volumes.VolumeError, match="--slices"):
            volumes.parse_keep(bad)


def bids_folder(root, subjects=8, n_slices=6):
    """sub-XX/anat/sub-XX_T1w.nii.gz volumes; sub-01 also has a T2w volume (one subject, two volumes)."""
    for s in range(1, subjects + 1):
        data, _ = phantom_volume(s, n_slices=n_slices)
        save(data, root / f"sub-{s:02d}" / "anat" / f"sub-{s:02d}_T1w.nii.gz")
    save(phantom_volume(1, n_slices=n_slices)[0] * 0.5, root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    return root


def test_a_folder_of_volumes_splits_by_subject_and_streams_its_slices(tmp_path):
    root = bids_folder(tmp_path / "bids")
    source = dataset.load_source(str(root), seed=3, cache_dir=tmp_path / "cache")
    assert source.kind == "volumes" and source.split_by() == "subject"
    owners, numbers = {}, {}
    for name, split in source.splits.items():
        assert len(split) > 0
        for path, number in zip(split.paths, split.subjects):
            subject = volumes.subject_of(volumes.parse_reference(path)[0], root)
            owners.setdefault(subject, set()).add(name)
            numbers.setdefault(subject, set()).add(int(number))
    assert all(len(splits) == 1 for splits in owners.values()) and len(owners) == 8
    assert sorted(min(n) for n in numbers.values()) == list(range(8)) and all(len(n) == 1 for n in numbers.values())
    t2 = [p for s in source.splits.values() for p in s.paths if "T2w" in p]
    t1 = [p for s in source.splits.values() for p in s.paths if "sub-01_T1w" in p]
    assert len(t2) == len(t1) > 0
    again = dataset.load_source(str(root), seed=3, cache_dir=tmp_path / "cache")
    assert {k: s.paths for k, s in again.splits.items()} == {k: s.paths for k, s in source.splits.items()}
    other = dataset.load_source(str(root), seed=4, cache_dir=tmp_path / "cache")
    assert {k: s.paths for k, s in other.splits.items()} != {k: s.paths for k, s in source.splits.items()}
    batch = next(iter(dataset.make_dataset(source.splits["train"], image_size=16, batch_size=5, with_meta=True)))
    assert batch["image"].shape == (5, 16, 16, 1)
    assert float(batch["image"].numpy().max()) <= 1.0 and (batch["slice"].numpy() >= 0).all()
    first = source.splits["train"].paths[0]
    assert dataset.item_name(first) == f"{volumes.stem(volumes.parse_reference(first)[0])}_axial000"
    np.testing.assert_array_equal(dataset.load_image(first), volumes.read_slice(first))


def test_the_same_slice_level_means_the_same_height_in_every_subject(tmp_path):
    for s, n in ((1, 40), (2, 64)):  # two heads of different heights
        data = np.zeros((8, 8, n + 10), np.float32)
        data[2:6, 2:6, 5:5 + n] = 1.0
        save(data, tmp_path / "vols" / f"s{s}.nii", np.eye(4))
    split = dataset.volume_split(volumes.list_volumes(tmp_path / "vols"), root=tmp_path / "vols",
                                 cache_dir=tmp_path / "cache")
    for s in (0, 1):
        levels = split.slices[split.subjects == s]
        assert levels[0] == 0 and levels[-1] == volumes.LEVELS - 1 and (np.diff(levels) >= 0).all()
        # Halfway up each head is level 16, a quarter of the way level 8, whatever its height.
        assert levels[len(levels) // 2] == 16 and levels[len(levels) // 4] == 8


@pytest.mark.parametrize("damage, expect", [
    ("truncated_gz", "truncated"),
    ("short_data", "truncated or its header does not match"),
    ("flat", "not a 3D volume"),
    ("img_without_hdr", "without its .hdr"),
    ("hdr_without_img", "without its .img"),
    ("no_direction", "names no direction"),
    ("empty", "is empty"),
])
def test_bad_volumes_give_one_line_naming_the_file(tmp_path, damage, expect):
    root = tmp_path / "vols"
    for s in range(1, 5):
        save(phantom_volume(s, n_slices=4)[0], root / f"s{s}.nii.gz")
    if damage == "truncated_gz":
        bad = save(phantom_volume(9, n_slices=4)[0], root / "bad.nii.gz")
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif damage == "short_data":
        bad = save(phantom_volume(9, n_slices=4)[0], root / "bad.nii")
        bad.write_bytes(bad.read_bytes()[:-2000])
    elif damage == "flat":
        bad = save(np.ones((8, 8), np.float32), root / "bad.nii")
    elif damage == "img_without_hdr":
        save(phantom_volume(9, n_slices=4)[0], root / "bad.hdr", np.eye(4), kind=nib.AnalyzeImage)
        (root / "bad.hdr").unlink()
        bad = root / "bad.img"
    elif damage == "no_direction":
        img = nib.Nifti1Image(phantom_volume(9, n_slices=4)[0], np.eye(4))
        img.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)  # a zero voxel size along y
        img.set_qform(None, code=0)
        bad = root / "bad.nii"
        nib.save(img, str(bad))
    elif damage == "hdr_without_img":
        bad = save(phantom_volume(9, n_slices=4)[0], root / "bad.hdr", np.eye(4), kind=nib.AnalyzeImage)
        (root / "bad.img").unlink()
    else:
        bad = save(np.zeros((8, 8, 4), np.float32), root / "bad.nii")
    with pytest.raises(dataset.DataError) as err:
        dataset.load_source(str(root), cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and expect in message, message
    # Every bad volume can be left out, by name.
    warnings = []
    source = dataset.load_source(str(root), on_bad="skip", cache_dir=tmp_path / "cache", warn=warnings.append)
    assert len(warnings) == 1 and str(bad) in warnings[0]
    assert not any(str(bad) in p for s in source.splits.values() for p in s.paths)


def test_analyze_pairs_are_read_and_mixed_folders_refused(tmp_path):
    root = tmp_path / "analyze"
    for s in range(1, 4):
        data, _ = phantom_volume(s, n_slices=4)
        save(data, root / f"OAS1_000{s}_MR1.hdr", np.diag([-1.0, 1.0, 1.0, 1.0]), kind=nib.AnalyzeImage)
    assert sorted(p.rsplit("/", 1)[1] for p in volumes.list_volumes(root)) == [
        "OAS1_0001_MR1.hdr", "OAS1_0002_MR1.hdr", "OAS1_0003_MR1.hdr"]
    source = dataset.load_source(str(root), cache_dir=tmp_path / "cache")
    assert sum(len(s) for s in source.splits.values()) == 12 and source.kind == "volumes"
    from conftest import brain_like, write_image

    write_image(root / "stray.png", brain_like())
    with pytest.raises(dataset.DataError, match="both volumes"):
        dataset.load_source(str(root), cache_dir=tmp_path / "cache")


def test_inspections_are_remembered_on_disk_until_a_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    nii = save(phantom_volume(1, n_slices=6)[0], tmp_path / "a.nii")
    hdr = save(phantom_volume(2, n_slices=6)[0], tmp_path / "b.hdr", np.eye(4), kind=nib.AnalyzeImage)
    first = volumes.infos([str(nii), str(hdr)], cache_dir=cache)
    volumes._MEMO.clear()  # as a new process

    def no_reading(path, axis="axial"):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(volumes, "inspect_volume", no_reading)
    assert volumes.infos([str(nii), str(hdr)], cache_dir=cache) == first  # from the headers alone
    monkeypatch.undo()
    # A changed file, even the .img of an Analyze pair, is inspected afresh.
    save(phantom_volume(3, n_slices=6)[0] * 3, tmp_path / "c.hdr", np.eye(4), kind=nib.AnalyzeImage)
    (tmp_path / "c.img").replace(tmp_path / "b.img")
    again = volumes.infos([str(nii), str(hdr)], cache_dir=cache)
    assert again[str(nii)] == first[str(nii)] and again[str(hdr)].hi != first[str(hdr)].hi


def test_gzipped_volumes_are_read_through_seek_points_saved_at_inspection(tmp_path, monkeypatch):
    """Every slice of a .nii.gz, read in random order on several threads through the seek points saved when it
    was inspected, is the known slice; a damaged index, a replaced file and more volumes than are kept open
    still read right."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(volumes, "GZ_SPACING", 65536)  # many seek points in a small volume
    monkeypatch.setattr(volumes, "OPEN_VOLUMES", 2)
    monkeypatch.setattr(volumes, "_OPEN", type(volumes._OPEN)())
    cache = tmp_path / "cache"
    heads = {s: phantom_volume(s, n_slices=16, size=96) for s in (1, 2, 3)}
    paths = {s: str(save(data, tmp_path / f"sub-0{s}.nii.gz")) for s, (data, _) in heads.items()}
    volumes.infos(list(paths.values()), cache_dir=cache)
    index = volumes._index_file(paths[1], cache / volumes.INDEX_FOLDER)
    assert index.is_file()
    img = volumes._open(paths[1])  # opened with its saved points, before any read:
    fresh = volumes._load_indexed(paths[1], None)
    assert len(list(img.dataobj.file_like.seek_points())) > 2 >= len(list(fresh.dataobj.file_like.seek_points()))

    refs = [(s, k) for s in heads for k in range(16)] * 2
    np.random.default_rng(0).shuffle(refs)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda ref: volumes.read_slice(volumes.reference(paths[ref[0]], "axial", ref[1])),
                            refs))
    for (s, k), image in zip(refs, got):
        data, shown = heads[s]
        np.testing.assert_allclose(image[..., 0], scaled(shown[k], data), atol=1e-6)
    assert len(volumes._OPEN) <= 2  # three volumes read, two kept open

    # A file replaced after its index was saved is opened afresh, never read through the old points; its next
    # inspection saves new points and removes the old ones.
    save(heads[3][0] * 2 + 1, tmp_path / "sub-01.nii.gz")
    replaced = volumes._open(paths[1])
    assert replaced is not img and len(list(replaced.dataobj.file_like.seek_points())) <= 2
    np.testing.assert_array_equal(replaced.dataobj[..., 7], heads[3][0][..., 7] * 2 + 1)
    volumes.infos([paths[1]], cache_dir=cache)
    assert not index.exists() and volumes._index_file(paths[1], cache / volumes.INDEX_FOLDER).is_file()
    # A damaged index is only a slower read.
    volumes._OPEN.clear()
    volumes._index_file(paths[1], cache / volumes.INDEX_FOLDER).write_bytes(b"not an index")
    np.testing.assert_array_equal(volumes._open(paths[1]).dataobj[..., 7], heads[3][0][..., 7] * 2 + 1)
    # A volume deleted mid-run is one line naming it (its stream is not read by path again).
    (tmp_path / "sub-02.nii.gz").unlink()
    with pytest.raises(volumes.VolumeError, match="sub-02.nii.gz.*moved after the split"):
        volumes.read_slice(volumes.reference(paths[2], "axial", 3))


def test_capital_suffixes_and_nifti2_take_the_indexed_reader_without_warnings(tmp_path, caplog):
    data, shown = phantom_volume(1, n_slices=8)
    paths = [str(save(data, tmp_path / "SUB-01.NII.GZ")),
             str(save(data, tmp_path / "sub-02.nii.gz", kind=nib.Nifti2Image))]
    volumes.infos(paths, cache_dir=tmp_path / "cache")
    for path in paths:
        assert volumes._index_file(path, tmp_path / "cache" / volumes.INDEX_FOLDER).is_file()
        img = volumes._load_indexed(path, None)
        assert type(img.dataobj.file_like).__module__.startswith("indexed_gzip")
        np.testing.assert_allclose(volumes.read_slice(volumes.reference(path, "axial", 3))[..., 0],
                                   scaled(shown[3], data), atol=1e-6)
    assert not [r for r in caplog.records if "sizeof_hdr" in r.getMessage()]


def test_subjects_from_bids_oasis_names_and_repeated_stems(tmp_path):
    paths = [tmp_path / "OAS1_0001_MR1" / "RAW" / f"OAS1_0001_MR1_mpr-{i}_anon.hdr" for i in (1, 2)]
    paths += [tmp_path / "100307" / "T1w.nii.gz", tmp_path / "100408" / "T1w.nii.gz",
              tmp_path / "flat" / "sub-07_T1w.nii.gz", tmp_path / "flat" / "IXI002-Guys-0828-T1.nii.gz",
              tmp_path / "sub-09" / "anat" / "run1.nii"]
    subjects = volumes.subjects_of([str(p) for p in paths], tmp_path)
    assert list(subjects.values()) == ["OAS1_0001", "OAS1_0001", "100307", "100408", "sub-07",
                                       "IXI002-Guys-0828-T1", "sub-09"]


def test_a_stray_analyze_half_in_a_folder_of_slices_is_not_a_volume(tmp_path):
    from conftest import brain_like, write_image

    for i in range(12):
        write_image(tmp_path / "slices" / f"img_{i:02d}.png", brain_like(seed=i))
    (tmp_path / "slices" / "disk.img").write_bytes(b"\0" * 64)
    source = dataset.load_source(str(tmp_path / "slices"), cache_dir=tmp_path / "cache")
    assert source.kind == "folder" and sum(len(s) for s in source.splits.values()) == 12


def test_volumes_train_reconstruct_generate_and_compress_with_only_data(tmp_path):
    root = bids_folder(tmp_path / "bids", subjects=6, n_slices=8)
    run = tmp_path / "run"
    assert command(train, "--data", root, "--run", run, "--epochs", "1", "--set", "loss=mse", *TINY).returncode == 0
    # Another axis and half the slices, stored in the run: the prior and predict.py slice the same way.
    coronal = tmp_path / "coronal"
    assert command(train, "--data", root, "--run", coronal, "--epochs", "1", "--set", "loss=mse", "--slice-axis",
                   "coronal", "--slices", "0.5", *TINY).returncode == 0
    assert command(train, *PRIOR, "--run", coronal, "--epochs", "1").returncode == 0
    done = command(predict, "--run", coronal, "--split", "all", "--data", root, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_json(done.stdout)["n_images"] == sum(
        len(volumes.infos([v], "coronal")[v].kept("0.5")) for v in volumes.list_volumes(root))
    assert command(train, *PRIOR, "--run", run, "--epochs", "1").returncode == 0
    done = command(predict, "--run", run, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = last_json(done.stdout)
    assert summary["source"] == "volumes" and summary["n_images"] > 0 and 0 < summary["ssim_mean"] <= 1
    done = command(predict, "--run", run, "--split", "all", "--data", root, "--json")
    assert done.returncode == 0 and last_json(done.stdout)["n_images"] == sum(
        len(volumes.infos([v])[v].kept()) for v in volumes.list_volumes(root)), done.stderr[-2000:]
    done = command(predict, "--run", run, "--generate", "4", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    volume = next(root.rglob("sub-02_T1w.nii.gz"))
    bvq = tmp_path / "one.bvq"
    done = command(predict, "--run", run, "--compress", volume, "--out", bvq, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert last_json(done.stdout)["n_slices"] == len(volumes.info_of(str(volume)).kept())
    out = tmp_path / "decoded"
    done = command(predict, "--run", run, "--decompress", bvq, "--out", out, "--json")
    assert done.returncode == 0 and last_json(done.stdout)["checksum_ok"], done.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png"))[0] == "sub-02_T1w_axial000.png"
