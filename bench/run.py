"""Runtime and peak-memory tables of the attention loss and of a whole distillation step, in one command.

    python -m bench.run --device cpu --quick            # under 3 minutes on 2 CPU cores
    python bench/run.py --device cuda                   # everything, on a GPU
    python bench/run.py --device cpu --only loss --out bench/results/

Markdown tables go to stdout; ``--out`` (default ``bench/results/<device>-<date>.json``; a directory
gets ``<device>-<date>.json`` inside it) receives the JSON with every condition and figure, a CSV of
the same rows next to it, and then a PNG of the speedups and peak memory (a missing matplotlib only
costs the PNG).

Loss table (bench/loss_table.py): one ``attention_loss`` call on one layer's features, per layer
shape: 10 classes x 128 real samples and IPC 1, 10, 50 synthetic samples per class, float32,
ps = pc = 4, both weights 1, only the synthetic features requiring a gradient. The shapes are the
ConvNet-3 (CIFAR, 32x32) and ConvNet-4 (TinyImageNet, 64x64) layers whose attention is matched:
(128, 64, 64), (128, 32, 32), (128, 16, 16); a network's loss is the sum of its layers' rows. 10
classes is what one CIFAR-10 step passes; larger class counts are processed in chunks of 10 classes.
Providers: ``eager`` (the plain-PyTorch reference), ``compile`` (``torch.compile(dynamic=False)`` of
it, compiled afresh for each timed shape; the compilation is the first warm-up call, recorded as
``warmup_s``), ``native`` (the C++/CUDA op) and ``triton`` (CUDA only). Modes fwd, bwd (backward
alone), fwd+bwd. Times: median with 20th/80th percentiles, the device synchronized around every
call. Achieved GB/s counts the bytes that must move (docs/loss.md): forward reads every real and synthetic
feature once, backward reads the synthetic features and writes their gradient once; it is compared
with a ``copy_`` of the real features timed just before each call (against the 80th percentile
of those copies' GB/s; bench/loss_table.py). Peak extra memory, in a fresh process per provider and mode: CUDA, peak allocated above
the inputs; CPU, growth of the resident set during one call with glibc returning every block >= 64 KiB to the OS (so freed temporaries cannot hide in the
heap); the backward alone is not measured on CPU.

Step table (bench/step_table.py, the layout of the ATOM paper's Table 3): seconds per
``Distiller.step`` and its peak memory at IPC 1, 10, 50, CIFAR-10 shapes (10 classes, 3x32x32 random
images, ConvNet width 128 depth 3 instancenorm, batch_real 128, DSA on), one fresh child process per
(row, IPC). Peak memory = memory held between steps except the dataset + the peak growth during one
step. Conv GFLOP/s: the step's convolution multiply-adds x 2 (real forward, synthetic forward and
input-gradient backward) over its median time, next to a 2048x2048 float32 matmul's GFLOP/s measured
in the same run.

``--quick`` (bench/plan.py) keeps the whole run under 3 minutes on 2 CPU cores: the loss at the CIFAR
layer-1 shape (128x32x32) and IPC 10, fwd+bwd, and the ATOM fused and DataDAM-script loops at IPC 10
always run; the other items only while the projected total stays within ``--budget`` seconds (165,
counted from the process start). The output lists everything quick left out.
"""

import time

_T0 = time.perf_counter()  # before torch's import: the budget counts the whole process

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

if __package__ in (None, ""):  # run as a file (python bench/run.py): make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from atom_fast import environment  # noqa: E402
from bench import loss_table, measure, plan, report, step_table  # noqa: E402

SCHEMA = "atom_fast.bench/1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="under 3 minutes on 2 CPU cores: fewer shapes, IPCs and repeats")
    p.add_argument("--only", choices=["loss", "step"], help="run one table only")
    p.add_argument("--out", help="JSON file, or a directory for <device>-<date>.json/.csv/.png "
                                 "(default bench/results/)")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help=f"loss providers, comma-separated (default all available of {loss_table.PROVIDERS})")
    p.add_argument("--budget", type=float,
                   help=f"seconds the optional items may extend the run to (quick: {plan.QUICK_BUDGET_S:.0f})")
    p.add_argument("--row", action="append", default=None,
                   help="run only this step-table row (its label; repeat for several)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' size
    p.add_argument("--step-child", help=argparse.SUPPRESS)  # kept for old callers: bench.step_table
    args = p.parse_args(argv)
    unknown = [r for r in args.row or [] if r not in [x.label for x in step_table.STEP_ROWS]]
    if unknown:
        p.error(f"--row: {unknown} not in {[x.label for x in step_table.STEP_ROWS]}")
    bad = [v for v in args.providers or [] if v not in loss_table.PROVIDERS]
    if bad:
        p.error(f"--providers: {bad} not in {loss_table.PROVIDERS}")
    if args.budget is None and args.quick:
        args.budget = plan.QUICK_BUDGET_S
    args.timing = plan.timing(args.device, args.quick, args.tiny)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.step_child:
        print(json.dumps(step_table.step_child(json.loads(args.step_child))))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/run.py: --device cuda but torch.cuda.is_available() is False")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    jobs, notes = plan.build_plan(args)
    loss_rows, step_rows, skipped, done = plan.run_plan(jobs, args, _T0)
    env = measure.conditions(device)
    if step_rows:
        env["matmul_gflops"] = measure.matmul_gflops(device, n=256 if args.tiny else 2048)
    result = {
        "schema": SCHEMA, "started": started, "command": [os.path.basename(sys.executable), *sys.argv],
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "environment": env,
        "config": {"device": args.device, "only": args.only, "rows": args.row, "memory": args.memory,
                   "budget_s": args.budget, **args.timing,
                   "loss": {**loss_table.SETTINGS, "classes": plan.CLASSES, "compile_dynamic": False,
                            "unit": "one layer per call"},
                   "step": {"classes": step_table.CLASSES, "image": list(step_table.IMAGE), "seed": 0,
                            "base_config": step_table.BASE_CONFIG, "speedup_base": step_table.SPEEDUP_BASE}},
        "plan": [{"what": plan.describe(d["job"]), "seconds": d["seconds"]} for d in done],
        "notes": notes, "skipped": skipped,
        "loss": loss_rows, "step": step_rows,
        "wall_s": time.perf_counter() - _T0,
    }
    written = report.write_outputs(report.output_paths(args.out, environment.device_slug(device)), result)
    for table in (report.loss_markdown(loss_rows, env), report.step_markdown(step_rows, env)):
        if table:
            print(table + "\n")
    for line in notes + [f"skipped: {s}" for s in skipped]:
        print(f"- {line}")
    print(f"\nwall {result['wall_s']:.0f} s; wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
