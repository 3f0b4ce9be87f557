"""Compile the CUDA kernels of the native op (csrc/cuda/*.cu) for an H100 (sm_90), with no GPU.

CI machines have CPU torch, so setup.py never builds the CUDA part there; this keeps it compiling.
It runs nvcc on each .cu against the headers of the installed torch (the CPU wheel ships the c10/cuda
and ATen headers the file uses, but not the generated cuda_cmake_macros.h, hence
C10_CUDA_NO_CMAKE_CONFIGURE_FILE), prints ptxas's registers / spills / shared memory per kernel, and
exits 1 on a compile error or when a kernel spills more than SPILL_LIMIT bytes. Nothing is linked
and nothing runs: run the test suite on a GPU for that (docs/gpu.md).

    python tools/compile_check/cuda.py [--arch sm_90]
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

SPILL_LIMIT = 64

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def nvcc_command(source, output, arch):
    import torch.utils.cpp_extension as ext
    includes = [os.path.join(ROOT, "csrc"), *ext.include_paths(), sysconfig.get_paths()["include"]]
    return ["nvcc", "-c", source, "-o", output, "-std=c++20", "-O3", f"-arch={arch}",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DATOM_FAST_WITH_CUDA",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-Xcompiler", "-fPIC", "-Xptxas", "-v", *[f"-I{p}" for p in includes]]


def parse_ptxas(text):
    """[(kernel, registers, spill_bytes, smem_bytes)] from ptxas -v output."""
    rows, name, spill = [], None, 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            for short in ("stats_kernel", "class_kernel", "class_from_sums_kernel", "sums_kernel",
                          "sum_kernel", "class_of_kernel",
                          "vector_grad_kernel", "grad_kernel"):
                if short in name:
                    t = re.search(short + r"I(.*?)E", name)
                    name = short + (f"<{t.group(1)}>" if t else "")
                    break
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = max(int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?$", line)
        if m and name:
            rows.append((name, int(m.group(1)), spill, int(m.group(2) or 0)))
            name, spill = None, 0
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90")
    args = p.parse_args(argv)
    if shutil.which("nvcc") is None:
        sys.exit("tools/compile_check/cuda.py: nvcc is not on PATH")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
            out = os.path.join(tmp, os.path.basename(source) + ".o")
            proc = subprocess.run(nvcc_command(source, out, args.arch), capture_output=True, text=True)
            text = proc.stdout + proc.stderr
            print(f"## {os.path.relpath(source, ROOT)} ({args.arch})\n")
            if proc.returncode != 0:
                print("compile failed:\n" + "\n".join(l for l in text.splitlines() if "error" in l)[:4000])
                failed = True
                continue
            print("| kernel | registers | spilled bytes | static smem |\n|---|---|---|---|")
            for name, regs, spill, smem in parse_ptxas(text):
                print(f"| {name} | {regs} | {spill} | {smem} |")
                failed |= spill > SPILL_LIMIT
            print()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
