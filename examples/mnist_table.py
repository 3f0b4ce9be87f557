"""Collect the ``results.json`` of several runs into one markdown table (method, IPC, accuracy).

    python examples/mnist_table.py runs/mnist-*/results.json

The random baseline of each IPC is taken from any run that evaluated it (``--baseline``).
"""

import json
import sys


def main(paths):
    rows, baselines = [], {}
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        key = (r["dataset"], r["ipc"])
        if r["method"] == "random":
            baselines[key] = r
        else:
            rows.append(r)
            if r.get("baseline"):
                baselines.setdefault(key, {**r["baseline"], "dataset": r["dataset"], "ipc": r["ipc"],
                                           "iterations": 0, "timings": {}})
    rows += baselines.values()
    order = {"random": 0, "dm": 1, "datadam": 2, "atom-channel": 3, "atom": 4}
    rows.sort(key=lambda r: (r["dataset"], r["ipc"], order.get(r["method"], 9)))
    print("| dataset | IPC | method | iterations | accuracy (%) | models | distill s | eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r.get("timings", {})
        ev = t.get(f"{r['method']}_eval_s")
        print(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r.get('iterations') or '-'} | "
              f"{r['accuracy_mean']:.2f} +- {r['accuracy_std']:.2f} | {len(r['accuracies'])} | "
              f"{t.get('distill_s', 0):.0f} | {ev:.0f} |" if ev is not None else
              f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r.get('iterations') or '-'} | "
              f"{r['accuracy_mean']:.2f} +- {r['accuracy_std']:.2f} | {len(r['accuracies'])} | - | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
