"""Image folders, ImageFolder style: ``data_path/train/<class>/*.png|jpg|...`` and
``data_path/test/<class>/...`` (or ``val/``).

Class names are the train class folders, sorted. Mean/std are computed from the train split's pixels
(exact integer histograms, :func:`atom_fast.distill.store.channel_histogram`), so the in-memory
loader and a prepared store agree. Files without an image extension (see :data:`IMAGE_EXTENSIONS`)
are skipped and counted in the log; a file with one that Pillow cannot decode is an error. Hidden
files and folders are ignored. ``train/`` needs at least two classes, each with an image; the test
split must hold images, and every train class must have test images (else an error, or with
``allow_missing_test_classes=True`` a warning and :attr:`Dataset.missing_test_classes`). Images are
single-channel when every train image is (mode L or 1), else RGB; they must all have the size of the
first train image unless ``image_size`` resizes them (bilinear) to ``image_size x image_size``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from atom_fast.distill.data.common import (DatasetFileError, DatasetNotFoundError, Log, Source,
                                           SourceInfo)
from atom_fast.distill.data.images import IMAGE_EXTENSIONS, decode_chunk, header_chunk


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
    """Per-channel mean and (population) std of ``(N, C, H, W)`` uint8 pixels, in [0, 1] units,
    from exact histograms: the values a store prepared from the same pixels records."""
    from atom_fast.distill.store import channel_histogram, stats_from_histogram

    return stats_from_histogram(channel_histogram(pixels))


class FolderSource(Source):
    """An image folder: listed and checked at once; the train images' headers are read on first use
    (they decide the channel count and size), the pixels batch by batch."""

    normalization = None  # from the train pixels

    def __init__(self, path: Path, class_names: List[str], train: _FolderSplit, test: _FolderSplit,
                 missing: List[str], image_size: Optional[int], workers: Optional[int]):
        super().__init__("folder", path, train.paths + test.paths, workers=workers,
                         description="image folder (train/<class>/, test/<class>/ or val/<class>/)")
        self._names, self._train, self._test, self._missing = class_names, train, test, missing
        self._image_size = image_size
        self._mode, self._size = "RGB", (0, 0)

    def _scan(self) -> SourceInfo:
        # single-channel only if every train image is; opening reads just the header
        paths = self._train.paths
        headers = list(itertools.chain.from_iterable(self.pool.map(header_chunk, paths, 0)))
        self._mode = "L" if all(m in ("L", "1") for m, _ in headers) else "RGB"
        image_size = self._image_size
        self._size = (image_size, image_size) if image_size is not None else headers[0][1]
        C = 1 if self._mode == "L" else 3
        return SourceInfo(
            class_names=list(self._names), image_shape=(C, self._size[1], self._size[0]),
            labels={"train": np.asarray(self._train.labels, dtype=np.int64),
                    "test": np.asarray(self._test.labels, dtype=np.int64)},
            missing_test_classes=list(self._missing))

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        paths = (self._train if split == "train" else self._test).paths
        C, H, W = self.image_shape
        yield from self.pool.map(decode_chunk, paths, C * H * W, self._mode, self._size,
                                 self._image_size is not None)


def make_source(path: Path, *, image_size: Optional[int] = None, log: Optional[Log] = None,
                workers: Optional[int] = None, allow_missing_test_classes: bool = False) -> FolderSource:
    """List and check the image folder at ``path`` (see the module docstring)."""
    log = log or (lambda s: None)
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
        warnings.warn(f"{msg}: the reported accuracy covers the other classes only", stacklevel=4)
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
    return FolderSource(path, class_names, train, test, missing, image_size, workers)
