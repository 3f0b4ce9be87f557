"""Image files -> uint8 pixels (TinyImageNet, image folders), one at a time or in parallel.

Pillow is imported lazily: only the formats stored as image files decode any. :class:`DecodePool`
decodes chunks of files in order: in threads of this process (the in-memory loader: Pillow releases
the GIL while decoding) or in worker processes (``atom-fast prepare``, where decoding is the whole
cost). Either way an undecodable file is the same one-line :class:`DatasetFileError` naming it: the
error is raised in the worker and travels back unchanged.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import struct
import sys
import zlib
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from atom_fast.distill.data.errors import DatasetFileError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# A chunk of decoding work holds at most this many bytes of pixels (and CHUNK_IMAGES images); at most
# two chunks per worker are in flight, which bounds the memory of a parallel decode.
CHUNK_BYTES = 8 << 20
CHUNK_IMAGES = 1024


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


def decode_chunk(paths: Sequence[Path], mode: str, size: Tuple[int, int], resize: bool,
                 size_fix: str = _RESIZE_FIX) -> np.ndarray:
    """Decode ``paths`` in order into one ``(n, C, H, W)`` uint8 array (C = 1 for mode "L", else 3).
    The unit of work of :class:`DecodePool` (a top-level function, so worker processes can run it)."""
    C = 1 if mode == "L" else 3
    out = np.empty((len(paths), C, size[1], size[0]), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = _decode_image(p, mode, size, resize, size_fix)
    return out


def header_chunk(paths: Sequence[Path]) -> List[Tuple[str, Tuple[int, int]]]:
    """``(mode, (W, H))`` of each of ``paths``, from their headers."""
    return [_image_header(p) for p in paths]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, the workers stay quiet
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _process_context():
    """``fork`` on Linux: the workers start in milliseconds and share the parent's imports (they
    run Pillow and NumPy only, no threads of the parent). Elsewhere the platform's default."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class DecodePool:
    """Runs chunks of decoding work in order, with a bounded number in flight.

    ``workers=None``: up to 8 threads of this process (the in-memory loader; fewer than 64 items are
    decoded inline). ``workers=k``: ``k`` worker processes (1: inline). The pool starts on first use
    and serves every later call until :meth:`close`.
    """

    def __init__(self, workers: Optional[int] = None):
        self.processes = workers is not None
        self.workers = max(1, int(workers)) if workers is not None else min(8, os.cpu_count() or 1)
        self._executor: Optional[Executor] = None

    def chunk_size(self, n: int, item_bytes: int) -> int:
        """Items per chunk: a few chunks per worker, at most :data:`CHUNK_BYTES` of pixels each."""
        by_bytes = max(1, min(CHUNK_IMAGES, CHUNK_BYTES // max(1, item_bytes)))
        spread = max(1, math.ceil(n / (4 * self.workers)))
        return min(by_bytes, spread)

    def _inline(self, n: int) -> bool:
        return self.workers <= 1 or (not self.processes and n < 64)

    def _get(self) -> Executor:
        if self._executor is None:
            if self.processes:
                self._executor = ProcessPoolExecutor(self.workers, mp_context=_process_context(),
                                                     initializer=_ignore_sigint)
            else:
                self._executor = ThreadPoolExecutor(self.workers)
        return self._executor

    def map(self, fn: Callable, items: Sequence, item_bytes: int, *args) -> Iterator:
        """``fn(chunk, *args)`` for consecutive chunks of ``items``, in order; at most two chunks per
        worker are submitted ahead of the one consumed. An exception of ``fn`` is raised here as it
        was raised there (the first one in item order)."""
        if not items:
            return
        if self._inline(len(items)):
            size = self.chunk_size(len(items), item_bytes) if self.processes else len(items)
            for i in range(0, len(items), size):
                yield fn(items[i:i + size], *args)
            return
        size = self.chunk_size(len(items), item_bytes)
        starts = iter(range(0, len(items), size))
        executor = self._get()
        pending: deque = deque()

        def submit() -> bool:
            i = next(starts, None)
            if i is None:
                return False
            pending.append(executor.submit(fn, items[i:i + size], *args))
            return True

        try:
            while len(pending) < 2 * self.workers and submit():
                pass
            while pending:
                future = pending.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool:
                    self._executor = None
                    raise RuntimeError(
                        "a decoding worker process died (killed, or out of memory?); run again, "
                        "with fewer workers if memory is short") from None
                submit()
                yield result
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _decode_all(
    paths: Sequence[Path],
    mode: str,
    size: Tuple[int, int],
    resize: bool,
    size_fix: str = _RESIZE_FIX,
    pool: Optional[DecodePool] = None,
) -> np.ndarray:
    """Decode ``paths`` into one ``(N, C, H, W)`` uint8 array (C = 1 for mode "L", else 3), in
    threads unless ``pool`` says otherwise."""
    C = 1 if mode == "L" else 3
    out = np.empty((len(paths), C, size[1], size[0]), dtype=np.uint8)
    own = pool is None
    pool = DecodePool() if own else pool
    try:
        at = 0
        for chunk in pool.map(decode_chunk, list(paths), C * size[0] * size[1], mode, size, resize,
                              size_fix):
            out[at:at + len(chunk)] = chunk
            at += len(chunk)
    finally:
        if own:
            pool.close()
    return out
