"""The native CPU op's software prefetch of the next feature rows (``ATOM_FAST_CPU_PREFETCH``: ``none``,
the default since 2026-12-04; ``rows``, only rows shorter than a 4 KiB page; ``all``, every row),
timed on the loss table's workload in one process, settings and powers interleaved round by round.

Workload: :mod:`bench.loss_table`'s (10 classes x ``--real`` real samples, ``--ipc`` synthetic per
class, one layer of each ``--shapes``, spatial and channel power both p), ``backend="native"``,
fwd+bwd. Reported per shape, setting and power: the median ms over the rounds and its ratio to
``all`` (the behaviour before 2026-12-04), and per shape the 80th percentile of ``real.sum()``'s
read bandwidth, timed once per round, beside the call's GB/s (bytes that must move / median).

    python bench/prefetch_table.py --json bench/results/cpu-prefetch-2026-12-04.json
"""

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from atom_fast import allocator, environment  # noqa: E402
from atom_fast.backends import native  # noqa: E402
from bench import loss_table, measure, powers_table  # noqa: E402

SETTINGS = ("none", "rows", "all")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="128x16x16,128x32x32,128x64x64")
    ap.add_argument("--powers", default="4,3.7")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--real", type=int, default=128)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.power_list = [float(p) for p in args.powers.split(",")]
    except ValueError:
        ap.error("--shapes must look like 128x32x32,128x16x16 and --powers like 4,3.7")
    if any(len(s) != 3 for s in args.shape_list):
        ap.error("--shapes: each shape is C x H x W")
    if args.rounds < 2 or args.warmup < 0:
        ap.error("--rounds must be >= 2 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not native.AVAILABLE:
        sys.exit(f"the native op is not built: {native.LOAD_ERROR}")
    allocator.keep_freed_memory()
    with measure.env_restored("ATOM_FAST_CPU_PREFETCH"):  # the caller's setting, as it was
        shapes = [_shape(args, shape) for shape in args.shape_list]
    result = {
        "command": "python bench/prefetch_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": environment.cpu_name(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "native_isa": native.cpu_isa(),
                    "load_average": os.getloadavg()},
        "classes": args.classes, "real_per_class": args.real, "ipc": args.ipc, "rounds": args.rounds,
        "shapes": shapes,
    }
    print("| layer | p | none | rows | all | none vs all | read (sum) GB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for sh in shapes:
        for p in args.power_list:
            med = {r["setting"]: r["median_ms"] for r in sh["rows"] if r["p"] == p}
            print(f"| {'x'.join(map(str, sh['shape']))} | {p:g} | {med['none']:.1f} | {med['rows']:.1f} "
                  f"| {med['all']:.1f} | {med['none'] / med['all']:.2f} | {sh['read_p80_gbs']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _shape(args, shape):
    C, H, W = shape
    real, syn = loss_table.make_inputs(args.classes, args.real, args.ipc, C, H, W, torch.float32,
                                       torch.device("cpu"))
    fns = {p: loss_table.loss_fn("native", args.classes, p, p, 1.0, 1.0) for p in args.power_list}
    read = powers_table.paired_sum(real)
    cases = [(s, p) for s in SETTINGS for p in args.power_list]
    for setting, p in cases:
        os.environ["ATOM_FAST_CPU_PREFETCH"] = setting
        for _ in range(args.warmup):
            loss_table.run_once(fns[p], real, syn, "fwd+bwd")
    times = {case: [] for case in cases}
    reads = []
    for _ in range(args.rounds):
        reads.append(read())
        for setting, p in cases:
            os.environ["ATOM_FAST_CPU_PREFETCH"] = setting
            times[(setting, p)].append(loss_table.run_once(fns[p], real, syn, "fwd+bwd"))
    moved = loss_table.bytes_moved(real, syn, "fwd+bwd")
    rows = []
    for setting, p in cases:
        med = statistics.median(times[(setting, p)])
        rows.append({"setting": setting, "p": p, "median_ms": med * 1e3,
                     "min_ms": min(times[(setting, p)]) * 1e3, "max_ms": max(times[(setting, p)]) * 1e3,
                     "gbs": moved / med / 1e9, "vs_all": med / statistics.median(times[("all", p)]),
                     "times_s": times[(setting, p)]})
    return {"shape": [C, H, W], "bytes_moved": moved, "read_gbs": reads,
            "read_p80_gbs": loss_table.copy_reference(reads), "rows": rows}


if __name__ == "__main__":
    main()
