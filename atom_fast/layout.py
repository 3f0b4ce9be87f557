"""Which samples belong to which class: equal contiguous blocks, or explicit int64 labels."""

import functools
import numbers
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ClassLayout:
    """Class membership of the real and synthetic batches of one call.

    Either ``real_per_class``/``syn_per_class`` are set (sample n belongs to class ``n // per_class``,
    the layout DataDAM/DM loops build by concatenating classes) or ``real_labels``/``syn_labels``
    (int64, on the features' device) with their per-class ``real_counts``/``syn_counts``.
    """

    num_classes: int
    real_per_class: Optional[int] = None
    syn_per_class: Optional[int] = None
    real_labels: Optional[torch.Tensor] = None
    syn_labels: Optional[torch.Tensor] = None
    real_counts: Optional[torch.Tensor] = None
    syn_counts: Optional[torch.Tensor] = None

    @property
    def has_labels(self):
        return self.real_labels is not None

    def labels(self, side):
        """Labels of ``side`` ("real" or "syn"), or None for equal contiguous blocks."""
        return self.real_labels if side == "real" else self.syn_labels

    def per_class(self, side):
        return self.real_per_class if side == "real" else self.syn_per_class

    def offsets_and_order(self, side, device):
        """``(offsets, order)`` of one side ("real" or "syn"): the K + 1 class starts and the
        class-sorted sample order (None for equal blocks, whose order is the identity)."""
        if not self.has_labels:
            return block_offsets(self.num_classes, self.per_class(side), device), None
        return class_offsets(getattr(self, f"{side}_counts")), class_order(self.labels(side))


# --------------------------------------------------------------------------------------------------
# class order and offsets: the one definition every backend uses
# --------------------------------------------------------------------------------------------------


def class_counts(labels, num_classes):
    """Samples per class (int64, on the labels' device), without a host synchronization (unlike
    ``bincount``, which reads the largest label)."""
    ones = torch.ones(labels.shape, dtype=torch.int64, device=labels.device)
    return torch.zeros((num_classes,), dtype=torch.int64, device=labels.device).index_add_(0, labels,
                                                                                          ones)


def class_offsets(counts):
    """``(K + 1,)`` int64 start of each class when samples are sorted by class: 0, then the
    running sum of ``counts``."""
    offsets = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def block_offsets(num_classes, per_class, device):
    """The ``class_offsets`` of equal contiguous blocks of ``per_class`` samples.

    Made once per (classes, block size, device) and reused: the ops only read it, and a loop calls
    the loss with the same blocks every step (no tensor op, no device launch after the first).
    Traced by torch.compile or under a fake-tensor mode, it is built there as before."""
    device = torch.device(device)
    if torch.compiler.is_compiling() or faking():
        return torch.arange(num_classes + 1, dtype=torch.int64, device=device) * per_class
    return _cached_block_offsets(int(num_classes), int(per_class), device)


def faking():
    """Whether a fake-tensor mode is active (opcheck, export): a cached real tensor cannot enter it."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


@functools.lru_cache(maxsize=64)
def _cached_block_offsets(num_classes, per_class, device):
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever the caller's mode
        return torch.arange(num_classes + 1, dtype=torch.int64, device=device) * per_class


def class_order(labels):
    """Sample indices sorted by class; stable, so samples of a class keep their order (and sums
    over a class run in the same order on every call: bitwise-reproducible results)."""
    return torch.argsort(labels, stable=True)


def grouping(labels, num, num_classes, device, counts=None):
    """``(offsets, order)`` of ``num`` samples with ``labels`` (None: equal blocks, order None), on
    ``device``. Given the labels' ``counts`` (e.g. counted on the host), both are computed where the
    labels are and copied over (host labels: no device op but the two copies)."""
    if labels is None:
        return block_offsets(num_classes, num // num_classes, device), None
    if counts is None:
        counts = class_counts(labels, num_classes)
    return on_device(class_offsets(counts), device), on_device(class_order(labels), device)


# --------------------------------------------------------------------------------------------------
# building a layout from the public arguments (validated)
# --------------------------------------------------------------------------------------------------


def check_num_classes(num_classes, name="num_classes"):
    """A positive int."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"{name} must be at least 1, got {num_classes}")
    return int(num_classes)


def check_labels(labels, n, name, device, num_classes=None):
    """int64 ``(n,)`` labels on ``device`` or on the host (CPU), non-negative and below
    ``num_classes`` (when given).

    Host labels are checked where they are: no device memory is read. Labels on another device
    (e.g. CUDA) are checked by reading their range on the host: one synchronization, which host
    labels avoid. Returns them contiguous, on the device they came on (the kernels index labels with
    unit stride; :func:`on_device` moves host labels over).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 (torch.long), got {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the features, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device and labels.device.type != "cpu":
        raise ValueError(f"{name} is on {labels.device} but the features are on {device} "
                         "(labels may be on the features' device or on the host)")
    if n:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0:
            raise ValueError(f"{name} holds {lo}: labels must be non-negative")
        if num_classes is not None and hi >= num_classes:
            raise ValueError(f"{name} holds {hi}, out of range for num_classes={num_classes}")
    return labels.contiguous()


def on_device(t, device, dtype=None):
    """``t`` on ``device`` (in ``dtype`` when given): a host tensor is copied without waiting for
    the device (queued), one on ``device`` is returned as is. A host tensor bound for a CUDA device
    goes through pinned memory first: from pageable memory CUDA synchronizes the stream before the
    copy, which would stall the host until the device has drained its queue."""
    device = torch.device(device)
    if t.device == device:
        return t if dtype is None else t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device=device, dtype=dtype, non_blocking=True)


def check_blocks(n, num_classes, name):
    """``n`` samples in equal contiguous blocks of ``num_classes`` classes: the block size."""
    if n % num_classes:
        raise ValueError(f"{name} has {n} samples, not divisible by num_classes={num_classes}; "
                         "samples must come in equal contiguous blocks per class "
                         "(or pass labels)")
    return n // num_classes


def check_presence(real_counts, syn_counts, class_names=None, real_name="real_labels",
                   syn_name="syn_labels"):
    """Every class with samples on one side has samples on the other (host or device counts;
    host counts are compared as Python numbers, no tensor op per class)."""
    if real_counts.device.type == "cpu" and syn_counts.device.type == "cpu":
        real, syn = real_counts.tolist(), syn_counts.tolist()
        for here, there, missing, present in ((real, syn, syn_name, "real"),
                                              (syn, real, real_name, "synthetic")):
            for k, (a, b) in enumerate(zip(here, there)):
                if a > 0 and b == 0:
                    if class_names is not None:
                        k = int(class_names[k])
                    raise ValueError(f"{missing} has no sample of class {k}, which has {present} "
                                     "samples; every class needs samples on both sides")
        return
    only_real = (real_counts > 0) & (syn_counts == 0)
    only_syn = (syn_counts > 0) & (real_counts == 0)
    for mask, missing, present in ((only_real, syn_name, "real"), (only_syn, real_name, "synthetic")):
        if bool(mask.any()):
            k = int(mask.nonzero()[0])
            if class_names is not None:
                k = int(class_names[k])
            raise ValueError(f"{missing} has no sample of class {k}, which has {present} samples; "
                             "every class needs samples on both sides")


def class_layout(num_real, num_syn, num_classes, real_labels, syn_labels, device,
                 names=("real", "syn")):
    """Validate the class arguments and build the ClassLayout.

    With labels this reads them on the host (range and per-class counts: one synchronization for
    labels on a device, none for host labels, which are then copied to ``device``), and renumbers
    them 0..K-1 over the classes that occur: a class absent from both sides adds nothing to the loss, so only the present ones are kept, and the work is bounded by the samples, not by
    ``num_classes`` (which only bounds the labels' range). ``names`` are the feature arguments'
    names, for messages.
    """
    if real_labels is None and syn_labels is None:
        if num_classes is None:
            raise ValueError("num_classes is required unless real_labels and syn_labels are given")
        K = check_num_classes(num_classes)
        real_block = check_blocks(num_real, K, names[0])
        syn_block = check_blocks(num_syn, K, names[1])
        return ClassLayout(K, real_per_class=real_block, syn_per_class=syn_block)
    if real_labels is None or syn_labels is None:
        missing = "real_labels" if real_labels is None else "syn_labels"
        raise ValueError(f"{missing} is missing: pass real_labels and syn_labels together")
    K = None if num_classes is None else check_num_classes(num_classes)
    real_labels = check_labels(real_labels, num_real, "real_labels", device, K)
    syn_labels = check_labels(syn_labels, num_syn, "syn_labels", device, K)
    if real_labels.device != syn_labels.device:  # one side on the host: both counted there
        real_labels, syn_labels = real_labels.cpu(), syn_labels.cpu()
    classes, compact = torch.unique(torch.cat([real_labels, syn_labels]), return_inverse=True)
    K = classes.numel()
    real_labels, syn_labels = compact[:num_real], compact[num_real:]
    real_counts = torch.bincount(real_labels, minlength=K)
    syn_counts = torch.bincount(syn_labels, minlength=K)
    check_presence(real_counts, syn_counts, classes)
    real_labels, syn_labels, real_counts, syn_counts = (
        on_device(t, device) for t in (real_labels, syn_labels, real_counts, syn_counts))
    return ClassLayout(K, real_labels=real_labels, syn_labels=syn_labels,
                       real_counts=real_counts, syn_counts=syn_counts)
