"""The two commands' pipelines, from parsed arguments (``cli.py``) to the files in ``--out``.

:func:`run_distill` (``atom-fast``): load the data, open ``--out``, whiten, distill (or draw random
real images), save the set, evaluate it next to the random baseline (or leave it for ``atom-fast
evaluate``), write results.json and print the table. :func:`run_evaluate` (``atom-fast evaluate
PATH``): the same evaluation and outputs for a set saved by this driver or another program.

The run's life (output folder, checkpoints, resume, preemption) is ``session.py``'s, the files'
formats ``artifacts.py``'s, the evaluation ``report.py``'s; under ``torchrun`` every process runs the
pipeline on its share of the classes and models (``distributed.py``), rank 0 writing the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from atom_fast.allocator import keep_freed_memory
from atom_fast.distill import artifacts, augment, report, session
from atom_fast.distill import distributed as dist
from atom_fast.distill.data import FORMATS, DatasetNotFoundError, load_dataset
from atom_fast.distill.evaluate import EvalConfig
from atom_fast.distill.loop import DistillConfig, random_positions
from atom_fast.distill.output import say
from atom_fast.distill.real import MemoryData, StoreData
from atom_fast.distill.store import Store


def device_of(name: str) -> torch.device:
    """``--device`` (auto, cpu, cuda, cuda:N) -> a torch.device; a one-line ValueError otherwise."""
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


def _run_identity(args, use_zca) -> dict:
    """What the synthetic pixels depend on beyond the distillation config (compared on resume).
    A named dataset gives the same images from its store as in memory, so only --store adds a key."""
    identity = {"dataset": args.dataset, "data_path": args.data_path, "image_size": args.image_size,
                "zca": use_zca}
    if args.store is not None:
        identity["store"] = str(Path(args.store).expanduser().resolve())
    return identity


def _logger(ctx):
    def log(msg):
        if ctx.is_main:
            say(f"atom-fast: {msg}")
    return log


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


def _check_backend(args, device) -> Optional[str]:
    """--backend must work on this device before any data is loaded (e.g. triton on a CPU); the
    backend that computes the attention loss ("auto" resolved), or None for a method without one."""
    if args.method in ("random", "dm"):
        return None
    from atom_fast.backends import resolve_backend

    try:
        return resolve_backend(args.backend, device)
    except RuntimeError as exc:
        raise ValueError(f"--backend {args.backend}: {exc}") from None


def _check_architectures(args, data) -> None:
    report.check_architectures(report.parse_architectures(args.eval_model), data,
                               lambda a: report.network_options(a, args.width, args.depth, args.norm,
                                                                data.im_size))


def _open_out(ctx, out) -> None:
    """Rank 0 creates and locks --out; a failure there stops every process alike."""
    error = None
    if ctx.is_main:
        try:
            out.open()
        except session.SessionError as exc:
            error = exc
    dist.agree(ctx, error, "opening --out")


def _whiten(data, device, ctx, timings) -> augment.ZCA:
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


# --------------------------------------------------------------------------------------------------
# atom-fast: distill, then evaluate
# --------------------------------------------------------------------------------------------------


def run_distill(args) -> Optional[dict]:
    """Distill and evaluate as the (checked) arguments say; returns results.json's content (rank 0)."""
    device = device_of(args.device)
    ctx = dist.initialize(device, args.dist_timeout)
    out = session.OutputDir(args.out or f"runs/{args.dataset}-{args.method}-ipc{args.ipc}",
                            resume=args.resume, overwrite=args.overwrite)
    try:
        return _distill_and_evaluate(args, dist.local_device(device, ctx), ctx, out)
    finally:
        out.release()
        dist.shutdown(ctx)


def _distill_and_evaluate(args, device, ctx, out) -> Optional[dict]:
    malloc_tuned = device.type == "cpu" and keep_freed_memory()
    log = _logger(ctx)
    loss_backend = _check_backend(args, device)
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
    _check_architectures(args, data)

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
        artifacts.write_synthetic(out, images, labels, run_id=run_id, dataset=args.dataset, zca=zca,
                                  mean=data.mean, std=data.std)
        artifacts.write_picture(out, data, images, labels, zca, device)

    run = {
        "run_id": run_id, "method": args.method, "ipc": args.ipc,
        "iterations": args.iterations if args.method != "random" else 0,
        "config": {**config, "zca": use_zca, "dsa": args.dsa},
        "loss_backend": loss_backend,  # what --backend resolved to on this device
        "distributed": {"world_size": ctx.world_size, "backend": ctx.backend},
        "args": vars(args),
        "malloc_keeps_freed_memory": malloc_tuned,
        "losses": result["losses"] if result else [],
        "train_classes_read_per_rank": read if result else None,
    }
    if not args.eval_models:
        return _finish_unevaluated(args, data, device, ctx, out, run, timings, t_start)
    sets = {args.method: (images, labels)}
    if baseline_images is not None:
        sets["random"] = baseline_images
    evaluation = _evaluate_sets(args, data, device, ctx, sets, log, timings)
    timings["total_s"] = time.perf_counter() - t_start
    if evaluation is None:
        return None
    results = artifacts.results(args.dataset, data, device, timings, run, evaluation)
    return _finish(args, out, results, ipc=args.ipc, iterations=results["iterations"])


def _finish_unevaluated(args, data, device, ctx, out, run, timings, t_start) -> Optional[dict]:
    """--eval-models 0: results.json without accuracies (``"evaluation": null``) and the command
    that evaluates the saved set later (rank 0)."""
    timings["total_s"] = time.perf_counter() - t_start
    if not ctx.is_main:
        return None
    results = artifacts.results(args.dataset, data, device, timings, run)
    artifacts.write_results(out, results, ipc=args.ipc)
    store = f" --store {args.store}" if args.store else ""
    print(f"\nnot evaluated (--eval-models 0); evaluate the set with: atom-fast evaluate "
          f"{out.file(session.SYNTHETIC)}{store}\nresults: {out.file(session.RESULTS)}   images: "
          f"{out.file(session.PICTURE)}   total {timings['total_s']:.0f} s")
    return results


def _evaluate_sets(args, data, device, ctx, sets, log, timings) -> Optional[dict]:
    """Evaluate every set on every --eval-model architecture; results.json's evaluation keys (rank
    0, None elsewhere).

    ``sets``: name -> (images, labels); the first is the result, ``random`` the baseline."""
    architectures = report.parse_architectures(args.eval_model)
    ecfg = EvalConfig(model=architectures[0], epochs=args.eval_epochs, batch_size=args.eval_batch,
                      dsa=args.dsa, test_every=args.test_every)
    evaluator = report.SetEvaluator(
        data, ecfg, architectures, args.eval_models, args.seed, device, ctx,
        lambda arch: report.network_options(arch, args.width, args.depth, args.norm, data.im_size),
        log, progress=getattr(args, "progress", True))
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
    if not ctx.is_main:
        return None
    return artifacts.evaluation_part(per_set, architectures=architectures, config=ecfg,
                                     models=args.eval_models, seed=args.seed, scores=scores)


def _finish(args, out, results, *, ipc, iterations) -> dict:
    """Write results.json and the accuracy plot; print the table (rank 0)."""
    artifacts.write_results(out, results, ipc=ipc)
    rows = [(name, arch, r) for name, per_arch in artifacts.evaluated_sets(results).items()
            for arch, r in per_arch.items()]
    report.print_table(rows, results["dataset"], ipc, iterations, args.eval_models)
    if results.get("label_robust_score"):
        for arch, s in results["label_robust_score"].items():
            print(f"label-robust score (DD-Ranking) on {arch}: {s['score_mean']:.3f} +- "
                  f"{s['score_std']:.3f} (full-data accuracy {s['full_data']['accuracy_mean']:.2f}%)")
    print(f"\nresults: {out.file(session.RESULTS)}   images: {out.file(session.PICTURE)}   "
          f"total {results['timings']['total_s']:.0f} s")
    return results


# --------------------------------------------------------------------------------------------------
# atom-fast evaluate PATH: any saved synthetic set
# --------------------------------------------------------------------------------------------------


def run_evaluate(args) -> Optional[dict]:
    """``atom-fast evaluate PATH`` from its (checked) arguments: a saved set, the distillation's
    protocol and outputs; returns results.json's content (rank 0)."""
    device = device_of(args.device)
    s = artifacts.read_synthetic(args.path)
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
        return _evaluate_saved_set(args, s, dist.local_device(device, ctx), ctx, out)
    finally:
        out.release()
        dist.shutdown(ctx)


def _evaluate_saved_set(args, s, device, ctx, out) -> Optional[dict]:
    log = _logger(ctx)
    if ctx.is_main:
        out.check()
    t_start = time.perf_counter()
    data = load_data(args, ctx, log)
    timings = {"load_s": time.perf_counter() - t_start}
    _check_architectures(args, data)
    artifacts.check_fits(s, data, args.path, args.dataset)
    images, labels = s["images"], s["labels"]
    counts = torch.bincount(labels, minlength=data.num_classes)
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
        artifacts.write_picture(out, data, images, labels, zca, device)
    evaluation = _evaluate_sets(args, data, device, ctx, sets, log, timings)
    timings["total_s"] = time.perf_counter() - t_start
    if evaluation is None:
        return None
    run = {"run_id": session.new_run_id(), "method": "synthetic",
           "source_file": str(Path(args.path).resolve()), "format": s["format"], "zca": use_zca,
           "images_per_class": counts.tolist(), "args": vars(args)}
    results = artifacts.results(args.dataset, data, device, timings, run, evaluation)
    ipc = int(counts.max()) if int(counts.min()) == int(counts.max()) else "mixed"
    return _finish(args, out, results, ipc=ipc, iterations="-")
