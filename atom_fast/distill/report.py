"""What a run reports about a synthetic set: its accuracy on every evaluation architecture (models
split over the processes of a torchrun), next to the random-real-images baseline, DD-Ranking's
label-robust score when asked, the console table and the accuracy plot's rows. Used by both
pipelines (``pipelines.py``): after distilling and by ``atom-fast evaluate`` for any saved set.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from atom_fast.distill import distributed as dist
from atom_fast.distill.architectures import canonical_name, default_depth
from atom_fast.distill.evaluate import EvalConfig, evaluate, summarize
from atom_fast.distill.score import data_fingerprint, full_data_accuracy, label_robust_scores

# the ConvNet family takes the distillation network's width, depth and norm; other architectures
# keep their published sizes
CONVNET_OPTIONS = ("width", "depth", "norm")


def parse_architectures(text: str) -> List[str]:
    """``"convnet,alexnet,..."`` -> canonical names (ValueError naming an unknown one)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError("--eval-model names no architecture")
    out = []
    for n in names:
        try:
            out.append(canonical_name(n))
        except ValueError as exc:
            raise ValueError(f"--eval-model: {exc}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"--eval-model repeats an architecture: {text}")
    return out


def check_architectures(architectures: Sequence[str], data, options: Callable[[str], dict]) -> None:
    """Build every evaluation network once on the meta device (no memory): an architecture that
    cannot take the data's images fails before any distillation, as a one-line ValueError."""
    from atom_fast.distill.architectures import build_network

    C, im_size = data.channels, tuple(data.im_size)
    for arch in architectures:
        try:
            with torch.device("meta"):
                build_network(arch, C, data.num_classes, im_size, **options(arch))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"--eval-model {arch} cannot evaluate {C}x{im_size[0]}x{im_size[1]} "
                             f"images: {exc}") from None


def network_options(architecture: str, width: int, depth: Optional[int], norm: str,
                    im_size: Sequence[int]) -> dict:
    """Options of an evaluation network: the distillation's ConvNet settings for the ConvNet family
    (ConvNet-4 at 64x64), nothing for the others."""
    if not architecture.startswith("convnet"):
        return {}
    opts = {"width": width, "depth": depth or default_depth(im_size), "norm": norm}
    if architecture == "convnet-d4":
        opts.pop("depth")
    if architecture in ("convnet-bn", "convnet-nn"):
        opts.pop("norm")
    return opts


class SetEvaluator:
    """Evaluates sets of images on the test split with one protocol, architecture by architecture."""

    def __init__(self, data, config: EvalConfig, architectures: Sequence[str], models: int,
                 seed: int, device: torch.device, ctx: dist.Context, options: Callable[[str], dict],
                 log: Callable[[str], None], progress: bool = False):
        self.data, self.config, self.architectures = data, config, list(architectures)
        self.models, self.seed, self.device, self.ctx = models, seed, device, ctx
        self.options, self.log = options, log
        self.progress = progress and ctx.is_main  # an epoch bar per set and architecture (rank 0)
        self.test = data.test_set(device)  # tensors, or a store's test split read in batches
        self.seconds: Dict[str, float] = {}

    def evaluate(self, name: str, images: torch.Tensor, labels: torch.Tensor) -> Optional[dict]:
        """``{architecture: summary}`` on rank 0 (None elsewhere); every process trains its share."""
        out = {}
        mine = self.ctx.model_indices(self.models)
        t = time.perf_counter()
        for arch in self.architectures:
            records = []
            if mine:
                records = evaluate(images.to(self.device), labels.to(self.device), self.test,
                                   None, self.data.num_classes, config=self.config,
                                   seed=self.seed, architecture=arch, model_indices=mine,
                                   network_kwargs=self.options(arch),
                                   bar=f"{name} on {arch}" if self.progress else None,
                                   progress=lambda m, a, arch=arch: self.log(
                                       f"{name} on {arch}: evaluation model {m + 1}/{self.models}: "
                                       f"{a:.2f}%"))
            gathered = dist.gather_to_main(self.ctx, records, f"gathering the {name} evaluation")
            if self.ctx.is_main:
                summary = summarize([r for part in gathered for r in part])
                summary["network"] = self.options(arch)
                out[arch] = summary
        self.seconds[name] = time.perf_counter() - t
        return out if self.ctx.is_main else None

    def protocol(self, arch: str) -> dict:
        return {**asdict(self.config), "model": arch, "network": self.options(arch)}


def headline(per_arch: dict) -> dict:
    """The first architecture's result (the headline figures of results.json)."""
    first = next(iter(per_arch.values()))
    return {"accuracies": first["accuracies"], "accuracy_mean": first["accuracy_mean"],
            "accuracy_std": first["accuracy_std"]}


def scores(evaluator: SetEvaluator, dataset: str, synthetic: dict, random: dict,
           cache_dir) -> dict:
    """DD-Ranking's label-robust score per architecture (rank 0). The full-data accuracy (the same
    architecture and protocol trained on the whole training set) is computed once and cached."""
    data = evaluator.data
    train_images, train_labels = data.full_train()
    fingerprint = data_fingerprint(train_images, train_labels)
    out = {}
    for arch in evaluator.architectures:
        def compute(arch=arch):
            evaluator.log(f"full-data accuracy of {arch}: training {evaluator.models} models on "
                          f"{len(train_labels)} images (cached afterwards)")
            recs = evaluate(train_images.to(evaluator.device), train_labels.to(evaluator.device),
                            evaluator.test, None, data.num_classes,
                            config=evaluator.config, seed=evaluator.seed, architecture=arch,
                            models=evaluator.models, network_kwargs=evaluator.options(arch))
            return [r.final_accuracy for r in recs]

        full = full_data_accuracy(dataset=dataset, architecture=arch, protocol=evaluator.protocol(arch),
                                  seed=evaluator.seed, models=evaluator.models,
                                  fingerprint=fingerprint, compute=compute, cache_dir=cache_dir)
        s = label_robust_scores(full["fraction"], [a / 100 for a in synthetic[arch]["accuracies"]],
                                [a / 100 for a in random[arch]["accuracies"]])
        out[arch] = {**s, "full_data": full,
                     "parts": {"full": "final-epoch accuracy of the same architecture and protocol "
                                       "trained on the whole training set (cached with its key)",
                               "synthetic": "final-epoch accuracy of each model on the synthetic set",
                               "random": "final-epoch accuracy of the same model index on the random "
                                         "real images (the baseline)"}}
    return out


def print_table(rows: List[Tuple[str, str, dict]], dataset: str, ipc, iterations, models: int) -> None:
    """One markdown row per (set, architecture): accuracy after the last epoch (the result), and the
    best-of-schedule figure DataDAM's code reports, labelled as such."""
    print(f"\n| method | dataset | IPC | iterations | architecture | accuracy (%), {models} models, "
          f"last epoch | best over test schedule (DataDAM-style, not the result) |")
    print("|---|---|---|---|---|---|---|")
    for name, arch, r in rows:
        b = r["best_of_schedule"]
        its = iterations if name != "random" else "-"
        print(f"| {name} | {dataset} | {ipc} | {its} | {arch} | {r['accuracy_mean']:.2f} +- "
              f"{r['accuracy_std']:.2f} | {b['accuracy_mean']:.2f} +- {b['accuracy_std']:.2f} |")


def plot_rows(results: Dict[str, dict]) -> List[dict]:
    """Rows for output.save_accuracy_plot: one per (set, architecture)."""
    return [{"architecture": arch, "method": name, "accuracy_mean": r["accuracy_mean"],
             "accuracy_std": r["accuracy_std"]}
            for name, per_arch in results.items() for arch, r in per_arch.items()]


def default_score_cache() -> Path:
    return Path.home() / ".cache" / "atom-fast" / "full-data"
