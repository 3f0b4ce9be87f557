"""Argument checks, opening a registered dataset's :class:`Source`, and :func:`load_dataset`: a
source's batches concatenated and normalized into one in-memory :class:`Dataset`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple

from atom_fast.distill.data.common import (DatasetNotFoundError, Dataset, Log, PathArg, Source,
                                           _make_dataset, reading)
from atom_fast.distill.data.registry import ALL_DATASETS, FORMATS, Format

_logger = logging.getLogger("atom_fast.distill.data")


def check_arguments(
    name, data_path, image_size, log, allow_missing_test_classes
) -> Tuple[Format, Optional[Path], Log]:
    """Check what :func:`load_dataset` and ``prepare`` are given, before any file is looked for:
    the format entry, ``data_path`` as an expanded ``Path`` (or None), and the ``log`` to use."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    if name not in FORMATS:
        raise ValueError(f"dataset must be one of {ALL_DATASETS}, got {name!r}")
    fmt = FORMATS[name]
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
        native = fmt.native_size
        if native is not None and image_size != native:
            raise ValueError(
                f"image_size={image_size} is not supported for dataset {name!r}: its images are "
                f"{native}x{native} and are not resized (image_size only resizes 'folder' datasets)"
            )
    path = None if data_path is None else Path(os.fspath(data_path)).expanduser()
    if fmt.requires_data_path and path is None:
        raise ValueError(f"data_path is required for dataset {name!r} ({fmt.requires_data_path})")
    if path is not None:
        _check_data_path(fmt, path)
    return fmt, path, (log if log is not None else _logger.info)


def _check_data_path(fmt: Format, path: Path) -> None:
    """A given ``data_path`` must be an existing folder: say so before looking for any file in it."""
    if not path.exists():
        raise DatasetNotFoundError(
            f"{fmt.name}: data_path {path} does not exist; pass the folder that holds {fmt.expects}"
        )
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{fmt.name}: data_path {path} is a file, not a folder (extract archives first); pass the "
            f"folder that holds {fmt.expects}"
        )


def open_source(
    name: str,
    data_path: Optional[PathArg] = None,
    *,
    image_size: Optional[int] = None,
    log: Optional[Log] = None,
    allow_missing_test_classes: bool = False,
    workers: Optional[int] = None,
) -> Source:
    """The :class:`Source` of dataset ``name`` read from ``data_path`` (its files found and listed,
    nothing decoded yet). ``workers``: None decodes image files in threads of this process; a
    number, in that many worker processes. Close it (or use it in a ``with``) to stop them.
    Raises as :func:`load_dataset` does."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    fmt, path, log = check_arguments(name, data_path, image_size, log, allow_missing_test_classes)
    with reading(name, path):
        return fmt.make_source(path, image_size=image_size, log=log, workers=workers,
                               allow_missing_test_classes=allow_missing_test_classes)


def load_dataset(
    name: str,
    data_path: Optional[PathArg] = None,
    *,
    image_size: Optional[int] = None,
    log: Optional[Log] = None,
    allow_missing_test_classes: bool = False,
) -> Dataset:
    """Load dataset ``name`` (a registered name, see :data:`ALL_DATASETS`) from ``data_path`` into
    memory; the package docstring lists the formats.

    ``image_size`` resizes ``folder`` images to ``image_size x image_size``; for the other datasets
    it may only equal their native size. ``log`` receives one-line progress notes (which cache is
    used or rebuilt, skipped files); by default they go to the ``logging`` logger of this package at
    INFO level. ``allow_missing_test_classes`` turns a class without test images from an error into
    a warning recorded in :attr:`Dataset.missing_test_classes`.

    Raises :class:`DatasetNotFoundError` when the files are missing, :class:`DatasetFileError` (a
    ``ValueError``) when they are corrupt or unusable, ``ValueError`` on bad argument values and
    ``TypeError`` on wrongly typed ones.
    """
    fmt, path, log = check_arguments(name, data_path, image_size, log, allow_missing_test_classes)
    with reading(name, path):
        with fmt.make_source(path, image_size=image_size, log=log, workers=None,
                             allow_missing_test_classes=allow_missing_test_classes) as source:
            pixels = source.read_all()
            if source.normalization is not None:
                mean, std = source.normalization
            else:
                from atom_fast.distill.data.folder import _channel_stats

                mean, std = _channel_stats(pixels["train"])
            return _make_dataset(
                name,
                (pixels["train"], source.labels("train")),
                (pixels["test"], source.labels("test")),
                source.class_names,
                mean,
                std,
                source.source,
                source.missing_test_classes,
            )
