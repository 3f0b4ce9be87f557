"""What a run costs: seconds per distillation iteration and per evaluation epoch, per dataset shape.

    python -m bench.run_cost --out bench/results/run-cost-DATE.json     # 7-8 minutes on the busy 2-core VM of bench/results

Random images of MNIST's shape (1x28x28) and CIFAR-10's (3x32x32), 10 classes, go through the code
the CLI runs: ``Distiller.step`` with the CLI's defaults (fused loop, DSA, batch_real 128, ConvNet-3
width 128, instance norm; glibc's allocator kept as the CLI keeps it on CPU) for a few iterations
after one warm-up, and ``evaluate`` (the CLI's protocol: SGD, DSA, batch 256) of one ConvNet for a
few epochs on ``10 * IPC`` images after a one-epoch warm-up, and one test pass over 10000 test images
(the size of both test splits; timed once per shape, since it does not depend on the set). From these the JSON also projects a run at the papers' defaults (8000 iterations, 5 models
x 1000 epochs with a test pass every 100 epochs): ``iterations * s_per_iteration + models * (epochs *
s_per_epoch + tests * s_per_test_pass)``. The pixels are random, so the figures are about time only;
the machine's load average is recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atom_fast.allocator import keep_freed_memory  # noqa: E402
from atom_fast.distill.evaluate import EvalConfig, evaluate  # noqa: E402
from atom_fast.distill.loop import DistillConfig, Distiller  # noqa: E402
from bench.measure import conditions  # noqa: E402

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
PLAN = [("mnist", 1), ("mnist", 10), ("cifar10", 1), ("cifar10", 10), ("cifar10", 50)]
DEFAULTS = {"iterations": 8000, "eval_models": 5, "eval_epochs": 1000, "test_passes_per_model": 10}
CLASSES, PER_CLASS, TEST_IMAGES = 10, 200, 10000


def time_steps(shape, ipc, method, steps):
    g = torch.Generator().manual_seed(0)
    images = torch.randn((CLASSES * PER_CLASS,) + shape, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    d = Distiller(images, labels, CLASSES, DistillConfig(method=method, ipc=ipc, iterations=steps + 1))
    try:
        d.step(0)  # warm-up
        times = []
        for it in range(1, steps + 1):
            t = time.perf_counter()
            d.step(it)
            times.append(time.perf_counter() - t)
    finally:
        d.close()
    return times


def time_evaluation(shape, ipc, epochs, test_images):
    """(seconds per training epoch, seconds of one test pass over ``test_images`` images), after a
    one-epoch warm-up on a tiny test set."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn((CLASSES * ipc,) + shape, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(ipc)
    kwargs = {"width": 128, "depth": 3, "norm": "instancenorm"}
    for n, e in ((CLASSES, 1), (test_images, epochs)):
        test = torch.randn((n,) + shape, generator=g)
        test_labels = torch.randint(0, CLASSES, (n,), generator=g)
        record, = evaluate(images, labels, test, test_labels, CLASSES, seed=0, models=1,
                           config=EvalConfig(epochs=e, test_every=e), network_kwargs=kwargs)
    return record.train_seconds / epochs, record.test_seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON file to write (default: print only)")
    p.add_argument("--steps", type=int, default=2, help="timed iterations per shape and IPC, after one warm-up")
    p.add_argument("--epochs", type=int, default=10, help="timed evaluation epochs per shape and IPC")
    p.add_argument("--methods", default="atom", help="comma-separated distillation methods")
    args = p.parse_args(argv)
    malloc_tuned = keep_freed_memory()
    start = datetime.datetime.now().astimezone()
    t_all = time.perf_counter()
    rows, test_pass = [], {}
    for dataset, ipc in PLAN:
        shape = SHAPES[dataset]
        row = {"dataset_shape": dataset, "image_shape": list(shape), "ipc": ipc, "iteration_seconds": {}}
        for method in args.methods.split(","):
            times = time_steps(shape, ipc, method, args.steps)
            row["iteration_seconds"][method] = {"median": statistics.median(times), "all": times}
        # a test pass does not depend on the synthetic set: timed over the full test split once per
        # shape (at its first IPC), over CLASSES images elsewhere
        first = dataset not in test_pass
        epoch_s, test_s = time_evaluation(shape, ipc, args.epochs, TEST_IMAGES if first else CLASSES)
        if first:
            test_pass[dataset] = test_s
        test_s = test_pass[dataset]
        row["evaluation"] = {"seconds_per_epoch": epoch_s, "seconds_per_test_pass": test_s,
                             "epochs_timed": args.epochs, "test_images": TEST_IMAGES}
        d = DEFAULTS
        per_model = d["eval_epochs"] * epoch_s + d["test_passes_per_model"] * test_s
        row["projected_default_seconds"] = {
            "distill": {m: d["iterations"] * v["median"] for m, v in row["iteration_seconds"].items()},
            "evaluation_per_model": per_model, "evaluation": d["eval_models"] * per_model}
        rows.append(row)
        its = ", ".join(f"{m} {v['median']:.2f} s" for m, v in row["iteration_seconds"].items())
        print(f"{dataset} IPC {ipc}: per iteration {its}; per evaluation epoch {epoch_s:.4f} s, "
              f"test pass {test_s:.2f} s", flush=True)
    result = {
        "what": "seconds per distillation iteration (Distiller.step, CLI defaults) and per evaluation "
                "epoch (evaluate, CLI protocol, one ConvNet), random images of each dataset's shape",
        "command": "python -m bench.run_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": start.isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - t_all,
        "load_average_at_end": os.getloadavg(),
        "glibc_keeps_freed_memory": malloc_tuned,
        "conditions": conditions("cpu"),
        "settings": {"classes": CLASSES, "real_images_per_class": PER_CLASS, "test_images": TEST_IMAGES,
                     "distill": "DistillConfig defaults: fused loop, DSA, batch_real 128, ConvNet-3 "
                                "width 128, instance norm, lr_img 1",
                     "evaluation": "EvalConfig defaults: SGD 0.01, momentum 0.9, wd 5e-4, batch 256, "
                                   "DSA; ConvNet-3 width 128, instance norm",
                     "steps": args.steps, "epochs": args.epochs, "projection": DEFAULTS},
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
