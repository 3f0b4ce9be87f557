"""The step table (the layout of the ATOM paper's Table 3): seconds per ``Distiller.step`` and its
peak memory at IPC 1, 10, 50, CIFAR-10 shapes (10 classes, 3x32x32 random images, ConvNet width 128
depth 3 instancenorm, batch_real 128, DSA on).

A row is a :class:`StepRow`: a label, the ``DistillConfig`` fields it sets, and a :class:`Launcher`
(how its child process starts and with which environment). To add a row, append one to
:data:`STEP_ROWS`, e.g.::

    StepRow("ATOM (fused loop, PyTorch block tail)", {"method": "atom", "loop": "fused"},
            Launcher("1 process, ATOM_FAST_FUSED_BLOCK_TAIL=0", (), {"ATOM_FAST_FUSED_BLOCK_TAIL": "0"})),
    StepRow("ATOM (fused loop, batch_real 512)", {"method": "atom", "loop": "fused", "batch_real": 512}),
    StepRow("ATOM (fused loop, 2 ranks, gloo)", {"method": "atom", "loop": "fused"}, torchrun(2)),

Each (row, IPC) runs in a fresh child process (``python -m bench.step_table SPEC_JSON``, under the row's
launcher): warm-up steps, then timed steps (the device synchronized after each; median and 20th/80th
percentiles), then one more step for memory. Peak memory = memory held between steps except the
dataset (synthetic images, their gradient and momentum, network weights) + the peak growth during
that step. CUDA: ``max_memory_allocated`` after a reset, minus the resident dataset. CPU: the held
tensors' bytes plus the resident-set growth during the step, with glibc switched (mallopt) to return
every block >= 64 KiB to the OS after the timed steps. The timed steps run with the allocator setting
the driver uses on CPU (``atom_fast.allocator.keep_freed_memory``: glibc keeps freed feature maps).
DM has no attention; its row uses the batched ("fused") loop. Under torchrun (``torchrun(n)``) each
process owns its block of classes, as ``atom-fast`` under torchrun does; a step's time is the slowest
process's, its peak memory the largest process's (``*_per_rank`` keep each), ``last_loss`` is rank
0's part.
"""

import gc
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

import torch

import atom_fast
from bench import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
CLASSES = 10
IMAGE = (3, 32, 32)
# DistillConfig fields every row starts from; a row's config overrides them, a job's (--tiny) both
BASE_CONFIG = {"batch_real": 128, "width": 128, "depth": 3, "norm": "instancenorm"}


class Launcher(NamedTuple):
    """How a row's child process starts: ``[python, *argv, "-m", "bench.step_table", SPEC_JSON]`` with
    ``env`` added to the environment."""

    name: str
    argv: tuple = ()
    env: dict = {}


LOCAL = Launcher("1 process")


def torchrun(nproc, backend_env=None):
    """A launcher running the row on ``nproc`` processes of this machine with torchrun (gloo on CPU,
    NCCL on CUDA: chosen in the child)."""
    return Launcher(f"torchrun x{nproc}",
                    ("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"),
                    dict(backend_env or {}))


class StepRow(NamedTuple):
    label: str          # the table's row label; unique
    config: dict        # DistillConfig fields (method, loop, batch_real, ...) over BASE_CONFIG
    launcher: Launcher = LOCAL
    source: str = "memory"  # "memory": the images as one float tensor; "store": a prepared
                            # uint8 store on disk, read by class (with the prefetch thread)


# The ATOM paper's Table 3 rows first (PAPER_ROWS, which --quick runs first), then ours. The
# comparison loop is the structure of DataDAM's published script (loop="datadam": one forward of all
# classes' real images with hooks cloning every ReLU output); "class-by-class" is DM's low-memory recipe.
STEP_ROWS = (
    StepRow("DM (fused loop, no attention)", {"method": "dm", "loop": "fused"}),
    StepRow("DataDAM (DataDAM script loop)", {"method": "datadam", "loop": "datadam"}),
    StepRow("ATOM (DataDAM script loop)", {"method": "atom", "loop": "datadam"}),
    StepRow("ATOM (fused loop)", {"method": "atom", "loop": "fused"}),
    StepRow("ATOM channel-only (fused loop)", {"method": "atom-channel", "loop": "fused"}),
    StepRow("ATOM (class-by-class loop)", {"method": "atom", "loop": "class-by-class"}),
    StepRow("DataDAM (fused loop)", {"method": "datadam", "loop": "fused"}),
    StepRow("ATOM (fused loop, PyTorch block tail)", {"method": "atom", "loop": "fused"},
            Launcher("1 process, ATOM_FAST_FUSED_BLOCK_TAIL=0", (), {"ATOM_FAST_FUSED_BLOCK_TAIL": "0"})),
    StepRow("ATOM (fused loop, batch_real 512)", {"method": "atom", "loop": "fused", "batch_real": 512}),
    StepRow("ATOM (fused loop, 2 ranks, gloo)", {"method": "atom", "loop": "fused"}, torchrun(2)),
    StepRow("ATOM (fused loop, from a store)", {"method": "atom", "loop": "fused"}, source="store"),
)
PAPER_ROWS = tuple(r for r in STEP_ROWS if r.label in (
    "DM (fused loop, no attention)", "DataDAM (DataDAM script loop)", "ATOM (DataDAM script loop)",
    "ATOM (fused loop)", "ATOM channel-only (fused loop)"))
SPEEDUP_BASE = "ATOM (DataDAM script loop)"


def row(label):
    """The StepRow labelled ``label``."""
    for r in STEP_ROWS:
        if r.label == label:
            return r
    raise KeyError(f"no step-table row labelled {label!r}")


# --------------------------------------------------------------------------------------------------
# the child: one (row, IPC) in a fresh process
# --------------------------------------------------------------------------------------------------


def held_bytes(d):
    """Bytes of what a Distiller keeps between steps, besides the dataset."""
    tensors = [d.syn, d.syn.grad, *d.net.parameters(), *d.net.buffers()]
    for state in d.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def step_memory(d, device, iteration):
    """Peak bytes of one step: held state (no dataset) + the growth during the step."""
    gc.collect()
    if device.type == "cuda":
        _, before, peak = measure.cuda_peak(lambda: d.step(iteration), device)
        dataset = d.real.nbytes()
        return {"peak_bytes": peak - dataset, "transient_bytes": peak - before,
                "held_bytes": before - dataset, "memory_method": "cuda max_memory_allocated - dataset"}
    mmap_mode = measure.glibc_return_to_os()
    gc.collect()
    held = held_bytes(d)
    _, transient = measure.rss_growth(lambda: d.step(iteration))
    return {"peak_bytes": held + transient, "transient_bytes": transient, "held_bytes": held,
            "memory_method": "held tensors + resident-set growth" +
                             ("" if mmap_mode else " (glibc mallopt unavailable: heap may hide frees)")}


def step_child(spec):
    """Time ``Distiller.step`` for one row's config at one IPC; runs in a fresh process. Under
    torchrun every process runs the classes it owns (as ``atom-fast`` does); a step's time is the
    slowest process's, its peak memory the largest process's (each process's in ``*_per_rank``)."""
    from atom_fast.distill import distributed

    ctx = distributed.initialize(torch.device(spec["device"]), timeout_s=600)
    device = distributed.local_device(torch.device(spec["device"]), ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        out = _time_steps(spec, device, ctx.classes(CLASSES))
        per_rank = distributed.gather_to_main(ctx, out, "gathering the step times")
    finally:
        distributed.shutdown(ctx)
    if not ctx.is_main:
        return None
    if ctx.world_size == 1:
        return {**out, "times_s": sorted(out["times_s"]), "world_size": 1}
    slowest = [max(ts) for ts in zip(*(r["times_s"] for r in per_rank))]
    merged = {**out, **measure.quantiles(slowest), "times_s": sorted(slowest), "world_size": ctx.world_size,
              "times_s_per_rank": [r["times_s"] for r in per_rank]}
    for key in ("peak_bytes", "held_bytes", "transient_bytes"):
        if key in out:
            merged[key] = max(r[key] for r in per_rank)
            merged[f"{key}_per_rank"] = [r[key] for r in per_rank]
    return merged


def _time_steps(spec, device, classes):
    """One process's part of step_child: its classes' Distiller, timed, then its peak memory."""
    from atom_fast.allocator import keep_freed_memory
    from atom_fast.distill.loop import DistillConfig, Distiller

    # time the steps with the allocator setting the driver uses on CPU (glibc keeps freed feature
    # maps instead of page-faulting them back every step)
    malloc_kept = device.type == "cpu" and keep_freed_memory()
    config = spec["config"]
    per_class = max(2 * config["batch_real"], spec["ipc"])
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    if spec.get("source", "memory") == "store":
        images = _store_source(labels, device)
    else:
        # random normalized images: timing does not depend on pixel values
        images = torch.randn(CLASSES * per_class, *IMAGE, generator=g)
    t0 = time.perf_counter()
    d = Distiller(images, labels, CLASSES, DistillConfig(**config, ipc=spec["ipc"], seed=0), device,
                  classes=classes)
    measure.sync(device)
    init_s = time.perf_counter() - t0
    warm = []
    for i in range(spec["warmup"]):
        t0 = time.perf_counter()
        d.step(i)
        measure.sync(device)
        warm.append(time.perf_counter() - t0)
    times = []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        measure.sync(device)
        t0 = time.perf_counter()
        loss = d.step(i)
        measure.sync(device)
        times.append(time.perf_counter() - t0)
    out = {"init_s": init_s, "warmup_s": warm, **measure.quantiles(times), "times_s": times,
           "steps": len(times), "last_loss": float(loss), "malloc_keeps_freed_memory": malloc_kept}
    if spec["memory"]:
        out.update(step_memory(d, device, spec["warmup"] + spec["steps"]))
    return out


def _store_source(labels, device):
    """The same number of random uint8 images written as a store in a temporary folder (removed at
    exit), read through the store path the CLI uses."""
    import atexit
    import shutil
    import tempfile

    import numpy as np

    from atom_fast.distill.real import StoreImages
    from atom_fast.distill.store import Store, StoreWriter

    root = tempfile.mkdtemp(prefix="atom-fast-step-store-")
    atexit.register(shutil.rmtree, root, True)
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), *IMAGE), dtype=np.uint8)
    w = StoreWriter(os.path.join(root, "store"), dataset="random", class_names=[str(k) for k in range(CLASSES)],
                    image_shape=IMAGE, counts={"train": np.bincount(labels.numpy()), "test": [0] * CLASSES},
                    normalization=((0.5,) * IMAGE[0], (0.25,) * IMAGE[0]), source={"path": "random"})
    w.write("train", pixels, labels.numpy())
    w.commit()
    return StoreImages(Store.open(os.path.join(root, "store")), device)


# --------------------------------------------------------------------------------------------------
# the parent: one job per (row, IPC)
# --------------------------------------------------------------------------------------------------


def job_spec(job, args):
    """What the child of ``job`` needs: the device, the full DistillConfig fields, IPC and timing."""
    overrides = {k: job[k] for k in ("width", "depth", "batch_real") if k in job}
    config = {**BASE_CONFIG, **row(job["label"]).config, **overrides}
    return {"device": args.device, "config": config, "ipc": job["ipc"], "source": row(job["label"]).source,
            "warmup": args.timing["step_warmup"], "steps": args.timing["step_steps"],
            "memory": args.memory}


def attention_backend(config, device):
    """The attention_loss backend a row's loop uses (None: no attention term)."""
    if config["method"] == "dm":
        return None
    if config["loop"] != "fused":
        return "reference"
    return atom_fast.backends.resolve_backend(config.get("backend", "auto"), torch.device(device))


def run_job(job, args):
    """Run one (row, IPC) in a child process under the row's launcher; one result row."""
    spec = job_spec(job, args)
    launcher = row(job["label"]).launcher
    cmd = [sys.executable, *launcher.argv, "-m", "bench.step_table", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **launcher.env))
    result = {"row": job["label"], **spec["config"], "ipc": job["ipc"], "warmup": spec["warmup"],
              "steps": spec["steps"], "memory": spec["memory"], "classes": CLASSES,
              "image": "x".join(map(str, IMAGE)), "launcher": launcher.name, "source": spec["source"],
              "attention_backend": attention_backend(spec["config"], args.device)}
    if proc.returncode != 0:
        print(f"step child failed for {job['label']} IPC {job['ipc']}:\n{proc.stderr[-3000:]}",
              file=sys.stderr)
        return [{**result, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                 f"exit code {proc.returncode}"}]
    return [{**result, **json.loads(proc.stdout.strip().splitlines()[-1])}]


def conv_gflop(config, ipc, classes=CLASSES, image=IMAGE):
    """GFLOP (2 x multiply-adds) of a step's convolutions: the forward of classes x batch_real real
    images, and forward plus input-gradient backward (the same multiply-adds again; the weights are
    frozen) of classes x ipc synthetic images. Norms, pooling, DSA and the loss are not counted."""
    channels, side = image[0], image[1]
    per_image = 0
    for _ in range(config["depth"]):
        per_image += 2 * side * side * config["width"] * channels * 9
        channels, side = config["width"], side // 2
    images = classes * config["batch_real"] + 2 * classes * ipc
    return per_image * images / 1e9


def add_speedups(rows):
    """speedup_vs_base on every row: SPEEDUP_BASE's median / the row's, per IPC; and the step's
    convolution GFLOP and achieved GFLOP/s (conv_gflop / median)."""
    base = {r["ipc"]: r["median_s"] for r in rows if r["row"] == SPEEDUP_BASE and "median_s" in r}
    for r in rows:
        r["speedup_vs_base"] = (base[r["ipc"]] / r["median_s"]
                                          if r["ipc"] in base and "median_s" in r else None)
        if all(k in r for k in ("depth", "width", "batch_real", "median_s")):
            r["conv_gflop"] = conv_gflop(r, r["ipc"])
            r["conv_gflops_per_s"] = r["conv_gflop"] / r["median_s"]


if __name__ == "__main__":
    out = step_child(json.loads(sys.argv[1]))
    if out is not None:
        print(json.dumps(out))
