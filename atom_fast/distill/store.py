"""The prepared image store: a dataset on disk that distilling reads class by class, without decoding.

A store is a folder::

    STORE/manifest.json          what the store holds (below); written last
    STORE/train/00000.npy        class 0's training images, (n_0, C, H, W) uint8, in source order
    STORE/train/00001.npy        ...
    STORE/test/00000.npy         class 0's test images (may hold 0 rows)

One plain ``.npy`` file per split and class: ``numpy.load(path, mmap_mode="r")`` maps it, and a
process maps only the classes it owns, so its memory holds the pages of the images it samples and
nothing of the other classes (mapped pages are the page cache's, not the process's). Copying the
share of one node is copying its classes' files. Any program that writes ``.npy`` files and a JSON
file can write a store; ``docs/store.md`` specifies the format.

``manifest.json`` (format version :data:`FORMAT_VERSION`)::

    format            "atom-fast-store"
    format_version    1
    dataset           the dataset's name (mnist, cifar10, ..., folder, imagenet64)
    class_names       one name per class, in class-index order
    image_shape       [C, H, W]
    dtype             "uint8"
    splits            {"train": {"counts": [n_0, n_1, ...]}, "test": {"counts": [...]}}
    normalization     {"mean": [...], "std": [...]}: per-channel constants in [0, 1] units that the
                      driver applies, (x / 255 - mean) / std (the dataset's conventional ones)
    pixel_mean, pixel_std   per-channel mean and population std of the training split in [0, 1]
                      units, computed while preparing from exact integer histograms
    source            {"path", "description", "fingerprint"}: where the images came from and a
                      SHA-256 fingerprint of the source files (a store of the same source is reused)
    missing_test_classes  class names without test images (image folders only)
    created, atom_fast_version

Opening checks the manifest and, for every file, its existence and size; the classes a process will
read also get their ``.npy`` header checked. Every problem is one :class:`StoreError` line naming the
file and saying to re-run ``atom-fast prepare``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

FORMAT = "atom-fast-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
PathArg = Union[str, "os.PathLike[str]"]


class StoreError(ValueError):
    """A store cannot be used: missing, half-written, of another version, or inconsistent.

    One line naming the file and what to do."""


def class_file(root: Path, split: str, k: int) -> Path:
    """Where class ``k``'s images of ``split`` live in the store at ``root``."""
    return root / split / f"{k:05d}.npy"


def _npy_header(shape: Tuple[int, ...]) -> bytes:
    """The ``.npy`` (version 1.0) header of a C-ordered uint8 array of ``shape``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# channel statistics, exact


def channel_histogram(pixels: np.ndarray) -> np.ndarray:
    """``(C, 256)`` int64 counts of every pixel value per channel of ``(N, C, H, W)`` uint8 pixels.

    Integer counts add up exactly, so statistics from them do not depend on how the images were
    batched or ordered."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise TypeError(f"pixels must be (N, C, H, W) uint8, got {pixels.dtype} {pixels.shape}")
    C = pixels.shape[1]
    out = np.zeros((C, 256), dtype=np.int64)
    for c in range(C):
        out[c] = np.bincount(pixels[:, c].reshape(-1), minlength=256)
    return out


def stats_from_histogram(hist: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and population std in ``[0, 1]`` units from :func:`channel_histogram` counts
    (float64, centred, so no cancellation). A constant channel gets std 1 (left unscaled)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1).astype(np.float64)
    n = np.where(n > 0, n, 1.0)
    mean = (hist * values).sum(axis=1) / n
    var = (hist * np.square(values[None, :] - mean[:, None])).sum(axis=1) / n
    std = np.sqrt(var)
    std = np.where(std > 1e-8, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ------------------------------------------------------------------------------------------------
# writing


class StoreWriter:
    """Writes a store into a temporary folder beside ``out`` and renames it into place on
    :meth:`commit`, so a killed or failed prepare never leaves a folder that reads as a store.
    ``normalization`` is the ``(mean, std)`` the driver will apply, or None for the training split's
    own per-channel statistics (computed while writing).

    ``counts[split]`` gives the images per class of each split, known before any pixel is written
    (from the labels), so each class file is allocated once and filled in place: memory does not
    grow with the dataset. :meth:`write` takes a batch of any classes, in source order; each class's
    images keep the order in which they arrive.
    """

    def __init__(self, out: PathArg, *, dataset: str, class_names: Sequence[str],
                 image_shape: Sequence[int], counts: Dict[str, Sequence[int]],
                 normalization: Optional[Tuple[Sequence[float], Sequence[float]]], source: dict,
                 missing_test_classes: Sequence[str] = ()):
        self.out = Path(os.fspath(out)).expanduser()
        self.class_names = [str(c) for c in class_names]
        K = len(self.class_names)
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        self.row_bytes = int(np.prod(self.image_shape))
        self.counts = {s: [int(n) for n in counts[s]] for s in SPLITS}
        for s in SPLITS:
            if len(self.counts[s]) != K:
                raise ValueError(f"counts[{s!r}] has {len(self.counts[s])} entries for {K} classes")
        self.dataset, self.source = dataset, dict(source)
        # None: normalize with the training split's own statistics (image folders)
        self.normalization = None if normalization is None else (
            [float(m) for m in normalization[0]], [float(v) for v in normalization[1]])
        self.missing_test_classes = list(missing_test_classes)
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self._offsets: Dict[str, List[int]] = {}
        self._filled = {s: [0] * K for s in SPLITS}
        self._hist = np.zeros((self.image_shape[0], 256), dtype=np.int64)
        for s in SPLITS:
            (self.tmp / s).mkdir(parents=True)
            offsets = []
            for k, n in enumerate(self.counts[s]):
                header = _npy_header((n,) + self.image_shape)
                with open(class_file(self.tmp, s, k), "wb") as f:
                    f.write(header)
                    f.truncate(len(header) + n * self.row_bytes)
                offsets.append(len(header))
            self._offsets[s] = offsets

    def write(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Append ``images`` ``(n, C, H, W)`` uint8 with class ``labels`` ``(n,)`` to ``split``."""
        images = np.ascontiguousarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be (n, {', '.join(map(str, self.image_shape))}) uint8, got "
                             f"{images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {labels.shape}")
        if split == "train":
            self._hist += channel_histogram(images)
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        classes, starts = np.unique(sorted_labels, return_index=True)
        ends = list(starts[1:]) + [len(order)]
        for k, s, e in zip(classes.tolist(), starts.tolist(), ends):
            if not 0 <= k < len(self.class_names):
                raise ValueError(f"label {k} outside 0..{len(self.class_names) - 1}")
            at = self._filled[split][k]
            if at + (e - s) > self.counts[split][k]:
                raise ValueError(f"{split} class {k}: more images than the {self.counts[split][k]} counted")
            rows = images[order[s:e]]
            with open(class_file(self.tmp, split, k), "r+b") as f:
                f.seek(self._offsets[split][k] + at * self.row_bytes)
                f.write(rows.tobytes())
            self._filled[split][k] = at + (e - s)

    def commit(self, *, replace: bool = False) -> Path:
        """Check every class is complete, write the manifest, fsync, and rename into place."""
        for s in SPLITS:
            short = [k for k, (a, b) in enumerate(zip(self._filled[s], self.counts[s])) if a != b]
            if short:
                raise ValueError(f"{s} classes {short[:5]} got fewer images than counted")
        pixel_mean, pixel_std = stats_from_histogram(self._hist)
        mean, std = self.normalization or (list(pixel_mean), list(pixel_std))
        from atom_fast import __version__

        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": self.dataset,
            "class_names": self.class_names, "image_shape": list(self.image_shape), "dtype": "uint8",
            "splits": {s: {"counts": self.counts[s]} for s in SPLITS},
            "normalization": {"mean": list(mean), "std": list(std)},
            "pixel_mean": list(pixel_mean), "pixel_std": list(pixel_std),
            "source": self.source, "missing_test_classes": self.missing_test_classes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "atom_fast_version": __version__,
        }
        for s in SPLITS:
            for k in range(len(self.class_names)):
                fd = os.open(class_file(self.tmp, s, k), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if self.out.exists():
            if not replace:
                raise FileExistsError(f"{self.out} exists")
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        """Remove the temporary folder (a failed prepare leaves nothing behind)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# reading


def _raise_nofile_limit(needed: int) -> None:
    """Each mapped class file holds a file descriptor: lift the soft limit toward the hard one when
    a process maps many classes (ImageNet-1K: up to 1000 train files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Store:
    """A prepared store, opened read-only; see the module docstring for the format.

    Class files are mapped lazily, the first time a class is read; :attr:`opened` records which
    ``(split, class)`` pairs this process mapped.
    """

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.class_names: List[str] = list(manifest["class_names"])
        self.image_shape: Tuple[int, int, int] = tuple(int(s) for s in manifest["image_shape"])
        self._arrays: Dict[Tuple[str, int], np.ndarray] = {}
        self.opened: set = set()
        self._checked: set = set()

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return str(self.manifest["dataset"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def mean(self) -> Tuple[float, ...]:
        return tuple(float(m) for m in self.manifest["normalization"]["mean"])

    @property
    def std(self) -> Tuple[float, ...]:
        return tuple(float(s) for s in self.manifest["normalization"]["std"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["source"].get("fingerprint", ""))

    @property
    def missing_test_classes(self) -> List[str]:
        return list(self.manifest.get("missing_test_classes", []))

    def counts(self, split: str) -> List[int]:
        return [int(n) for n in self.manifest["splits"][split]["counts"]]

    def labels(self, split: str) -> torch.Tensor:
        """``(N,)`` int64 labels of ``split`` in store order (class-major)."""
        counts = self.counts(split)
        return torch.arange(len(counts)).repeat_interleave(torch.tensor(counts, dtype=torch.long))

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: PathArg, classes: Optional[Sequence[int]] = None) -> "Store":
        """Open and check the store at ``path``; ``classes`` (default: all) get their headers read."""
        root = Path(os.fspath(path)).expanduser()
        fix = "re-run `atom-fast prepare` to make it"
        if not root.is_dir():
            partial = sorted(root.parent.glob(f".{root.name}.partial-*")) if root.parent.is_dir() else []
            if partial:
                raise StoreError(f"store {root} is not there, only a half-written one ({partial[0]}) "
                                 f"from a prepare that did not finish; {fix}")
            raise StoreError(f"store {root} not found (no such folder); {fix}")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise StoreError(f"{mpath} not found: {root} is not a complete store (a half-written "
                             f"or foreign folder); {fix}")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{mpath} is not readable JSON ({exc}); {fix}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} is not an atom-fast store manifest; {fix}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{mpath}: store format version {version!r}, this atom-fast reads version "
                             f"{FORMAT_VERSION}; re-run `atom-fast prepare` with this version")
        try:
            store = cls(root, manifest)
            K, shape = store.num_classes, store.image_shape
            for s in SPLITS:
                if len(store.counts(s)) != K or min(store.counts(s), default=0) < 0:
                    raise StoreError(f"{mpath}: splits.{s}.counts must hold {K} non-negative counts; {fix}")
            if len(shape) != 3 or min(shape) < 1 or manifest.get("dtype") != "uint8":
                raise StoreError(f"{mpath}: image_shape must be [C, H, W] of uint8 images; {fix}")
            if len(store.mean) != shape[0] or len(store.std) != shape[0]:
                raise StoreError(f"{mpath}: normalization needs {shape[0]} means and stds; {fix}")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{mpath} lacks or garbles {exc}; {fix}") from None
        store._check_sizes()
        wanted = range(store.num_classes) if classes is None else classes
        for s in SPLITS:
            for k in wanted:
                store._check_header(s, int(k))
        return store

    def _check_sizes(self) -> None:
        """Every class file exists and is at least as long as its images (no data read)."""
        row = int(np.prod(self.image_shape))
        for s in SPLITS:
            for k, n in enumerate(self.counts(s)):
                p = class_file(self.root, s, k)
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    raise StoreError(f"{p} is missing (class {k} of {self.num_classes}, {s} split); "
                                     f"re-run `atom-fast prepare`") from None
                if size < n * row:
                    raise StoreError(f"{p} is truncated: {size} bytes for {n} images of {row} bytes; "
                                     f"re-run `atom-fast prepare`")

    def check_classes(self, split: str, classes: Sequence[int]) -> None:
        """Read and check the ``.npy`` headers of ``classes`` (those a process will read)."""
        for k in classes:
            self._check_header(split, int(k))

    def _check_header(self, split: str, k: int) -> None:
        """Class ``k``'s file holds exactly ``(count, C, H, W)`` C-ordered uint8 images."""
        if (split, k) in self._checked:
            return
        p = class_file(self.root, split, k)
        expect = (self.counts(split)[k],) + self.image_shape
        fix = "re-run `atom-fast prepare`"
        try:
            with open(p, "rb") as f:
                major, minor = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                offset = f.tell()
            size = p.stat().st_size
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p} is not a readable .npy file ({exc}); {fix}") from None
        if dtype != np.uint8 or fortran or tuple(shape) != expect:
            raise StoreError(f"{p} holds {dtype} {tuple(shape)}{' Fortran-ordered' if fortran else ''}, "
                             f"the manifest says uint8 {expect}; {fix}")
        if size != offset + int(np.prod(expect)):
            raise StoreError(f"{p} is {size} bytes, expected {offset + int(np.prod(expect))} for "
                             f"{expect} uint8 (truncated or overwritten); {fix}")
        self._checked.add((split, k))

    # -- reading -----------------------------------------------------------------------------------
    def array(self, split: str, k: int) -> np.ndarray:
        """Class ``k``'s images of ``split``: ``(n_k, C, H, W)`` uint8, memory-mapped read-only."""
        key = (split, int(k))
        a = self._arrays.get(key)
        if a is None:
            self._check_header(split, int(k))
            n = self.counts(split)[int(k)]
            if n == 0:  # an empty file section cannot be mapped
                a = np.empty((0,) + self.image_shape, dtype=np.uint8)
            else:
                _raise_nofile_limit(len(self._arrays) + 1)
                a = np.load(class_file(self.root, split, int(k)), mmap_mode="r")
            self._arrays[key] = a
            self.opened.add(key)
        return a

    def gather(self, split: str, classes: Sequence[int], positions: Sequence,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The images at ``positions[i]`` (indices within the class) of each class ``classes[i]``,
        class-major, as one ``(sum len(positions[i]), C, H, W)`` uint8 tensor (into ``out`` if given,
        e.g. a pinned buffer)."""
        total = sum(len(p) for p in positions)
        if out is None:
            out = torch.empty((total,) + self.image_shape, dtype=torch.uint8)
        dst = out.numpy()
        at = 0
        for k, pos in zip(classes, positions):
            pos = np.asarray(pos, dtype=np.int64)
            np.take(self.array(split, k), pos, axis=0, out=dst[at:at + len(pos)])
            at += len(pos)
        return out

    def batches(self, split: str, batch: int = 4096,
                classes: Optional[Sequence[int]] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """``(images uint8 (n, C, H, W), labels (n,))`` of ``split``, class by class in chunks of at
        most ``batch`` images: the whole split (or ``classes``) without holding it in memory."""
        for k in (range(self.num_classes) if classes is None else classes):
            a = self.array(split, k)
            for i in range(0, a.shape[0], batch):
                x = torch.from_numpy(np.array(a[i:i + batch]))
                yield x, torch.full((x.shape[0],), int(k), dtype=torch.long)

    def read_split(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
        """The whole split in memory: ``(N, C, H, W)`` uint8 and ``(N,)`` int64 labels, class-major."""
        counts = self.counts(split)
        images = np.empty((sum(counts),) + self.image_shape, dtype=np.uint8)
        at = 0
        for k, n in enumerate(counts):
            images[at:at + n] = self.array(split, k)
            at += n
        return images, self.labels(split).numpy()
