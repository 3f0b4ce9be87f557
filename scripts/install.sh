#!/usr/bin/env bash
# Create .venv (if missing) and install atom-fast into it, editable, with its test and Triton extras.
# torch and triton are pinned through constraints.txt: an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[triton,test]"
