"""What bench/run.py runs: the jobs of a full, ``--quick`` or ``--tiny`` run, the time budget of the
optional ones, and running them.

A job is a dict: ``{"kind": "loss", "shape", "ipc", "providers", "modes", "classes", "real",
"required"}`` (one loss table at one layer shape, see bench/loss_table.py) or ``{"kind": "step",
"label", "loop", "ipc", "required", ...}`` (one step-table row at one IPC, see bench/step_table.py;
``width``/``depth``/``batch_real`` keys override the row's config, as --tiny does).

``--quick`` keeps the whole run under 3 minutes on 2 CPU cores. It always runs the loss at the CIFAR
layer-1 shape (128x32x32) and IPC 10, fwd+bwd, and the ATOM fused and DataDAM-script loops at IPC 10;
then, in this order, the other paper rows at IPC 10, ATOM's loops at IPC 1 and 50, the 16x16 layer
and the other rows at IPC 1 and 50, each only while the projected total (from the items already run)
stays within the budget (165 s, counted from the process start). The output lists everything quick
left out.
"""

import sys
import time

import torch

from bench import loss_table, measure, step_table
from bench.loss_table import run_job as run_loss_job
from bench.step_table import run_job as run_step_job

CLASSES = 10
REAL_PER_CLASS = 128
IPCS = (1, 10, 50)
QUICK_BUDGET_S = 165.0   # 3 minutes less a margin for misestimates and the output files
# ATOM's two loops: the rows --quick always runs (at IPC 10) and the only ones --tiny runs
ATOM_LOOPS = ("ATOM (DataDAM script loop)", "ATOM (fused loop)")


def timing(device, quick, tiny):
    """Repeat counts. CPU runs are seconds per call, so fewer; CUDA warms up Triton/cuDNN first."""
    if torch.device(device).type == "cuda":
        return {"loss_warmup": 3, "loss_repeats": 10 if quick else 30,
                "step_warmup": 3 if quick else 5, "step_steps": 20 if quick else 100}
    if tiny:
        return {"loss_warmup": 1, "loss_repeats": 3, "step_warmup": 1, "step_steps": 2}
    return {"loss_warmup": 1, "loss_repeats": 5 if quick else 7,
            "step_warmup": 1, "step_steps": 2 if quick else 5}


def loss_job(shape, ipc, providers, modes, required=True, classes=CLASSES, real=REAL_PER_CLASS):
    return {"kind": "loss", "shape": tuple(shape), "ipc": ipc, "providers": list(providers),
            "modes": list(modes), "classes": classes, "real": real, "required": required}


def step_job(row, ipc, required=True, **overrides):
    """A job for ``row`` (a step_table.StepRow) at ``ipc``."""
    return {"kind": "step", "label": row.label, "method": row.config.get("method"),
            "loop": row.config.get("loop"), "ipc": ipc, "required": required, **overrides}


def describe(job):
    if job["kind"] == "loss":
        shape = "x".join(map(str, job["shape"]))
        return f"loss {shape} IPC {job['ipc']} {'/'.join(job['modes'])} {','.join(job['providers'])}"
    return f"step {job['label']} IPC {job['ipc']}"


def build_plan(args):
    """(jobs, notes): the jobs in run order, and what this mode leaves out on purpose."""
    loss_on = args.only in (None, "loss")
    step_on = args.only in (None, "step")
    providers = args.providers or list(loss_table.PROVIDERS)
    rows, paper = step_table.STEP_ROWS, step_table.PAPER_ROWS
    if getattr(args, "row", None):  # --row: only the rows named
        rows = tuple(r for r in rows if r.label in args.row)
        paper = tuple(r for r in paper if r.label in args.row)
    jobs, notes = [], []
    if args.tiny:
        if loss_on:
            jobs.append(loss_job((16, 8, 8), 2, args.providers or ["eager", "native"], ["bwd", "fwd+bwd"],
                                 real=4))
        if step_on:
            jobs += [step_job(r, 1, width=8, batch_real=4) for r in rows if r.label in ATOM_LOOPS]
        notes.append("tiny: test-sized shapes (loss 16x8x8 with 4 real per class; step width 8, "
                     "batch_real 4), not figures to quote")
        return jobs, notes
    if not args.quick:
        if loss_on:
            jobs += [loss_job(shape, ipc, providers, loss_table.MODES)
                     for shape in loss_table.LAYERS for ipc in IPCS]
        if step_on:
            jobs += [step_job(r, ipc) for ipc in IPCS for r in rows]
        return jobs, notes
    # --quick: the loss at CIFAR layer 1 and ATOM's two loops at IPC 10 always run; every other item,
    # in order of interest, only while the projected total stays within the budget
    atom_loops = [r for r in paper if r.label in ATOM_LOOPS]
    if loss_on:
        jobs.append(loss_job((128, 32, 32), 10, providers, ["fwd+bwd"]))
    if step_on:
        jobs += [step_job(r, 10) for r in atom_loops]
        jobs += [step_job(r, 10, required=False) for r in paper if r not in atom_loops]
        for ipc in (1, 50):
            jobs += [step_job(r, ipc, required=False) for r in atom_loops]
    if loss_on:
        jobs.append(loss_job((128, 16, 16), 10, providers, ["fwd+bwd"], required=False))
    if step_on:
        for ipc in (1, 50):
            jobs += [step_job(r, ipc, required=False) for r in paper if r not in atom_loops]
    t = args.timing
    if loss_on:
        notes.append("quick: the loss modes fwd and bwd alone, the loss at IPC 1 and 50 and the "
                     "TinyImageNet layer 128x64x64 are not run; the loss is timed over "
                     f"{t['loss_repeats']} calls after {t['loss_warmup']} warm-up")
    if step_on:
        left_out = [r.label for r in rows if r not in paper]
        notes.append(f"quick: the step rows {', '.join(left_out)} are not run; steps are timed over "
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


def run_plan(jobs, args, start):
    """Run the jobs; optional ones only while the projected total stays within args.budget.
    Returns (loss rows, step rows, skipped: one line each, done: [{"job", "seconds"}])."""
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
            free = measure.free_memory_bytes(device)
            need = loss_table.memory_needed(job)
            if free is not None and need > 0.9 * free:
                skipped.append(f"{describe(job)}: needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
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
    step_table.add_speedups(step_rows)
    return loss_rows, step_rows, skipped, done
