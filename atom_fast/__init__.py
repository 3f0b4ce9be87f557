"""atom-fast: fused attention-matching losses for dataset distillation (ATOM, DataDAM, DM)."""

from atom_fast.loss import (
    AttentionLoss,
    attention_loss,
    channel_attention,
    mmd_loss,
    spatial_attention,
)
from atom_fast.statistics import ClassStatistics, class_statistics

__all__ = ["attention_loss", "AttentionLoss", "mmd_loss", "spatial_attention", "channel_attention",
           "class_statistics", "ClassStatistics"]
__version__ = "0.1.0"
