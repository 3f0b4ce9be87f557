"""atom-fast: fused attention-matching losses for dataset distillation (ATOM, DataDAM, DM)."""

from atom_fast.loss import (
    AttentionLoss,
    attention_loss,
    channel_attention,
    mmd_loss,
    spatial_attention,
)

__all__ = ["attention_loss", "AttentionLoss", "mmd_loss", "spatial_attention", "channel_attention"]
__version__ = "0.1.0"
