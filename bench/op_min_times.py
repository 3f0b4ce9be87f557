"""The native CPU op's two passes over the features, alone, per power: the minimum over many calls
(robust to the other jobs of a shared machine) of ``attention_stats`` (the forward's statistics
pass: reads F) and ``attention_backward`` (reads F, writes dF) on a small batch, in ns per feature
element, beside a ``copy_`` of the same tensor. Prints JSON.

    python bench/op_min_times.py [--threads 1] [--calls 80] [--samples 4] [--powers 4,2.5,1.5,3.7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _min_seconds(fn, calls: int) -> float:
    fn()  # one untimed call
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(shapes, powers, samples: int = 4, calls: int = 80) -> list:
    from atom_fast.backends import native
    if not native.AVAILABLE:
        raise SystemExit("the native op is not built (python setup.py build_ext --inplace)")
    ops = torch.ops.atom_fast
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        features = torch.randn(samples, *shape).relu_()
        n = features.numel()
        dst = torch.empty_like(features)
        copy_s = _min_seconds(lambda: dst.copy_(features), calls)
        offsets = torch.tensor([0, samples])
        grad = torch.ones(())
        for p in powers:
            stats = ops.attention_stats(features, p, p, True, True)
            diffs = torch.randn(1, shape[1] * shape[2] + shape[0])
            stats_s = _min_seconds(lambda: ops.attention_stats(features, p, p, True, True), calls)
            backward_s = _min_seconds(lambda: ops.attention_backward(
                grad, features, stats, diffs, offsets, None, -1.0, p, p, 1.0, 1.0), calls)
            rows.append({"C_H_W": list(shape), "p": p,
                         "stats_ns_per_element": stats_s / n * 1e9,
                         "backward_ns_per_element": backward_s / n * 1e9,
                         "stats_min_s": stats_s, "backward_min_s": backward_s, "copy_min_s": copy_s,
                         "stats_read_gbs": features.nbytes / stats_s / 1e9,
                         "backward_gbs": 2 * features.nbytes / backward_s / 1e9,
                         "copy_gbs": 2 * features.nbytes / copy_s / 1e9, "elements": n})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=80)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--powers", default="4,2.5,1.5,3.7")
    parser.add_argument("--shapes", default="128x32x32,128x64x64")
    args = parser.parse_args(argv)
    for name in ("threads", "calls", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    try:
        powers = [float(p) for p in args.powers.split(",")]
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error("--powers takes numbers and --shapes CxHxW, comma-separated")
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        parser.error("--shapes takes CxHxW with positive sizes, e.g. 128x32x32")
    torch.set_num_threads(args.threads)
    from atom_fast.backends import native
    out = {"command": "python bench/op_min_times.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "threads": torch.get_num_threads(), "native_isa": native.cpu_isa(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "rows": measure(shapes, powers, args.samples, args.calls)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
