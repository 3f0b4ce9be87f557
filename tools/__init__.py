"""Checks that are not benchmarks (run as files: ``python tools/<name>.py``).

    compile_check/sm90.py    every Triton kernel variant compiled ahead of time for an H100 (no GPU)
    compile_check/cuda.py    the native op's CUDA kernels compiled with nvcc for sm_90 (no GPU)
    validate_gpu.py          the steps of bench/validate_gpu.sh (build, tests, sanitizers, benchmark)
    sanitizer_cases.py       every Triton and CUDA kernel once on small shapes, for compute-sanitizer
"""
