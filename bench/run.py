"""Runtime and peak-memory tables of the attention loss and of a whole distillation step, in one command.

    python bench/run.py --device cpu --quick            # under 3 minutes on 2 CPU cores
    python bench/run.py --device cuda                   # everything, on a GPU
    python bench/run.py --device cpu --only loss --out bench/results/

Markdown tables go to stdout; ``--out`` (default ``bench/results/<device>-<date>.json``; a directory
gets ``<device>-<date>.json`` inside it) receives the JSON with every condition and figure, a CSV of
the same rows next to it, and a PNG of the speedups.

Loss table (bench/loss_table.py does the measuring; this file chooses the workloads). One
``attention_loss`` call on one layer's features, per layer shape: 10 classes x 128 real samples and
IPC 1, 10, 50 synthetic samples per class, float32, ps = pc = 4, both weights 1, only the synthetic
features requiring a gradient. The shapes are the ConvNet-3 (CIFAR, 32x32) and ConvNet-4
(TinyImageNet, 64x64) layers whose attention is matched: (128, 64, 64), (128, 32, 32), (128, 16, 16);
a network's loss is the sum of its layers' rows. 10 classes is what one CIFAR-10 step passes; larger
class counts are processed in chunks of 10 classes. Providers: ``eager`` (the plain-PyTorch
reference), ``compile`` (``torch.compile(dynamic=False)`` of it, compiled afresh for each timed shape;
the compilation is the first warm-up call, recorded as ``warmup_s``), ``native`` (the C++/CUDA op)
and ``triton`` (CUDA only). Modes fwd, bwd (backward alone), fwd+bwd. Times: median with 20th/80th
percentiles, the device synchronized around every call. Achieved GB/s counts the bytes that must move
(SPEC 4): forward reads every real and synthetic feature once, backward reads the synthetic features
and writes their gradient once; it is compared with the bandwidth of ``copy_`` measured in the same
run. Peak extra memory, in a fresh process per provider and mode: CUDA, peak allocated above the
inputs; CPU, growth of the resident set during one call with glibc returning every block >= 64 KiB
to the OS (so freed temporaries cannot hide in the heap); the backward alone is not measured on CPU.

Step table (the layout of the ATOM paper's Table 3): seconds per ``Distiller.step`` and its peak memory
at IPC 1, 10, 50, CIFAR-10 shapes (10 classes, 3x32x32 random images, ConvNet width 128 depth 3
instancenorm, batch_real 128, DSA on). Each (method, loop, IPC) runs in a fresh child process: warm-up
steps, then timed steps (the device synchronized after each; median and 20th/80th percentiles), then
one more step for memory. Peak memory = memory held between steps except the dataset (synthetic
images, their gradient and momentum, network weights) + the peak growth during that step. CUDA:
``max_memory_allocated`` after a reset, minus the resident dataset. CPU: the held tensors' bytes plus
the resident-set growth during the step (VmHWM reset through /proc/self/clear_refs), with glibc
switched (mallopt) to return every block >= 64 KiB to the OS after the timed steps. The timed steps
run with the allocator setting the CLI uses on CPU (``keep_freed_memory``: glibc keeps freed feature
maps). DM has no attention; its row uses the batched ("fused") loop.

``--quick`` keeps the whole run under 3 minutes on 2 CPU cores. It always runs the loss at the CIFAR
layer-1 shape (128x32x32) and IPC 10, fwd+bwd, and the ATOM fused and reference loops at IPC 10;
then, in this order, the other paper rows at IPC 10, ATOM's loops at IPC 1 and 50, the 16x16 layer
and the other rows at IPC 1 and 50, each only while the projected total (from the items already run)
stays within ``--budget`` seconds (165, counted from the process start). The output lists everything
quick left out.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before torch's import: the budget counts the whole process

import argparse
import csv
import ctypes
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import loss_table as lt  # noqa: E402  (bench/ is not a package)

import atom_fast  # noqa: E402

SCHEMA = "atom_fast.bench/1"
CLASSES = 10
REAL_PER_CLASS = 128
IPCS = (1, 10, 50)
# (C, H, W) of the matched layers -> which network layers have it
LAYERS = {
    (128, 64, 64): "TinyImageNet block 1",
    (128, 32, 32): "CIFAR block 1, TinyImageNet block 2",
    (128, 16, 16): "CIFAR block 2, TinyImageNet block 3",
}
LOSS_SETTINGS = {"dtype": "float32", "ps": 4.0, "pc": 4.0, "ws": 1.0, "wc": 1.0}
# label, method, loop; the paper's Table 3 rows first
STEP_ROWS = (
    ("DM (batched loop, no attention)", "dm", "fused"),
    ("DataDAM (reference loop)", "datadam", "reference"),
    ("ATOM (reference loop)", "atom", "reference"),
    ("ATOM (fused loop)", "atom", "fused"),
    ("ATOM channel-only (fused loop)", "atom-channel", "fused"),
    ("DataDAM (fused loop)", "datadam", "fused"),
)
PAPER_ROWS = STEP_ROWS[:5]
SPEEDUP_BASE = "ATOM (reference loop)"
STEP_IMAGE = (3, 32, 32)
QUICK_BUDGET_S = 165.0   # 3 minutes less a margin for misestimates and the output files


# --------------------------------------------------------------------------------------------------
# what runs: a plan of jobs
# --------------------------------------------------------------------------------------------------


def _timing(device, quick, tiny):
    """Repeat counts. CPU runs are seconds per call, so fewer; CUDA warms up Triton/cuDNN first."""
    if device.type == "cuda":
        return {"loss_warmup": 3, "loss_repeats": 10 if quick else 30,
                "step_warmup": 3 if quick else 5, "step_steps": 20 if quick else 100}
    if tiny:
        return {"loss_warmup": 1, "loss_repeats": 3, "step_warmup": 1, "step_steps": 2}
    return {"loss_warmup": 1, "loss_repeats": 5 if quick else 7,
            "step_warmup": 1, "step_steps": 2 if quick else 5}


def loss_job(shape, ipc, providers, modes, required=True, classes=CLASSES, real=REAL_PER_CLASS):
    return {"kind": "loss", "shape": tuple(shape), "ipc": ipc, "providers": list(providers),
            "modes": list(modes), "classes": classes, "real": real, "required": required}


def step_job(label, method, loop, ipc, required=True, **net):
    return {"kind": "step", "label": label, "method": method, "loop": loop, "ipc": ipc,
            "required": required, **net}


def describe(job):
    if job["kind"] == "loss":
        shape = "x".join(map(str, job["shape"]))
        return f"loss {shape} IPC {job['ipc']} {'/'.join(job['modes'])} {','.join(job['providers'])}"
    return f"step {job['label']} IPC {job['ipc']}"


def build_plan(args):
    """(jobs, notes): the jobs in run order, and what this mode leaves out on purpose."""
    loss_on = args.only in (None, "loss")
    step_on = args.only in (None, "step")
    providers = args.providers or list(lt.PROVIDERS)
    jobs, notes = [], []
    if args.tiny:  # CI-sized: exercises every code path in seconds
        if loss_on:
            jobs.append(loss_job((16, 8, 8), 2, args.providers or ["eager", "native"], ["bwd", "fwd+bwd"],
                                 real=4))
        if step_on:
            net = {"width": 8, "batch_real": 4}
            jobs += [step_job(label, m, loop, 1, **net) for label, m, loop in STEP_ROWS
                     if label in ("ATOM (reference loop)", "ATOM (fused loop)")]
        notes.append("tiny: test-sized shapes (loss 16x8x8 with 4 real per class; step width 8, "
                     "batch_real 4), not figures to quote")
        return jobs, notes
    if not args.quick:
        if loss_on:
            jobs += [loss_job(shape, ipc, providers, lt.MODES) for shape in LAYERS for ipc in IPCS]
        if step_on:
            jobs += [step_job(label, m, loop, ipc) for ipc in IPCS for label, m, loop in STEP_ROWS]
        return jobs, notes
    # --quick: the loss at CIFAR layer 1 and ATOM's two loops at IPC 10 always run; every other item,
    # in order of interest, only while the projected total stays within the budget
    if loss_on:
        jobs.append(loss_job((128, 32, 32), 10, providers, ["fwd+bwd"]))
    if step_on:
        first = [row for row in PAPER_ROWS if row[1] == "atom" and row[2] in ("fused", "reference")]
        jobs += [step_job(label, m, loop, 10) for label, m, loop in first]
        jobs += [step_job(label, m, loop, 10, required=False) for label, m, loop in PAPER_ROWS
                 if (label, m, loop) not in first]
        for ipc in (1, 50):
            jobs += [step_job(label, m, loop, ipc, required=False) for label, m, loop in PAPER_ROWS
                     if m == "atom" and loop in ("fused", "reference")]
    if loss_on:
        jobs.append(loss_job((128, 16, 16), 10, providers, ["fwd+bwd"], required=False))
    if step_on:
        for ipc in (1, 50):
            jobs += [step_job(label, m, loop, ipc, required=False) for label, m, loop in PAPER_ROWS
                     if m != "atom" or loop not in ("fused", "reference")]
    t = args.timing
    if loss_on:
        notes.append("quick: the loss modes fwd and bwd alone, the loss at IPC 1 and 50 and the "
                     "TinyImageNet layer 128x64x64 are not run; the loss is timed over "
                     f"{t['loss_repeats']} calls after {t['loss_warmup']} warm-up")
    if step_on:
        notes.append("quick: the DataDAM (fused loop) step row is not run; steps are timed over "
                     f"{t['step_steps']} steps after {t['step_warmup']} warm-up")
    return jobs, notes


def estimate_s(job, done):
    """Seconds an optional job will take, from the jobs already run (None: no basis, run it);
    15% above what they took, as the last job run must not push the total past the budget."""
    est = _estimate_s(job, done)
    return None if est is None else 1.15 * est


def _estimate_s(job, done):
    same = [d for d in done if d["job"]["kind"] == job["kind"]]
    if not same:
        return None
    if job["kind"] == "step":
        rows = ([d for d in same if d["job"]["label"] == job["label"]]
                or [d for d in same if d["job"]["loop"] == job["loop"]] or same)
        return max(d["seconds"] for d in rows) * (1.3 if job["ipc"] > 10 else 1.0)
    ref = max(same, key=lambda d: d["job"]["shape"][1] * d["job"]["shape"][2])
    ratio = (job["shape"][1] * job["shape"][2]) / (ref["job"]["shape"][1] * ref["job"]["shape"][2])
    return ref["seconds"] * max(ratio, 0.6)  # compilation and process starts do not shrink with H*W


# --------------------------------------------------------------------------------------------------
# the loss table
# --------------------------------------------------------------------------------------------------


def _free_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loss_memory_needed(job):
    """Bytes a loss job needs at once: a memory child's inputs and the eager reference's peak
    (its |F|^p temporaries: ~2x the inputs, measured) while the parent keeps its own inputs."""
    C, H, W = job["shape"]
    inputs = job["classes"] * (job["real"] + job["ipc"]) * C * H * W * 4
    return 4 * inputs


def loss_argv(job, args):
    """bench/loss_table.py's command line for ``job`` (its memory children re-parse it)."""
    s = LOSS_SETTINGS
    argv = ["--device", args.device, "--classes", str(job["classes"]), "--real", str(job["real"]),
            "--ipc", str(job["ipc"]), "--shape", "x".join(map(str, job["shape"])),
            "--dtype", s["dtype"], "--ps", str(s["ps"]), "--pc", str(s["pc"]), "--ws", str(s["ws"]),
            "--wc", str(s["wc"]), "--providers", ",".join(job["providers"]),
            "--modes", ",".join(job["modes"]), "--warmup", str(args.timing["loss_warmup"]),
            "--repeats", str(args.timing["loss_repeats"]), "--compile-dynamic", "false"]
    return argv + ([] if args.memory else ["--no-memory"])


def run_loss_job(job, args):
    # a fresh dynamo cache per shape: each shape gets its own static graph, and the graphs of earlier
    # shapes would otherwise count towards the recompile limit (past it, dynamo silently runs eager)
    torch._dynamo.reset()
    result = lt.run_table(lt.parse_args(loss_argv(job, args)))
    C, H, W = job["shape"]
    common = {"C": C, "H": H, "W": W, "layers": LAYERS.get(job["shape"], "test shape"),
              "classes": job["classes"], "real_per_class": job["real"], "ipc": job["ipc"],
              "dtype": LOSS_SETTINGS["dtype"], "input_bytes": result["input_bytes"],
              "copy_gbs": result["copy_gbs"], "unit": "one layer per call"}
    return [{**common, **row} for row in result["rows"]]


# --------------------------------------------------------------------------------------------------
# the step table: one child process per (method, loop, IPC)
# --------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _glibc_return_to_os():
    """Make glibc hand every freed block >= 64 KiB back to the OS (as MALLOC_MMAP_THRESHOLD_ does
    for loss_table's children), so the resident set follows live memory; True if it worked."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
        # undo the CLI's keep_freed_memory() of the timed steps (mmap allowed again)
        ok = (libc.mallopt(M_MMAP_MAX, 65536) == 1 and libc.mallopt(M_MMAP_THRESHOLD, 65536) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, 0) == 1)
        libc.malloc_trim(0)  # what the heap already caches goes back now
        return ok
    except (OSError, AttributeError):
        return False


def _held_bytes(d):
    """Bytes of what a Distiller keeps between steps, besides the dataset."""
    tensors = [d.syn, d.syn.grad, *d.net.parameters(), *d.net.buffers()]
    for state in d.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def step_memory(d, device, iteration):
    """Peak bytes of one step: held state (no dataset) + the growth during the step."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        d.step(iteration)
        _sync(device)
        dataset = d.images.numel() * d.images.element_size()
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - dataset, "transient_bytes": peak - before,
                "held_bytes": before - dataset, "memory_method": "cuda max_memory_allocated - dataset"}
    mmap_mode = _glibc_return_to_os()
    gc.collect()
    held = _held_bytes(d)
    base = lt._proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak resident set) to the current resident set
    d.step(iteration)
    transient = (lt._proc_status_kib("VmHWM") - base) * 1024
    return {"peak_bytes": held + transient, "transient_bytes": transient, "held_bytes": held,
            "memory_method": "held tensors + resident-set growth" +
                             ("" if mmap_mode else " (glibc mallopt unavailable: heap may hide frees)")}


def step_child(spec):
    """Time ``Distiller.step`` for one (method, loop, IPC); runs in a fresh process."""
    from atom_fast.distill.cli import keep_freed_memory
    from atom_fast.distill.loop import DistillConfig, Distiller

    device = torch.device(spec["device"])
    # time the steps with the allocator setting the CLI uses on CPU (glibc keeps freed feature
    # maps instead of page-faulting them back every step)
    malloc_kept = device.type == "cpu" and keep_freed_memory()
    per_class = max(2 * spec["batch_real"], spec["ipc"])
    g = torch.Generator().manual_seed(0)
    # random normalized images: timing does not depend on pixel values
    images = torch.randn(CLASSES * per_class, *STEP_IMAGE, generator=g)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    config = DistillConfig(method=spec["method"], ipc=spec["ipc"], batch_real=spec["batch_real"],
                           loop=spec["loop"], seed=0, width=spec["width"], depth=spec["depth"],
                           norm="instancenorm")
    t0 = time.perf_counter()
    d = Distiller(images, labels, CLASSES, config, device)
    _sync(device)
    init_s = time.perf_counter() - t0
    warm = []
    for i in range(spec["warmup"]):
        t0 = time.perf_counter()
        d.step(i)
        _sync(device)
        warm.append(time.perf_counter() - t0)
    times = []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        loss = d.step(i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    out = {"init_s": init_s, "warmup_s": warm, **_quantiles(times), "steps": len(times),
           "last_loss": float(loss), "malloc_keeps_freed_memory": malloc_kept}
    if spec["memory"]:
        out.update(step_memory(d, device, spec["warmup"] + spec["steps"]))
    return out


def _quantiles(times):
    times = sorted(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "times_s": times}


def step_spec(job, args):
    big = {"width": 128, "depth": 3, "batch_real": REAL_PER_CLASS}
    net = {k: job.get(k, v) for k, v in big.items()}
    return {"device": args.device, "method": job["method"], "loop": job["loop"], "ipc": job["ipc"],
            **net, "warmup": args.timing["step_warmup"], "steps": args.timing["step_steps"],
            "memory": args.memory}


def run_step_job(job, args):
    spec = step_spec(job, args)
    cmd = [sys.executable, os.path.abspath(__file__), "--step-child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"row": job["label"], **{k: v for k, v in spec.items() if k != "device"},
           "classes": CLASSES, "image": "x".join(map(str, STEP_IMAGE)), "norm": "instancenorm",
           "attention_backend": _attention_backend(job, args)}
    if proc.returncode != 0:
        print(f"step child failed for {describe(job)}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return [{**row, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                 f"exit code {proc.returncode}"}]
    return [{**row, **json.loads(proc.stdout.strip().splitlines()[-1])}]


def _attention_backend(job, args):
    if job["method"] == "dm":
        return None
    if job["loop"] == "reference":
        return "reference"
    return atom_fast.loss.resolve_backend("auto", torch.device(args.device))


def add_step_speedups(rows):
    base = {r["ipc"]: r["median_s"] for r in rows if r["row"] == SPEEDUP_BASE and "median_s" in r}
    for r in rows:
        r["speedup_vs_atom_reference"] = (base[r["ipc"]] / r["median_s"]
                                          if r["ipc"] in base and "median_s" in r else None)


# --------------------------------------------------------------------------------------------------
# running the plan
# --------------------------------------------------------------------------------------------------


def run_plan(jobs, args, start):
    """Run the jobs; optional ones only while the projected total stays within args.budget."""
    done, skipped, loss_rows, step_rows = [], [], [], []
    device = torch.device(args.device)
    for job in jobs:
        elapsed = time.perf_counter() - start
        if not job["required"] and args.budget is not None:
            est = estimate_s(job, done)
            if est is not None and elapsed + est > args.budget:
                skipped.append(f"{describe(job)}: would end past the {args.budget:.0f} s budget "
                               f"({elapsed:.0f} s spent, ~{est:.0f} s more)")
                continue
        if job["kind"] == "loss":
            free = _free_memory_bytes(device)
            if free is not None and loss_memory_needed(job) > 0.9 * free:
                skipped.append(f"{describe(job)}: needs ~{loss_memory_needed(job) / 1e9:.1f} GB, "
                               f"{free / 1e9:.1f} GB free")
                continue
        print(f"[{elapsed:5.0f} s] {describe(job)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            if job["kind"] == "loss":
                loss_rows += run_loss_job(job, args)
            else:
                step_rows += run_step_job(job, args)
        except Exception as e:  # noqa: BLE001  (one failed workload must not lose the others)
            print(f"{describe(job)} failed: {e!r}", file=sys.stderr)
            skipped.append(f"{describe(job)}: failed: {e!r}")
            continue
        done.append({"job": job, "seconds": time.perf_counter() - t0})
    add_step_speedups(step_rows)
    return loss_rows, step_rows, skipped, done


# --------------------------------------------------------------------------------------------------
# conditions, tables, files
# --------------------------------------------------------------------------------------------------


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else lt._cpu_name()


def device_slug(device):
    """A short file-name slug: cpu, h100, a100, ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b(gh200|h200|h100|h800|a100|a800|a10g?|l40s?|l4|v100|t4|rtx ?\w+)\b", name)
    return re.sub(r"[^a-z0-9]+", "", m.group(1)) if m else "cuda"


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device):
    env = {"device_type": device.type, "device_name": device_name(device),
           "torch": torch.__version__, "triton": _version("triton"), "atom_fast": _version("atom-fast"),
           "python": platform.python_version(), "platform": platform.platform(),
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "native_built": atom_fast.loss.native_available(), "native_isa": atom_fast._native.cpu_isa(),
           "backend_env": os.environ.get(atom_fast.loss.BACKEND_ENV)}
    if device.type == "cuda":
        env.update({"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "native_cuda": atom_fast.loss.native_available(device),
                    "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory})
    return env


def _ms(r):
    # three significant digits or more: GPU rows are fractions of a millisecond, CPU eager seconds
    digits = 1 if r["median_s"] >= 0.01 else 2 if r["median_s"] >= 0.001 else 3
    return " ".join((f"{1e3 * r['median_s']:.{digits}f}",
                     f"({1e3 * r['p20_s']:.{digits}f}-{1e3 * r['p80_s']:.{digits}f})"))


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def loss_markdown(rows, env):
    if not rows:
        return ""
    s = LOSS_SETTINGS
    head = (f"Loss on {env['device_name']}, {env['threads']} threads, torch {env['torch']}, triton "
            f"{env['triton']}, native ISA {env['native_isa']}. One attention_loss call per layer shape "
            f"(a network's loss is the sum of its layers' rows); {rows[0]['classes']} classes x "
            f"{rows[0]['real_per_class']} real per call (larger class counts are processed in chunks "
            f"of 10 classes); {s['dtype']}, ps={s['ps']:g} pc={s['pc']:g} ws={s['ws']:g} wc={s['wc']:g}; "
            "only the synthetic features require grad. GB/s: bytes that must move (fwd reads real + "
            "syn, bwd reads syn and writes its gradient) / median; 'of copy': vs copy_ in the same run; "
            "peak extra: fresh process, above the inputs (CPU: resident-set growth). compile = "
            "torch.compile(dynamic=False) of the reference.")
    lines = [head, "",
             "| layer (C,H,W) | used by | IPC | mode | provider | median ms (p20-p80) | GB/s | of copy "
             "| vs eager | vs compile | peak extra MB (of inputs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_extra_bytes")
        peak_s = "-" if peak is None else f"{peak / 1e6:.1f} ({100 * r['peak_extra_fraction']:.0f}%)"
        lines.append(f"| {r['C']}x{r['H']}x{r['W']} | {r['layers']} | {r['ipc']} | {r['mode']} | "
                     f"{r['provider']} | {_ms(r)} | {r['gbs']:.1f} | {100 * r['copy_fraction']:.0f}% | "
                     f"{_x(r['speedup_vs_eager'])} | {_x(r['speedup_vs_compile'])} | {peak_s} |")
    return "\n".join(lines)


def step_markdown(rows, env):
    if not rows:
        return ""
    r0 = rows[0]
    ipcs = sorted({r["ipc"] for r in rows})
    head = (f"Distillation step on {env['device_name']}, {env['threads']} threads: {r0['classes']} "
            f"classes, {r0['image']} random images, ConvNet width {r0['width']} depth {r0['depth']} "
            f"{r0['norm']}, batch_real {r0['batch_real']}, DSA on; median (p20-p80) over "
            f"{r0['steps']} steps after {r0['warmup']} warm-up. Peak MB: memory held between steps "
            "except the dataset + peak growth during one step (CUDA: max_memory_allocated - dataset; "
            "CPU: held tensors + resident-set growth, fresh process). Speedup: vs ATOM (reference loop).")
    by = {(r["row"], r["ipc"]): r for r in rows}
    labels = [label for label, _, _ in STEP_ROWS if any(r["row"] == label for r in rows)]
    cols = [f"s/step IPC {i}" for i in ipcs] + [f"speedup IPC {i}" for i in ipcs] + \
           [f"peak MB IPC {i}" for i in ipcs]
    lines = [head, "", "| method (loop) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label in labels:
        cells = []
        for key in ("time", "speedup", "peak"):
            for ipc in ipcs:
                cells.append(_step_cell(by.get((label, ipc)), key))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_cell(r, key):
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    if key == "time":
        return f"{r['median_s']:.3f} ({r['p20_s']:.3f}-{r['p80_s']:.3f})"
    if key == "speedup":
        return _x(r.get("speedup_vs_atom_reference"))
    return "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 1e6:.0f}"


def output_paths(args, slug):
    """(json, csv, png) paths: --out as a .json file, or a directory (made if missing)."""
    stem = f"{slug}-{datetime.date.today().isoformat()}"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if out.endswith(".json"):
        base = out[:-len(".json")]
    else:
        base = os.path.join(out, stem)
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    return base + ".json", base + ".csv", base + ".png"


def write_csv(path, loss_rows, step_rows):
    rows = [{"table": "loss", **r} for r in loss_rows] + [{"table": "step", **r} for r in step_rows]
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def write_plot(path, loss_rows, step_rows, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (("loss", loss_rows), ("step", step_rows)) if p[1]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7 * max(len(panels), 1), 4.5), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels):
        if kind == "loss":
            _bars(ax, rows, group=lambda r: f"{r['C']}x{r['H']}x{r['W']}\nIPC {r['ipc']} {r['mode']}",
                  series=lambda r: r["provider"], value=lambda r: r.get("speedup_vs_eager"),
                  skip=lambda r: r["provider"] == "eager")
            ax.set_ylabel("speedup vs eager reference (log)")
            ax.set_yscale("log")
            ax.set_title("attention loss, one layer per call")
        else:
            _bars(ax, rows, group=lambda r: f"IPC {r['ipc']}", series=lambda r: r["row"],
                  value=lambda r: r.get("speedup_vs_atom_reference"), skip=lambda r: False)
            ax.set_ylabel("speedup vs ATOM (reference loop)")
            ax.set_title("distillation step (CIFAR-10 shapes)")
        ax.axhline(1.0, color="gray", lw=0.8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, rows, group, series, value, skip):
    rows = [r for r in rows if not skip(r) and value(r) is not None]
    groups = list(dict.fromkeys(group(r) for r in rows))
    names = list(dict.fromkeys(series(r) for r in rows))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys = [], []
        for r in rows:
            if series(r) == name:
                xs.append(groups.index(group(r)) + (j - (len(names) - 1) / 2) * width)
                ys.append(value(r))
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.1fx", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="under 3 minutes on 2 CPU cores: fewer shapes, IPCs and repeats")
    p.add_argument("--only", choices=["loss", "step"], help="run one table only")
    p.add_argument("--out", help="JSON file, or a directory for <device>-<date>.json/.csv/.png "
                                 "(default bench/results/)")
    p.add_argument("--providers", type=lambda s: s.split(","),
                   help=f"loss providers, comma-separated (default all available of {lt.PROVIDERS})")
    p.add_argument("--budget", type=float,
                   help=f"seconds the optional items may extend the run to (quick: {QUICK_BUDGET_S:.0f})")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' size
    p.add_argument("--step-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [v for v in args.providers or [] if v not in lt.PROVIDERS]
    if bad:
        p.error(f"--providers: {bad} not in {lt.PROVIDERS}")
    if args.budget is None and args.quick:
        args.budget = QUICK_BUDGET_S
    args.timing = _timing(torch.device(args.device), args.quick, args.tiny)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.step_child:
        print(json.dumps(step_child(json.loads(args.step_child))))
        return
    start = _T0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/run.py: --device cuda but torch.cuda.is_available() is False")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    jobs, notes = build_plan(args)
    loss_rows, step_rows, skipped, done = run_plan(jobs, args, start)
    env = environment(device)
    result = {
        "schema": SCHEMA, "started": started, "command": [os.path.basename(sys.executable), *sys.argv],
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "environment": env,
        "config": {"device": args.device, "only": args.only, "memory": args.memory,
                   "budget_s": args.budget, **args.timing, "loss": {**LOSS_SETTINGS, "classes": CLASSES,
                   "compile_dynamic": False, "unit": "one layer per call"},
                   "step": {"classes": CLASSES, "image": list(STEP_IMAGE), "seed": 0,
                            "speedup_base": SPEEDUP_BASE}},
        "plan": [{"what": describe(d["job"]), "seconds": d["seconds"]} for d in done],
        "notes": notes, "skipped": skipped,
        "loss": loss_rows, "step": step_rows,
    }
    json_path, csv_path, png_path = output_paths(args, device_slug(device))
    write_csv(csv_path, loss_rows, step_rows)
    write_plot(png_path, loss_rows, step_rows,
               f"{env['device_name']}, torch {env['torch']}, {result['mode']} run, {started}")
    result["wall_s"] = time.perf_counter() - start
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    for table in (loss_markdown(loss_rows, env), step_markdown(step_rows, env)):
        if table:
            print(table + "\n")
    for line in notes + [f"skipped: {s}" for s in skipped]:
        print(f"- {line}")
    print(f"\nwall {result['wall_s']:.0f} s; wrote {json_path}, {csv_path}, {png_path}")


if __name__ == "__main__":
    main()
