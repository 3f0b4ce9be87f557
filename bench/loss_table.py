"""Runtime and peak extra memory of the attention loss, per provider, on one device.

Providers:
    eager     atom_fast's plain-PyTorch reference (the ground truth), eager
    compile   torch.compile of that same reference function (default mode)
    native    the C++/CUDA op of csrc/ (backend="native")
    triton    the Triton kernels (backend="triton"; CUDA only)
Modes: ``fwd`` (the loss, with autograd recording), ``bwd`` (loss.backward() alone, the forward run
untimed before each repeat) and ``fwd+bwd``. As in a distillation step, only the synthetic features
require a gradient.

Bytes that must move (docs/loss.md): forward reads every real and synthetic feature once; backward reads
the synthetic features and writes their gradient once. The per-sample vectors (N*(H*W + C)) are
ignored: at C=128, 16x16 they are 1.5% of F. Achieved GB/s = those bytes / median time. "Of copy"
compares it with ``dst.copy_(real)`` (read + write), measured in the same process: every timed call
is preceded by one such copy, and the reference is the 80th percentile of those copies' GB/s (the
machine's copy bandwidth near its best during the run; this project's CPU machines are shared VMs
whose bandwidth drifts). The median over the pairs of (call GB/s / copy GB/s), the measure used
before 2026-12-03, is kept in the JSON as ``paired_copy_fraction``.

On CPU the timed calls run with the allocator setting of the driver
(``atom_fast.allocator.keep_freed_memory``: glibc keeps freed blocks instead of returning them, so
each call's fresh gradient buffer is not page-faulted in again), as in a distillation run and in the
step table.

Peak extra memory is measured in a fresh child process per provider and mode: CUDA, peak allocated
above the inputs; CPU, growth of the resident set (VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS before the timed call), with glibc told to return every block of
64 KiB or more to the OS (MALLOC_MMAP_THRESHOLD_), so freed temporaries cannot hide in the heap.
The warm-up call (and torch.compile's compilation) happens before the reset.

    python bench/loss_table.py --device cpu                  # the native op's acceptance shape
    python -m bench.loss_table --device cpu --json out.json --providers eager,native

bench/run.py's loss table is this table at each matched layer shape (:data:`LAYERS`) and IPC
(:func:`run_job`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file (python bench/loss_table.py): make `bench` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import atom_fast  # noqa: E402
from atom_fast import environment  # noqa: E402
from atom_fast.backends import reference  # noqa: E402
from atom_fast.layout import ClassLayout  # noqa: E402
from bench import measure  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

PROVIDERS = ("eager", "compile", "native", "triton")
MODES = ("fwd", "bwd", "fwd+bwd")
# bench/run.py's loss table: (C, H, W) of the matched layers -> which network layers have it
LAYERS = {
    (128, 64, 64): "TinyImageNet block 1",
    (128, 32, 32): "CIFAR block 1, TinyImageNet block 2",
    (128, 16, 16): "CIFAR block 2, TinyImageNet block 3",
}
SETTINGS = {"dtype": "float32", "ps": 4.0, "pc": 4.0, "ws": 1.0, "wc": 1.0}


# --------------------------------------------------------------------------------------------------
# the workload
# --------------------------------------------------------------------------------------------------


def make_inputs(classes, real_per_class, ipc, C, H, W, dtype, device, seed=0):
    """Post-ReLU real features and synthetic features (leaf, requires grad), classes in blocks."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(classes * real_per_class, C, H, W, generator=g).relu_().to(device, dtype)
    syn = torch.randn(classes * ipc, C, H, W, generator=g).relu_().to(device, dtype)
    return real, syn.requires_grad_()


def loss_fn(provider, classes, ps, pc, ws, wc, dynamic=None):
    """A function (real, syn) -> loss for ``provider``; ``dynamic`` goes to torch.compile."""
    if provider in ("native", "triton"):
        def fused(real, syn):
            return atom_fast.attention_loss(real, syn, classes, spatial_power=ps, channel_power=pc,
                                            spatial_weight=ws, channel_weight=wc, backend=provider)
        return fused

    def eager(real, syn):
        layout = ClassLayout(classes, real_per_class=real.shape[0] // classes,
                             syn_per_class=syn.shape[0] // classes)
        return reference.attention_loss([real], [syn], layout, ps, pc, ws, wc)

    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager, dynamic=dynamic)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def bytes_moved(real, syn, mode):
    fwd = (real.numel() + syn.numel()) * real.element_size()
    bwd = 2 * syn.numel() * syn.element_size()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def run_once(fn, real, syn, mode):
    """One call in ``mode``; returns the seconds of the timed part."""
    device = real.device
    syn.grad = None
    if mode == "bwd":
        loss = fn(real, syn)
        measure.sync(device)
        t0 = time.perf_counter()
        loss.backward()
        measure.sync(device)
        return time.perf_counter() - t0
    measure.sync(device)
    t0 = time.perf_counter()
    loss = fn(real, syn)
    if mode == "fwd+bwd":
        loss.backward()
    measure.sync(device)
    elapsed = time.perf_counter() - t0
    if mode == "fwd":
        del loss
    return elapsed


def time_provider(fn, real, syn, mode, warmup, repeats, copy=None):
    """Median (p20-p80) of ``repeats`` calls after ``warmup``. With ``copy`` (a callable returning
    one ``copy_``'s GB/s), each timed call is preceded by a copy, and ``copy_fraction`` is the
    call's GB/s (bytes that must move / median time) over the 80th percentile of those copies' GB/s
    (:func:`copy_reference`); ``paired_copy_fraction`` keeps the earlier measure, the median over
    the pairs of (the call's GB/s / its copy's GB/s)."""
    # the warm-up times are kept: the first one holds torch.compile's compilation
    warm = [run_once(fn, real, syn, mode) for _ in range(warmup)]
    times, copies = [], []
    for _ in range(repeats):
        if copy is not None:
            copies.append(copy())
        times.append(run_once(fn, real, syn, mode))
    out = {**measure.quantiles(times), "repeats": repeats, "warmup_s": warm}
    if copies:
        moved = bytes_moved(real, syn, mode)
        out["paired_copy_gbs"] = copies
        out["copy_p80_gbs"] = copy_reference(copies)
        out["copy_fraction"] = moved / out["median_s"] / 1e9 / out["copy_p80_gbs"]
        out["paired_copy_fraction"] = statistics.median(
            moved / t / 1e9 / c for t, c in zip(times, copies))
    return out


def copy_reference(copies):
    """The copy bandwidth a call is compared with: the 80th percentile (inclusive) of the GB/s of
    the copies interleaved with the timed calls, i.e. the copy near the machine's best of the
    moment (a median would let slow moments of a shared machine flatter the calls)."""
    copies = sorted(copies)
    return statistics.quantiles(copies, n=5, method="inclusive")[3] if len(copies) > 1 else copies[0]


def paired_copy(x):
    """A callable timing one ``copy_`` of ``x``'s size into a buffer kept for the purpose; returns
    GB/s (bytes read + written)."""
    dst = torch.empty_like(x)

    def once():
        measure.sync(x.device)
        t0 = time.perf_counter()
        dst.copy_(x)
        measure.sync(x.device)
        return 2 * x.numel() * x.element_size() / (time.perf_counter() - t0) / 1e9

    once()  # first touch of dst
    return once


# --------------------------------------------------------------------------------------------------
# peak extra memory, in a fresh process
# --------------------------------------------------------------------------------------------------


def measure_memory_here(args, provider, mode):
    """Peak bytes above the inputs during one call (run in the child process)."""
    device = torch.device(args.device)
    real, syn = make_inputs(args.classes, args.real, args.ipc, *args.shape, _dtype(args.dtype), device)
    fn = loss_fn(provider, args.classes, args.ps, args.pc, args.ws, args.wc, _compile_dynamic(args))
    run_once(fn, real, syn, mode)  # warm-up: compilation, lazy initialization, first allocations
    syn.grad = None
    if device.type == "cuda":
        _, before, peak = measure.cuda_peak(lambda: run_once(fn, real, syn, mode), device)
        return peak - before
    if mode == "bwd":
        raise ValueError("CPU peak memory is measured for fwd and fwd+bwd")
    _, grown = measure.rss_growth(lambda: run_once(fn, real, syn, mode))
    return grown


def measure_memory(args, provider, mode):
    """Run measure_memory_here in a fresh interpreter; returns bytes, or None if it failed."""
    env = dict(os.environ, **measure.RETURN_TO_OS_ENV)
    cmd = [sys.executable, "-m", "bench.loss_table", *args.argv, "--memory-child", provider, mode]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory child failed for {provider}/{mode}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------


def _dtype(name):
    return {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def _compile_dynamic(args):
    """torch.compile's ``dynamic`` for --compile-dynamic: auto -> None (torch's default)."""
    return {"auto": None, "false": False, "true": True}[getattr(args, "compile_dynamic", "auto")]


def available_providers(device):
    out = ["eager", "compile"]
    if atom_fast.backends.native_available(device):
        out.append("native")
    if device.type == "cuda" and atom_fast.backends.triton_available():
        out.append("triton")
    return out


def run_table(args):
    device = torch.device(args.device)
    # time with the allocator setting the driver uses on CPU (glibc keeps freed blocks, so a fresh
    # gradient buffer is not page-faulted in again on every call), as the step table does; the
    # memory children undo it (measure.glibc_return_to_os)
    from atom_fast.allocator import keep_freed_memory
    malloc_kept = device.type == "cpu" and keep_freed_memory()
    torch.manual_seed(0)
    real, syn = make_inputs(args.classes, args.real, args.ipc, *args.shape, _dtype(args.dtype), device)
    providers = [p for p in args.providers if p in available_providers(device)]
    input_bytes = (real.numel() + syn.numel()) * real.element_size()
    rows = []
    copy_gbs = measure.copy_bandwidth(real)
    copy = paired_copy(real)
    for mode in args.modes:
        for provider in providers:
            fn = loss_fn(provider, args.classes, args.ps, args.pc, args.ws, args.wc,
                         _compile_dynamic(args))
            t = time_provider(fn, real, syn, mode, args.warmup, args.repeats, copy)
            moved = bytes_moved(real, syn, mode)
            row = {"provider": provider, "mode": mode, **t, "bytes_moved": moved,
                   "gbs": moved / t["median_s"] / 1e9}
            rows.append(row)
    del copy
    by_mode = {}
    for row in rows:
        by_mode.setdefault(row["mode"], {})[row["provider"]] = row
    for row in rows:
        base = by_mode[row["mode"]]
        row["speedup_vs_eager"] = base["eager"]["median_s"] / row["median_s"] if "eager" in base else None
        row["speedup_vs_compile"] = (base["compile"]["median_s"] / row["median_s"]
                                     if "compile" in base else None)
        if args.memory and (device.type == "cuda" or row["mode"] != "bwd"):
            peak = measure_memory(args, row["provider"], row["mode"])
            row["peak_extra_bytes"] = peak
            row["peak_extra_fraction"] = None if peak is None else peak / input_bytes
    return {
        "device": environment.device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_isa": atom_fast.backends.native.cpu_isa(),
        "config": {"classes": args.classes, "real_per_class": args.real, "ipc": args.ipc,
                   "C_H_W": list(args.shape), "dtype": args.dtype, "spatial_power": args.ps,
                   "channel_power": args.pc, "spatial_weight": args.ws, "channel_weight": args.wc,
                   "warmup": args.warmup, "repeats": args.repeats,
                   "compile_dynamic": getattr(args, "compile_dynamic", "auto")},
        "input_bytes": input_bytes,
        "copy_gbs": copy_gbs,
        "malloc_keeps_freed_memory": malloc_kept,
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# bench/run.py's loss table: one job per (layer shape, IPC)
# --------------------------------------------------------------------------------------------------


def memory_needed(job):
    """Bytes a loss job needs at once: a memory child's inputs and the eager reference's peak
    (its |F|^p temporaries: ~2x the inputs, measured) while the parent keeps its own inputs."""
    C, H, W = job["shape"]
    inputs = job["classes"] * (job["real"] + job["ipc"]) * C * H * W * 4
    return 4 * inputs


def job_argv(job, args):
    """This file's command line for a bench/run.py loss ``job`` (its memory children re-parse it)."""
    s = SETTINGS
    argv = ["--device", args.device, "--classes", str(job["classes"]), "--real", str(job["real"]),
            "--ipc", str(job["ipc"]), "--shape", "x".join(map(str, job["shape"])),
            "--dtype", s["dtype"], "--ps", str(s["ps"]), "--pc", str(s["pc"]), "--ws", str(s["ws"]),
            "--wc", str(s["wc"]), "--providers", ",".join(job["providers"]),
            "--modes", ",".join(job["modes"]), "--warmup", str(args.timing["loss_warmup"]),
            "--repeats", str(args.timing["loss_repeats"]), "--compile-dynamic", "false"]
    return argv + ([] if args.memory else ["--no-memory"])


def run_job(job, args):
    """The rows of one bench/run.py loss job, each with its layer's conditions."""
    # a fresh dynamo cache per shape: each shape gets its own static graph, and the graphs of earlier
    # shapes would otherwise count towards the recompile limit (past it, dynamo silently runs eager)
    torch._dynamo.reset()
    result = run_table(parse_args(job_argv(job, args)))
    C, H, W = job["shape"]
    common = {"C": C, "H": H, "W": W, "layers": LAYERS.get(job["shape"], "test shape"),
              "classes": job["classes"], "real_per_class": job["real"], "ipc": job["ipc"],
              "dtype": SETTINGS["dtype"], "input_bytes": result["input_bytes"],
              "copy_gbs": result["copy_gbs"], "unit": "one layer per call"}
    return [{**common, **row} for row in result["rows"]]


def markdown(result):
    cfg = result["config"]
    lines = [f"Loss on {result['device']}, {result['threads']} threads, torch {result['torch']}, "
             f"native ISA {result['native_isa']}; {cfg['classes']} classes x {cfg['real_per_class']} "
             f"real, IPC {cfg['ipc']}, (C, H, W) = {tuple(cfg['C_H_W'])}, {cfg['dtype']}, "
             f"ps={cfg['spatial_power']} pc={cfg['channel_power']}; inputs "
             f"{result['input_bytes'] / 1e6:.1f} MB; copy bandwidth {result['copy_gbs']:.1f} GB/s",
             "",
             "| mode | provider | median ms (p20-p80) | GB/s | of copy | vs eager | vs compile | peak extra MB (of inputs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = r.get("peak_extra_bytes")
        peak_s = "-" if peak is None else f"{peak / 1e6:.1f} ({100 * r['peak_extra_fraction']:.1f}%)"
        vs = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        lines.append(f"| {r['mode']} | {r['provider']} | {1e3 * r['median_s']:.1f} "
                     f"({1e3 * r['p20_s']:.1f}-{1e3 * r['p80_s']:.1f}) | {r['gbs']:.1f} | "
                     f"{100 * r['copy_fraction']:.0f}% | {vs(r['speedup_vs_eager'])} | "
                     f"{vs(r['speedup_vs_compile'])} | {peak_s} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--real", type=int, default=128, help="real samples per class")
    p.add_argument("--ipc", type=int, default=10, help="synthetic samples per class")
    p.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split("x")), default=(128, 16, 16),
                   help="C x H x W of the layer (default 128x16x16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--ps", type=float, default=4.0)
    p.add_argument("--pc", type=float, default=4.0)
    p.add_argument("--ws", type=float, default=1.0)
    p.add_argument("--wc", type=float, default=1.0)
    p.add_argument("--providers", type=lambda s: s.split(","), default=list(PROVIDERS))
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile-dynamic", choices=["auto", "false", "true"], default="auto",
                   help="torch.compile(dynamic=...) of the compile provider (auto: torch's default)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory child processes")
    p.add_argument("--json", help="also write the result as JSON to this file")
    p.add_argument("--memory-child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--memory-child" in raw:
        raw = raw[:raw.index("--memory-child")]
    args.argv = raw
    for name, allowed in (("providers", PROVIDERS), ("modes", MODES)):
        bad = [v for v in getattr(args, name) if v not in allowed]
        if bad:
            p.error(f"--{name}: {bad} not in {allowed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        provider, mode = args.memory_child
        print(json.dumps({"peak_extra_bytes": measure_memory_here(args, provider, mode)}))
        return
    result = run_table(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
