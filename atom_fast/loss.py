"""The public loss functions: check the arguments (``atom_fast.checks``), build the class layout
(``atom_fast.layout``), then call the chosen backend (``atom_fast.backends``)."""

from typing import Optional, Sequence, Union

import torch
from torch import nn

from atom_fast import backends, checks
from atom_fast.backends import reference
from atom_fast.layout import check_num_classes, class_layout, grouping, on_device
from atom_fast.statistics import ClassStatistics

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


def attention_loss(real: Layers, syn: Layers, num_classes: Optional[int] = None, *,
                   real_labels: Optional[torch.Tensor] = None,
                   syn_labels: Optional[torch.Tensor] = None,
                   spatial_power: float = 4.0, channel_power: float = 4.0,
                   spatial_weight: float = 1.0, channel_weight: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """Attention-matching loss between real and synthetic features of one or many layers.

    ``loss = sum_layers sum_k [spatial_weight ||mean_real_k(s) - mean_syn_k(s)||^2
    + channel_weight ||mean_real_k(t) - mean_syn_k(t)||^2]`` with s, t the L2-normalized spatial
    (H*W) and channel (C) attention of each sample.

    Args:
        real, syn: ``(N, C, H, W)`` tensors, or equal-length sequences of them (one per layer).
        num_classes: K, with samples in equal contiguous blocks per class (real ``(K*B, ...)``,
            syn ``(K*IPC, ...)``). Optional when labels are given: then the classes are the labels
            that occur (renumbered in increasing order), and ``num_classes`` only bounds them.
        real_labels, syn_labels: int64 ``(N,)`` class of each sample, in any order.
        spatial_power, channel_power: ps, pc > 0 (integers are fastest).
        spatial_weight, channel_weight: ws, wc >= 0; 0 skips that term.
        backend: "auto", "triton", "native" or "reference"; ``ATOM_FAST_BACKEND`` overrides "auto".

    ``real`` may also be a :class:`~atom_fast.ClassStatistics` (from :func:`atom_fast.class_statistics`,
    summed over chunks or processes): the same value and the same gradient w.r.t. ``syn``; then
    ``num_classes`` defaults to the statistics' and ``syn_labels`` may be given alone.

    Returns:
        A 0-dim tensor: float32, or float64 for float64 features.
    """
    if isinstance(real, ClassStatistics):
        return _attention_loss_from_statistics(real, syn, num_classes, real_labels, syn_labels,
                                               spatial_power, channel_power, spatial_weight,
                                               channel_weight, backend)
    reals, syns = checks.check_layers(real, syn)
    terms = checks.check_terms(spatial_power, channel_power, spatial_weight, channel_weight)
    device = reals[0].device
    layout = class_layout(reals[0].shape[0], syns[0].shape[0], num_classes, real_labels,
                          syn_labels, device)
    return backends.backend_module(backend, device).attention_loss(reals, syns, layout, *terms)


def mmd_loss(real_emb, syn_emb: torch.Tensor, num_classes: Optional[int] = None, *,
             real_labels: Optional[torch.Tensor] = None,
             syn_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output feature matching of DM/DataDAM: ``sum_k ||mean_real_k(e) - mean_syn_k(e)||^2``.

    Args:
        real_emb, syn_emb: ``(N, ...)`` embeddings, flattened per sample. ``real_emb`` may also be a
            :class:`~atom_fast.ClassStatistics` holding embedding sums (same value and gradient).
        num_classes, real_labels, syn_labels: the class layout, as in :func:`attention_loss`.

    One small reduction on every device: it has no fused backend.
    """
    if isinstance(real_emb, ClassStatistics):
        return _mmd_loss_from_statistics(real_emb, syn_emb, num_classes, real_labels, syn_labels)
    checks.check_embeddings(real_emb, syn_emb)
    layout = class_layout(real_emb.shape[0], syn_emb.shape[0], num_classes, real_labels, syn_labels,
                          real_emb.device, names=("real_emb", "syn_emb"))
    return reference.mmd_loss(real_emb, syn_emb, layout)


def _attention_loss_from_statistics(stats, syn, num_classes, real_labels, syn_labels,
                                    spatial_power, channel_power, spatial_weight, channel_weight,
                                    backend):
    """The loss with the real side as class statistics (docs/scale.md): one backend call per layer."""
    syns = checks.check_side(syn, "syn")
    terms = checks.check_terms(spatial_power, channel_power, spatial_weight, channel_weight)
    checks.check_layers_against_statistics(stats, syns, *terms)
    device = syns[0].device
    checks.check_statistics_device(stats, device, syns[0].dtype, "syn")
    host_labels = syn_labels
    labels, syn_counts = checks.check_syn_against_statistics(stats, syns[0].shape[0], num_classes,
                                                             real_labels, syn_labels, device, "syn")
    impl = backends.backend_module(backend, device)
    counts = on_device(stats.counts, device)
    # the class layout once for all layers, where the labels came (the host, usually)
    grouped = grouping(host_labels if host_labels is None or host_labels.device.type == "cpu"
                       else labels, syns[0].shape[0], stats.num_classes, device, syn_counts)
    total = None
    for s, S, T in zip(syns, stats.spatial, stats.channel):
        loss = impl.attention_loss_from_sums(S, T, counts, s, labels, stats.num_classes, *terms,
                                             grouped=grouped)
        total = loss if total is None else total + loss
    return total


def _mmd_loss_from_statistics(stats, syn_emb, num_classes, real_labels, syn_labels):
    checks.check_embedding_against_statistics(stats, syn_emb)
    labels, _ = checks.check_syn_against_statistics(stats, syn_emb.shape[0], num_classes,
                                                    real_labels, syn_labels, syn_emb.device,
                                                    "syn_emb")
    syn = syn_emb.flatten(1).to(stats.dtype)
    return reference.mean_difference_error(stats.embedding, stats.counts.to(syn.device), syn,
                                           labels, stats.num_classes)


def spatial_attention(F: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """L2-normalized ``sum_c |F|^p`` per sample: ``(N, C, H, W) -> (N, H*W)`` (float32 for half inputs)."""
    return reference.spatial_attention(checks.check_features(F), checks.check_power(p, "p"))


def channel_attention(F: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """L2-normalized ``sum_hw |F|^p`` per sample: ``(N, C, H, W) -> (N, C)`` (float32 for half inputs)."""
    return reference.channel_attention(checks.check_features(F), checks.check_power(p, "p"))


class AttentionLoss(nn.Module):
    """``nn.Module`` form of :func:`attention_loss`; arguments are checked when it is built."""

    def __init__(self, num_classes: Optional[int] = None, *, spatial_power: float = 4.0,
                 channel_power: float = 4.0, spatial_weight: float = 1.0,
                 channel_weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        (self.spatial_power, self.channel_power, self.spatial_weight,
         self.channel_weight) = checks.check_terms(spatial_power, channel_power, spatial_weight,
                                                   channel_weight)
        self.backend = backends.check_backend(backend)

    def forward(self, real: Layers, syn: Layers, real_labels: Optional[torch.Tensor] = None,
                syn_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_loss(real, syn, self.num_classes, real_labels=real_labels,
                              syn_labels=syn_labels, spatial_power=self.spatial_power,
                              channel_power=self.channel_power, spatial_weight=self.spatial_weight,
                              channel_weight=self.channel_weight, backend=self.backend)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, spatial_power={self.spatial_power}, "
                f"channel_power={self.channel_power}, spatial_weight={self.spatial_weight}, "
                f"channel_weight={self.channel_weight}, backend={self.backend!r}")
