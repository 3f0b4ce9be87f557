#!/usr/bin/env bash
# The main job: install into .venv, then distill MNIST with ATOM at IPC 1 on the CPU budget the
# README states (200 iterations, batch 128 real images per class, 3 evaluation ConvNets trained
# 300 epochs each) and print its accuracy next to the random baseline (the same number of random
# real images, evaluated with the same protocol and seeds). About 5-10 minutes on 2 CPU cores.
# Extra arguments go to the CLI (e.g. --ipc 10, --method datadam, --device cuda). It replaces its own
# demo folder (--overwrite), so it can be run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/atom-fast --dataset mnist --method atom --ipc 1 --iterations 200 \
    --eval-models 3 --eval-epochs 300 --out runs/mnist-atom-ipc1 --overwrite "$@"
