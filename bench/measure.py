"""Measuring, shared by both tables: device sync, time quantiles, peak memory, copy bandwidth, and the
conditions a result is recorded with.

Peak memory:
- CUDA: ``max_memory_allocated`` after a reset (:func:`cuda_peak`).
- CPU: growth of the resident set during a call (:func:`rss_growth`): VmHWM, the peak resident set,
  is reset to the current resident set through /proc/self/clear_refs, the call runs, and the growth
  is VmHWM minus the resident set before. glibc keeps freed blocks in its heap unless told otherwise,
  which would hide freed temporaries; a child process gets :data:`RETURN_TO_OS_ENV`, a running one
  calls :func:`glibc_return_to_os`.
"""

import contextlib
import ctypes
import os
import statistics
import time

import torch

import atom_fast
from atom_fast import environment

@contextlib.contextmanager
def env_restored(name):
    """Run the block, then put the environment variable ``name`` back as it was (unset if it was):
    for the scripts that switch a setting the native op reads per call (``ATOM_FAST_CPU_ISA``,
    ``ATOM_FAST_CPU_PREFETCH``) and are also called from the tests."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


# glibc: serve every block >= 64 KiB with mmap and return freed memory at once (a child's environment)
RETURN_TO_OS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def sync(device):
    """Wait for the device (CUDA) so that a host timer covers the work launched before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times):
    """Median and 20th/80th percentiles (inclusive method) of ``times`` in seconds."""
    times = sorted(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3]}


def copy_bandwidth(x, repeats=10):
    """GB/s of ``dst.copy_(src)`` for a tensor of ``x``'s size (bytes read + written); the median of
    ``repeats`` copies after 2 untimed ones."""
    src = x.detach().clone()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        sync(src.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(src.device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:]) / 1e9


def matmul_gflops(device, n=2048, repeats=10):
    """GFLOP/s (2 n^3 per call) of a float32 ``n x n`` matmul on ``device``: the median of ``repeats``
    calls after 2 untimed ones; the ceiling the step table's convolution GFLOP/s is compared with."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    times = []
    for _ in range(repeats + 2):
        sync(a.device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(a.device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[2:]) / 1e9


# --------------------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------------------


def proc_status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_growth(fn):
    """(result of fn(), bytes the resident set grew by at its peak during the call). Linux only."""
    base = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak resident set) to the current resident set
    result = fn()
    return result, (proc_status_kib("VmHWM") - base) * 1024


def cuda_peak(fn, device):
    """(result of fn(), bytes allocated before the call, peak bytes allocated during it)."""
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    return result, before, torch.cuda.max_memory_allocated(device)


def glibc_return_to_os():
    """Make glibc hand every freed block >= 64 KiB back to the OS from now on (what
    RETURN_TO_OS_ENV does for a child), so the resident set follows live memory; True if it worked."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        # undoes atom_fast.allocator.keep_freed_memory() (mmap allowed again)
        ok = (libc.mallopt(M_MMAP_MAX, 65536) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 65536) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, 0) == 1)
        libc.malloc_trim(0)  # what the heap already caches goes back now
        return ok
    except (OSError, AttributeError):
        return False


def free_memory_bytes(device):
    """Bytes free on the device (CUDA) or available to processes (CPU); None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------------


def conditions(device):
    """The environment a result was measured in: device name, versions, threads, native op, backend."""
    device = torch.device(device)
    versions = environment.versions()
    env = {"device_type": device.type, "device_name": environment.device_name(device),
           "torch": versions["torch"], "triton": versions["triton"], "atom_fast": versions["atom_fast"],
           "python": versions["python"], "platform": versions["platform"],
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "native_built": atom_fast.backends.native_available(), "native_isa": atom_fast.backends.native.cpu_isa(),
           "backend_env": os.environ.get(atom_fast.backends.BACKEND_ENV)}
    if device.type == "cuda":
        env.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "native_cuda": atom_fast.backends.native_available(device),
                    "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory})
    return env
