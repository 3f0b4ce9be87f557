"""CIFAR-10 and CIFAR-100: the pickled python batches.

* ``cifar10`` -- ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
  from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz. 50000 / 10000, 3x32x32.
* ``cifar100`` -- ``cifar-100-python/`` (``train``, ``test``, ``meta``; fine labels) from
  https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz. 50000 / 10000, 3x32x32.

``data_path`` may be the dataset folder itself or its parent; without it ``./data`` and ``.`` are
searched. The files are Python pickles: only load copies you downloaded from the address above.
Each 3072-byte row is the R, G and B planes in turn, each 32x32 row-major: already CHW.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

from atom_fast.distill.data.common import (DatasetFileError, DatasetNotFoundError, Log, Source,
                                           SourceInfo, _find_dataset_dir, _fmt_paths, batch_rows)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


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
    """One pickled batch -> ``(n, 3, 32, 32)`` uint8 images and ``(n,)`` labels."""
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


class CifarSource(Source):
    """The batches of one CIFAR folder. The pickles hold pixels and labels together, so the first
    use reads and checks them all (180 MB at most); batches are slices."""

    def __init__(self, name: str, root: Path, train_files: List[str], test_file: str, meta_file: str,
                 label_key: str, names_key: str, url: str, workers: Optional[int]):
        files = [root / f for f in train_files + [test_file, meta_file]]
        title = "CIFAR-100" if name == "cifar100" else "CIFAR-10"
        super().__init__(name, root, files, workers=workers,
                         description=f"{title} python batches ({root.name}/: "
                                     f"{', '.join(train_files + [test_file, meta_file])})")
        self.normalization = (CIFAR100_MEAN, CIFAR100_STD) if name == "cifar100" else (CIFAR10_MEAN, CIFAR10_STD)
        self._train_files, self._test_file, self._meta_file = train_files, test_file, meta_file
        self._label_key, self._names_key = label_key, names_key
        self._fix = f"; download and extract {url} again"
        self._images = {}

    def _scan(self) -> SourceInfo:
        root, fix, name = self.root, self._fix, self.name
        train = [_cifar_batch(root / f, self._label_key, fix) for f in self._train_files]
        test = _cifar_batch(root / self._test_file, self._label_key, fix)
        meta = root / self._meta_file
        raw_names = _pickle_get(_unpickle(meta, fix), self._names_key, meta, fix)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
        labels = {"train": np.concatenate([t[1] for t in train]), "test": test[1]}
        for split in ("train", "test"):
            if labels[split].size == 0:
                raise DatasetFileError(f"{name}: the {split} split in {root} holds no images{fix}")
            if labels[split].min() < 0 or labels[split].max() >= len(names):
                raise DatasetFileError(
                    f"{name} {split} labels outside [0, {len(names)}) (from {root}; {self._meta_file} "
                    f"names {len(names)} classes){fix}"
                )
        self._images = {"train": [t[0] for t in train], "test": [test[0]]}
        return SourceInfo(class_names=names, image_shape=(3, 32, 32), labels=labels)

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        step = batch_rows(3072)
        for images in self._images[split]:
            for i in range(0, len(images), step):
                yield images[i:i + step]


def make_source(path: Optional[Path], *, cifar100: bool, image_size: Optional[int] = None,
                log: Optional[Log] = None, workers: Optional[int] = None,
                allow_missing_test_classes: bool = False) -> CifarSource:
    """Find the CIFAR folder (see the module docstring) and return its :class:`CifarSource`."""
    if cifar100:
        folder, train_files, test_file, meta_file = "cifar-100-python", ["train"], "test", "meta"
        label_key, names_key, url, name = "fine_labels", "fine_label_names", CIFAR100_URL, "cifar100"
    else:
        folder, test_file, meta_file = "cifar-10-batches-py", "test_batch", "batches.meta"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        label_key, names_key, url, name = "labels", "label_names", CIFAR10_URL, "cifar10"
    needed = train_files + [test_file, meta_file]

    root, tried = _find_dataset_dir(path, folder, needed)
    missing = [] if root is None else [f for f in needed if not (root / f).is_file()]
    if root is None or missing:
        what = f"{folder}/ ({', '.join(needed)})" if root is None else f"{', '.join(missing)} in {root}"
        raise DatasetNotFoundError(
            f"{name}: {what} not found (looked in: {_fmt_paths(tried)}). Download and extract "
            f"{url} and pass --data-path to the extracted {folder}/ folder or its parent."
        )
    return CifarSource(name, root, train_files, test_file, meta_file, label_key, names_key, url, workers)
