"""The Triton backend: autograd.Functions over the fused kernels in ``atom_fast.kernels.attention``
(the only module that imports them). It implements the contract of :mod:`atom_fast.backends`.

Forward saves only per-sample statistics (``SideStats``: scaled attention vectors, norms and scales,
N*(H*W + C) + 3N floats per side and layer) and the class differences (K*(H*W + C)); the features
themselves are the caller's tensors. No host synchronization happens in forward or backward: the
upstream gradient is read on the device. The powers, weights and norm floor reach the kernels as one
small tensor of the accumulation dtype per loss call (``kernels.attention.loss_scalars``, filled on
the device and kept for the backward), never as float arguments, which the Triton interpreter would
round to float32. Triton is imported on first use, so ``import atom_fast`` works where it is not
installed.
"""

import itertools
from typing import NamedTuple, Optional

import torch

from atom_fast.backends.reference import class_sums
from atom_fast.constants import accumulation_dtype, norm_floor
from atom_fast.layout import class_counts, class_offsets, class_order, on_device

DOUBLE_BACKWARD_ERROR = ("backend='triton' does not support double backward (a gradient of the "
                         "attention loss's gradient); use backend='reference' for that")


def _kernels():
    # Imported on first use so that ``import atom_fast`` works where Triton is not installed.
    from atom_fast.kernels import attention
    return attention


_LAUNCHERS = None


def _launchers():
    """The four kernel launchers as custom ops (``torch.ops.atom_fast_triton``), registered on first
    use: each has a fake kernel (shapes only), so the backend runs on the meta device and traces
    under ``torch.compile``; the real kernel runs on CUDA, or interpreted on CPU. Returns
    :class:`_Launchers`, whose methods take the launchers' arguments."""
    global _LAUNCHERS
    if _LAUNCHERS is None:
        _LAUNCHERS = _Launchers(_register_ops(_kernels()))
    return _LAUNCHERS


def _register_ops(kernels):
    """Define the custom ops over the launchers of ``kernels`` (once per process)."""
    from typing import List

    from torch import Tensor

    lib = "atom_fast_triton"

    @torch.library.custom_op(f"{lib}::attention_stats", mutates_args=())
    def attention_stats(F: Tensor, ps: float, pc: float, has_spatial: bool, has_channel: bool,
                        scalars: Tensor) -> List[Tensor]:
        return list(kernels.attention_stats(F, ps, pc, has_spatial, has_channel, scalars.dtype,
                                            scalars))

    @attention_stats.register_fake
    def _(F, ps, pc, has_spatial, has_channel, scalars):
        N, C, H, W = F.shape
        acc = scalars.dtype
        return [F.new_empty((N, H * W), dtype=acc), F.new_empty((N, C), dtype=acc),
                *(F.new_empty((N,), dtype=acc) for _ in range(3))]

    # The weighted per-class terms come back as a third output, allocated here: an op that writes
    # into a caller's buffer and also returns tensors cannot be functionalized (torch.compile).
    @torch.library.custom_op(f"{lib}::class_differences", mutates_args=())
    def class_differences(real: List[Tensor], syn: List[Tensor], num_classes: int, ps: float,
                          pc: float, ws: float, wc: float, scalars: Tensor,
                          real_order: Optional[Tensor], real_offsets: Optional[Tensor],
                          syn_order: Optional[Tensor], syn_offsets: Optional[Tensor],
                          real_per_class: int, syn_per_class: int) -> List[Tensor]:
        partials = torch.zeros((num_classes, 2), dtype=scalars.dtype, device=real[0].device)
        DS, DT = kernels.class_differences(
            kernels.SideStats(*real), kernels.SideStats(*syn), num_classes, ps, pc, ws, wc, partials,
            scalars=scalars, real_order=real_order, real_offsets=real_offsets, syn_order=syn_order,
            syn_offsets=syn_offsets, real_per_class=real_per_class, syn_per_class=syn_per_class)
        return [DS, DT, partials]

    @class_differences.register_fake
    def _(real, syn, num_classes, ps, pc, ws, wc, scalars, *layout):
        return [real[0].new_empty((num_classes, real[0].shape[1])),
                real[1].new_empty((num_classes, real[1].shape[1])),
                scalars.new_empty((num_classes, 2))]

    @torch.library.custom_op(f"{lib}::vector_grad", mutates_args=())
    def vector_grad(stats: List[Tensor], DS: Tensor, DT: Tensor, grad_output: Tensor,
                    side_sign: int, ps: float, pc: float, ws: float, wc: float, scalars: Tensor,
                    labels: Optional[Tensor], counts: Optional[Tensor],
                    per_class: int) -> List[Tensor]:
        return list(kernels.vector_grad(kernels.SideStats(*stats), DS, DT, grad_output, side_sign,
                                        ps, pc, ws, wc, scalars=scalars, labels=labels,
                                        counts=counts, per_class=per_class))

    @vector_grad.register_fake
    def _(stats, *args):
        return [torch.empty_like(stats[0]), torch.empty_like(stats[1])]

    @torch.library.custom_op(f"{lib}::attention_backward", mutates_args=())
    def attention_backward(F: Tensor, scale: Tensor, GS: Tensor, GT: Tensor, ps: float, pc: float,
                           has_spatial: bool, has_channel: bool, scalars: Tensor) -> Tensor:
        return kernels.attention_backward(F, scale, GS, GT, ps, pc, has_spatial, has_channel,
                                          scalars)

    @attention_backward.register_fake
    def _(F, *args):
        return torch.empty_like(F, memory_format=torch.contiguous_format)

    return torch.ops.atom_fast_triton


class _Launchers:
    """The launchers of ``atom_fast.kernels.attention`` with their arguments, run as custom ops."""

    def __init__(self, ops):
        self.ops = ops
        self.SideStats = _kernels().SideStats

    def attention_stats(self, F, ps, pc, has_spatial, has_channel, acc_dtype, scalars):
        if scalars.dtype != acc_dtype:
            raise ValueError(f"scalars must be a {acc_dtype} tensor (the accumulation dtype), "
                             f"got {scalars.dtype}")
        return self.SideStats(*self.ops.attention_stats(F, float(ps), float(pc), bool(has_spatial),
                                                        bool(has_channel), scalars))

    def class_differences(self, real, syn, num_classes, ps, pc, ws, wc, *, scalars,
                          real_order=None, real_offsets=None, syn_order=None, syn_offsets=None,
                          real_per_class=0, syn_per_class=0):
        """(DS, DT, partials): the class differences and the (K, 2) weighted terms."""
        return tuple(self.ops.class_differences(
            list(real), list(syn), int(num_classes), float(ps), float(pc), float(ws), float(wc),
            scalars, real_order, real_offsets, syn_order, syn_offsets,
            int(real_per_class), int(syn_per_class)))

    def vector_grad(self, stats, DS, DT, grad_output, side_sign, ps, pc, ws, wc, *, scalars,
                    labels=None, counts=None, per_class=0):
        return tuple(self.ops.vector_grad(list(stats), DS, DT, grad_output, int(side_sign),
                                          float(ps), float(pc), float(ws), float(wc), scalars,
                                          labels, counts, int(per_class)))

    def attention_backward(self, F, scale, GS, GT, ps, pc, has_spatial, has_channel, scalars):
        return self.ops.attention_backward(F, scale, GS, GT, float(ps), float(pc), bool(has_spatial),
                                           bool(has_channel), scalars)


def interpreted():
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` before Triton was
    imported), as on a CPU-only machine."""
    return type(_kernels()._attention_stats_kernel).__name__ == "InterpretedFunction"


class LayerStats(NamedTuple):
    """What the forward keeps of one layer for the backward."""

    real: Optional[tuple]  # SideStats of the real features; None when they need no gradient
    syn: Optional[tuple]  # SideStats of the synthetic features; None when they need no gradient
    spatial_diff: torch.Tensor  # D_k(s), (K, H*W): mean real minus mean synthetic normalized s
    channel_diff: torch.Tensor  # D_k(t), (K, C)


class ClassOrder(NamedTuple):
    """One side's samples grouped by class, for the class-mean kernel."""

    order: torch.Tensor  # sample indices sorted by class (stable), int64
    offsets: torch.Tensor  # (K + 1,) start of each class in ``order``, int64


def _class_order(labels, counts):
    return ClassOrder(class_order(labels), class_offsets(counts))


def _class_layout_arguments(layout):
    """``class_differences``'s class-layout keywords for a ``ClassLayout``."""
    if not layout.has_labels:
        return dict(real_per_class=layout.real_per_class, syn_per_class=layout.syn_per_class)
    real = _class_order(layout.real_labels, layout.real_counts)
    syn = _class_order(layout.syn_labels, layout.syn_counts)
    return dict(real_order=real.order, real_offsets=real.offsets,
                syn_order=syn.order, syn_offsets=syn.offsets)


def _side_layout_arguments(layout, side):
    """``vector_grad``'s class-layout keywords for one side ("real" or "syn") of a ``ClassLayout``."""
    if layout.has_labels:
        return dict(labels=layout.labels(side), counts=getattr(layout, f"{side}_counts"))
    return dict(per_class=layout.per_class(side))


def _pack(stats):
    """Tensors of a SideStats for save_for_backward; Nones where that side needs no gradient."""
    return tuple(stats) if stats is not None else (None,) * len(_kernels().SideStats._fields)


class _FeatureGradient(torch.autograd.Function):
    """dF from the per-sample gradients: one pass over F. Its own gradient is not implemented, and
    asking for it (double backward) raises instead of returning a silently wrong zero."""

    @staticmethod
    def forward(ctx, F, scale, GS, GT, ps, pc, has_spatial, has_channel, scalars):
        return _launchers().attention_backward(F, scale, GS, GT, ps, pc, has_spatial, has_channel,
                                             scalars)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _feature_gradient(F, stats, DS, DT, grad_output, side_sign, ps, pc, ws, wc, scalars,
                      side_layout):
    """The gradient of the loss w.r.t. one side's features F (vector_grad, then one pass over F);
    ``scalars``: the forward's ``loss_scalars``."""
    kernels = _launchers()
    go = grad_output.reshape(1).to(stats.spatial.dtype)
    GS, GT = kernels.vector_grad(stats, DS, DT, go, side_sign, ps, pc, ws, wc, scalars=scalars,
                                 **side_layout)
    if torch.is_grad_enabled():  # create_graph=True: record a node whose backward raises
        return _FeatureGradient.apply(F, stats.scale, GS, GT, ps, pc, ws != 0, wc != 0, scalars)
    return kernels.attention_backward(F, stats.scale, GS, GT, ps, pc, ws != 0, wc != 0, scalars)


class FusedAttentionLoss(torch.autograd.Function):
    """loss = sum_layers [ws sum_k ||D_k(s)||^2 + wc sum_k ||D_k(t)||^2] with fused kernels.

    ``features`` holds the real layers followed by the synthetic layers (equal counts).
    """

    @staticmethod
    def forward(ctx, layout, spatial_power, channel_power, spatial_weight, channel_weight, *features):
        kernels, launchers = _kernels(), _launchers()
        num_layers = len(features) // 2
        reals, syns = features[:num_layers], features[num_layers:]
        acc_dtype = accumulation_dtype(reals[0].dtype)
        has_spatial, has_channel = spatial_weight != 0, channel_weight != 0
        # ``features`` are the trailing arguments of apply().
        needs = ctx.needs_input_grad[-len(features):]
        needs_real, needs_syn = needs[:num_layers], needs[num_layers:]
        # (layer, class, [spatial, channel]) weighted terms; summed once at the end.
        partials = []
        saved = []
        if has_spatial or has_channel:
            class_args = _class_layout_arguments(layout)
            # the powers, weights and norm floor for every kernel of this call and its backward
            scalars = kernels.loss_scalars(spatial_power, channel_power, spatial_weight,
                                           channel_weight, dtype=acc_dtype, device=reals[0].device)
            for i, (real, syn) in enumerate(zip(reals, syns)):
                real_stats = launchers.attention_stats(real, spatial_power, channel_power,
                                                     has_spatial, has_channel, acc_dtype, scalars)
                syn_stats = launchers.attention_stats(syn, spatial_power, channel_power,
                                                    has_spatial, has_channel, acc_dtype, scalars)
                DS, DT, terms = launchers.class_differences(real_stats, syn_stats,
                                                            layout.num_classes, spatial_power,
                                                            channel_power, spatial_weight,
                                                            channel_weight, scalars=scalars,
                                                            **class_args)
                partials.append(terms)
                # Statistics of a side that needs no gradient are not kept until backward.
                saved += [*_pack(real_stats if needs_real[i] else None),
                          *_pack(syn_stats if needs_syn[i] else None), DS, DT]
            # five values, never written again: kept on ctx beside the Python scalars
            ctx.scalars = scalars
        # Features are saved only for the sides that need a gradient: the real features of a
        # distillation step (computed under no_grad) must not stay alive until backward.
        ctx.save_for_backward(*(f if need else None for f, need in zip(features, needs)), *saved)
        ctx.layout = layout
        ctx.params = (spatial_power, channel_power, spatial_weight, channel_weight)
        ctx.num_layers = num_layers
        if not partials:  # both weights zero
            return torch.zeros((), dtype=acc_dtype, device=reals[0].device)
        return torch.stack(partials).sum()

    @staticmethod
    def _unpack(ctx):
        """The saved features (real layers, then synthetic) and one LayerStats per layer."""
        kernels = _kernels()
        saved = iter(ctx.saved_tensors)
        features = list(itertools.islice(saved, 2 * ctx.num_layers))
        layers = []
        for _ in range(ctx.num_layers):
            width = len(kernels.SideStats._fields)
            real, syn = (kernels.SideStats(*itertools.islice(saved, width)) for _ in range(2))
            layers.append(LayerStats(real=real if real.spatial is not None else None,
                                     syn=syn if syn.spatial is not None else None,
                                     spatial_diff=next(saved), channel_diff=next(saved)))
        return features, layers

    @staticmethod
    def backward(ctx, grad_output):
        ps, pc, ws, wc = ctx.params
        num_layers = ctx.num_layers
        needs = ctx.needs_input_grad[-2 * num_layers:]
        if ws == 0 and wc == 0:  # nothing was computed, only the features were saved
            grads = [torch.zeros_like(f) if need else None
                     for f, need in zip(ctx.saved_tensors, needs)]
            return (None, None, None, None, None, *grads)
        features, layers = FusedAttentionLoss._unpack(ctx)
        grads = [None] * (2 * num_layers)
        for i, layer in enumerate(layers):
            sides = (("real", 1.0, i, layer.real), ("syn", -1.0, num_layers + i, layer.syn))
            for side, sign, index, stats in sides:
                if not needs[index]:
                    continue  # no work for a side that needs no gradient
                grads[index] = _feature_gradient(
                    features[index], stats, layer.spatial_diff, layer.channel_diff, grad_output,
                    sign, ps, pc, ws, wc, ctx.scalars, _side_layout_arguments(ctx.layout, side))
        # layout and the four scalars get no gradient
        return (None, None, None, None, None, *grads)


def attention_loss(reals, syns, layout, spatial_power, channel_power, spatial_weight,
                   channel_weight):
    """Sum over layers of the fused loss (arguments already validated by atom_fast.loss)."""
    return FusedAttentionLoss.apply(layout, spatial_power, channel_power, spatial_weight,
                                    channel_weight, *reals, *syns)


# --------------------------------------------------------------------------------------------------
# the real side as class statistics (docs/scale.md)
# --------------------------------------------------------------------------------------------------


def _normalized(vectors, norms, scale, power):
    """x_hat = x / max(||x||, eps) from the kernels' scaled x' = x / m^p: x' / max(||x'||, eps / m^p),
    the floor in log space as in the kernels."""
    return vectors / torch.maximum(norms, norm_floor(scale, power))[:, None]


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power,
                         has_spatial, has_channel, grouped=None):
    """Per-class sums of the normalized spatial (K, H*W) and channel (K, C) attention vectors.

    One run of the stats kernel over ``features``; the normalization and the class sums are small
    torch ops on the (N, H*W + C) per-sample vectors. A disabled side is None. Detached.
    """
    acc_dtype = accumulation_dtype(features.dtype)
    with torch.no_grad():
        scalars = _kernels().loss_scalars(spatial_power, channel_power, dtype=acc_dtype,
                                          device=features.device)
        stats = _launchers().attention_stats(features.detach(), spatial_power, channel_power,
                                             has_spatial, has_channel, acc_dtype, scalars)
        spatial = channel = None
        if has_spatial:
            spatial = class_sums(_normalized(stats.spatial, stats.spatial_norm, stats.scale,
                                              spatial_power), labels, num_classes)
        if has_channel:
            channel = class_sums(_normalized(stats.channel, stats.channel_norm, stats.scale,
                                              channel_power), labels, num_classes)
    return spatial, channel


class AttentionLossFromSums(torch.autograd.Function):
    """One layer's loss with the real side given as class sums; gradient w.r.t. ``syn`` only.

    Saves the synthetic per-sample statistics and the class differences D_k (real mean minus
    synthetic mean); the backward is the fused one (``vector_grad`` then one pass over syn).
    """

    @staticmethod
    def forward(ctx, real_spatial, real_channel, real_counts, syn_labels, num_classes,
                spatial_power, channel_power, spatial_weight, channel_weight, syn):
        kernels = _kernels()
        acc_dtype = accumulation_dtype(syn.dtype)
        # for the stats kernel now and the backward's kernels (the weights are applied here in torch)
        scalars = kernels.loss_scalars(spatial_power, channel_power, spatial_weight, channel_weight,
                                       dtype=acc_dtype, device=syn.device)
        stats = _launchers().attention_stats(syn, spatial_power, channel_power, spatial_weight != 0,
                                             channel_weight != 0, acc_dtype, scalars)
        # Counts kept on the host (K values) are copied without waiting for the device.
        real_counts = on_device(real_counts, syn.device, acc_dtype).clamp_min(1)
        if syn_labels is None:
            syn_counts = None
            side_layout = dict(per_class=syn.shape[0] // num_classes)
            syn_denominator = torch.full((num_classes,), syn.shape[0] // num_classes,
                                         dtype=acc_dtype, device=syn.device)
        else:
            syn_counts = class_counts(syn_labels, num_classes)
            side_layout = dict(labels=syn_labels, counts=syn_counts)
            syn_denominator = syn_counts.to(acc_dtype).clamp_min(1)

        def difference(real_sums, vectors, norms, power):
            syn_sums = class_sums(_normalized(vectors, norms, stats.scale, power), syn_labels,
                                   num_classes)
            return (real_sums.to(acc_dtype) / real_counts[:, None]
                    - syn_sums / syn_denominator[:, None])

        loss = torch.zeros((), dtype=acc_dtype, device=syn.device)
        DS = DT = stats.spatial.new_empty((0,))  # not read when the weight is 0
        if spatial_weight != 0:
            DS = difference(real_spatial, stats.spatial, stats.spatial_norm, spatial_power)
            loss = loss + spatial_weight * DS.pow(2).sum()
        if channel_weight != 0:
            DT = difference(real_channel, stats.channel, stats.channel_norm, channel_power)
            loss = loss + channel_weight * DT.pow(2).sum()
        ctx.save_for_backward(syn, *stats, DS, DT, syn_labels, syn_counts)
        ctx.scalars = scalars  # five values, never written again
        ctx.params = (spatial_power, channel_power, spatial_weight, channel_weight)
        ctx.per_class = side_layout.get("per_class", 0)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        syn, S, T, NS, NT, M, DS, DT, syn_labels, syn_counts = ctx.saved_tensors
        stats = _kernels().SideStats(S, T, NS, NT, M)
        ps, pc, ws, wc = ctx.params
        if syn_labels is None:
            side_layout = dict(per_class=ctx.per_class)
        else:
            side_layout = dict(labels=syn_labels, counts=syn_counts)
        grad = _feature_gradient(syn, stats, DS, DT, grad_output, -1.0, ps, pc, ws, wc, ctx.scalars,
                                 side_layout)
        # the sums, counts, labels, class count and the four scalars get no gradient
        return (None,) * 9 + (grad,)


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight,
                             grouped=None):
    """The attention loss of one layer with the real side given as class sums (docs/scale.md).

    ``ws * sum_k ||S_k / n_k - mean_syn_k(s_hat)||^2 + wc * sum_k ||T_k / n_k - mean_syn_k(t_hat)||^2``,
    0-dim, float32 (float64 for float64 syn), differentiable w.r.t. ``syn`` with the fused backward.
    """
    if spatial_weight == 0 and channel_weight == 0:
        # A zero still connected to syn: backward gives zero gradients.
        return syn.reshape(-1)[:0].sum().to(accumulation_dtype(syn.dtype))
    if syn_labels is not None:
        syn_labels = syn_labels.contiguous()  # the kernels index labels with unit stride
    return AttentionLossFromSums.apply(
        real_spatial.detach() if real_spatial is not None else None,
        real_channel.detach() if real_channel is not None else None,
        real_counts, syn_labels, num_classes, spatial_power, channel_power, spatial_weight,
        channel_weight, syn)
