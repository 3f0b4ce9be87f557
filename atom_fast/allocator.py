"""glibc allocator tuning for CPU runs: keep freed blocks in the heap instead of returning them.

glibc serves allocations above 32 MB with fresh ``mmap()``s, so every batch of 128-channel feature
maps (hundreds of MB) is page-faulted in again: on CPU that kernel time was half of each iteration
(1.57 s -> 0.88 s per real forward at MNIST, batch 128 x 10, measured on 2 cores). Serving them from
the heap, never trimmed, keeps the pages. The distillation driver switches this on for CPU runs (and
records that it did in ``results.json``); the benchmarks time with the same setting.
"""

import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks (CPU runs); ``ATOM_FAST_MALLOC_TUNING=0`` opts out. True if
    the setting took effect (Linux with glibc only)."""
    if sys.platform != "linux" or os.environ.get("ATOM_FAST_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False
