"""The CUDA kernels of the native op compile for sm_90 (nvcc, no GPU needed), so the part of csrc/
that CI cannot build (CPU torch) cannot rot unnoticed. Running them takes a GPU (docs/gpu.md).
The compile runs in the background from the start of the test session (conftest.py,
tests/_background.py)."""

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.background([sys.executable, os.path.join(ROOT, "tools", "compile_check", "cuda.py")], timeout=600)
def test_cuda_kernels_compile_for_sm90(background_result):
    proc = background_result
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kernel in ("stats_kernel", "class_kernel", "class_from_sums_kernel", "sums_kernel",
                   "vector_grad_kernel", "grad_kernel"):
        assert kernel in proc.stdout
