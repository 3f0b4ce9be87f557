"""The launch budget: ATen ops dispatched per loss call and per distillation step, and the host time
of a loss call on tiny tensors.

On a GPU every ATen op that touches device memory is at least one kernel launch, and a step's time
at small sizes is the host's time to issue them. The ops are counted on CPU with a
``TorchDispatchMode`` (every op the dispatcher sees, host-side ones included; a custom op, such as a
Triton launcher of the Triton backend, counts once and the ops inside it are not seen: a Triton
launcher allocates its outputs with ``torch.empty`` and launches one kernel, except the stats
launcher, which zeroes its channel vectors when a sample's H*W spans several blocks, and
``loss_scalars``, which fills its five values once per set of values and is then reused):

* per layer, one ``attention_loss`` forward + backward (the features path, 2 layers: the count per
  layer is half of it), one ``class_statistics`` call (the statistics path) and one
  ``attention_loss(stats, ...)`` forward + backward (the from-sums path), for the native and the
  Triton backends (Triton interpreted on CPU, ``TRITON_INTERPRET=1``);
* per ``Distiller.step`` of the fused loop (ATOM, native backend, DSA on, batch_real 128) at 10
  classes and IPC 1, 10, 50, and at 100 classes IPC 1; and the DataDAM-script loop at 10 classes IPC
  1 beside it; on CPU, and on the meta device, where the step dispatches what it would on a GPU
  (copies of host data to the device included) without computing anything; and the fused steps on
  meta again with the Triton backend, the one a GPU run uses by default. The images are 3x16x16 and
  the network is 16 wide (depth 3): the op count does not depend on the sizes, only on the classes,
  the IPC and the number of chunks.

Host time: microseconds per layer of one forward + backward on tiny tensors (native backend, one
thread, the median of five rounds' median calls, with their range): the pure per-call overhead of
the features path and of the statistics path (``class_statistics`` then the from-sums loss).

    python -m bench.launch_budget --out bench/results/launch-budget-2026-12-04
    python -m bench.launch_budget --quick        # no K=100 / IPC 50 steps, fewer timed calls

writes OUT.json (every count by op name, the machine, versions, the command) and OUT.md (the table).
"""

import os

if "TRITON_INTERPRET" not in os.environ:  # before anything imports triton
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import atom_fast  # noqa: E402
from atom_fast import environment  # noqa: E402

# what the targets of this table are (ops per layer, per step; microseconds per layer)
TARGETS = {"features": 10, "statistics+from-sums": 15, "step K=10 IPC 1": 400,
           "features us": 100, "statistics+from-sums us": 200}
LAYER = (8, 8, 8)  # (C, H, W) of the counted layers
CLASSES = 10


class OpCounter(TorchDispatchMode):
    """ATen ops dispatched under it, by name; also how many were views (no kernel: a new tensor
    header over the same memory) and, of the others, how many touched a tensor off the CPU (on a
    GPU, the kernel launches and copies; on meta, what a GPU step would launch)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.views = 0
        self.device_work = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            self.views += 1
        elif any(isinstance(t, torch.Tensor) and t.device.type != "cpu"
                 for t in pytree.tree_leaves((args, kwargs, out))):
            self.device_work[name] += 1
        return out

    @property
    def total(self):
        return sum(self.ops.values())


def counted(fn):
    """(total, by name) of the ops of one call of ``fn``, after one uncounted call (first-use work
    such as loading the Triton kernels is not counted)."""
    fn()
    counter = OpCounter()
    with counter:
        fn()
    return counter.total, dict(counter.ops.most_common())


def loss_inputs(layers, real_per_class=4, ipc=2, classes=CLASSES):
    torch.manual_seed(0)
    real = [torch.randn(classes * real_per_class, *LAYER).relu() for _ in range(layers)]
    syn = [torch.randn(classes * ipc, *LAYER, requires_grad=True) for _ in range(layers)]
    labels = torch.arange(classes).repeat_interleave(real_per_class)
    return real, syn, labels


def path_calls(backend, layers):
    """The three paths' calls (name -> zero-argument function) on ``layers`` layers."""
    real, syn, labels = loss_inputs(layers)

    def features():
        atom_fast.attention_loss(real, syn, CLASSES, backend=backend).backward()

    def statistics_():
        atom_fast.class_statistics(real, CLASSES, labels=labels, backend=backend)

    stats = atom_fast.class_statistics(real, CLASSES, labels=labels, backend=backend)

    def from_sums():
        atom_fast.attention_loss(stats, syn, backend=backend).backward()

    def both():
        statistics_()
        from_sums()

    return {"features": features, "statistics": statistics_, "from-sums": from_sums,
            "statistics+from-sums": both}


def loss_counts(backends, layers=2):
    """Ops per layer of each path and backend (a ``layers``-layer call, divided by ``layers``)."""
    rows = []
    for backend in backends:
        for path, fn in path_calls(backend, layers).items():
            total, ops = counted(fn)
            rows.append({"backend": backend, "path": path, "layers": layers, "ops": total,
                         "ops_per_layer": total / layers, "by_op": ops})
    return rows


def step_counts(settings, device, backend="native"):
    """Ops of one ``Distiller.step`` (after a warm-up step) for each (label, classes, ipc, loop) on
    ``device`` ("cpu", or "meta": the ops a GPU step dispatches, shapes only) with the loss on
    ``backend`` (on a GPU ``auto`` picks "triton")."""
    from atom_fast.distill.loop import DistillConfig, Distiller

    rows = []
    for label, classes, ipc, loop in settings:
        g = torch.Generator().manual_seed(0)
        per_class = 130
        x = torch.randn(classes * per_class, 3, 16, 16, generator=g)
        y = torch.arange(classes).repeat_interleave(per_class)
        cfg = DistillConfig(method="atom", ipc=ipc, batch_real=128, width=16, depth=3, loop=loop,
                            backend=backend, dsa=True, iterations=3)
        d = Distiller(x, y, classes, cfg, device, prefetch=False)
        try:
            d.step(0)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a read of the meta device
            rows.append({"label": label, "device": device, "backend": backend,
                         "classes": classes, "ipc": ipc, "loop": loop, "chunks": None, "ops": None, "by_op": {},
                         "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        counter = OpCounter()
        with counter:
            d.step(1)
        d.close()
        rows.append({"label": label, "device": device, "backend": backend, "classes": classes,
                     "ipc": ipc, "loop": loop,
                     "chunks": len(d.chunks) if loop == "fused" else None,
                     "real_chunks": (-(-classes * cfg.batch_real // d.real_chunk)
                                     if loop == "fused" else None),
                     "ops": counter.total, "views": counter.views,
                     "device_ops": sum(counter.device_work.values()),
                     "device_by_op": dict(counter.device_work.most_common()),
                     "by_op": dict(counter.ops.most_common())})
    return rows


def host_times(repeats, rounds=5):
    """Microseconds per layer of one call on tiny tensors (native, one thread): ``rounds`` rounds,
    each timing every path ``repeats // rounds`` times in turn; per path the median of the round
    medians and their range (a shared machine's slow moments show as a wide range)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calls = {}
    for layers in (1, 4):
        torch.manual_seed(0)
        real = [torch.randn(6, 2, 2, 2).relu() for _ in range(layers)]
        syn = [torch.randn(3, 2, 2, 2, requires_grad=True) for _ in range(layers)]
        labels = torch.arange(3).repeat_interleave(2)

        def features(real=real, syn=syn):
            atom_fast.attention_loss(real, syn, 3, backend="native").backward()

        def stats_path(real=real, syn=syn, labels=labels):
            stats = atom_fast.class_statistics(real, 3, labels=labels, backend="native")
            atom_fast.attention_loss(stats, syn, backend="native").backward()

        calls[("features", layers)] = features
        calls[("statistics+from-sums", layers)] = stats_path
    medians = {key: [] for key in calls}
    try:
        for fn in calls.values():
            for _ in range(20):
                fn()
        for _ in range(rounds):
            for key, fn in calls.items():
                times = []
                for _ in range(max(1, repeats // rounds)):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                medians[key].append(statistics.median(times) * 1e6)
    finally:
        torch.set_num_threads(threads)
    out = []
    for (path, layers), values in sorted(medians.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(values)
        out.append({"path": path, "layers": layers, "us_per_call": med,
                    "us_per_layer": med / layers, "round_medians_us": values})
    return out


def markdown(result):
    lines = [f"# Launch budget ({result['date']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}, {result['threads']} torch threads (host times: 1); "
             "load average at the start "
             + ", ".join(f"{v:.1f}" for v in result.get("load_average", ())) + "  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()
                                      if v is not None), "",
             "ATen ops dispatched (TorchDispatchMode on CPU; host-side ops included; a Triton "
             "launcher custom op counts once).", "",
             f"## Per layer, forward + backward ({CLASSES} classes, layer {LAYER}, "
             f"{result['loss'][0]['layers']} layers per call)", "",
             "| path | backend | ops per layer | target | top ops |", "|---|---|---:|---:|---|"]
    for r in result["loss"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["by_op"].items())[:5])
        target = TARGETS.get(r["path"], "")
        lines.append(f"| {r['path']} | {r['backend']} | {r['ops_per_layer']:g} | {target} | {top} |")
    lines += ["", "## Per distillation step (ATOM, DSA, batch_real 128, 3x16x16, width 16)",
              "", "cpu: the ops of a CPU step (the native block tail; copies to the device are no-ops; "
              "real chunks of 256 images). meta: the same step on the meta device, the op stream of a "
              "GPU step (the block tail as modules, every copy of host data to the device counted as "
              "`_to_copy`; real chunks of 2048 images, the default off the CPU). ops: every ATen op "
              "dispatched; views: those that only make a tensor header (no kernel); device ops: the "
              "others that touch a tensor off the CPU (on meta: the launches and copies a GPU step "
              "would issue; host-side work such as the random draws is not among them). backend: "
              "the loss's (a GPU run's default, `auto`, is triton; each of its launchers counts as "
              "one op).", "",
              "| step | device | backend | loop | classes | IPC | real chunks | synthetic chunks | ops "
              "| views | device ops | top ops |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["steps"]:
        top = ", ".join(f"{k} {v}" for k, v in list(r["by_op"].items())[:5])

        def cell(key):
            return "" if r.get(key) is None else r[key]

        device_ops = r.get("device_ops") if r.get("device") == "meta" else None
        lines.append(f"| {r['label']} | {r.get('device', 'cpu')} | {r.get('backend', 'native')} | "
                     f"{r['loop']} | {r['classes']} | "
                     f"{r['ipc']} | {cell('real_chunks')} | {cell('chunks')} | {cell('ops')} | "
                     f"{cell('views')} | {'' if device_ops is None else device_ops} | "
                     f"{top or r.get('error', '')} |")
    lines += ["", "## Host time per layer, forward + backward (native, tiny tensors, one thread)", "",
              "Median over rounds of each round's median call (the paths timed in turn in every "
              "round); the range is that of the round medians.", "",
              "| path | layers per call | us per call | us per layer | range per layer |",
              "|---|---:|---:|---:|---|"]
    for r in result["host"]:
        rounds = r.get("round_medians_us") or [r["us_per_call"]]
        lo, hi = min(rounds) / r["layers"], max(rounds) / r["layers"]
        lines.append(f"| {r['path']} | {r['layers']} | {r['us_per_call']:.0f} | "
                     f"{r['us_per_layer']:.0f} | {lo:.0f}-{hi:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write OUT.json and OUT.md (default: print the table)")
    parser.add_argument("--quick", action="store_true", help="no K=100 or IPC 50 steps, fewer calls")
    parser.add_argument("--backends", default="native,triton")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    settings = [("fused K=10 IPC 1", 10, 1, "fused"), ("fused K=10 IPC 10", 10, 10, "fused"),
                ("DataDAM script K=10 IPC 1", 10, 1, "datadam")]
    if not args.quick:
        settings[2:2] = [("fused K=10 IPC 50", 10, 50, "fused"), ("fused K=100 IPC 1", 100, 1, "fused")]
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python -m bench.launch_budget " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": environment.device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),  # other work on the machine during the host times
        "versions": environment.versions(),
        "targets": TARGETS,
        "loss": loss_counts(backends),
        "steps": (step_counts(settings, "cpu") + step_counts(settings, "meta")
                  + (step_counts([row for row in settings if row[3] == "fused"], "meta", "triton")
                     if "triton" in backends else [])),
        "host": host_times(200 if args.quick else 2000),
    }
    text = markdown(result)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
