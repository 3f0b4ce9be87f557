#!/usr/bin/env bash
# The main job: install into .venv, then distill MNIST with ATOM at IPC 1 on the CPU budget the
# README states (200 iterations, batch 128 real images per class, 3 evaluation ConvNets trained
# 300 epochs each, tested once, after the last epoch) and print its accuracy next to the random baseline (the same number of random
# real images, evaluated with the same protocol and seeds). Its cost on 2 CPU cores: README.md,
# "What a run costs". Extra arguments go to the CLI and win over the ones below (e.g.
# --ipc 10 --out runs/mnist-atom-ipc10, --method datadam --out runs/mnist-datadam-ipc1,
# --device cuda); give another --out with another --ipc or --method, or the IPC 1 ATOM run is
# replaced. It replaces its own demo folder (--overwrite), so it can be run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/atom-fast --dataset mnist --method atom --ipc 1 --iterations 200 \
    --eval-models 3 --eval-epochs 300 --test-every 300 --out runs/mnist-atom-ipc1 --overwrite "$@"
