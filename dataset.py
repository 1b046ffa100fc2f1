"""Brain MRI slices in, batches of float32 images out.

This file has one job: turn a folder of 2D slices into a streaming tf.data
pipeline the models can eat. It never holds the dataset in memory: the file
list is shuffled, each file is decoded on demand in parallel, fitted to the
model's square size and batched.

Four sources, picked by `load_source`:

  * "oasis"    the preprocessed OASIS-1 PNG slices (keras_png_slices_train /
               _validate / _test, found however deeply the zip nested them).
  * "folder"   any other folder of PNG/JPEG slices, split deterministically
               (by subject when file names carry one, so no subject leaks).
  * "volumes"  a folder of NIfTI or Analyze brain volumes, split by subject,
               each slice read from its volume on demand (`volumes.py`).
  * "phantoms" the embedded default: synthetic skull-stripped brain slices,
               written once as PNGs in the OASIS layout under a cache folder,
               so the real PNG path is what runs.

Every file is checked by reading its header and chunk/marker structure, then
decoded once exactly as the pipeline decodes it; files that decoded are
remembered by (path, size, mtime) in a small cache file, so later runs decode
only new or changed files. A bad file is reported by name before training
starts instead of stopping it mid-epoch.

Run `python dataset.py --preview grid.png` to see what the model will see.
"""

import argparse
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import devices  # noqa: E402,F401  first: it imports TensorFlow without its start-up noise
import tensorflow as tf  # noqa: E402

import phantoms  # noqa: E402
import volumes  # noqa: E402

SPLITS = ("train", "validate", "test")
OASIS_DIRS = {split: f"keras_png_slices_{split}" for split in SPLITS}
DEFAULT_DATA = Path("data") / "keras_png_slices_data"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FIT_MODES = ("pad", "stretch", "crop")
# Folder names that mark a predefined split inside a generic folder.
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validate": ("validate", "validation", "val", "valid"),
    "test": ("test", "testing"),
}
OASIS_NAME = re.compile(r"case_(\d+)_slice_(\d+)", re.IGNORECASE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> decoded channels
DECODED_VERSION = 1  # bump when the decode check changes: older lists of decoded files are ignored
PROGRESS_MIN_FILES = 1000  # show a progress bar when more files than this need decoding


class DataError(ValueError):
    """A problem with the user's data, stated in one line with the fix."""


# ---------------------------------------------------------------------------
# Records: what a split is made of
# ---------------------------------------------------------------------------


@dataclass
class Split:
    """The files of one split and what their names tell.

    Attributes:
        paths: image file paths, as strings.
        subjects: subject id per file parsed from OASIS-style names, -1 if unknown.
        slices: axial slice index per file (OASIS: 0-31), -1 if unknown.
        labels: class index per file (class sub-folders), -1 if none.
    """

    paths: list
    subjects: np.ndarray
    slices: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.paths)

    def take(self, index):
        """Returns the split restricted to `index` (an array of positions)."""
        index = np.asarray(index, dtype=np.int64)
        return Split(
            [self.paths[i] for i in index],
            self.subjects[index],
            self.slices[index],
            self.labels[index],
        )


@dataclass
class DataSource:
    """A resolved dataset: where it came from and its three splits."""

    kind: str
    root: Path
    splits: dict
    class_names: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def counts(self):
        return {name: len(split) for name, split in self.splits.items()}

    def split_by(self):
        """"subject" when the file names carry subject ids (the splits never share a subject), else "file"."""
        return "subject" if any((s.subjects >= 0).any() for s in self.splits.values()) else "file"

    def summary(self):
        """A JSON-ready description (the `--json` keys of dataset.py)."""
        out = {"source": self.kind, "root": str(self.root), **self.counts()}
        out["subjects"] = {
            name: int(len(np.unique(s.subjects[s.subjects >= 0])))
            for name, s in self.splits.items()
        }
        out["classes"] = list(self.class_names)
        out["notes"] = list(self.notes)
        return out


def parse_name(name):
    """Subject id and slice index from an OASIS-style file name.

    Args:
        name: a file name such as `case_441_slice_7.nii.png`.

    Returns:
        `(subject, slice)` as ints; `(-1, -1)` when the name carries neither.

    Example:
    >>> parse_name("case_441_slice_7.nii.png")
    (441, 7)
    """
    match = OASIS_NAME.search(Path(name).name)
    if match is None:
        return -1, -1
    return int(match.group(1)), int(match.group(2))


def make_split(paths, labels=None):
    """A `Split` from file paths (sorted), parsing subject and slice from names."""
    order = np.argsort([str(p) for p in paths], kind="stable")
    paths = [str(paths[i]) for i in order]
    parsed = np.array([parse_name(p) for p in paths], dtype=np.int32).reshape(-1, 2)
    if labels is None:
        labels = np.full(len(paths), -1, dtype=np.int32)
    else:
        labels = np.asarray(labels, dtype=np.int32)[order]
    return Split(paths, parsed[:, 0].copy(), parsed[:, 1].copy(), labels)


# ---------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------


def _skip_dir(name):
    # Segmentation masks, macOS zip debris and hidden folders are never slices.
    return "_seg_" in name or name == "__MACOSX" or name.startswith(".")


def list_images(folder):
    """All PNG/JPEG files under `folder`, recursively, sorted.

    Segmentation-mask folders (`*_seg_*`), `__MACOSX` and hidden files
    (including macOS `._name.png` resource forks) are ignored.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def find_oasis_layout(root, max_depth=5):
    """Locates the three OASIS split folders under `root`.

    The zip is often nested (`keras_png_slices_data/keras_png_slices_data/...`);
    the shallowest complete set wins. Mask folders (`*_seg_*`) are ignored.

    Args:
        root: folder to search.
        max_depth: how many folder levels to descend.

    Returns:
        A dict split -> Path, or None when no split folder exists at all.

    Raises:
        DataError: when only some of the three split folders exist.
    """
    root = Path(root)
    wanted = {v: k for k, v in OASIS_DIRS.items()}
    partial = None
    level = [root]
    for _ in range(max_depth + 1):  # breadth first: the shallowest complete set wins
        deeper = []
        for folder in level:
            try:
                names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _skip_dir(p.name))
            except OSError as err:
                raise DataError(f"cannot read folder {folder} ({err.strerror}). Check its permissions.") from None
            found = {wanted[n]: folder / n for n in names if n in wanted}
            if len(found) == len(SPLITS):  # all three side by side, never mixed from two copies
                return found
            partial = partial or (found or None)
            deeper += [folder / n for n in names if n not in wanted]
        level = deeper
    if partial is None:
        return None
    have = ", ".join(str(partial[s]) for s in SPLITS if s in partial)
    missing = ", ".join(OASIS_DIRS[s] for s in SPLITS if s not in partial)
    raise DataError(f"incomplete OASIS layout under {root}: found {have} but not {missing}. "
                    "Extract the whole keras_png_slices_data zip there.")


def _match_split_dirs(root):
    """Predefined split sub-folders (train/val/test...) of a generic folder."""
    subdirs = {p.name.lower(): p for p in Path(root).iterdir() if p.is_dir()}
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in subdirs:
                found[split] = subdirs[alias]
                break
    return found if "train" in found and len(found) >= 2 else {}


def class_of(path, root):
    """Class name of a file: its first folder below `root`, '' if at the top."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def _cut(keys, fractions):
    """Shuffled group keys cut into test, validate and train by the fractions (test first)."""
    n = len(keys)
    n_test = int(round(n * fractions[2]))
    n_val = int(round(n * fractions[1]))
    if n >= 3:  # every split gets something when there is enough to go round
        n_test, n_val = max(n_test, int(fractions[2] > 0)), max(n_val, int(fractions[1] > 0))
    return {"test": keys[:n_test], "validate": keys[n_test:n_test + n_val], "train": keys[n_test + n_val:]}


def split_files(paths, *, root, seed=0, fractions=(0.8, 0.1, 0.1), class_names=None):
    """Deterministic train/validate/test split of a flat list of files.

    Files are grouped by subject when their names carry one (OASIS
    `case_441_slice_7`), so all slices of a subject land in one split; other
    files are their own group. Groups are shuffled with `seed` within each
    class folder (stratified), then cut by the fractions.

    Args:
        paths: image file paths.
        root: the folder the class sub-folders are relative to.
        seed: seed of the shuffle; the same seed gives the same split.
        fractions: train, validate, test shares (must sum to 1).
        class_names: class folder names to label with; None derives them.

    Returns:
        `(splits, class_names)`: a dict split -> `Split`, and the sorted classes.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise DataError(f"split fractions must be >= 0 and sum to 1. Received: fractions={fractions}")
    classes = [class_of(p, root) for p in paths]
    if class_names is None:
        class_names = sorted(set(classes)) if len(set(classes)) > 1 else []
    label_of = {name: i for i, name in enumerate(class_names)}
    assigned = {split: [] for split in SPLITS}
    rng = np.random.default_rng(seed)
    for cls in sorted(set(classes)):
        members = [p for p, c in zip(paths, classes) if c == cls]
        groups = {}
        for p in members:
            subject, _ = parse_name(p)
            groups.setdefault(subject if subject >= 0 else p, []).append(p)
        keys = sorted(groups, key=str)
        keys = [keys[i] for i in rng.permutation(len(keys))]
        for split, split_keys in _cut(keys, fractions).items():
            for key in split_keys:
                assigned[split].extend(groups[key])
    splits = {}
    for split in SPLITS:
        files = assigned[split]
        labels = [label_of.get(class_of(p, root), -1) for p in files]
        splits[split] = make_split(files, labels)
    return splits, class_names


def volume_split(paths, *, root, slice_axis="axial", slices=None, cache_dir=None, on_bad="error", warn=None,
                 numbers=None, progress=True):
    """A `Split` of every kept slice of the given volumes, each named by a reference (`volumes.py`).

    Every volume is inspected once (read in full: orientation, intensity
    scale, non-empty slices; remembered in `cache_dir`).

    Args:
        paths: volume files (`.nii`, `.nii.gz`, Analyze `.hdr`).
        root: the folder subjects are found under (`volumes.subject_of`).
        slice_axis: "axial", "coronal" or "sagittal".
        slices: None (the non-empty slices), `"lo:hi"` or a central fraction (see `volumes.VolumeInfo.kept`).
        cache_dir: where inspections are remembered (default `default_cache_dir()`).
        on_bad: "error" stops at the first bad volume; "skip" leaves it out with a warning.
        warn: callable taking a message.
        numbers: subject name -> subject number (default: numbered in sorted order).
        progress: show a progress bar for more than 20 volumes.

    Returns:
        A `Split` whose paths are slice references, subjects are subject
        numbers and slices are levels in [0, 32) (`volumes.level`).
    """
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    subject = volumes.subjects_of(paths, root)
    numbers = numbers or {name: i for i, name in enumerate(sorted(set(subject.values())))}
    bar = None
    if progress and len(paths) > 20:
        import keras

        print(f"Inspecting {len(paths)} volumes (read once, then remembered) ...", file=sys.stderr)
        bar = keras.utils.Progbar(len(paths), unit_name="volume", interval=0.5)

    def bad(path, err):
        if on_bad == "error":
            raise DataError(f"{err} (or pass --skip-bad to leave bad volumes out)")
        warn(f"skipped {err}")

    found = volumes.infos(paths, slice_axis, cache_dir or default_cache_dir(), on_error=bad,
                          progress=None if bar is None else (lambda: bar.add(1)))
    names, subjects, levels = [], [], []
    for path, info in found.items():
        try:
            kept = info.kept(slices)
        except volumes.VolumeError as err:
            raise DataError(str(err)) from None
        if not kept:
            warn(f"--slices {slices} keeps no slice of {path}, which has {info.n_slices} {slice_axis} slices")
        names += [volumes.reference(path, slice_axis, k) for k in kept]
        subjects += [numbers[subject[path]]] * len(kept)
        levels += [volumes.level(k, kept) for k in kept]
    return Split(names, np.asarray(subjects, np.int32), np.asarray(levels, np.int32),
                 np.full(len(names), -1, np.int32))


def split_volumes(root, *, seed=0, fractions=(0.8, 0.1, 0.1), slice_axis="axial", slices=None, cache_dir=None,
                  on_bad="error", warn=None):
    """Splits a folder of 3D volumes by subject into three `volume_split`s.

    A volume's subject is a BIDS `sub-XXX` folder above it, else a `sub-XXX`
    or OASIS `OAS1_0001` prefix of its name, else its file stem (a stem found
    in several folders, as `100307/T1w.nii.gz`, takes its folder instead;
    `volumes.subjects_of`), so a subject's several volumes stay together.
    Subjects are shuffled with `seed` and cut by the fractions, so no subject
    is in two splits. An Analyze `.img` without its `.hdr` (or the reverse)
    is an error, or left out with a warning when `on_bad` is "skip". The
    other arguments are `volume_split`'s.

    Returns:
        A dict split -> `Split`.
    """
    if slice_axis not in volumes.SLICE_AXES:
        raise DataError(f"--slice-axis must be one of {', '.join(volumes.SLICE_AXES)}. Received: "
                        f"slice_axis={slice_axis!r}")
    try:
        if slices is not None:
            volumes.parse_keep(slices)
    except volumes.VolumeError as err:
        raise DataError(str(err)) from None
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    paths = list_volumes(root, unpaired="skip" if on_bad == "skip" else "error", warn=warn)
    subject = volumes.subjects_of(paths, root)
    names = sorted(set(subject.values()))
    numbers = {name: i for i, name in enumerate(names)}
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    split_of = {name: split for split, keys in _cut(order, fractions).items() for name in keys}
    found = volume_split(paths, root=root, slice_axis=slice_axis, slices=slices, cache_dir=cache_dir, on_bad=on_bad,
                         warn=warn, numbers=numbers)
    of_subject = np.array([split_of[n] for n in names])[found.subjects] if len(found) else np.array([])
    return {split: found.take(np.flatnonzero(of_subject == split)) for split in SPLITS}


# ---------------------------------------------------------------------------
# Checking the files: structure first, then one cached full decode
# ---------------------------------------------------------------------------


@dataclass
class ImageInfo:
    format: str
    width: int
    height: int
    channels: int
    bit_depth: int


def _png_info(path, f, size):
    f.seek(0)
    header = f.read(33)
    if len(header) < 33 or header[12:16] != b"IHDR":
        raise DataError(f"truncated PNG: {path} ends inside its header. Re-extract or delete the file.")
    width, height, depth, colour = struct.unpack(">IIBB", header[16:26])
    if colour not in PNG_CHANNELS:
        raise DataError(f"corrupt PNG: {path} has an invalid colour type {colour}. Re-export the file.")
    # Walk the chunk list by seeking over each chunk: a truncated file ends
    # before IEND. This reads a few bytes per chunk, never the pixel data.
    offset, seen_idat = 33, False
    while True:
        if offset + 12 > size:
            raise DataError(f"truncated PNG: {path} ends before its IEND chunk. Re-extract or delete the file.")
        f.seek(offset)
        length, kind = struct.unpack(">I4s", f.read(8))
        if kind == b"IEND":
            break
        seen_idat |= kind == b"IDAT"
        offset += 12 + length
    if not seen_idat:
        raise DataError(f"corrupt PNG: {path} has no image data (IDAT). Re-export the file.")
    return ImageInfo("png", width, height, PNG_CHANNELS[colour], depth)


def _jpeg_info(path, f, size):
    f.seek(2)
    info = None
    while info is None:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise DataError(f"corrupt JPEG: {path} has a broken marker structure. Re-export the file.")
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            f.seek(-1, os.SEEK_CUR)
            continue
        if 0xD0 <= kind <= 0xD9 or kind == 0x01:  # markers without a length
            continue
        raw = f.read(2)
        if len(raw) < 2:
            break
        (length,) = struct.unpack(">H", raw)
        if kind in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            frame = f.read(6)
            if len(frame) < 6:
                break
            depth, height, width, channels = struct.unpack(">BHHB", frame)
            info = ImageInfo("jpeg", width, height, channels, depth)
        elif kind == 0xDA:  # start of scan before any frame header
            break
        else:
            f.seek(length - 2, os.SEEK_CUR)
    if info is None:
        raise DataError(f"corrupt JPEG: {path} has no frame header. Re-export the file.")
    if info.bit_depth != 8:
        raise DataError(f"unsupported JPEG: {path} is {info.bit_depth}-bit; convert it to 8-bit or PNG.")
    f.seek(max(0, size - 64))
    if b"\xff\xd9" not in f.read():
        raise DataError(f"truncated JPEG: {path} has no end-of-image marker. Re-extract or delete the file.")
    return info


def inspect_image(path):
    """Format, size, channels and bit depth of an image, from its structure.

    Reads the header and walks the PNG chunks / JPEG markers without decoding
    pixels, which catches empty, non-image, truncated and malformed files.

    Args:
        path: path to a PNG or JPEG file.

    Returns:
        An `ImageInfo`.

    Raises:
        DataError: with one line naming the file and the fix.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"empty file: {path} has 0 bytes. Re-extract it or delete it.")
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic == PNG_SIGNATURE:
            info = _png_info(path, f, size)
        elif magic[:3] == b"\xff\xd8\xff":
            info = _jpeg_info(path, f, size)
        else:
            raise DataError(
                f"not an image: {path} is neither PNG nor JPEG (starts with {magic[:8]!r}). "
                "Delete it or convert it to PNG."
            )
    if info.width == 0 or info.height == 0:
        raise DataError(f"corrupt image: {path} claims a size of {info.width}x{info.height}. Re-export it.")
    return info


def _file_key(path):
    """`(size, mtime_ns)` of a file, to tell whether it changed; None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _decoded_list_file(paths, cache_dir):
    """The cache file remembering decoded files, one per folder the files share."""
    folder = os.path.commonpath([os.path.dirname(p) for p in paths])
    digest = hashlib.sha1(os.fsencode(folder)).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "decoded" / f"{digest}.json"


def _load_decoded(list_file):
    """The `{absolute path: (size, mtime_ns)}` a previous run decoded; empty when missing or unreadable."""
    try:
        data = json.loads(Path(list_file).read_text())
        if data["version"] != DECODED_VERSION:
            return {}
        return {str(path): (int(size), int(mtime)) for path, (size, mtime) in data["files"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # missing or corrupt: rebuilt
        return {}


def _save_decoded(list_file, decoded):
    """Writes the list atomically (temp file, then rename); failing to write only costs a re-check."""
    tmp = None
    try:
        list_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=list_file.parent, prefix=f".{list_file.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": DECODED_VERSION, "files": {p: list(k) for p, k in decoded.items()}}, f)
        os.replace(tmp, list_file)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _decode_error(path):
    """None when `path` decodes as the pipeline decodes it, else TensorFlow's reason in one line."""
    try:
        decode_image(tf.io.read_file(path))
    except tf.errors.OpError as err:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", err.message).strip()  # drop TF's node and op tags
        return reason.splitlines()[0].rstrip(".") if reason else type(err).__name__
    return None


def find_undecodable(paths, *, cache_dir=None):
    """The files the pipeline's decoder rejects, decoding each new or changed file once.

    A PNG/JPEG whose structure is intact can still hold damaged compressed
    data that only a full decode finds, and that would stop training
    mid-epoch. Each file is decoded exactly as the pipeline decodes it
    (`decode_image`); the files that decode are remembered by (absolute
    path, size, mtime) in a small JSON file under `cache_dir/decoded/`, so a
    later run decodes only new or changed files. A missing or corrupt list
    is simply rebuilt. A progress bar is shown when more than
    `PROGRESS_MIN_FILES` files need decoding.

    Args:
        paths: image file paths.
        cache_dir: parent folder of the list (default `default_cache_dir()`).

    Returns:
        A dict path -> one-line message naming the file and the fix, for the
        files that fail to decode, in the order of `paths`.
    """
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    list_file = _decoded_list_file(absolute, cache_dir)
    decoded = _load_decoded(list_file)
    keys = {a: _file_key(a) for a in absolute}
    todo = [(p, a) for p, a in zip(paths, absolute) if keys[a] is None or decoded.get(a) != keys[a]]
    if not todo:
        return {}
    bar = None
    if len(todo) > PROGRESS_MIN_FILES:
        import keras

        print(f"Decoding {len(todo)} new or changed images once to check them ...", file=sys.stderr)
        bar = keras.utils.Progbar(len(todo), unit_name="image", interval=0.5)
    bad = {}
    with ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 1))) as pool:
        for (path, a), reason in zip(todo, pool.map(_decode_error, [a for _, a in todo])):
            if reason is None:
                decoded[a] = keys[a]
            else:
                decoded.pop(a, None)
                bad[path] = f"corrupt image: {path} cannot be decoded ({reason}). Re-export it or delete it."
            if bar is not None:
                bar.add(1)
    # Merge with what other splits or runs wrote meanwhile; forget deleted, changed and bad files.
    failed = {os.path.abspath(p) for p in bad}
    merged = {**_load_decoded(list_file), **decoded}
    _save_decoded(list_file, {a: k for a, k in merged.items()
                              if k is not None and a not in failed and _file_key(a) == k})
    return bad


def check_split(name, split, *, on_bad="error", warn=None, cache_dir=None):
    """Checks every file of a split; returns the good part and notes.

    Each file's structure is checked (`inspect_image`), then the files that
    pass are decoded once (`find_undecodable`, cached across runs).

    Args:
        name: the split's name, for messages.
        split: a `Split`.
        on_bad: "error" raises on the first bad file; "skip" leaves bad
            files out, warning about each by name.
        warn: callable taking a message (default: print to stderr).
        cache_dir: where the list of decoded files is kept (default
            `default_cache_dir()`).

    Returns:
        `(split, notes)`: the split without bad files, and one-line notes
        about conversions that will happen (RGB to grayscale, 16-bit, sizes).
    """
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip'. Received: on_bad={on_bad!r}")
    keep, infos = [], []
    for i, path in enumerate(split.paths):
        try:
            infos.append(inspect_image(path))
            keep.append(i)
        except DataError as err:
            if on_bad == "error":
                raise DataError(f"{err} (or pass --skip-bad to leave bad files out)") from None
            warn(f"skipped {err}")
        except OSError as err:
            if on_bad == "error":
                raise DataError(f"unreadable file: {path} ({err.strerror}). Check its permissions.") from None
            warn(f"skipped unreadable file: {path} ({err.strerror})")
    undecodable = find_undecodable([split.paths[i] for i in keep], cache_dir=cache_dir)
    for message in undecodable.values():
        if on_bad == "error":
            raise DataError(f"{message} (or pass --skip-bad to leave bad files out)")
        warn(f"skipped {message}")
    infos = [info for i, info in zip(keep, infos) if split.paths[i] not in undecodable]
    keep = [i for i in keep if split.paths[i] not in undecodable]
    notes = []
    colour = sum(info.channels >= 2 for info in infos)
    if colour:
        notes.append(f"{name}: {colour} colour/alpha images converted to grayscale")
    deep = sum(info.bit_depth == 16 for info in infos)
    if deep:
        notes.append(f"{name}: {deep} 16-bit PNGs read at full precision")
    sizes = sorted({(info.width, info.height) for info in infos})
    if len(sizes) > 1:
        notes.append(f"{name}: {len(sizes)} different image sizes, each fitted to the model size")
    return split.take(keep), notes


# ---------------------------------------------------------------------------
# Resolving what to load
# ---------------------------------------------------------------------------


def default_cache_dir():
    """Where generated data live: $BRAIN_VQVAE_CACHE, else the XDG cache folder."""
    if os.environ.get("BRAIN_VQVAE_CACHE"):
        return Path(os.environ["BRAIN_VQVAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "brain-vqvae"


def locate_default_data():
    """`data/keras_png_slices_data` next to the working directory or this file, if present."""
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        candidate = base / DEFAULT_DATA
        if candidate.is_dir():
            return candidate
    return None


def list_volumes(root, unpaired="error", warn=None):
    """`volumes.list_volumes`, its errors as `DataError`."""
    try:
        return volumes.list_volumes(root, unpaired=unpaired, warn=warn)
    except volumes.VolumeError as err:
        raise DataError(f"{err} (or pass --skip-bad to leave it out)") from None


def holds_volumes(root):
    """True when `root` holds NIfTI or Analyze volumes (at any depth; a lone `.img` or `.hdr` is not one)."""
    return bool(volumes.list_volumes(root, unpaired="ignore"))


def load_source(data=None, *, seed=0, fractions=(0.8, 0.1, 0.1), on_bad="error",
                cache_dir=None, phantom_subjects=None, warn=None, slice_axis="axial", slices=None):
    """Resolves a data path into a checked `DataSource`.

    Args:
        data: folder of OASIS splits, of any 2D slices or of 3D volumes
            (NIfTI, Analyze; see `split_volumes`); None looks for
            `data/keras_png_slices_data` and else uses the synthetic phantoms.
        seed: seed of the split for generic folders.
        fractions: train/validate/test shares for generic folders.
        on_bad: "error" or "skip" (see `check_split`).
        cache_dir: where phantoms are written and the list of decoded files
            is kept (default `default_cache_dir()`).
        phantom_subjects: (train, validate, test) subject counts for phantoms.
        warn: callable taking a warning message.
        slice_axis: volumes only: "axial", "coronal" or "sagittal".
        slices: volumes only: None (the non-empty slices), `"lo:hi"` or a
            central fraction.

    Returns:
        A `DataSource` whose splits hold only files that passed the checks.

    Raises:
        DataError: missing folder, empty split, bad file (one line, with the fix).
    """
    notes = []
    if data is None:
        data = locate_default_data()
        if data is None:
            subjects = phantom_subjects or phantoms.PHANTOM_SUBJECTS
            data = phantoms.ensure_phantoms(cache_dir or default_cache_dir(), subjects=subjects)
            kind = "phantoms"
            notes.append("no --data given and no data/keras_png_slices_data found: "
                         "using the synthetic brain phantoms")
        else:
            kind = None
    else:
        kind = None
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(
            f"data folder not found: {root}. Pass --data with the folder that holds "
            "keras_png_slices_train/ (or any folder of PNG/JPEG slices)."
        )
    if not root.is_dir():
        raise DataError(f"--data must be a folder, not a file: {root}. Pass the folder that holds the slices.")

    class_names = []
    layout = find_oasis_layout(root)
    if layout is not None:
        kind = kind or "oasis"
        splits = {split: make_split(list_images(layout[split])) for split in SPLITS}
        for split, folder in layout.items():
            if not len(splits[split]):
                raise DataError(
                    f"empty split: {folder} holds no .png/.jpg files. "
                    "Re-extract the OASIS zip, or pass a folder of slices to --data to split it automatically."
                )
    elif holds_volumes(root):
        if list_images(root):
            raise DataError(f"{root} holds both volumes (.nii/.nii.gz/.hdr) and 2D slices (.png/.jpg). Pass a "
                            "folder of one kind.")
        splits = split_volumes(root, seed=seed, fractions=fractions, slice_axis=slice_axis, slices=slices,
                               cache_dir=cache_dir, on_bad=on_bad, warn=warn)
        subjects = sum(len(np.unique(split.subjects)) for split in splits.values())
        for s in SPLITS:
            if not len(splits[s]):
                raise DataError(f"empty split: no '{s}' slices from the volumes under {root} ({subjects} usable "
                                "subjects in all; each split needs one). Add volumes or change the split fractions.")
        notes.append(f"{slice_axis} slices of {subjects} subjects' volumes, split "
                     f"{fractions[0]:.0%}/{fractions[1]:.0%}/{fractions[2]:.0%} by subject with seed {seed}")
        return DataSource("volumes", root, splits, [], notes)
    else:
        kind = "folder"
        predefined = _match_split_dirs(root)
        if predefined:
            files = {s: list_images(d) for s, d in predefined.items()}
            class_roots = {s: predefined[s] for s in predefined}
            all_classes = sorted({class_of(p, class_roots[s]) for s in files for p in files[s]})
            class_names = all_classes if len(all_classes) > 1 else []
            splits = {}
            for s, paths in files.items():
                labels = [class_names.index(class_of(p, class_roots[s])) if class_names else -1 for p in paths]
                splits[s] = make_split(paths, labels)
            for missing in [m for m in ("validate", "test") if m not in splits]:  # carve it out of train
                share = fractions[SPLITS.index(missing)] / (fractions[0] + fractions[SPLITS.index(missing)])
                shares = (1 - share, share, 0.0) if missing == "validate" else (1 - share, 0.0, share)
                carved, _ = split_files(splits["train"].paths, root=class_roots["train"], seed=seed,
                                        fractions=shares, class_names=class_names)
                splits["train"], splits[missing] = carved["train"], carved[missing]
            notes.append("used the folder's own " + "/".join(d.name for d in predefined.values())
                         + " split")
        else:
            paths = list_images(root)
            if not paths:
                raise DataError(
                    f"no images found: {root} holds no .png/.jpg/.jpeg files (searched recursively). "
                    "Point --data at the folder with the slices."
                )
            splits, class_names = split_files(paths, root=root, seed=seed, fractions=fractions)
            has_subjects = any((s.subjects >= 0).any() for s in splits.values())
            notes.append(f"split {len(paths)} files {fractions[0]:.0%}/{fractions[1]:.0%}/{fractions[2]:.0%} "
                         f"with seed {seed}, " + ("by subject" if has_subjects else "by file (no subject ids in names)"))
        for s in SPLITS:
            if not len(splits[s]):
                raise DataError(
                    f"empty split: no '{s}' images under {root} ({len(sum((x.paths for x in splits.values()), []))} "
                    "files in all). Add more images or change the split fractions."
                )

    for s in SPLITS:
        splits[s], split_notes = check_split(s, splits[s], on_bad=on_bad, warn=warn, cache_dir=cache_dir)
        notes.extend(split_notes)
        if not len(splits[s]):
            raise DataError(f"empty split: every '{s}' file under {root} was bad. Fix or replace the files.")
    return DataSource(kind, root, splits, class_names, notes)


# ---------------------------------------------------------------------------
# The tf.data pipeline
# ---------------------------------------------------------------------------


def decode_image(contents):
    """Decodes PNG (8- or 16-bit) or JPEG bytes to grayscale float32 in [0, 1].

    Colour and alpha are converted to one gray channel by the decoder.

    Args:
        contents: a scalar string tensor of file bytes.

    Returns:
        A float32 tensor of shape (height, width, 1).
    """
    def jpeg():
        return tf.cast(tf.io.decode_jpeg(contents, channels=1), tf.float32) / 255.0

    def png():
        return tf.cast(tf.io.decode_png(contents, channels=1, dtype=tf.uint16), tf.float32) / 65535.0

    return tf.cond(tf.io.is_jpeg(contents), jpeg, png)


def _read_reference(name):
    return volumes.read_slice(name.decode())


def load_image(path):
    """One slice as the pipeline reads it, before fitting: float32 (H, W, 1) in [0, 1], as NumPy.

    Args:
        path: a PNG/JPEG file, or a volume slice reference (`volume.nii.gz#axial=87`).
    """
    if volumes.is_reference(path):
        return volumes.read_slice(path)
    return decode_image(tf.io.read_file(str(path))).numpy()


def image_shape(path):
    """`(height, width)` of a slice from its header alone (PNG/JPEG file or volume slice reference)."""
    if volumes.is_reference(path):
        return volumes.slice_shape(path)
    info = inspect_image(path)
    return info.height, info.width


def item_name(path):
    """A file-name stem for a slice: the image file's stem, or `volume_axial087` for a volume slice."""
    return volumes.slice_name(path) if volumes.is_reference(path) else Path(path).stem


def fit_image(image, size, fit="pad"):
    """Fits a (h, w, 1) image to (size, size, 1).

    Args:
        image: float32 tensor (h, w, 1).
        size: the model's square size.
        fit: "pad" shrinks images larger than `size` keeping their aspect
            ratio, then pads to the centre with black (never upsamples);
            "stretch" resizes to size x size ignoring aspect; "crop" scales
            the short side to `size` and crops the centre.

    Returns:
        A float32 tensor (size, size, 1).
    """
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}. Received: fit={fit!r}")
    if fit == "stretch":
        return tf.image.resize(image, (size, size), antialias=True)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    if fit == "pad":
        scale = tf.minimum(1.0, size / tf.reduce_max(hw))
    else:
        scale = size / tf.reduce_min(hw)
    new_hw = tf.maximum(1, tf.cast(tf.round(hw * scale), tf.int32))
    image = tf.cond(
        tf.reduce_all(new_hw == tf.shape(image)[:2]),
        lambda: image,
        lambda: tf.image.resize(image, new_hw, antialias=True),
    )
    image = tf.image.resize_with_crop_or_pad(image, size, size)
    return tf.clip_by_value(image, 0.0, 1.0)


def index_stream(n, batch_size, *, shuffle=False, seed=0, first_epoch=0, repeat=False, drop_remainder=False,
                 with_epoch=False):
    """Indices 0..n-1 epoch after epoch, each epoch a fixed permutation of (seed, epoch) when shuffled.

    Because an epoch's order depends only on (seed, epoch), a run resumed at
    epoch e sees the order an uninterrupted run would. When repeating with
    `drop_remainder`, each epoch contributes only whole batches, so epoch
    boundaries stay aligned with batch boundaries.

    Returns:
        A `tf.data.Dataset` of int64 indices, or of (epoch, index) pairs
        when `with_epoch`.
    """
    per_epoch = (n // batch_size) * batch_size if (repeat and drop_remainder) else n
    if per_epoch == 0:
        raise DataError(f"the split has {n} items, fewer than one batch of {batch_size}. Lower the batch size.")

    def epoch_indices(epoch):
        indices = tf.data.Dataset.range(n)
        if shuffle:
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            indices = indices.map(lambda i: tf.random.experimental.index_shuffle(i, key, n - 1))
        indices = indices.take(per_epoch)
        return indices.map(lambda i: (epoch, i)) if with_epoch else indices

    last_epoch = first_epoch + 1 if not repeat else 2**62
    return tf.data.Dataset.range(first_epoch, last_epoch).flat_map(epoch_indices)


def make_dataset(split, *, image_size=256, batch_size=32, shuffle=False, seed=0, first_epoch=0,
                 repeat=False, fit="pad", with_meta=False, drop_remainder=False, input_context=None, crop=None,
                 crop_step=8):
    """The streaming pipeline: file list -> shuffle -> parallel decode -> fit -> [crop] -> batch -> prefetch.

    Only file names are shuffled and held; pixels are decoded on demand, so
    memory does not grow with the number of files. With `shuffle`, the order
    of epoch `e` is a fixed permutation of (seed, e), so a resumed run sees
    the same order as an uninterrupted one.

    Args:
        split: a `Split`.
        image_size: side of the square images the model sees.
        batch_size: global batch size (divided over replicas when
            `input_context` is given).
        shuffle: shuffle files each epoch.
        seed: seed of the per-epoch shuffle.
        first_epoch: epoch number to start the shuffle sequence at (resume).
        repeat: repeat forever (use `steps_per_epoch` in `fit`).
        fit: how to fit sizes: "pad", "stretch" or "crop" (see `fit_image`).
        with_meta: yield dicts {"image", "subject", "slice", "label"}
            instead of bare image batches.
        drop_remainder: drop the last partial batch.
        input_context: a `tf.distribute.InputContext`; files are sharded
            per input pipeline.
        crop: side of a random square crop taken from each fitted image
            (training on patches: a fully convolutional model takes
            `(image_size / crop)**2` times the steps in the same time), or
            None for whole images. The crop of an image depends only on
            (seed, epoch, image), so a resumed run sees the crops an
            uninterrupted one would.
        crop_step: crops start on multiples of this many pixels (a multiple
            of the model's downsampling keeps its code grid in phase with
            whole images).

    Returns:
        A `tf.data.Dataset` of float32 batches (batch, size, size, 1) in [0, 1]
        (size `crop` when given), or of dicts when `with_meta`.

    Example:
    >>> source = load_source()
    >>> ds = make_dataset(source.splits["train"], image_size=128, batch_size=8)
    >>> next(iter(ds)).shape
    TensorShape([8, 128, 128, 1])
    """
    n = len(split)
    if n == 0:
        raise DataError("cannot build a pipeline over an empty split")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8. Received: image_size={image_size}")
    if crop is not None and not (0 < crop <= image_size and crop % crop_step == 0):
        raise ValueError(f"crop must be a multiple of {crop_step} in (0, image_size={image_size}]. "
                         f"Received: crop={crop}")
    tables = (
        tf.constant(split.paths),
        tf.constant(split.subjects, tf.int32),
        tf.constant(split.slices, tf.int32),
        tf.constant(split.labels, tf.int32),
    )

    ds = index_stream(n, batch_size, shuffle=shuffle, seed=seed, first_epoch=first_epoch, repeat=repeat,
                      drop_remainder=drop_remainder, with_epoch=True)
    items = n
    if input_context is not None and input_context.num_input_pipelines > 1:
        shards, shard = input_context.num_input_pipelines, input_context.input_pipeline_id
        ds = ds.shard(shards, shard)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        items = len(range(shard, n, shards))
    if not repeat:  # let Keras know the length up front
        ds = ds.apply(tf.data.experimental.assert_cardinality(items))

    from_volumes = volumes.is_reference(split.paths[0])

    def load(epoch, i):
        if from_volumes:  # only the one slice is read from its volume
            image = tf.ensure_shape(tf.numpy_function(_read_reference, [tables[0][i]], tf.float32), (None, None, 1))
        else:
            image = decode_image(tf.io.read_file(tables[0][i]))
        image = tf.ensure_shape(fit_image(image, image_size, fit), (image_size, image_size, 1))
        if crop is not None and crop < image_size:
            key = tf.stack([tf.constant(seed, tf.int64), epoch * n + i])
            top, left = tf.unstack(crop_step * tf.random.stateless_uniform(
                (2,), key, minval=0, maxval=(image_size - crop) // crop_step + 1, dtype=tf.int64))
            image = tf.ensure_shape(image[top:top + crop, left:left + crop], (crop, crop, 1))
        if not with_meta:
            return image
        return {"image": image, "subject": tables[1][i], "slice": tables[2][i], "label": tables[3][i]}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def code_dataset(codes, split, batch_size, *, shuffle, seed=0, first_epoch=0, skip=0, repeat=False,
                 drop_condition=0.0):
    """(inputs, targets) batches of code grids with their slice and label, for `fit`.

    With `drop_condition`, each example's slice and label are replaced by
    "unknown" (-1) with that probability (independently, seeded by the
    example's place in the whole stream, so a resumed run drops the same
    ones). `skip` leaves out the first batches (a resumed epoch).
    """
    n = len(codes)
    table = (tf.constant(codes.astype(np.int32)), tf.constant(split.slices, tf.int32),
             tf.constant(split.labels, tf.int32))
    ds = index_stream(n, batch_size, shuffle=shuffle, seed=seed, first_epoch=first_epoch, repeat=repeat,
                              drop_remainder=repeat)
    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(n))

    def example(position, i):
        slice_, label = table[1][i], table[2][i]
        if drop_condition > 0:
            keep = tf.random.stateless_uniform((2,), seed=tf.stack([tf.cast(seed, tf.int64), position])) >= drop_condition
            slice_, label = tf.where(keep[0], slice_, -1), tf.where(keep[1], label, -1)
        return {"codes": table[0][i], "slice": slice_, "label": label}, table[0][i]

    per_epoch = (n // batch_size) * batch_size if repeat else n
    ds = ds.skip(skip * batch_size).enumerate(start=first_epoch * per_epoch + skip * batch_size).map(example)
    return ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def save_figure(fig, path, *, dpi=110):
    """Saves a matplotlib figure as a PNG at `path` atomically (a temporary file, then a rename) and closes it.

    Args:
        fig: the figure.
        path: where the PNG goes; its folder is made if needed.
        dpi: resolution.

    Returns:
        The path, as a `Path`.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def save_grid(images, path, *, titles=None, suptitle=None, columns=8):
    """Saves a grid of grayscale images (N, H, W[, 1]) in [0, 1] as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images)
    n = len(images)
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 1.9 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].squeeze(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[k], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def preview(source, path, *, image_size=256, fit="pad", n_images=32, seed=0):
    """Writes a grid of training images exactly as the pipeline yields them."""
    split = source.splits["train"]
    ds = make_dataset(split, image_size=image_size, batch_size=min(n_images, len(split)),
                      shuffle=True, seed=seed, fit=fit, with_meta=True)
    batch = next(iter(ds))
    titles = []
    for subject, slice_, label in zip(batch["subject"].numpy(), batch["slice"].numpy(), batch["label"].numpy()):
        if subject >= 0:
            titles.append(f"case {subject} slice {slice_}")
        elif label >= 0:
            titles.append(source.class_names[label])
        else:
            titles.append("")
    counts = source.counts()
    suptitle = (f"{source.kind}: train {counts['train']} / validate {counts['validate']} / "
                f"test {counts['test']}, shown at {image_size}x{image_size} ({fit})")
    return save_grid(batch["image"].numpy(), path, titles=titles, suptitle=suptitle)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Inspect the slices the models will see: resolve the data, check every file, "
                    "report counts per split, and optionally draw a preview grid.")
    parser.add_argument("--data", default=None,
                        help="folder with the OASIS keras_png_slices_* folders (any nesting), any folder of "
                             "PNG/JPEG slices, or a folder of NIfTI/Analyze volumes (sliced, split by subject). "
                             "Default: data/keras_png_slices_data if present, else the built-in synthetic brain "
                             "phantoms.")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images (default 256)")
    parser.add_argument("--fit", choices=FIT_MODES, default="pad",
                        help="how other sizes are fitted: pad (shrink if larger, keep aspect, pad to centre; "
                             "default), stretch, or crop (fill, then centre-crop)")
    parser.add_argument("--preview", metavar="FILE.png", default=None,
                        help="write a grid of training images as the pipeline yields them")
    parser.add_argument("--n-preview", type=int, default=32, help="images in the preview grid (default 32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split (generic folders) and of the shuffle (default 0)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out unreadable or corrupt files with a warning naming each, instead of stopping")
    parser.add_argument("--slice-axis", choices=volumes.SLICE_AXES, default="axial",
                        help="volume data (.nii, .nii.gz, Analyze .hdr/.img): the axis the volumes are sliced across, "
                             "found from each volume's affine (default axial)")
    parser.add_argument("--slices", default=None,
                        help="volume data: the slices kept, LO:HI (along the axis, from the left, posterior or "
                             "inferior end) or a fraction (the central part of the non-empty slices); default: the "
                             "non-empty slices")
    parser.add_argument("--cache-dir", default=None,
                        help="where the phantoms are written and the lists of checked files and volumes are kept "
                             "(default $BRAIN_VQVAE_CACHE or ~/.cache/brain-vqvae)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line last on stdout")
    args = parser.parse_args(argv)

    try:
        source = load_source(args.data, seed=args.seed, on_bad="skip" if args.skip_bad else "error",
                             cache_dir=args.cache_dir, slice_axis=args.slice_axis, slices=args.slices)
        summary = source.summary()
        summary["image_size"] = args.image_size
        if args.preview:
            summary["preview"] = str(preview(source, args.preview, image_size=args.image_size, fit=args.fit,
                                             n_images=args.n_preview, seed=args.seed))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in summary["notes"]:
        print(f"note: {note}")
    subjects = summary["subjects"]
    per_split = ", ".join(
        f"{s} {summary[s]}" + (f" ({subjects[s]} subjects)" if subjects[s] else "") for s in SPLITS)
    line = f"{summary['source']} data at {summary['root']}: {per_split}"
    if args.preview:
        line += f"; preview written to {summary['preview']}"
    print(line)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
