"""The native op at ImageNet-1K class counts, called the way the fused loop calls it (docs/scale.md):

- ``stats``: ``class_statistics`` of one real chunk (``--chunk`` images of each ``--shapes`` layer,
  labels spread over ``--spread`` of the K classes), under no_grad: reads the chunk once;
- ``loss``: the attention loss from the statistics of K classes for one synthetic chunk of
  ``--syn`` images at IPC 1 and IPC 10 (``--syn`` / IPC classes hold it), forward + backward
  w.r.t. the synthetic features: reads the chunk, then reads it again and writes its gradient.

Each row is measured at K = 1000 and, beside it, at K = 10 with the same bytes (the same chunk; at
K = 10 the labels cover all 10 classes), so the ratio of the two times is the cost of the class count
alone. Timing as in bench/loss_table.py: one process, every timed call preceded by a ``copy_`` of the
chunk's size; "of copy" is the call's GB/s (bytes that must move / median time) over the 80th
percentile of those copies' GB/s (a copy near the machine's bandwidth of the moment).

    python bench/classes_table.py --json bench/results/cpu-classes-DATE.json
"""

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import atom_fast  # noqa: E402
from atom_fast import environment  # noqa: E402
from bench import loss_table, measure  # noqa: E402


def spread_labels(n, spread, K, g):
    """``n`` labels over ``spread`` classes chosen among ``K`` (every chosen class gets n / spread)."""
    chosen = torch.randperm(K, generator=g)[:spread]
    return chosen[torch.arange(n) % spread][torch.randperm(n, generator=g)].contiguous()


def timed(fn, copy, warmup, repeats):
    """Median (p20-p80) of ``repeats`` calls of ``fn`` after ``warmup``, each preceded by ``copy``."""
    for _ in range(warmup):
        fn()
    times, copies = [], []
    for _ in range(repeats):
        copies.append(copy())
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {**measure.quantiles(times), "repeats": repeats, "paired_copy_gbs": copies,
            "copy_p80_gbs": loss_table.copy_reference(copies)}


def stats_rows(args, shape, g):
    C, H, W = shape
    real = torch.randn(args.chunk, C, H, W, generator=g).relu_()
    copy = loss_table.paired_copy(real)
    rows = []
    for spread in args.spreads:
        for K in (args.classes, 10):
            labels = spread_labels(args.chunk, min(spread, K), K, g)

            def call():
                with torch.no_grad():
                    atom_fast.class_statistics(real, K, labels=labels, backend="native",
                                               spatial_power=args.power, channel_power=args.power)
            t = timed(call, copy, args.warmup, args.repeats)
            rows.append({"kind": "stats", "C_H_W": list(shape), "images": args.chunk, "K": K,
                         "classes_in_chunk": min(spread, K), "bytes_moved": real.nbytes, **t})
    return rows


def loss_rows(args, shape, g):
    """As the fused loop's _fused_backward: statistics of all K classes, then per synthetic chunk of
    classes ``stats.select(chunk)`` and the loss of those classes (equal blocks of IPC images),
    forward + backward. The K = 10 twin: the same images, labels over 10 classes, no select."""
    C, H, W = shape
    real = torch.randn(args.chunk, C, H, W, generator=g).relu_()
    rows = []
    for ipc in args.ipcs:
        present = max(args.syn // ipc, 1)  # classes in the synthetic chunk
        syn = torch.randn(present * ipc, C, H, W, generator=g).relu_().requires_grad_()
        copy = loss_table.paired_copy(syn.detach())
        for K in (args.classes, 10):
            # real statistics of every class (as the loop's, summed over its real chunks): the
            # chunk reduced under shifted labels until all K classes have samples
            stats = None
            for start in range(0, K, args.chunk):
                labels = (torch.arange(args.chunk) + start) % K
                with torch.no_grad():
                    part = atom_fast.class_statistics(real, K, labels=labels, backend="native",
                                                      spatial_power=args.power, channel_power=args.power)
                stats = part if stats is None else stats + part
            kw = dict(backend="native", spatial_power=args.power, channel_power=args.power)
            if K == 10:
                labels = (torch.arange(syn.shape[0]) % 10).contiguous()
                stats10 = stats

                def call():
                    syn.grad = None
                    atom_fast.attention_loss(stats10, syn, 10, syn_labels=labels, **kw).backward()
            else:
                chunk = torch.randperm(K, generator=g)[:present].sort().values.tolist()

                def call():
                    syn.grad = None
                    part = stats.select(chunk)
                    atom_fast.attention_loss(part, syn, len(chunk), **kw).backward()
            t = timed(call, copy, args.warmup, args.repeats)
            rows.append({"kind": "loss fwd+bwd", "C_H_W": list(shape), "images": syn.shape[0],
                         "ipc": ipc, "K": K, "classes_in_chunk": min(present, K),
                         "bytes_moved": 3 * syn.nbytes, **t})
    return rows


def finish(rows):
    for r in rows:
        r["gbs"] = r["bytes_moved"] / r["median_s"] / 1e9
        r["copy_fraction"] = r["gbs"] / r["copy_p80_gbs"]
    # each K = 1000 row is followed by its K = 10 twin (same chunk, same kind)
    for big, small in zip(rows[::2], rows[1::2]):
        assert big["K"] != 10 and small["K"] == 10 and big["kind"] == small["kind"]
        big["vs_K10"] = big["median_s"] / small["median_s"]
    return rows


def markdown(result):
    lines = [f"Native op at K = {result['config']['classes']} on {result['device']}, "
             f"{result['threads']} threads, torch {result['torch']}, native ISA {result['native_isa']}, "
             f"float32, ps = pc = {result['config']['power']}",
             "",
             "| call | layer (C,H,W) | images | IPC | K | classes in chunk | median ms (p20-p80) | GB/s | of copy (p80) | vs K=10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        vs = f"{r['vs_K10']:.2f}x" if "vs_K10" in r else "-"
        lines.append(f"| {r['kind']} | {'x'.join(map(str, r['C_H_W']))} | {r['images']} | "
                     f"{r.get('ipc', '-')} | {r['K']} | {r['classes_in_chunk']} | "
                     f"{1e3 * r['median_s']:.2f} ({1e3 * r['p20_s']:.2f}-{1e3 * r['p80_s']:.2f}) | "
                     f"{r['gbs']:.1f} | {100 * r['copy_fraction']:.0f}% | {vs} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000, help="K of the large rows (default 1000)")
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in x.split("x")) for x in s.split(",")],
                   default=[(128, 32, 32), (128, 16, 16)])
    p.add_argument("--chunk", type=int, default=256, help="real images per chunk")
    p.add_argument("--spreads", type=lambda s: [int(v) for v in s.split(",")], default=[16, 256],
                   help="classes the real chunk's labels cover")
    p.add_argument("--syn", type=int, default=128, help="synthetic images per chunk")
    p.add_argument("--ipcs", type=lambda s: [int(v) for v in s.split(",")], default=[1, 10])
    p.add_argument("--power", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="also write the result as JSON to this file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from atom_fast.allocator import keep_freed_memory
    malloc_kept = keep_freed_memory()
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    rows = []
    for shape in args.shapes:
        rows += stats_rows(args, shape, g)
        rows += loss_rows(args, shape, g)
    result = {"command": "python bench/classes_table.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d"), "device": environment.device_name(torch.device("cpu")),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "native_isa": atom_fast.backends.native.cpu_isa(),
              "malloc_keeps_freed_memory": malloc_kept,
              "config": {k: v for k, v in vars(args).items() if k != "json"},
              "wall_s": None, "rows": finish(rows)}
    result["wall_s"] = time.time() - t0
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
