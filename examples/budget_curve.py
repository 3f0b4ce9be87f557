"""Accuracy against distillation iterations: the evaluations of one run's sets at several budgets.

    python examples/budget_curve.py --out bench/results/mnist-budget-DATE/budget \\
        --baseline RANDOM.json atom:200:A200.json atom:500:A500.json dm:200:D200.json ...

Each ``METHOD:ITERATIONS:RESULTS`` names the ``results.json`` of ``atom-fast evaluate`` on the set a
run had after that many iterations (the run distilled with ``--iterations N --eval-models 0``, then
continued with ``--resume --iterations M``). ``--baseline``: a ``results.json`` whose random-real
baseline (``baseline``) or whose own result (a ``--method random`` run) is the random images of the
same IPC under the same protocol. Writes OUT.json (every point, per architecture, with its source
file) and OUT.png (one panel per architecture: mean +- std over the evaluation models, the random
baseline as a band).
"""

import argparse
import json
from pathlib import Path


def _per_architecture(results):
    return {a: (v["accuracy_mean"], v["accuracy_std"]) for a, v in results["architectures"].items()}


def collect(entries, baseline_path):
    points = []
    for entry in entries:
        try:
            method, iterations, path = entry.split(":", 2)
            iterations = int(iterations)
        except ValueError:
            raise SystemExit(f"budget_curve: {entry!r} is not METHOD:ITERATIONS:RESULTS.json")
        r = json.loads(Path(path).read_text())
        points.append({"method": method, "iterations": iterations, "source": path,
                       "protocol": r.get("evaluation"), "accuracy": _per_architecture(r)})
    base = json.loads(Path(baseline_path).read_text())
    if base.get("baseline"):
        baseline = {a: (v["accuracy_mean"], v["accuracy_std"])
                    for a, v in base["baseline"]["architectures"].items()}
    else:
        baseline = _per_architecture(base)
    return {"points": sorted(points, key=lambda p: (p["method"], p["iterations"])),
            "baseline": {"source": baseline_path, "accuracy": baseline}}


def plot(data, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(data["baseline"]["accuracy"])
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.6), squeeze=False)
    methods = sorted({p["method"] for p in data["points"]})
    for ax, arch in zip(axes[0], archs):
        for method in methods:
            pts = [p for p in data["points"] if p["method"] == method and arch in p["accuracy"]]
            xs = [p["iterations"] for p in pts]
            ms = [p["accuracy"][arch][0] for p in pts]
            ss = [p["accuracy"][arch][1] for p in pts]
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=method)
        m, s = data["baseline"]["accuracy"][arch]
        ax.axhspan(m - s, m + s, color="grey", alpha=0.25)
        ax.axhline(m, color="grey", linestyle="--", label="random real")
        ax.set_xscale("log")
        ticks = sorted({p["iterations"] for p in data["points"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("distillation iterations")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="+", help="METHOD:ITERATIONS:results.json")
    p.add_argument("--baseline", required=True, help="results.json holding the random baseline")
    p.add_argument("--out", required=True, help="output prefix: OUT.json and OUT.png")
    args = p.parse_args(argv)
    data = collect(args.entries, args.baseline)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out.with_suffix(".png"))
    print(f"budget_curve: wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
