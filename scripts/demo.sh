#!/usr/bin/env bash
# The main job until the distillation driver lands: install, then show the fused loss matching the
# reference on ConvNet features, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python examples/demo.py "$@"
