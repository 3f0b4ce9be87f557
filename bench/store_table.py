"""The store table: what reading real images from a prepared store costs in memory and time.

``python -m bench.store_table [--out FILE.json] [--work DIR] [--scale S]`` writes synthetic sources
(random pixels: this measures bytes, not accuracy) in downsampled-ImageNet's ``.npz`` format and as an
image folder, then runs the real commands as child processes and samples their memory from
``/proc``:

* ``prepare``: ``atom-fast prepare`` of a 200-class x 600-image and a 200 x 1200 64x64 source, and
  its throughput (images/s) for the ``.npz`` batches and for PNG and JPEG folders, with its workers;
* ``distill``: a short fused ATOM distillation from each store (IPC 1, small ``--batch-real`` and
  ``--width``, no evaluation), the same from the 600-image source decoded into memory
  (``--in-memory``), and from the store under ``torchrun --nproc-per-node 2`` (per rank);
* ``imagenet1k``: a 1000-class source (few images per class), prepared, then 2 iterations under
  ``torchrun --nproc-per-node 2``, each rank owning 500 classes;
* ``step``: the fused ATOM step at CIFAR-10 shapes from memory and from a store, alternating in one
  process (the ratio store / memory);
* ``zca``: the streamed ZCA fit against kornia's fit on the whole set, CIFAR-shaped (3x32x32).

Memory is the peak *anonymous* resident memory (``RssAnon`` of ``/proc/PID/status``, sampled every
20 ms): the process's own heap and tensors. Pages of a memory-mapped store are file-backed (the page
cache's, shared, reclaimable), so they are not in it. For the prepare commands the figure is the sum
over the process and its decoding workers at each sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# -- memory sampling ---------------------------------------------------------------------------------

def _rss_anon_kib(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_sampled(cmd, env=None, interval=0.02):
    """Run ``cmd``; returns (returncode, seconds, stderr tail, peaks) where peaks holds the peak
    RssAnon (MiB) of the process itself, of the sum over its process tree, and of each descendant
    running the driver (the torchrun ranks)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peaks = {"self": 0, "tree": 0, "ranks": {}}
    done = threading.Event()

    def sample():
        while not done.is_set():
            own = _rss_anon_kib(proc.pid) or 0
            tree = own
            for pid in _descendants(proc.pid):
                kib = _rss_anon_kib(pid) or 0
                tree += kib
                if "atom_fast.distill" in _cmdline(pid) and "torch.distributed.run" not in _cmdline(pid):
                    peaks["ranks"][pid] = max(peaks["ranks"].get(pid, 0), kib)
            peaks["self"] = max(peaks["self"], own)
            peaks["tree"] = max(peaks["tree"], tree)
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    mib = {"self_mib": peaks["self"] / 1024, "tree_mib": peaks["tree"] / 1024,
           "ranks_mib": [v / 1024 for _, v in sorted(peaks["ranks"].items())]}
    return proc.returncode, seconds, (out + err)[-2000:], mib


# -- synthetic sources -------------------------------------------------------------------------------

def write_npz_source(root: Path, classes: int, per_class: int, size: int = 64, val_per_class: int = 10,
                     batches: int = 10, seed: int = 0) -> Path:
    """Downsampled-ImageNet files: train_data_batch_1..N.npz and val_data.npz, ``data`` (n, 3*S*S)
    uint8 channel-major, ``labels`` 1-based, the images of each class spread over the batches."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(1, classes + 1), per_class))
    for b, part in enumerate(np.array_split(labels, batches), 1):
        data = rng.integers(0, 256, (len(part), 3 * size * size), dtype=np.uint8)
        np.savez(root / f"train_data_batch_{b}.npz", data=data, labels=part)
        del data
    val = rng.permutation(np.repeat(np.arange(1, classes + 1), val_per_class))
    np.savez(root / "val_data.npz", data=rng.integers(0, 256, (len(val), 3 * size * size), dtype=np.uint8),
             labels=val)
    return root


def write_folder_source(root: Path, classes: int, per_class: int, ext: str, size: int = 64,
                        seed: int = 0) -> Path:
    """An image folder (train/<class>/*.EXT, test/<class>/*.EXT) of smooth random images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", max(1, per_class // 10))):
        for k in range(classes):
            d = root / split / f"class{k:03d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(d / f"{i}{ext}")
    return root


# -- the commands --------------------------------------------------------------------------------------

def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def prepare(source: Path, store: Path, dataset: str, workers: int):
    cmd = [sys.executable, "-m", "atom_fast.distill", "prepare", "--dataset", dataset, "--data-path",
           str(source), "--out", str(store), "--no-progress", "--workers", str(workers), "--overwrite"]
    rc, seconds, tail, mib = run_sampled(cmd, _env())
    if rc != 0:
        raise RuntimeError(f"prepare failed: {tail}")
    m = json.loads((store / "manifest.json").read_text())
    images = sum(sum(m["splits"][s]["counts"]) for s in ("train", "test"))
    return {"command": cmd[1:], "seconds": seconds, "images": images, "images_per_s": images / seconds,
            "workers": workers, "peak_rss_anon_mib": mib["tree_mib"], "peak_rss_anon_main_mib": mib["self_mib"]}


BATCH_REAL = 16
DISTILL = ["--method", "atom", "--ipc", "1", "--width", "32", "--iterations", "5",
           "--eval-models", "0", "--no-progress", "--log-every", "1", "--overwrite", "--dist-timeout", "600"]


def distill(data_args, out: Path, nproc: int = 1, batch_real: int = BATCH_REAL, extra=(), repeats: int = 1):
    """The run ``repeats`` times; its peaks (the heap's high-water mark varies from run to run by tens
    of MB, since glibc is told to keep freed memory) per run and their median."""
    import statistics

    runs = [_distill_once(data_args, out, nproc, batch_real, extra) for _ in range(repeats)]
    row = dict(runs[0])
    if nproc == 1:
        row["peak_rss_anon_mib_runs"] = [r["peak_rss_anon_mib"] for r in runs]
        row["peak_rss_anon_mib"] = statistics.median(row["peak_rss_anon_mib_runs"])
    else:
        row["peak_rss_anon_per_rank_mib_runs"] = [r["peak_rss_anon_per_rank_mib"] for r in runs]
        row["peak_rss_anon_per_rank_mib"] = [statistics.median(v) for v in
                                             zip(*row["peak_rss_anon_per_rank_mib_runs"])]
    row["seconds_runs"] = [r["seconds"] for r in runs]
    row["iterations_per_s_runs"] = [r["iterations_per_s"] for r in runs]
    return row


def _distill_once(data_args, out: Path, nproc: int, batch_real: int, extra):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "atom_fast.distill", *data_args, *DISTILL,
           "--batch-real", str(batch_real), *extra, "--out", str(out)]
    rc, seconds, tail, mib = run_sampled(cmd, _env())
    if rc != 0:
        raise RuntimeError(f"distill failed: {tail}")
    r = json.loads((out / "results.json").read_text())
    row = {"command": cmd[1:], "seconds": seconds, "world_size": nproc, "batch_real": batch_real,
           "iterations_per_s": r["timings"].get("iterations_per_s"), "load_s": r["timings"]["load_s"],
           "train_classes_read_per_rank": [None if x is None else {k: (len(v) if v is not None else None)
                                                                   for k, v in x.items()}
                                           for x in (r.get("train_classes_read_per_rank") or [])]}
    if nproc == 1:
        row["peak_rss_anon_mib"] = mib["self_mib"]
    else:
        row["peak_rss_anon_per_rank_mib"] = mib["ranks_mib"]
    return row


def paired_steps(ipcs=(1, 10, 50), steps=8, per_class=256):
    """The fused ATOM step at CIFAR-10 shapes (the step table's: 10 classes, 3x32x32, ConvNet-3 width
    128, batch_real 128, DSA) from the same random uint8 images held in memory and read from a store,
    the two Distillers' steps alternating in one process (so a slow moment of the machine hits both):
    the median of each, and the median of the per-pair ratios store / memory."""
    import statistics
    import tempfile

    import torch

    from atom_fast.allocator import keep_freed_memory
    from atom_fast.distill.loop import DistillConfig, Distiller
    from atom_fast.distill.real import normalize_
    from bench.step_table import BASE_CONFIG, CLASSES, IMAGE, _store_source

    keep_freed_memory()
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    rows = {}
    with tempfile.TemporaryDirectory():
        store_images = _store_source(labels, torch.device("cpu"))
        pixels = torch.from_numpy(store_images.store.read_split("train")[0]).to(torch.float32)
        memory_images = normalize_(pixels, store_images._mean, store_images._std)
        for ipc in ipcs:
            config = DistillConfig(**BASE_CONFIG, method="atom", loop="fused", ipc=ipc, seed=0,
                                   iterations=steps + 1)
            mem = Distiller(memory_images, labels, CLASSES, config, "cpu")
            sto = Distiller(store_images, None, CLASSES, config, "cpu")
            times = {"memory": [], "store": []}
            for i in range(steps + 1):
                for name, d in (("memory", mem), ("store", sto)) if i % 2 else (("store", sto), ("memory", mem)):
                    t0 = time.perf_counter()
                    d.step(i)
                    if i:  # the first step of each is the warm-up
                        times[name].append(time.perf_counter() - t0)
            mem.close()
            sto.close()
            assert torch.equal(mem.syn, sto.syn), "the store path must give the in-memory images"
            ratios = [b / a for a, b in zip(times["memory"], times["store"])]
            rows[f"IPC {ipc}"] = {"memory_median_s": statistics.median(times["memory"]),
                                  "store_median_s": statistics.median(times["store"]),
                                  "ratio_median": statistics.median(ratios), "ratios": ratios,
                                  "times_s": times, "same_images": True}
    return {"what": "fused ATOM step, CIFAR-10 shapes, memory vs store, alternating in one process",
            "image": list(IMAGE), "per_class": per_class, "steps": steps, "rows": rows}


def zca_agreement(n=5000, shape=(3, 32, 32)):
    import torch

    from atom_fast.distill.augment import ZCA

    g = torch.Generator().manual_seed(0)
    x = (torch.nn.functional.avg_pool2d(torch.rand(n, *shape, generator=g), 3, 1, 1) - 0.5) / 0.25
    t0 = time.perf_counter()
    whole = ZCA().fit(x).state_dict()
    t1 = time.perf_counter()
    streamed = ZCA().fit_streamed(x[i:i + 1000] for i in range(0, n, 1000)).state_dict()
    t2 = time.perf_counter()
    rel = {k: float((whole[k] - streamed[k]).norm() / whole[k].norm()) for k in ("mean", "transform", "inverse")}
    return {"images": n, "shape": list(shape), "relative_difference": rel,
            "kornia_fit_s": t1 - t0, "streamed_fit_s": t2 - t1}


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench/store_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file (default bench/results/cpu-store-<date>.json)")
    p.add_argument("--work", default="/tmp/atom-fast-store-bench", help="scratch folder (sources, stores)")
    p.add_argument("--scale", type=float, default=1.0, help="images per class x this (the tests' size: 0.01)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare's decoding workers")
    p.add_argument("--repeats", type=int, default=3, help="runs of each store distillation (median peak)")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each kind in the paired step part")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: step,prepare,distill,imagenet1k,zca")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    from atom_fast import environment
    import torch

    result = {"schema": "atom_fast.bench.store/1", "started": started,
              "command": [os.path.basename(sys.executable), *sys.argv],
              "environment": {"device": environment.device_name(torch.device("cpu")),
                              "versions": environment.versions(), "cpu_count": os.cpu_count()},
              "memory": "peak RssAnon from /proc/PID/status, sampled every 20 ms (prepare: process + "
                        "workers); mapped store pages are file-backed and not counted",
              "distill_settings": DISTILL, "scale": args.scale}
    if "step" not in skip:
        result["step"] = paired_steps(steps=args.steps)
    per = [max(2, int(600 * args.scale)), max(2, int(1200 * args.scale))]
    sources = {n: work / f"imagenet64-200x{n}" for n in per}
    stores = {n: work / f"store-200x{n}" for n in per}
    if not {"prepare", "distill"} <= skip:
        for n in per:
            if not (sources[n] / "val_data.npz").exists():
                write_npz_source(sources[n], 200, n)
    if "prepare" not in skip:
        result["prepare"] = {f"imagenet64 200x{n}": prepare(sources[n], stores[n], "imagenet64", args.workers)
                             for n in per}
        folders = {}
        for ext in (".png", ".jpg"):
            src = work / f"folder{ext[1:]}"
            if not src.exists():
                write_folder_source(src, 10, max(4, int(300 * args.scale)), ext)
            for w in sorted({1, args.workers}):
                folders[f"folder {ext[1:]} workers={w}"] = prepare(src, work / f"store-folder{ext[1:]}", "folder", w)
        result["prepare"].update(folders)
    if "distill" not in skip:
        rows = {}
        for n in per:
            if not (stores[n] / "manifest.json").exists():
                prepare(sources[n], stores[n], "imagenet64", args.workers)
            rows[f"store 200x{n}"] = distill(["--store", str(stores[n])], work / f"run-store-{n}",
                                             batch_real=min(BATCH_REAL, n), repeats=args.repeats)
        rows[f"store 200x{per[0]}, torchrun x2"] = distill(["--store", str(stores[per[0]])],
                                                           work / "run-store-2p", nproc=2,
                                                           batch_real=min(BATCH_REAL, per[0]),
                                                           repeats=args.repeats)
        rows[f"in memory 200x{per[0]}"] = distill(["--dataset", "imagenet64", "--data-path", str(sources[per[0]]),
                                                   "--in-memory"], work / "run-memory",
                                                  batch_real=min(BATCH_REAL, per[0]))
        result["distill"] = rows
    if "imagenet1k" not in skip:
        src = work / "imagenet64-1000"
        if not (src / "val_data.npz").exists():
            write_npz_source(src, 1000, max(2, int(20 * max(args.scale, 0.1))), val_per_class=2)
        result["imagenet1k"] = {
            "prepare": prepare(src, work / "store-1000", "imagenet64", args.workers),
            "distill": distill(["--store", str(work / "store-1000")], work / "run-1000", nproc=2,
                               batch_real=2, extra=("--iterations", "2")),
        }
    if "zca" not in skip:
        result["zca"] = zca_agreement(n=max(100, int(5000 * args.scale)))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cpu-store-{started[:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
