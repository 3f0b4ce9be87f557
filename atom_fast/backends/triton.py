"""The Triton backend: autograd.Functions over the fused kernels in ``atom_fast.kernels.attention``
(the only module that imports them). It implements the contract of :mod:`atom_fast.backends`.

Forward saves only per-sample statistics (``SideStats``: scaled attention vectors, norms, scales
and norm floors, N*(H*W + C) + 5N floats per side and layer) and the class differences (K*(H*W +
C)); the features themselves are the caller's tensors. No host synchronization happens in forward
or backward: the upstream gradient is read on the device. The powers, weights and norm floor reach
the kernels as one small tensor of the accumulation dtype (``kernels.attention.loss_scalars``, made
once per set of values, dtype, device and stream and kept), never as float arguments, which the
Triton interpreter would round to float32. Every path is a few custom ops per layer and nothing
else: the stats kernel, one class kernel (class differences, class sums, or class differences
with the real side as sums), and in backward ``vector_grad`` and one pass over the features.
Triton is imported on first use, so ``import atom_fast`` works where it is not
installed.
"""

import itertools
from typing import NamedTuple, Optional

import torch

from atom_fast.constants import accumulation_dtype
from atom_fast.layout import grouping, on_device

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
                *(F.new_empty((N,), dtype=acc) for _ in range(5))]

    # The weighted per-class terms come back as a third output, allocated here: an op that writes
    # into a caller's buffer and also returns tensors cannot be functionalized (torch.compile).
    @torch.library.custom_op(f"{lib}::class_differences", mutates_args=())
    def class_differences(real: List[Tensor], syn: List[Tensor], num_classes: int, ps: float,
                          pc: float, ws: float, wc: float, scalars: Tensor,
                          real_order: Optional[Tensor], real_offsets: Optional[Tensor],
                          syn_order: Optional[Tensor], syn_offsets: Optional[Tensor],
                          real_per_class: int, syn_per_class: int) -> List[Tensor]:
        partials = torch.empty((num_classes, 2), dtype=scalars.dtype, device=real[0].device)
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

    @torch.library.custom_op(f"{lib}::class_differences_from_sums", mutates_args=())
    def class_differences_from_sums(real_spatial: Optional[Tensor], real_channel: Optional[Tensor],
                                    real_counts: Tensor, syn: List[Tensor], num_classes: int,
                                    ps: float, pc: float, ws: float, wc: float, scalars: Tensor,
                                    syn_order: Optional[Tensor], syn_offsets: Optional[Tensor],
                                    syn_per_class: int) -> List[Tensor]:
        partials = torch.empty((num_classes, 2), dtype=scalars.dtype, device=syn[0].device)
        DS, DT = kernels.class_differences_from_sums(
            real_spatial, real_channel, real_counts, kernels.SideStats(*syn), num_classes, ps, pc,
            ws, wc, partials, scalars=scalars, syn_order=syn_order, syn_offsets=syn_offsets,
            syn_per_class=syn_per_class)
        return [DS, DT, partials]

    @class_differences_from_sums.register_fake
    def _(real_spatial, real_channel, real_counts, syn, num_classes, ps, pc, ws, wc, scalars,
          *layout):
        return [syn[0].new_empty((num_classes, syn[0].shape[1])),
                syn[1].new_empty((num_classes, syn[1].shape[1])),
                scalars.new_empty((num_classes, 2))]

    @torch.library.custom_op(f"{lib}::class_sums", mutates_args=())
    def class_sums(stats: List[Tensor], num_classes: int, has_spatial: bool, has_channel: bool,
                   order: Optional[Tensor], offsets: Optional[Tensor],
                   per_class: int) -> List[Tensor]:
        return list(kernels.class_sums(kernels.SideStats(*stats), num_classes, has_spatial,
                                       has_channel, order=order, offsets=offsets,
                                       per_class=per_class))

    @class_sums.register_fake
    def _(stats, num_classes, *args):
        return [stats[0].new_empty((num_classes, stats[0].shape[1])),
                stats[1].new_empty((num_classes, stats[1].shape[1]))]

    @torch.library.custom_op(f"{lib}::vector_grad", mutates_args=())
    def vector_grad(stats: List[Tensor], DS: Tensor, DT: Tensor, grad_output: Tensor,
                    side_sign: int, ps: float, pc: float, ws: float, wc: float, scalars: Tensor,
                    labels: Optional[Tensor], offsets: Optional[Tensor],
                    per_class: int) -> List[Tensor]:
        return list(kernels.vector_grad(kernels.SideStats(*stats), DS, DT, grad_output, side_sign,
                                        ps, pc, ws, wc, scalars=scalars, labels=labels,
                                        offsets=offsets, per_class=per_class))

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

    def class_differences_from_sums(self, real_spatial, real_channel, real_counts, syn,
                                    num_classes, ps, pc, ws, wc, *, scalars, syn_order=None,
                                    syn_offsets=None, syn_per_class=0):
        """(DS, DT, partials) with the real side as class sums and counts."""
        return tuple(self.ops.class_differences_from_sums(
            real_spatial, real_channel, real_counts, list(syn), int(num_classes), float(ps),
            float(pc), float(ws), float(wc), scalars, syn_order, syn_offsets, int(syn_per_class)))

    def class_sums(self, stats, num_classes, has_spatial, has_channel, *, order=None, offsets=None,
                   per_class=0):
        return tuple(self.ops.class_sums(list(stats), int(num_classes), bool(has_spatial),
                                         bool(has_channel), order, offsets, int(per_class)))

    def vector_grad(self, stats, DS, DT, grad_output, side_sign, ps, pc, ws, wc, *, scalars,
                    labels=None, offsets=None, per_class=0):
        return tuple(self.ops.vector_grad(list(stats), DS, DT, grad_output, int(side_sign),
                                          float(ps), float(pc), float(ws), float(wc), scalars,
                                          labels, offsets, int(per_class)))

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


def _class_layout_arguments(layout):
    """``class_differences``'s class-layout keywords for a ``ClassLayout``."""
    if not layout.has_labels:
        return dict(real_per_class=layout.real_per_class, syn_per_class=layout.syn_per_class)
    out = {}
    for side in ("real", "syn"):
        out[f"{side}_offsets"], out[f"{side}_order"] = layout.offsets_and_order(side, None)
    return out


def _side_layout_arguments(layout, class_args, side):
    """``vector_grad``'s class-layout keywords for one side ("real" or "syn") of a ``ClassLayout``
    whose ``class_differences`` keywords are ``class_args``."""
    if layout.has_labels:
        return dict(labels=layout.labels(side), offsets=class_args[f"{side}_offsets"])
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
    # the kernel reads the one value (0-dim, the loss's dtype) and converts it itself
    GS, GT = kernels.vector_grad(stats, DS, DT, grad_output, side_sign, ps, pc, ws, wc,
                                 scalars=scalars, **side_layout)
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
            ctx.side_layouts = {side: _side_layout_arguments(layout, class_args, side)
                                for side in ("real", "syn")}
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
                    sign, ps, pc, ws, wc, ctx.scalars, ctx.side_layouts[side])
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


def _grouped_arguments(grouped, labels, num, num_classes, device):
    """The class-kernel layout keywords (order, offsets, per_class) of one side from its
    ``grouped`` ``(offsets, order)`` (:func:`atom_fast.layout.grouping`), made here when None."""
    if grouped is None:
        grouped = grouping(labels, num, num_classes, device)
    offsets, order = grouped
    if order is None:  # equal contiguous blocks
        return dict(order=None, offsets=None, per_class=num // num_classes)
    return dict(order=order, offsets=offsets, per_class=0)


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power,
                         has_spatial, has_channel, grouped=None):
    """Per-class sums of the normalized spatial (K, H*W) and channel (K, C) attention vectors: the
    stats kernel over ``features`` and one class kernel. ``grouped``: the labels' ``(offsets,
    order)`` when the caller already has them (one per batch, shared by its layers). A disabled side
    is None. Detached.
    """
    acc_dtype = accumulation_dtype(features.dtype)
    layout = _grouped_arguments(grouped, labels, features.shape[0], num_classes, features.device)
    launchers = _launchers()
    with torch.no_grad():
        scalars = _kernels().loss_scalars(spatial_power, channel_power, dtype=acc_dtype,
                                          device=features.device)
        stats = launchers.attention_stats(features.detach(), spatial_power, channel_power,
                                          has_spatial, has_channel, acc_dtype, scalars)
        spatial, channel = launchers.class_sums(stats, num_classes, has_spatial, has_channel,
                                                **layout)
    return (spatial if has_spatial else None), (channel if has_channel else None)


class AttentionLossFromSums(torch.autograd.Function):
    """One layer's loss with the real side given as class sums; gradient w.r.t. ``syn`` only.

    Forward: the stats kernel over ``syn`` and one class kernel (the class differences D_k, real
    mean minus synthetic mean, and the weighted per-class terms). Saves the synthetic per-sample
    statistics and D_k; the backward is the fused one (``vector_grad`` then one pass over syn).
    """

    @staticmethod
    def forward(ctx, real_spatial, real_channel, real_counts, layout, side_layout, num_classes,
                spatial_power, channel_power, spatial_weight, channel_weight, syn):
        kernels, launchers = _kernels(), _launchers()
        acc_dtype = accumulation_dtype(syn.dtype)
        scalars = kernels.loss_scalars(spatial_power, channel_power, spatial_weight, channel_weight,
                                       dtype=acc_dtype, device=syn.device)
        stats = launchers.attention_stats(syn, spatial_power, channel_power, spatial_weight != 0,
                                          channel_weight != 0, acc_dtype, scalars)
        DS, DT, terms = launchers.class_differences_from_sums(
            real_spatial, real_channel, real_counts, stats, num_classes, spatial_power,
            channel_power, spatial_weight, channel_weight, scalars=scalars,
            syn_order=layout["order"], syn_offsets=layout["offsets"],
            syn_per_class=layout["per_class"])
        ctx.save_for_backward(syn, *stats, DS, DT)
        ctx.scalars = scalars  # five values, never written again
        ctx.params = (spatial_power, channel_power, spatial_weight, channel_weight)
        ctx.side_layout = side_layout  # vector_grad's keywords (labels and offsets, or per_class)
        return terms.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[10]:
            return (None,) * 11  # only the sums asked for a gradient: they get none
        syn, *stats, DS, DT = ctx.saved_tensors
        grad = _feature_gradient(syn, _kernels().SideStats(*stats), DS, DT, grad_output, -1.0,
                                 *ctx.params, ctx.scalars, ctx.side_layout)
        # the sums, counts, layouts, class count and the four scalars get no gradient
        return (None,) * 10 + (grad,)


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight,
                             grouped=None):
    """The attention loss of one layer with the real side given as class sums (docs/scale.md).

    ``ws * sum_k ||S_k / n_k - mean_syn_k(s_hat)||^2 + wc * sum_k ||T_k / n_k - mean_syn_k(t_hat)||^2``,
    0-dim, float32 (float64 for float64 syn), differentiable w.r.t. ``syn`` with the fused backward.
    real_counts (K,): samples per class (int64, or whole-number floats), on syn's device or the
    host (copied without a wait); the sums and counts may be strided. ``grouped``: the synthetic
    labels' ``(offsets, order)`` when the caller already has them (one per batch, shared by its
    layers).
    """
    if spatial_weight == 0 and channel_weight == 0:
        # A zero still connected to syn: backward gives zero gradients.
        return syn.reshape(-1)[:0].sum().to(accumulation_dtype(syn.dtype))
    if syn_labels is not None:  # the kernels index labels with unit stride, on syn's device
        syn_labels = on_device(syn_labels, syn.device).contiguous()
    # the kernel reads the counts and sums with unit stride where syn is; counts kept on the host
    # are copied without waiting for the device (a caller's device int64 counts pass as they are)
    real_counts = on_device(real_counts, syn.device, torch.int64).contiguous()
    layout = _grouped_arguments(grouped, syn_labels, syn.shape[0], num_classes, syn.device)
    side_layout = (dict(per_class=layout["per_class"]) if layout["order"] is None
                   else dict(labels=syn_labels, offsets=layout["offsets"]))
    acc_dtype = accumulation_dtype(syn.dtype)

    def real_sums(sums, weight):  # no detach needed: the Function gives the sums no gradient
        return None if sums is None or weight == 0 else sums.to(acc_dtype).contiguous()

    return AttentionLossFromSums.apply(
        real_sums(real_spatial, spatial_weight), real_sums(real_channel, channel_weight),
        real_counts, layout, side_layout, num_classes, spatial_power, channel_power,
        spatial_weight, channel_weight, syn)
