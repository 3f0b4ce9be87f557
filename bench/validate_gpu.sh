#!/usr/bin/env bash
# One-command validation on an NVIDIA GPU, after installing a CUDA build of torch: builds the CUDA op,
# runs the test suite on the GPU (compiled Triton, the CUDA op, the > 2^31-element cases),
# compute-sanitizer memcheck and racecheck on every kernel, and bench/run.py --device cuda; logs and
# JSON go to bench/results/gpu-validation-<gpu>-<date>/. Exits 1 on a machine without a GPU.
#
#   bash bench/validate_gpu.sh                  # everything (the full benchmark takes the longest)
#   bash bench/validate_gpu.sh --bench quick    # the short benchmark; --bench none, --no-build, --help
#   PYTHON=/path/to/python bash bench/validate_gpu.sh   # the interpreter whose torch is the CUDA build
#
# The steps are in tools/validate_gpu.py; docs/gpu.md describes them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$PY" ]; then
    echo "validate_gpu.sh: no python found; set PYTHON=/path/to/python" >&2
    exit 1
fi
exec "$PY" tools/validate_gpu.py "$@"
