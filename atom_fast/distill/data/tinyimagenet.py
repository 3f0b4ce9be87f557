"""TinyImageNet: ``tiny-imagenet-200/`` as extracted from http://cs231n.stanford.edu/tiny-imagenet-200.zip.

It holds ``wnids.txt`` (the 200 class ids, in class-index order), ``words.txt`` (their names),
``train/<wnid>/images/*.JPEG`` and ``val/images`` + ``val/val_annotations.txt`` (val is the test
split). 100000 / 10000 images, 3x64x64. ``data_path`` may be ``tiny-imagenet-200/`` or its parent;
without it ``./data`` and ``.`` are searched.

The in-memory loader caches the decoded pixels in ``tiny-imagenet-200/atom_fast_cache.npz`` (about
1.4 GB, uncompressed so it loads fast) when that folder is writable. The cache stores the
fingerprint of the files it was built from (relative name, size and modification time of
``wnids.txt``, ``val/val_annotations.txt`` and every image): when an image is changed, added or
removed it is rebuilt. Every use or rebuild is logged with the cache's path; delete the file to
force a rebuild. ``atom-fast prepare`` does not use it: it decodes into a store, which serves the
same purpose for distilling at scale.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from atom_fast.distill.data.common import (DatasetFileError, DatasetNotFoundError, Log, Source,
                                           SourceInfo, _find_dataset_dir, _read_text, fingerprint_files,
                                           patchable)
from atom_fast.distill.data.images import _decode_all, decode_chunk

TINY_MEAN, TINY_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

TINY_CACHE_NAME = "atom_fast_cache.npz"
# 2: keyed on a hash of the source files' listing (1 checked only wnids.txt's date)
_TINY_CACHE_VERSION = 2
_TINY_FIX = f"TinyImageNet images are 64x64: re-extract {TINY_URL}, or remove it"


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
    """:func:`fingerprint_files` of the lists and every image; a listed image that is gone is named."""

    def missing(p: Path) -> Exception:
        return DatasetNotFoundError(
            f"tinyimagenet: {p} not found (listed in {files.lists[1]}, or removed while loading); "
            f"re-extract {TINY_URL}"
        )

    return fingerprint_files(root, files.lists + files.train_paths + files.test_paths, missing)


def _tiny_decode(files: _TinyFiles) -> Dict[str, np.ndarray]:
    return {
        "train_images": _decode_all(files.train_paths, "RGB", (64, 64), False, _TINY_FIX),
        "test_images": _decode_all(files.test_paths, "RGB", (64, 64), False, _TINY_FIX),
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
        warnings.warn(f"could not write the TinyImageNet cache {cache}: {e}", stacklevel=4)
        try:
            tmp.unlink()
        except OSError:
            pass
        return False


class TinySource(Source):
    """A ``tiny-imagenet-200/`` folder: the listing is read at once, images decoded batch by batch."""

    normalization = (TINY_MEAN, TINY_STD)

    def __init__(self, root: Path, wnids: List[str], class_names: List[str], files: _TinyFiles,
                 log: Log, workers: Optional[int]):
        super().__init__("tinyimagenet", root, files.lists + files.train_paths + files.test_paths,
                         description="TinyImageNet (tiny-imagenet-200/: wnids.txt, train/, val/)",
                         workers=workers)
        self._wnids, self._names, self._files, self._log = wnids, class_names, files, log

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _tiny_fingerprint(self.root, self._files)
        return self._fingerprint

    def _scan(self) -> SourceInfo:
        f = self._files
        return SourceInfo(
            class_names=list(self._names), image_shape=(3, 64, 64),
            labels={"train": np.asarray(f.train_labels, dtype=np.int64),
                    "test": np.asarray(f.test_labels, dtype=np.int64)})

    def _batches(self, split: str) -> Iterator[np.ndarray]:
        paths = self._files.train_paths if split == "train" else self._files.test_paths
        yield from self.pool.map(decode_chunk, paths, 3 * 64 * 64, "RGB", (64, 64), False, _TINY_FIX)

    def read_all(self) -> Dict[str, np.ndarray]:
        """Both splits, from the decoded-pixel cache when it matches the files, else decoded (and the
        cache written); see the module docstring."""
        root, files, wnids, log = self.root, self._files, self._wnids, self._log
        fingerprint = self.fingerprint()
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
            arrays = patchable("_tiny_decode")(files)
            if not patchable("_dir_writable")(root):
                log(f"tinyimagenet: {root} is not writable, so the decoded pixels are not cached")
            elif _tiny_write_cache(cache, wnids, fingerprint, arrays):
                log(f"tinyimagenet: wrote the decoded-pixel cache {cache}")
        return {"train": arrays["train_images"], "test": arrays["test_images"]}


def make_source(path: Optional[Path], *, image_size: Optional[int] = None, log: Optional[Log] = None,
                workers: Optional[int] = None, allow_missing_test_classes: bool = False) -> TinySource:
    """Find ``tiny-imagenet-200/``, read its class list and file listing, return its :class:`TinySource`."""
    root, tried = _find_dataset_dir(path, "tiny-imagenet-200", ["wnids.txt"])
    if root is None:
        raise DatasetNotFoundError(
            f"tinyimagenet: tiny-imagenet-200/ (wnids.txt, train/, val/) not found (looked in: "
            f"{', '.join(map(str, tried))}). Download and extract {TINY_URL} and pass --data-path to "
            f"the extracted tiny-imagenet-200/ folder or its parent."
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
    files = patchable("_tiny_files")(root, wnids)
    return TinySource(root, wnids, class_names, files, log or (lambda s: None), workers)
