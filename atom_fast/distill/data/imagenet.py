"""Downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter, 2017): ImageNet-1K at 64x64, 32x32 or
16x16 pixels, as the ``.npz`` batches distributed at https://image-net.org/download-images.php.

``data_path`` is the folder holding the extracted files, all in it:

* ``train_data_batch_1.npz`` ... ``train_data_batch_10.npz`` -- the training split. Every present
  ``train_data_batch_<n>.npz`` is read, in numeric order of ``n``; a subset (say batches 1-5, one of
  the two train archives) is accepted and logged with the numbers used, none at all is an error.
* ``val_data.npz`` -- the validation split, used as the test split (required).
* ``map_clsloc.txt`` -- optional: lines ``<wnid> <class id> <name>`` (the ILSVRC devkit's list);
  it fixes the number of classes and names them. Without it the classes are named
  ``class_0000``, ... and their number is the largest class id in the files.

Each batch holds ``data``, ``(N, 3*S*S)`` uint8 rows in channel-major order (all R, then G, then B,
each S x S row-major, like CIFAR: a row reshapes to ``(3, S, S)``), and ``labels``, ``(N,)`` class
ids from 1 (made 0-based here); the train batches also carry ``mean``, which is not used. Real batch
files are about 1.5 GB (64x64), so ``data`` is never loaded whole: its ``.npy`` header is read from
the zip member and its rows are streamed in chunks of at most :data:`CHUNK_BYTES`, whether the member
is stored or deflated. Labels are small and read whole. Every file is checked (the arrays present,
their shapes and dtypes, class ids in ``1..K``, every class in the training split, one image size
across files) with a one-line :class:`DatasetFileError` naming the file.

Normalization: the ImageNet constants (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). 1281167 train
/ 50000 val images, 1000 classes.
"""

from __future__ import annotations

import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from atom_fast.distill.data.common import (DatasetFileError, DatasetNotFoundError, Log, Source,
                                           SourceInfo, _read_text)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_URL = "https://image-net.org/download-images.php"
IMAGENET_SIZES = (64, 32, 16)
MAP_FILE = "map_clsloc.txt"
VAL_FILE = "val_data.npz"
_TRAIN_RE = re.compile(r"^train_data_batch_(\d+)\.npz$")

# the rows of one chunk read from a data member hold at most this many bytes
CHUNK_BYTES = 64 << 20


@dataclass
class _Batch:
    """One checked ``.npz`` batch file."""

    path: Path
    n: int
    size: int  # S
    labels: np.ndarray  # (n,) int64, 0-based


def _fix(size: int) -> str:
    return f"download the {size}x{size} npz files again from {IMAGENET_URL}"


def _npy_header(f, path: Path, key: str, size: int) -> Tuple[Tuple[int, ...], np.dtype, bool]:
    """Read the ``.npy`` header of member ``key`` from its stream ``f``: ``(shape, dtype, fortran)``."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif major == 2:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DatasetFileError(f"{path}: {key!r} is a .npy of format version {major}, which this "
                               f"reader does not read; {_fix(size)}")
    return tuple(shape), dtype, fortran


def _open_member(zf: zipfile.ZipFile, path: Path, key: str, size: int):
    """The stream of ``key.npy`` in ``zf`` (positioned after its header), its shape and dtype."""
    try:
        info = zf.getinfo(f"{key}.npy")
    except KeyError:
        held = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        raise DatasetFileError(f"{path}: no {key!r} array (it holds {held}); is it a downsampled-"
                               f"ImageNet batch file? {_fix(size)}") from None
    f = zf.open(info)
    shape, dtype, fortran = _npy_header(f, path, key, size)
    if fortran:
        f.close()
        raise DatasetFileError(f"{path}: {key!r} is Fortran-ordered; {_fix(size)}")
    return f, shape, dtype


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError)


def _read_batch(path: Path, size: int, split: str) -> _Batch:
    """Check one batch file and read its labels (its pixels stay on disk)."""
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape, dtype = _open_member(zf, path, "data", size)
            f.close()
            g, lshape, ldtype = _open_member(zf, path, "labels", size)
            with g:
                if not np.issubdtype(ldtype, np.integer) or len(lshape) != 1:
                    raise DatasetFileError(f"{path}: labels must be (N,) integers, got {ldtype} "
                                           f"{lshape}; {_fix(size)}")
                count = int(lshape[0])
                raw = g.read(count * ldtype.itemsize)
                if len(raw) != count * ldtype.itemsize:
                    raise DatasetFileError(f"{path}: the labels array is truncated; {_fix(size)}")
                labels = np.frombuffer(raw, dtype=ldtype).astype(np.int64)
    except DatasetFileError:
        raise
    except _ZIP_ERRORS as e:
        raise DatasetFileError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); "
                               f"{_fix(size)}") from None
    if dtype != np.uint8 or len(shape) != 2:
        raise DatasetFileError(f"{path}: data must be (N, 3*S*S) uint8 rows, got {dtype} {shape}; "
                               f"{_fix(size)}")
    n, row = shape
    side = int(round((row / 3) ** 0.5))
    if 3 * side * side != row:
        raise DatasetFileError(f"{path}: data rows of {row} values are not 3 x S x S images; "
                               f"{_fix(size)}")
    if side != size:
        other = f"use dataset imagenet{side} for it, or " if side in IMAGENET_SIZES else ""
        raise DatasetFileError(
            f"{path} holds {side}x{side} images (rows of {row} values), imagenet{size} needs "
            f"{size}x{size} (rows of {3 * size * size}); {other}{_fix(size)}")
    if labels.shape != (n,):
        raise DatasetFileError(f"{path}: {n} images but {labels.shape[0]} labels; {_fix(size)}")
    if n == 0:
        raise DatasetFileError(f"{path}: the {split} batch holds no images; {_fix(size)}")
    if labels.min() < 1:
        raise DatasetFileError(f"{path}: class id {labels.min()} below 1 (class ids start at 1 in "
                               f"these files); {_fix(size)}")
    return _Batch(path, n, side, labels - 1)


def _read_rows(path: Path, size: int, chunk_rows: int) -> Iterator[np.ndarray]:
    """The images of ``path``'s ``data`` member, ``(k, 3, S, S)`` uint8, ``chunk_rows`` at a time;
    never more than one chunk is in memory."""
    row = 3 * size * size
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape, _ = _open_member(zf, path, "data", size)
            with f:
                left = int(shape[0])
                while left:
                    k = min(chunk_rows, left)
                    buf = np.empty((k, row), dtype=np.uint8)
                    view = memoryview(buf).cast("B")
                    at = 0
                    while at < len(view):
                        got = f.readinto(view[at:])
                        if not got:
                            raise DatasetFileError(f"{path}: the data array is truncated "
                                                   f"({int(shape[0]) - left + at // row} of "
                                                   f"{shape[0]} rows read); {_fix(size)}")
                        at += got
                    left -= k
                    yield buf.reshape(k, 3, size, size)
    except DatasetFileError:
        raise
    except _ZIP_ERRORS as e:
        raise DatasetFileError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); "
                               f"{_fix(size)}") from None


def _class_map(path: Path) -> List[str]:
    """Class names from a ``map_clsloc.txt``: ``<wnid> <id> <name>`` per line, ids 1..K."""
    names = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1 or int(fields[1]) in names:
            raise DatasetFileError(f"{path}:{lineno}: expected '<wnid> <class id from 1> <name>' with "
                                   f"a new class id, got {line!r}")
        names[int(fields[1])] = " ".join(fields[2:]) or fields[0]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DatasetFileError(f"{path}: class ids must be 1..{len(names)}, each once")
    return [names[i] for i in range(1, len(names) + 1)]


class ImageNetSource(Source):
    """The ``.npz`` batches of one downsampled-ImageNet folder; see the module docstring."""

    normalization = (IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, path: Path, size: int, train: List[Path], val: Path, class_map: Optional[Path],
                 log: Log, allow_missing_test_classes: bool, workers: Optional[int]):
        files = train + [val] + ([class_map] if class_map is not None else [])
        numbers = [int(_TRAIN_RE.match(p.name).group(1)) for p in train]
        super().__init__(f"imagenet{size}", path, files, workers=workers,
                         description=f"downsampled ImageNet {size}x{size} (npz: train batches "
                                     f"{_ranges(numbers)}, {VAL_FILE})")
        self.size, self._train, self._val, self._map = size, train, val, class_map
        self._log, self._allow_missing = log, allow_missing_test_classes
        self._batch_files = {}

    def _scan(self) -> SourceInfo:
        size = self.size
        numbers = [int(_TRAIN_RE.match(p.name).group(1)) for p in self._train]
        if numbers != list(range(1, 11)):
            self._log(f"{self.name}: reading train batches {_ranges(numbers)} of {self.root} (the "
                      f"full set has batches 1-10)")
        train = [_read_batch(p, size, "train") for p in self._train]
        val = _read_batch(self._val, size, "validation")
        if self._map is not None:
            names = _class_map(self._map)
            K = len(names)
            for b in train + [val]:
                if b.labels.max() >= K:
                    raise DatasetFileError(f"{b.path}: class id {b.labels.max() + 1} above the {K} "
                                           f"classes of {self._map}; {_fix(size)}")
        else:
            K = max(int(b.labels.max()) + 1 for b in train + [val])
            names = [f"class_{k:04d}" for k in range(K)]
        labels = {"train": np.concatenate([b.labels for b in train]), "test": val.labels}
        absent = np.flatnonzero(np.bincount(labels["train"], minlength=K) == 0)
        if absent.size:
            raise DatasetFileError(
                f"{self.name}: class ids {(absent[:5] + 1).tolist()} have no image in the train "
                f"batches of {self.root} ({len(absent)} of {K} classes); a partial copy? "
                f"{_fix(size)}")
        untested = np.flatnonzero(np.bincount(labels["test"], minlength=K) == 0)
        missing = [names[k] for k in untested]
        if missing:
            msg = (f"{self.name}: {len(missing)} classes have no image in {self._val} (e.g. "
                   f"{missing[:3]}), so their test accuracy cannot be measured")
            if not self._allow_missing:
                raise DatasetFileError(f"{msg}; {_fix(size)} (allow_missing_test_classes=True "
                                       f"scores the others)")
            warnings.warn(f"{msg}: the reported accuracy covers the other classes only", stacklevel=4)
            self._log(f"warning: {msg}")
        self._batch_files = {"train": train, "test": [val]}
        return SourceInfo(class_names=names, image_shape=(3, size, size), labels=labels,
                          missing_test_classes=missing)

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        rows = max(1, CHUNK_BYTES // (3 * self.size * self.size))
        for b in self._batch_files[split]:
            yield from _read_rows(b.path, self.size, rows)


def _ranges(numbers: List[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def make_source(path: Path, *, size: int, image_size: Optional[int] = None, log: Optional[Log] = None,
                workers: Optional[int] = None, allow_missing_test_classes: bool = False) -> ImageNetSource:
    """Find the batch files of downsampled ImageNet at ``size`` in ``path`` (see the module docstring)."""
    log = log or (lambda s: None)
    found = []
    for p in path.iterdir():
        m = _TRAIN_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    found.sort()
    val = path / VAL_FILE
    where = (f"from {IMAGENET_URL} (Downsampled ImageNet {size}x{size}, npz format), extracted into "
             f"{path}")
    if not found:
        raise DatasetNotFoundError(
            f"imagenet{size}: no train_data_batch_<n>.npz in {path}; download the train batches "
            f"{where}")
    if not val.is_file():
        raise DatasetNotFoundError(f"imagenet{size}: {val} not found; download the validation data "
                                   f"{where}")
    class_map = path / MAP_FILE if (path / MAP_FILE).is_file() else None
    return ImageNetSource(path, size, [p for _, p in found], val, class_map, log,
                          allow_missing_test_classes, workers)
