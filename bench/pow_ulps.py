"""The native CPU op's non-integer power |x|^p against float64, per instruction set: the largest
error in float32 ulps over the inputs that tests/backends/test_native_pow.py takes from here (every
4099th finite non-negative float32, subnormals included, the edges, and the inputs whose power lies
next to the largest float), through the test hook ``atom_fast::_general_power``. Prints JSON (the test holds every
power to 1 ulp; this reports how far below it each is).

    python bench/pow_ulps.py --isas default,avx2,avx512 --random-powers 300 \\
        --json bench/results/cpu-pow-ulps-2026-12-04.json
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from atom_fast.backends import native  # noqa: E402
from bench import measure  # noqa: E402

POWERS = [0.5, 0.75, 1.5, 2.5, 3.7, 7.3, 15.5, 24.5, 33.3, 63.9, 64.0, 64.5, 100.3,
          -0.5, -0.25, 2.7, 1.0, 2.0, 4.0, 16.0]
FLOAT_MAX = float(torch.finfo(torch.float32).max)


def magnitudes():
    """Every 4099th non-negative finite float32 bit pattern (all binades, subnormals included) and
    the edges: 0, the smallest and largest subnormal, the smallest normal, 1 and its neighbours,
    the largest float (tests/backends/test_native_pow.py sweeps these too)."""
    step = np.arange(0, 0x7F800000, 4099, dtype=np.int64)
    edges = np.array([0, 1, 2, 3, 0x007FFFFF, 0x00800000, 0x00800001, 0x3F7FFFFF, 0x3F800000,
                      0x3F800001, 0x7F7FFFFE, 0x7F7FFFFF], dtype=np.int64)
    bits = np.concatenate([step, edges]).astype(np.uint32).view(np.int32)
    return torch.from_numpy(bits.view(np.float32).copy())


def near_overflow(p):
    """Inputs whose p-th power lies within a few ulp of the largest float, on both sides."""
    edge = torch.tensor(FLOAT_MAX, dtype=torch.float64).pow(1 / p).float()
    return (edge.view(torch.int32) + torch.arange(-64, 65, dtype=torch.int32)).view(torch.float32)


def ulps(got, want):
    """|got - want| in float32 ulps of want (float64), subnormal spacing below the normals."""
    mag = want.abs().clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 23)
    return (got.double() - want).abs() / ulp


def max_ulps(x, p):
    got = torch.ops.atom_fast._general_power(x, p)
    want = x.double().pow(p)
    want[x == 0] = 0
    finite = ~torch.isinf(want.float())
    return ulps(got[finite], want[finite]).max().item()


def random_powers(count, seed=0):
    """The worst error over ``count`` random powers (the same ones for every instruction set)."""
    g = np.random.default_rng(seed)
    worst, at = 0.0, None
    for trial in range(count):
        if trial % 3 == 2:
            p = float(g.uniform(0.5, 56))
        else:
            p = float(g.uniform(56, 64)) * (1 if trial % 3 == 0 else -1)
        m = g.integers(0, 0x800000, 20000)
        m[:10000] = g.integers(0x070000, 0x080000, 10000)  # r near 1/16, the r^2 term largest
        bits = (g.integers(1, 254, 20000) << 23) | m
        x = torch.from_numpy(bits.astype(np.int32)).view(torch.float32)
        err = max_ulps(x, p)
        if err > worst:
            worst, at = err, p
    return worst, at


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isas", default="default,avx2,avx512")
    ap.add_argument("--random-powers", type=int, default=0,
                    help="also N random powers (2/3 in +-[56, 64], 1/3 in [0.5, 56]), each on 20000 "
                         "floats of every exponent, half at the top of the first reduction interval")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not native.AVAILABLE:
        sys.exit(f"the native op is not built: {native.LOAD_ERROR}")
    x = magnitudes()
    with measure.env_restored("ATOM_FAST_CPU_ISA"):  # the caller's setting, as it was
        result = _run(args, argv, x)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


def _run(args, argv, x):
    result = {"command": "python bench/pow_ulps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "isas": {}}
    for isa in args.isas.split(","):
        os.environ["ATOM_FAST_CPU_ISA"] = isa
        try:
            native.cpu_isa()
        except RuntimeError as exc:
            result["isas"][isa] = f"not on this CPU: {exc}"
            continue
        rows = {}
        for p in POWERS:
            worst = max_ulps(x, p)
            if p > 1:
                worst = max(worst, max_ulps(near_overflow(p), p))
            rows[str(p)] = worst
        result["isas"][isa] = {"max_ulps": rows, "worst": max(rows.values())}
        if args.random_powers:
            worst, at = random_powers(args.random_powers)
            result["isas"][isa]["random_powers"] = {"count": args.random_powers, "worst": worst,
                                                    "at_p": at}
        print(f"{isa}: worst {max(rows.values()):.4f} ulp", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
