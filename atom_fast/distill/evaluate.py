"""Evaluation protocol of DC/DM/DataDAM/ATOM (SPEC 3).

Train a fresh network on the (synthetic) training set with SGD (lr 0.01, momentum 0.9, weight decay
5e-4, lr x0.1 at half the epochs, batch 256, DSA on), then report its accuracy on the real test
split after the final epoch. Nothing is selected on test accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch.nn import functional as F

from atom_fast.distill import augment as dsa
from atom_fast.distill.networks import build_network


@dataclass
class EvalConfig:
    model: str = "convnet"
    epochs: int = 1000          # DM's evaluation budget
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    test_batch_size: int = 1000


@torch.no_grad()
def test_accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 1000) -> float:
    """Top-1 accuracy (in %) of ``net`` on ``images (M, C, H, W)`` with ``labels (M,)``."""
    net.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        correct += int((net(x).argmax(1) == labels[i:i + batch_size].to(x.device)).sum())
    return 100.0 * correct / max(images.shape[0], 1)


def train_network(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  config: EvalConfig, generator: torch.Generator) -> float:
    """Train ``net`` on ``images (N, C, H, W)`` / ``labels (N,)``; returns the final training loss."""
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    # lr x0.1 once half the epochs are done (DM trains epochs + 1 and decays after epochs // 2 + 1;
    # the same schedule up to one epoch)
    milestones = [config.epochs // 2] if config.epochs >= 2 else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    n = images.shape[0]
    net.train()
    loss = torch.zeros(())
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(images.device)
        for i in range(0, n, config.batch_size):
            idx = order[i:i + config.batch_size]
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
            if config.dsa:
                x = dsa.augment(x, generator=generator)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return float(loss.detach())


def evaluate(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, *, models: int, config: EvalConfig,
             seed: int, network_kwargs: Optional[dict] = None,
             progress: Optional[callable] = None) -> List[float]:
    """Train ``models`` fresh networks on ``images``/``labels``; their test accuracies (in %).

    Model ``m`` is initialized and trained from seed ``(seed, m)``, so a run is reproducible and
    the same seeds evaluate a distilled set and its random baseline.
    """
    if models < 1:
        raise ValueError(f"eval models must be >= 1, got {models}")
    if config.epochs < 1:
        raise ValueError(f"eval epochs must be >= 1, got {config.epochs}")
    accuracies = []
    images, labels = images.detach(), labels.detach()
    for m in range(models):
        torch.manual_seed(_mix(seed, m))
        with torch.device(images.device):
            net = build_network(config.model, images.shape[1], num_classes, images.shape[-2:],
                                **(network_kwargs or {}))
        generator = torch.Generator().manual_seed(_mix(seed, m, 1))
        train_network(net, images, labels, config, generator)
        accuracies.append(test_accuracy(net, test_images, test_labels, config.test_batch_size))
        if progress is not None:
            progress(m, accuracies[-1])
    return accuracies


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and (population) standard deviation, the way DC/DM/DataDAM report them."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
