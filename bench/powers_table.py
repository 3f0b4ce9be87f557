"""The native CPU op's forward + backward at several powers, in one process, calls interleaved, so the
ratios to p = 4 and the fractions of copy bandwidth come from one run.

Workload: :mod:`bench.loss_table`'s (10 classes x ``--real`` real samples, ``--ipc`` synthetic per
class, one layer of ``--shape``, spatial and channel power both p, only the synthetic features
requiring a gradient), ``backend="native"``, for every instruction set given by ``--isas`` (the row
kernels are chosen per call from ``ATOM_FAST_CPU_ISA``).

Each round runs, for every (instruction set, power) in turn, one ``copy_`` of the real features, one
``real.sum()`` and then one timed fwd+bwd call. The median over the rounds is reported with:

- ``vs_p4``: the median over that of p = 4 on the same instruction set;
- ``copy_fraction``: the bytes that must move (forward reads every feature once, backward reads the
  synthetic features and writes their gradient) over the median time, divided by the 80th percentile
  of the GB/s of all the run's copies (:func:`bench.loss_table.copy_reference`);
- ``read_fraction``: the same over the 80th percentile of the GB/s of ``real.sum()`` calls, also
  one per call (a copy counts the bytes it reads and writes, so a pass that mostly reads can stay
  well below it when the machine writes as fast as it reads; a sum only reads).

    python bench/powers_table.py --shape 128x32x32 --powers 4,2.5,1.5,3.7 --isas avx2,avx512 \\
        --json bench/results/cpu-native-powers-avx512-2026-12-04-32.json
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

import atom_fast  # noqa: E402
from atom_fast import allocator, environment  # noqa: E402
from atom_fast.backends import native  # noqa: E402
from bench import loss_table, measure  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="128x32x32", help="C x H x W of the layer")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--real", type=int, default=128, help="real samples per class")
    ap.add_argument("--ipc", type=int, default=10, help="synthetic samples per class")
    ap.add_argument("--powers", default="4,2.5,1.5,3.7", help="comma-separated; must include 4")
    ap.add_argument("--isas", default=None,
                    help="comma-separated native CPU instruction sets (default: the one in use)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    try:
        args.C, args.H, args.W = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape must look like 128x32x32, got {args.shape!r}")
    try:
        args.power_list = [float(p) for p in args.powers.split(",")]
    except ValueError:
        ap.error(f"--powers must be comma-separated numbers, got {args.powers!r}")
    if 4.0 not in args.power_list:
        ap.error("--powers must include 4 (the ratios are to p = 4)")
    if args.warmup < 0 or args.rounds < 2:
        ap.error("--warmup must be >= 0 and --rounds >= 2")
    return args


def paired_sum(x):
    """A callable timing one ``x.sum()`` (a read of every byte, the floor of a pass that reads the
    features); returns GB/s (bytes read)."""
    def once():
        t0 = time.perf_counter()
        x.sum()
        return x.numel() * x.element_size() / (time.perf_counter() - t0) / 1e9

    once()
    return once


def _use_isa(isa):
    os.environ["ATOM_FAST_CPU_ISA"] = isa
    got = native.cpu_isa()  # raises if this CPU lacks it
    if got != isa:
        raise RuntimeError(f"asked for the {isa} row kernels, the op reports {got}")


def main(argv=None):
    args = parse_args(argv)
    if not native.AVAILABLE:
        sys.exit(f"the native op is not built: {native.LOAD_ERROR}")
    with measure.env_restored("ATOM_FAST_CPU_ISA"):  # the caller's setting, as it was
        return _run(args, argv)


def _run(args, argv):
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the loss table and a distillation run do
    isas = args.isas.split(",") if args.isas else [native.cpu_isa()]
    for isa in isas:
        _use_isa(isa)
    real, syn = loss_table.make_inputs(args.classes, args.real, args.ipc, args.C, args.H, args.W,
                                       torch.float32, torch.device("cpu"))
    cases = [(isa, p) for isa in isas for p in args.power_list]
    fns = {case: loss_table.loss_fn("native", args.classes, case[1], case[1], 1.0, 1.0)
           for case in cases}
    copy = loss_table.paired_copy(real)
    read = paired_sum(real)
    for case in cases:
        _use_isa(case[0])
        for _ in range(args.warmup):
            loss_table.run_once(fns[case], real, syn, "fwd+bwd")
    times = {case: [] for case in cases}
    copies, reads = [], []
    for _ in range(args.rounds):
        for case in cases:
            _use_isa(case[0])
            copies.append(copy())
            reads.append(read())
            times[case].append(loss_table.run_once(fns[case], real, syn, "fwd+bwd"))
    moved = loss_table.bytes_moved(real, syn, "fwd+bwd")
    copy_p80 = loss_table.copy_reference(copies)
    read_p80 = loss_table.copy_reference(reads)
    rows = []
    for isa, p in cases:
        med = statistics.median(times[(isa, p)])
        ref = statistics.median(times[(isa, 4.0)])
        rows.append({"isa": isa, "p": p, "median_ms": med * 1e3,
                     "min_ms": min(times[(isa, p)]) * 1e3, "max_ms": max(times[(isa, p)]) * 1e3,
                     "vs_p4": med / ref, "copy_fraction": moved / med / 1e9 / copy_p80,
                     "read_fraction": moved / med / 1e9 / read_p80,
                     "times_s": times[(isa, p)]})
    result = {
        "command": "python bench/powers_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": environment.cpu_name(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "shape": [args.C, args.H, args.W], "classes": args.classes, "real_per_class": args.real,
        "ipc": args.ipc, "warmup": args.warmup, "rounds": args.rounds,
        "bytes_moved": moved, "copy_p80_gbs": copy_p80, "copy_gbs": copies,
        "read_p80_gbs": read_p80, "read_gbs": reads, "rows": rows,
    }
    print(f"{args.C}x{args.H}x{args.W}, {args.classes} classes x {args.real} real, IPC {args.ipc}, "
          f"fwd+bwd, {torch.get_num_threads()} threads; copy p80 {copy_p80:.1f} GB/s, "
          f"read (sum) p80 {read_p80:.1f} GB/s")
    print("| isa | p | median ms (min-max) | of copy | of read | vs p = 4 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['isa']} | {r['p']:g} | {r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f}) "
              f"| {100 * r['copy_fraction']:.0f}% | {100 * r['read_fraction']:.0f}% | {r['vs_p4']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
