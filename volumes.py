"""Brain volumes (NIfTI, Analyze 7.5) as 2D slices: found, checked, oriented, scaled and read lazily.

This file has one job: let `dataset.py` treat a folder of 3D volumes like a
folder of slices. A slice is named by a reference, `path#axial=87`: the
volume file, the slice axis and the slice's place along it, counted from
the left, posterior or inferior end (RAS order), whatever order the
array is stored in. The pipeline reads each slice on demand with
`read_slice`, so memory does not grow with the number or size of volumes.

* **Orientation** comes from the affine (`nibabel.io_orientation`), not from
  the array order: an axial slice is cut across the inferior-superior axis
  however the scanner stored it, and every slice is shown the same way up,
  in the radiological convention: anterior (axial) or superior (coronal,
  sagittal) at the top, the patient's right on the image's left (axial,
  coronal), anterior on the left (sagittal).
* **Intensity** is scaled per volume, not per slice, so the slices of one
  subject stay comparable: the 0.5th to 99.5th percentile of the non-zero
  voxels maps to [0, 1] (clipped); NaNs count as background. A 4D volume
  gives its first 3D volume.
* **Slices kept**: by default those with a non-zero voxel at or above the
  volume's low percentile (empty ends waste training); `keep` takes `"lo:hi"` (RAS
  order, hi excluded) or a fraction (the central part of the non-empty
  range). Each kept slice's `level` bins its place in the kept range into
  `LEVELS` (32, as the OASIS PNGs' slice numbers), so slice k of one
  subject and slice k of another mean the same height to the prior.

Inspecting a volume reads it once in full (percentiles, the non-empty
range); the result is remembered by the path, size and mtime of its files
in a small JSON file in the cache folder, so later runs read only the
headers.

A gzipped volume cannot be sought in: reaching a slice means decompressing
the stream up to it. So when it is inspected, its seek points (one every
`GZ_SPACING` bytes of voxels, with the 32 KB of history each needs) are
saved beside that JSON file by `indexed_gzip` (one more pass over the
file), and each process keeps the last `OPEN_VOLUMES` volumes it read
open, headers parsed, gzipped ones with their points. A slice across the
last stored axis (one run of bytes; axial for most scanners' files) then
costs at most `GZ_SPACING` bytes of decompression, wherever it lies; a
slice across another stored axis is scattered over the file, and is cut
from one read of the whole volume.
"""

import hashlib
import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SUFFIXES = (".nii.gz", ".nii", ".hdr", ".img")
SLICE_AXES = ("axial", "coronal", "sagittal")
ACROSS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis (x=0, y=1, z=2) the slices are cut across
SHOWN = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}  # RAS axes down the rows, along the columns
LEVELS = 32  # slice levels the prior conditions on (the OASIS PNGs have 32 slices a subject)
PERCENTILES = (0.5, 99.5)
INFO_VERSION = 1  # bump when inspection changes: older remembered results are ignored
INFO_FILE = "volume_info.json"
INDEX_FOLDER = "gzip_index"  # beside INFO_FILE: one `indexed_gzip` index of seek points per .nii.gz
GZ_SPACING = 1 << 20  # bytes of voxels between seek points (each point stores 32 KB)
OPEN_VOLUMES = 32  # volumes a process keeps open, headers parsed, .nii.gz with seek points (least recent closed)


class VolumeError(ValueError):
    """A volume that cannot be used, stated in one line naming the file, with the fix."""


# ---------------------------------------------------------------------------
# Finding volumes and their subjects
# ---------------------------------------------------------------------------


def is_volume(path):
    """True for a NIfTI or Analyze file name (`.nii`, `.nii.gz`, `.hdr`, `.img`)."""
    return str(path).lower().endswith(SUFFIXES)


def stem(path):
    """The file name without its volume suffix: `sub-01_T1w` for `sub-01_T1w.nii.gz`."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_volumes(folder, unpaired="error", warn=None):
    """Every volume under `folder`, recursively, sorted; an Analyze pair is named by its `.hdr`.

    Hidden files and folders are ignored.

    Args:
        folder: where to look.
        unpaired: what an `.img` without its `.hdr` (or the reverse) does:
            "error" raises, "skip" leaves it out with a warning, "ignore"
            leaves it out silently.
        warn: callable taking a warning message (for "skip").

    Raises:
        VolumeError: an unpaired Analyze file, with `unpaired="error"`.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        names = {n.lower() for n in filenames}
        for name in filenames:
            if name.startswith(".") or not is_volume(name):
                continue
            lower = name.lower()
            other = {".img": ".hdr", ".hdr": ".img"}.get(lower[-4:])
            if other and lower[:-4] + other not in names:
                problem = (f"{os.path.join(dirpath, name)}: an Analyze {lower[-4:]} without its {other}. Put the "
                           f"{other} beside it, or remove the {lower[-4:]}.")
                if unpaired == "error":
                    raise VolumeError(problem)
                if unpaired == "skip" and warn is not None:
                    warn(f"skipped {problem}")
                continue
            if lower.endswith(".img"):
                continue  # the .hdr names the pair
            found.append(os.path.join(dirpath, name))
    return sorted(found)


def files_of(path):
    """The files holding a volume: itself, or an Analyze `.hdr` and its `.img`."""
    path = Path(path)
    if path.suffix.lower() == ".hdr":
        pair = [f for f in path.parent.iterdir() if f.name.lower() == path.stem.lower() + ".img"]
        return [str(path), *map(str, pair[:1])]
    return [str(path)]


SUBJECT_IN_NAME = re.compile(r"^(sub-[A-Za-z0-9]+|OAS\d_\d+)")


def subject_of(path, root):
    """A volume's subject: a BIDS `sub-XXX` folder above it, else a `sub-XXX` or OASIS `OAS1_0001` name
    prefix, else its file stem.

    Example:
    >>> subject_of("/d/OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-2_anon.hdr", "/d")
    'OAS1_0001'
    """
    for part in Path(path).relative_to(root).parts[:-1]:
        if part.startswith("sub-"):
            return part
    match = SUBJECT_IN_NAME.match(stem(path))
    return match.group(1) if match else stem(path)


def subjects_of(paths, root):
    """`subject_of` for each path; a stem found in several folders (`100307/T1w.nii.gz`,
    `100408/T1w.nii.gz`) names no subject, so those volumes take their folder below `root` as theirs."""
    subjects = {p: subject_of(p, root) for p in paths}
    folders = {}
    for p in paths:
        folders.setdefault(subjects[p], set()).add(str(Path(p).parent))
    for p in paths:
        if len(folders[subjects[p]]) > 1 and subjects[p] == stem(p):
            subjects[p] = Path(p).relative_to(root).parts[0] if len(Path(p).relative_to(root).parts) > 1 \
                else subjects[p]
    return subjects


# ---------------------------------------------------------------------------
# Orientation and inspection
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeInfo:
    """What reading a volume's slices needs, found once per volume.

    Attributes:
        path: the volume file (the `.hdr` of an Analyze pair).
        axis: "axial", "coronal" or "sagittal".
        shape: the 3D spatial shape of the array.
        array_axis: the array axis the slices are cut across.
        flip: True when the array index runs against the RAS direction.
        lo: the intensity mapped to 0 (the 0.5th percentile of non-zero voxels).
        hi: the intensity mapped to 1 (the 99.5th percentile).
        first: the first slice (RAS order) with a non-zero voxel at or above `lo`.
        last: the last such slice.
    """

    path: str
    axis: str
    shape: tuple
    array_axis: int
    flip: bool
    lo: float
    hi: float
    first: int
    last: int

    @property
    def n_slices(self):
        return self.shape[self.array_axis]

    def kept(self, keep=None):
        """The slices kept (RAS order): the non-empty range, a `"lo:hi"` range, or a central fraction of it."""
        if keep is None:
            return list(range(self.first, self.last + 1))
        spec = parse_keep(keep)
        if isinstance(spec, tuple):
            lo, hi = spec
            return list(range(lo, min(self.n_slices if hi is None else hi, self.n_slices)))
        n = self.last - self.first + 1
        count = max(1, int(round(n * spec)))
        start = self.first + (n - count) // 2
        return list(range(start, start + count))


def parse_keep(keep):
    """`"lo:hi"` as ints (either may be empty: `None`), or a fraction in (0, 1] as a float.

    Example:
    >>> parse_keep("20:140"), parse_keep("0.6")
    ((20, 140), 0.6)
    """
    text = str(keep).strip()
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            lo, hi = int(lo) if lo.strip() else 0, int(hi) if hi.strip() else None
            if lo < 0 or (hi is not None and hi <= lo):
                raise ValueError
            return lo, hi
        fraction = float(text)
        if not 0 < fraction <= 1:
            raise ValueError
        return fraction
    except ValueError:
        raise VolumeError(f"--slices takes lo:hi (0 <= lo < hi) or a fraction in (0, 1]. Received: "
                          f"slices={keep!r}") from None


def _load(path, mmap=True):
    import nibabel

    try:
        return nibabel.load(path, mmap=mmap)
    except Exception as err:  # nibabel raises many kinds for a damaged header
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise VolumeError(f"cannot read the volume {path} ({reason}). Re-export it as NIfTI, or remove it.") \
            from None


def _orientation(img, path):
    import nibabel

    if len(img.shape) < 3 or min(img.shape[:3]) < 2:
        raise VolumeError(f"{path} is not a 3D volume (shape {tuple(img.shape)}). Pass volumes, or convert 2D "
                          "images to PNG slices.")
    if len(img.shape) > 4:
        raise VolumeError(f"{path} has {len(img.shape)} dimensions (shape {tuple(img.shape)}); 3D or 4D volumes "
                          "only.")
    ornt = nibabel.io_orientation(img.affine)
    if np.isnan(ornt).any():
        raise VolumeError(f"{path} has an affine that names no direction for an axis (a zero voxel size?). Fix "
                          "its header (pixdim, qform/sform) and re-save it.")
    return ornt


def _read_all(img, path):
    """The first 3D volume as float32, NaNs as 0; a truncated or damaged file is one VolumeError line."""
    try:
        data = img.dataobj[..., 0] if len(img.shape) == 4 else img.dataobj[...]
        data = np.asarray(data, dtype=np.float32)
    except (EOFError, OSError, ValueError, zlib.error) as err:
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise VolumeError(f"cannot read the voxels of {path} ({reason}): the file is truncated or its header does "
                          "not match its data. Re-export or re-copy it.") from None
    return np.where(np.isfinite(data), data, 0.0).astype(np.float32)


def inspect_volume(path, axis="axial"):
    """Finds a volume's slice axis, orientation, intensity scale and non-empty range (reads it once in full).

    Args:
        path: a `.nii`, `.nii.gz` or Analyze `.hdr` file.
        axis: "axial", "coronal" or "sagittal".

    Returns:
        A `VolumeInfo`.

    Raises:
        VolumeError: unreadable, truncated, 2D or empty volumes (one line naming the file).
    """
    if axis not in SLICE_AXES:
        raise VolumeError(f"--slice-axis must be one of {', '.join(SLICE_AXES)}. Received: slice_axis={axis!r}")
    img = _load(path)
    ornt = _orientation(img, path)
    array_axis = int(np.flatnonzero(ornt[:, 0] == ACROSS[axis])[0])
    flip = bool(ornt[array_axis, 1] < 0)
    data = _read_all(img, path)
    inside = data[data != 0]
    if inside.size == 0:
        raise VolumeError(f"{path} is empty: every voxel is 0 or NaN. Remove it.")
    lo, hi = (float(v) for v in np.percentile(inside, PERCENTILES))
    if not hi > lo:  # a constant volume: everything non-zero is foreground
        lo, hi = min(lo, 0.0), max(hi, 0.0) + (1.0 if hi <= 0 else 0.0)
    others = tuple(a for a in range(3) if a != array_axis)
    full = np.flatnonzero(((data >= lo) & (data != 0)).any(axis=others))
    if full.size == 0:
        full = np.arange(data.shape[array_axis])
    if flip:
        full = data.shape[array_axis] - 1 - full
    return VolumeInfo(str(path), axis, tuple(int(s) for s in img.shape[:3]), array_axis, flip, lo, hi,
                      int(full.min()), int(full.max()))


_MEMO = {}  # (absolute path, axis) -> VolumeInfo, for this process: what the split was made with
_INDEX_HOME = {}  # absolute path of a .nii.gz -> the folder `infos` keeps its seek points in
_OPEN = OrderedDict()  # `_signature` of a volume -> its image (a .nii.gz reading through its seek points)
_OPEN_LOCK = threading.Lock()  # the pipeline reads slices on several threads


def _key(path, axis):
    stats = [os.stat(f) for f in files_of(path)]
    return "|".join([f"v{INFO_VERSION}", os.path.abspath(path), axis,
                     *(f"{st.st_size}:{st.st_mtime_ns}" for st in stats)])


def _read_store(file):
    try:
        return json.loads(file.read_text()) if file is not None and file.is_file() else {}
    except (OSError, ValueError):
        return {}  # a damaged cache is only a cache


def _write_store(file, store):
    file.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_store(file), **store}  # keep what another process added meanwhile
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(merged))
    os.replace(tmp, file)


def _gzipped(path):
    return str(path).lower().endswith(".gz")


_FILES = {}  # absolute path -> `files_of` it, found once per process (an Analyze pair means listing a folder)


def _signature(path):
    """A volume's absolute path and the size and mtime of its files: what an open image and seek points
    belong to."""
    key = os.path.abspath(path)
    if key not in _FILES:
        _FILES[key] = files_of(key)
    return "|".join([key, *(f"{st.st_size}:{st.st_mtime_ns}" for st in map(os.stat, _FILES[key]))])


def _index_file(path, folder):
    """`<hash of the path>-<hash of the path, size and mtime>.gzidx`: a changed file never meets an old index,
    and the old one is found by its first half."""
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return Path(folder) / f"{digest}-{hashlib.sha1(_signature(path).encode()).hexdigest()[:16]}.gzidx"


def _ensure_index(path, folder):
    """The file of `path`'s gzip seek points in `folder`, written now (atomically, replacing those of an older
    version of the file) if absent; None if it cannot be."""
    import indexed_gzip

    index = _index_file(path, folder)
    if index.is_file():
        return index
    tmp = index.with_name(f".{index.name}.tmp-{os.getpid()}")
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        with indexed_gzip.IndexedGzipFile(str(path), spacing=GZ_SPACING) as stream:
            stream.build_full_index()
            stream.export_index(str(tmp))
        os.replace(tmp, index)
        for old in index.parent.glob(f"{index.name.split('-')[0]}-*.gzidx"):
            if old != index:
                old.unlink(missing_ok=True)
        return index
    except (OSError, ValueError):  # the index only speeds reading up: without it, slices are still read right
        tmp.unlink(missing_ok=True)
        return None


def infos(paths, axis="axial", cache_dir=None, on_error=None, progress=None):
    """`inspect_volume` for many volumes, each remembered on disk (with `cache_dir`) by the path, size and mtime
    of its files, so a later run reads only what is new or changed; the store is read once and written once.

    Args:
        paths: volume files.
        axis: the slice axis.
        cache_dir: the folder of the store (`volume_info.json`), or None.
        on_error: callable taking (path, VolumeError) for a bad volume, which is then left out; None raises.
        progress: callable called once per volume, or None.

    Returns:
        A dict path -> `VolumeInfo`.
    """
    file = Path(cache_dir) / INFO_FILE if cache_dir else None
    store, added, found = _read_store(file), {}, {}
    try:
        for path in paths:
            try:
                key = _key(path, axis)
                if key in store:
                    fields = store[key]
                    info = VolumeInfo(**{**fields, "shape": tuple(fields["shape"])})
                else:
                    info = inspect_volume(path, axis)
                    added[key] = asdict(info)
                    if file is not None and len(added) % 50 == 0:  # an interrupted first pass keeps its work
                        _write_store(file, added)
            except (VolumeError, OSError) as err:
                err = err if isinstance(err, VolumeError) else VolumeError(f"cannot read {path} ({err.strerror})")
                if on_error is None:
                    raise err from None
                on_error(path, err)
                continue
            finally:
                if progress is not None:
                    progress()
            found[path] = _MEMO[(os.path.abspath(path), axis)] = info
            if file is not None and _gzipped(path):
                _INDEX_HOME[os.path.abspath(path)] = file.parent / INDEX_FOLDER
                _ensure_index(path, file.parent / INDEX_FOLDER)
    finally:
        if file is not None and added:
            _write_store(file, added)
    return found


def info_of(path, axis="axial", cache_dir=None):
    """The `VolumeInfo` this process made its split with, else `infos` of the one volume."""
    known = _MEMO.get((os.path.abspath(path), axis))
    return known if known is not None else infos([path], axis, cache_dir)[path]


# ---------------------------------------------------------------------------
# Slice references and reading
# ---------------------------------------------------------------------------


def reference(path, axis, k):
    """The name of slice `k` (RAS order: from the left, posterior or inferior end) of a volume: `path#axial=87`."""
    return f"{path}#{axis}={k}"


def is_reference(name):
    """True for a slice reference (`volume#axis=k`)."""
    path, sep, rest = str(name).rpartition("#")
    axis, _, k = rest.partition("=")
    return bool(sep) and is_volume(path) and axis in SLICE_AXES and k.isdigit()


def parse_reference(name):
    """`(path, axis, k)` of a slice reference."""
    path, _, rest = str(name).rpartition("#")
    axis, _, k = rest.partition("=")
    return path, axis, int(k)


def slice_name(name):
    """A file-name-safe name for a slice reference: `sub-01_T1w_axial087`."""
    path, axis, k = parse_reference(name)
    return f"{stem(path)}_{axis}{k:03d}"


def _open(path):
    """The image to read `path`'s slices from, its header parsed once: the last `OPEN_VOLUMES` read are kept
    (without memory maps, so memory stays flat); a `.nii.gz` reads through its saved seek points."""
    try:
        key = _signature(path)  # a file replaced since it was opened is opened again
    except OSError as err:
        raise VolumeError(f"cannot read {path} ({err.strerror}); it moved after the split. Start the run "
                          "again.") from None
    with _OPEN_LOCK:
        if key in _OPEN:
            _OPEN.move_to_end(key)
            return _OPEN[key]
    if _gzipped(path):
        home = _INDEX_HOME.get(os.path.abspath(path))
        index = _index_file(path, home) if home is not None else None
        img = _load_indexed(path, index if index is not None and index.is_file() else None)
    else:
        img = _load(path, mmap=False)
    with _OPEN_LOCK:
        _OPEN[key] = img
        while len(_OPEN) > OPEN_VOLUMES:
            _OPEN.popitem(last=False)  # its stream closes when the last reader lets go of it
    return img


def _load_indexed(path, index):
    """`path` (a .nii.gz) as a nibabel image over an `indexed_gzip` stream (thread-safe), with the seek points
    in `index` if given; a damaged index or an unexpected header falls back to `_load`, which names any real
    damage."""
    import indexed_gzip
    import nibabel

    try:
        # Small buffers: indexed_gzip's default read-ahead (4x the spacing) decompresses 4 MB for each slice
        # and holds it; 128 KB read 3.3x faster here (random axial slices of 192x192 int16, one thread). The
        # file stays open (one descriptor a kept volume): the stream cannot meet another file at its path.
        stream = indexed_gzip.IndexedGzipFile(str(path), spacing=GZ_SPACING, buffer_size=1 << 17,
                                              readbuf_size=1 << 16, drop_handles=False,
                                              index_file=str(index) if index is not None else None)
    except (OSError, ValueError):
        return _load(path)
    try:
        head = stream.read(4)
        kind = nibabel.Nifti2Image if 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big")) \
            else nibabel.Nifti1Image  # sizeof_hdr: 540 for NIfTI-2, 348 for NIfTI-1
        stream.seek(0)
        return kind.from_file_map({"image": nibabel.FileHolder(str(path), fileobj=stream)})
    except Exception:  # noqa: BLE001 - `_load` says what is wrong with the file
        stream.close()
        return _load(path)


def read_slice(name, cache_dir=None):
    """Reads one slice by its reference, oriented and scaled: float32 (H, W, 1) in [0, 1].

    A plane across the last stored axis is read alone (for `.nii.gz`, inflated from the seek point before
    it); any other is cut from one read of the volume, which is then let go.
    """
    path, axis, k = parse_reference(name)
    info = info_of(path, axis, cache_dir)
    img = _open(path)
    ornt = _orientation(img, path)
    if not 0 <= k < info.n_slices:
        raise VolumeError(f"{path} has no {axis} slice {k} (it has {info.n_slices}); it changed after the split. "
                          "Start the run again.")
    index = [slice(None)] * 3
    index[info.array_axis] = info.n_slices - 1 - k if info.flip else k
    first = (slice(None),) * 3 + ((0,) if len(img.shape) == 4 else ())  # a 4D volume's first volume
    try:
        if info.array_axis == 2:  # voxels are stored first axis fastest: this plane is one run of bytes
            data = img.dataobj[tuple(index) + first[3:]]
        else:  # a plane scattered over the whole file: one read of the volume beats thousands of small ones
            data = np.asarray(img.dataobj[first])[tuple(index)]  # (for .nii.gz each would restart inflating)
        data = np.asarray(data, dtype=np.float32)
    except (EOFError, OSError, ValueError, zlib.error) as err:
        raise VolumeError(f"cannot read slice {k} of {path} ({str(err).splitlines()[0][:160]}): the file is "
                          "truncated or damaged. Re-export or re-copy it.") from None
    data = np.where(np.isfinite(data), data, 0.0)
    rows, cols = [a for a in range(3) if a != info.array_axis]  # the array axes left, in array order
    if ornt[rows, 0] != SHOWN[axis][0]:  # the rows must run along the shown vertical axis
        data, rows, cols = data.T, cols, rows
    if ornt[rows, 1] > 0:  # top = anterior or superior: the row index must run towards -RAS
        data = data[::-1]
    if ornt[cols, 1] > 0:  # the patient's right (or anterior) on the left: columns run towards -RAS
        data = data[:, ::-1]
    scaled = np.clip((data - info.lo) / (info.hi - info.lo), 0.0, 1.0)
    return np.ascontiguousarray(scaled, dtype=np.float32)[..., None]


def slice_shape(name, cache_dir=None):
    """`(height, width)` of a referenced slice as `read_slice` gives it, from the header alone."""
    path, axis, _ = parse_reference(name)
    info = info_of(path, axis, cache_dir)
    img = _open(path)
    ornt = _orientation(img, path)
    rows, cols = [a for a in range(3) if a != info.array_axis]
    if ornt[rows, 0] != SHOWN[axis][0]:
        rows, cols = cols, rows
    return info.shape[rows], info.shape[cols]


def level(k, kept):
    """Slice `k`'s level in [0, LEVELS): its place in the kept range, binned."""
    return min(LEVELS - 1, (k - kept[0]) * LEVELS // len(kept))
