"""Which samples belong to which class: equal contiguous blocks, or explicit int64 labels."""

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

    def side(self, side):
        """Per-sample class lookup for the kernels: labels + counts, or the block size."""
        if self.has_labels:
            return {"labels": self.labels(side), "counts": getattr(self, f"{side}_counts")}
        return {"per_class": self.per_class(side)}

    def grouped(self):
        """Class membership for the class-mean kernels: samples sorted by class (stable) and the
        offsets of each class in that order, or the block sizes."""
        if not self.has_labels:
            return {"num_classes": self.num_classes, "real_per_class": self.real_per_class,
                    "syn_per_class": self.syn_per_class}
        out = {"num_classes": self.num_classes}
        for side in ("real", "syn"):
            counts = getattr(self, f"{side}_counts")
            offsets = torch.zeros(self.num_classes + 1, dtype=torch.int64, device=counts.device)
            torch.cumsum(counts, 0, out=offsets[1:])
            out[f"{side}_order"] = torch.argsort(self.labels(side), stable=True)
            out[f"{side}_offsets"] = offsets
        return out
