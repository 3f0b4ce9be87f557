"""Evaluation protocol of DC/DM/DataDAM/ATOM (docs/distill.md).

Train a fresh network on the (synthetic) training set with SGD (lr 0.01, momentum 0.9, weight decay
5e-4, lr x0.1 at half the epochs, batch 256, DSA on), then report its accuracy on the real test
split after the final epoch: that is the result (DC/DM and DC-BENCH report it this way).

Two accuracy conventions, kept apart:

- ``final_accuracy``: the accuracy after the last epoch. The headline; nothing is selected on test
  accuracy.
- ``best_of_schedule_accuracy``: the best test accuracy over a fixed schedule of test evaluations
  during training (every ``max(1, epochs // 10)`` epochs and after the last, or every
  ``EvalConfig.test_every`` epochs). It is what DataDAM's code ("maximum results") and DD-Ranking
  report, recorded so that a user can compare with those numbers. It is selected on the test set,
  so it is never the result.

Measuring the test accuracy during training changes nothing about the training (no random draws,
batch-norm statistics untouched in eval mode), so ``final_accuracy`` is the same whatever the schedule.

Models are numbered: model ``m`` is initialized from ``derive_seed(seed, m)`` and trained (batch order,
augmentation, dropout) from ``derive_seed(seed, m, 1)``, whichever process trains it and whichever
other models it is evaluated with, so ``model_indices`` can split one evaluation across processes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.nn import functional as F
from tqdm import tqdm

from atom_fast.distill import augment as dsa
from atom_fast.distill.architectures import build_network, canonical_name
from atom_fast.distill.seeds import derive_seed

BEST_OF_SCHEDULE_NOTE = (
    "best test accuracy over the test schedule, as DataDAM's code and DD-Ranking report it; selected "
    "on the test set, so not the result (the result is the accuracy after the last epoch)")


@dataclass
class EvalConfig:
    model: str = "convnet"      # architecture, when evaluate() is not given one
    epochs: int = 1000          # DM's evaluation budget
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    test_batch_size: int = 1000
    test_every: int = 0         # epochs between test evaluations (best-of-schedule); 0: max(1, epochs // 10)


@dataclass
class ModelRecord:
    """One trained evaluation model. Accuracies in %; ``test_schedule`` lists the epochs (1-based,
    measured after that epoch) of ``schedule_accuracies``; its last entry is ``epochs``."""
    index: int
    architecture: str
    final_accuracy: float
    best_of_schedule_accuracy: float
    best_of_schedule_epoch: int
    test_schedule: List[int]
    schedule_accuracies: List[float]
    final_train_loss: float
    train_seconds: float        # training only, the schedule's test evaluations excluded
    test_seconds: float         # all test evaluations of this model

    def as_dict(self) -> Dict:
        return asdict(self)


def evaluation_schedule(epochs: int, every: int = 0) -> List[int]:
    """Epochs after which the test accuracy is measured: every ``every`` epochs
    (``every=0``: ``max(1, epochs // 10)``, about ten evaluations) and always after the last."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"eval epochs must be a positive integer, got {epochs!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"test_every must be a non-negative integer, got {every!r}")
    step = every or max(1, epochs // 10)
    schedule = list(range(step, epochs + 1, step))
    if not schedule or schedule[-1] != epochs:
        schedule.append(epochs)
    return schedule


@torch.no_grad()
def test_accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 1000) -> float:
    """Top-1 accuracy (in %) of ``net`` on ``images (M, C, H, W)`` with ``labels (M,)``, or on a
    test set that yields its own batches (``images.batches(batch_size)`` of ``(x, y)``, ``labels``
    None; e.g. a store's test split read batch by batch). Leaves ``net`` in eval mode."""
    net.eval()
    if hasattr(images, "batches"):
        batches, total = images.batches(batch_size), len(images)
    else:
        batches = ((images[i:i + batch_size], labels[i:i + batch_size])
                   for i in range(0, images.shape[0], batch_size))
        total = images.shape[0]
    correct = 0  # becomes a device tensor, read once at the end: no host sync per batch
    for x, y in batches:
        correct = correct + (net(x).argmax(1) == y.to(x.device)).sum()
    return 100.0 * int(correct) / max(total, 1)


def train_network(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  config: EvalConfig, generator: torch.Generator,
                  after_epoch: Optional[Callable[[int], None]] = None) -> float:
    """Train ``net`` on ``images (N, C, H, W)`` / ``labels (N,)``; returns the final training loss.

    ``after_epoch(e)`` is called after epoch ``e`` (1-based); it may evaluate ``net`` (the network is
    put back in training mode after it) but must not draw random numbers.
    """
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    # lr x0.1 once half the epochs are done (DM trains epochs + 1 and decays after epochs // 2 + 1;
    # the same schedule up to one epoch)
    milestones = [config.epochs // 2] if config.epochs >= 2 else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    n = images.shape[0]
    net.train()
    loss = torch.zeros(())
    for epoch in range(config.epochs):
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
        if after_epoch is not None:
            after_epoch(epoch + 1)
            net.train()
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_inputs(images, labels, test_images, test_labels, num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    streamed = hasattr(test_images, "batches")  # a test set read batch by batch
    checked = (("images", images, labels),) if streamed else (
        ("images", images, labels), ("test_images", test_images, test_labels))
    for name, x, y in checked:
        lname = "labels" if name == "images" else "test_labels"
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (N, C, H, W) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype != torch.int64:
            raise ValueError(f"{lname} must be a 1-d int64 tensor, got "
                             f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{lname} has {y.shape[0]} entries for {x.shape[0]} {name}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty")
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{lname} must lie in [0, {num_classes}), got values in "
                             f"[{int(y.min())}, {int(y.max())}]")
    test_shape = tuple(test_images.image_shape if streamed else test_images.shape[1:])
    if tuple(images.shape[1:]) != test_shape:
        raise ValueError(f"images are {tuple(images.shape[1:])} (C, H, W) but test_images are "
                         f"{test_shape}")
    if streamed and len(test_images) == 0:
        raise ValueError("test_images is empty")


def _indices(models: Optional[int], model_indices: Optional[Sequence[int]]) -> List[int]:
    if (models is None) == (model_indices is None):
        raise ValueError("give exactly one of models (the count) and model_indices")
    if models is not None:
        if isinstance(models, bool) or not isinstance(models, int) or models < 1:
            raise ValueError(f"eval models must be >= 1, got {models!r}")
        return list(range(models))
    indices = list(model_indices)
    if not indices:
        raise ValueError("model_indices is empty")
    for m in indices:
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"model_indices must be non-negative integers, got {m!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"model_indices has repeated entries: {indices}")
    return indices


def evaluate(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
             test_labels: torch.Tensor, num_classes: int, *, config: EvalConfig, seed: int,
             architecture: Optional[str] = None, model_indices: Optional[Sequence[int]] = None,
             models: Optional[int] = None, network_kwargs: Optional[dict] = None,
             progress: Optional[Callable[[int, float], None]] = None,
             bar: Optional[str] = None) -> List[ModelRecord]:
    """Train fresh networks on ``images (N, C, H, W)`` / ``labels (N,)`` and test them on
    ``test_images`` / ``test_labels``; one :class:`ModelRecord` per model, in the order given.

    Args:
        architecture: a name of ``architectures.ARCHITECTURES`` (``None``: ``config.model``). Evaluate
            several architectures by calling this once per architecture.
        model_indices: which models to train, e.g. ``range(5)``, or ``[0, 2, 4]`` in one process and
            ``[1, 3]`` in another: model ``m`` is the same network trained the same way either way.
        models: shorthand for ``model_indices=range(models)``; give one of the two.
        network_kwargs: options of the architecture (``width``, ``depth``, ...).
        progress: called as ``progress(m, final_accuracy)`` after each model.
        bar: a label to show a progress bar (stderr, tqdm) of the epochs of every model, with the
            model and the rate; None shows none.
    """
    _check_inputs(images, labels, test_images, test_labels, num_classes)
    indices = _indices(models, model_indices)
    name = canonical_name(architecture if architecture is not None else config.model)
    schedule = evaluation_schedule(config.epochs, config.test_every)
    wanted = set(schedule)
    images, labels = images.detach(), labels.detach()
    device = images.device
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    records = []
    epochs_bar = tqdm(total=len(indices) * config.epochs, disable=bar is None, unit="epoch",
                      desc=bar, dynamic_ncols=True, file=sys.stderr, leave=False)
    for m in indices:
        epochs_bar.set_postfix_str(f"{name} model {m + 1}", refresh=False)
        # the caller's random state is left as it was; model m's draws depend on (seed, m) only
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(derive_seed(seed, m))
            with torch.device(device):
                net = build_network(name, images.shape[1], num_classes, images.shape[-2:],
                                    **(network_kwargs or {}))
            generator = torch.Generator().manual_seed(derive_seed(seed, m, 1))
            accuracies: List[float] = []
            test_s = [0.0]

            def after_epoch(epoch: int) -> None:
                epochs_bar.update(1)
                if epoch in wanted:
                    _sync(device)
                    t = time.perf_counter()
                    accuracies.append(test_accuracy(net, test_images, test_labels, config.test_batch_size))
                    test_s[0] += time.perf_counter() - t

            _sync(device)
            t0 = time.perf_counter()
            loss = train_network(net, images, labels, config, generator, after_epoch)
            _sync(device)
            total = time.perf_counter() - t0
        best = max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))  # the earliest best
        records.append(ModelRecord(
            index=m, architecture=name, final_accuracy=accuracies[-1],
            best_of_schedule_accuracy=accuracies[best], best_of_schedule_epoch=schedule[best],
            test_schedule=list(schedule), schedule_accuracies=accuracies, final_train_loss=loss,
            train_seconds=total - test_s[0], test_seconds=test_s[0]))
        epochs_bar.refresh()  # a finished model shows its last epoch, however fast the epochs ran
        if progress is not None:
            progress(m, accuracies[-1])
    epochs_bar.close()
    return records


def final_accuracies(*args, **kwargs) -> List[float]:
    """:func:`evaluate`'s final accuracies (in %) alone, model by model: the list ``evaluate``
    returned before it returned records (the driver reads the records; this is for callers that
    want the numbers only)."""
    return [r.final_accuracy for r in evaluate(*args, **kwargs)]


def mean_std(values: Sequence[float]) -> tuple:
    """Mean and (population) standard deviation, the way DC/DM/DataDAM report them."""
    values = list(values)
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize(records: Sequence[ModelRecord]) -> Dict:
    """Per-architecture summary of records (of one or several processes, merged by model index):
    the final accuracies with their mean and std (the result), and the best-of-schedule figures,
    kept under their own key with their note. Raises ValueError on a repeated model index or records
    of different architectures or schedules."""
    records = sorted(records, key=lambda r: r.index)
    if not records:
        raise ValueError("summarize needs at least one record")
    indices = [r.index for r in records]
    if len(set(indices)) != len(indices):
        raise ValueError(f"records repeat a model index: {indices}")
    if len({r.architecture for r in records}) != 1 or len({tuple(r.test_schedule) for r in records}) != 1:
        raise ValueError("records mix architectures or test schedules; summarize one evaluation at a time")
    final = [r.final_accuracy for r in records]
    best = [r.best_of_schedule_accuracy for r in records]
    mean, std = mean_std(final)
    best_mean, best_std = mean_std(best)
    return {
        "architecture": records[0].architecture,
        "model_indices": indices,
        "accuracies": final, "accuracy_mean": mean, "accuracy_std": std,
        "best_of_schedule": {"accuracies": best, "accuracy_mean": best_mean, "accuracy_std": best_std,
                             "epochs": [r.best_of_schedule_epoch for r in records],
                             "test_schedule": list(records[0].test_schedule),
                             "note": BEST_OF_SCHEDULE_NOTE},
        "train_seconds": sum(r.train_seconds for r in records),
        "models": [r.as_dict() for r in records],
    }


# the earlier private name of the seed mix in this module; seeds.derive_seed is its one definition
_mix = derive_seed
