"""Triton backend: an autograd.Function over the fused kernels in ``atom_fast.kernels.attention``.

Forward saves only per-sample attention vectors and norms (N*(H*W + C) + 2N floats per side and
layer) and the class differences (K*(H*W + C)); the features themselves are the caller's tensors.
No host synchronization happens in forward or backward: the upstream gradient is read on the device.
"""

import torch

from atom_fast.constants import NORM_EPS


def _kernels():
    # Imported on first use so that ``import atom_fast`` works where Triton is not installed.
    from atom_fast.kernels import attention
    return attention


class FusedAttentionLoss(torch.autograd.Function):
    """loss = sum_layers [ws sum_k ||D_k(s)||^2 + wc sum_k ||D_k(t)||^2] with fused kernels.

    ``features`` holds the real layers followed by the synthetic layers (equal counts).
    """

    @staticmethod
    def forward(ctx, layout, spatial_power, channel_power, spatial_weight, channel_weight, *features):
        kernels = _kernels()
        num_layers = len(features) // 2
        reals, syns = features[:num_layers], features[num_layers:]
        acc_dtype = torch.float64 if reals[0].dtype == torch.float64 else torch.float32
        has_spatial, has_channel = spatial_weight != 0, channel_weight != 0
        grouped = layout.grouped()
        # (layer, class, [spatial, channel]) weighted terms; summed once at the end.
        partials = torch.zeros((num_layers, layout.num_classes, 2), dtype=acc_dtype,
                               device=reals[0].device)
        saved = []
        if has_spatial or has_channel:
            for i, (real, syn) in enumerate(zip(reals, syns)):
                real_stats = kernels.attention_stats(real, spatial_power, channel_power,
                                                     has_spatial, has_channel, acc_dtype)
                syn_stats = kernels.attention_stats(syn, spatial_power, channel_power,
                                                    has_spatial, has_channel, acc_dtype)
                DS, DT = kernels.class_differences(real_stats, syn_stats, grouped, spatial_weight,
                                                   channel_weight, partials[i])
                saved += [*real_stats, *syn_stats, DS, DT]
        # Features are saved only for the sides that need a gradient: the real features of a
        # distillation step (computed under no_grad) must not stay alive until backward.
        needs = ctx.needs_input_grad[5:]
        ctx.save_for_backward(*(f if need else None for f, need in zip(features, needs)), *saved)
        ctx.layout = layout
        ctx.params = (spatial_power, channel_power, spatial_weight, channel_weight)
        ctx.num_layers = num_layers
        return partials.sum()

    @staticmethod
    def backward(ctx, grad_output):
        kernels = _kernels()
        ps, pc, ws, wc = ctx.params
        has_spatial, has_channel = ws != 0, wc != 0
        num_layers = ctx.num_layers
        saved = ctx.saved_tensors
        features, stats = saved[:2 * num_layers], saved[2 * num_layers:]
        needs = ctx.needs_input_grad[5:]
        grads = [None] * (2 * num_layers)
        if not (has_spatial or has_channel):  # both weights 0: nothing was computed or saved
            return (None,) * 5 + tuple(torch.zeros_like(f) if need else None
                                       for f, need in zip(features, needs))
        for i in range(num_layers):
            layer = stats[10 * i:10 * (i + 1)]
            DS, DT = layer[8], layer[9]
            for side, sign, idx, side_stats in (("real", 1.0, i, layer[0:4]),
                                                 ("syn", -1.0, num_layers + i, layer[4:8])):
                if not needs[idx]:
                    continue  # no work for a side that needs no gradient
                F = features[idx]
                go = grad_output.reshape(1).to(side_stats[0].dtype)
                GS, GT = kernels.vector_grad(side_stats, DS, DT, go, ctx.layout.side(side), sign,
                                             ws, wc, ps, pc)
                grads[idx] = kernels.attention_backward(F, GS, GT, ps, pc, has_spatial, has_channel)
        return (None, None, None, None, None, *grads)


# --------------------------------------------------------------------------------------------------
# the real side as class statistics (SPEC 2.1)
# --------------------------------------------------------------------------------------------------


def _normalized(vectors, norms):
    """x_hat = x / max(||x||, eps) for raw per-sample vectors (N, L) and their norms (N,)."""
    return vectors / norms.clamp_min(NORM_EPS)[:, None]


def _class_sums(x, labels, num_classes):
    """Per-class sums of the rows of x (N, L) -> (K, L); ``labels`` None: equal contiguous blocks."""
    if labels is None:
        return x.reshape(num_classes, x.shape[0] // num_classes, x.shape[1]).sum(dim=1)
    return x.new_zeros((num_classes, x.shape[1])).index_add_(0, labels, x)


def _class_counts(labels, num_classes, dtype):
    """Samples per class, on the labels' device without a host synchronization (unlike bincount)."""
    ones = torch.ones(labels.shape, dtype=dtype, device=labels.device)
    return torch.zeros((num_classes,), dtype=dtype, device=labels.device).index_add_(0, labels, ones)


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power,
                         has_spatial, has_channel):
    """Per-class sums of the normalized spatial (K, H*W) and channel (K, C) attention vectors.

    One pass of the stats kernel over ``features``; the normalization and the class sums are small
    torch ops on the (N, H*W + C) per-sample vectors. A disabled side is None. Detached.
    """
    kernels = _kernels()
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        S, T, NS, NT = kernels.attention_stats(features.detach(), spatial_power, channel_power,
                                               has_spatial, has_channel, acc_dtype)
        spatial = _class_sums(_normalized(S, NS), labels, num_classes) if has_spatial else None
        channel = _class_sums(_normalized(T, NT), labels, num_classes) if has_channel else None
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
        acc_dtype = torch.float64 if syn.dtype == torch.float64 else torch.float32
        has_spatial, has_channel = spatial_weight != 0, channel_weight != 0
        S, T, NS, NT = kernels.attention_stats(syn, spatial_power, channel_power, has_spatial,
                                               has_channel, acc_dtype)
        real_counts = real_counts.to(device=syn.device, dtype=acc_dtype).clamp_min(1)
        if syn_labels is None:
            syn_counts = None
            per_class = syn.shape[0] // num_classes
            denom = torch.full((num_classes,), per_class, dtype=acc_dtype, device=syn.device)
        else:
            syn_counts = _class_counts(syn_labels, num_classes, torch.int64)
            per_class = 0
            denom = syn_counts.to(acc_dtype).clamp_min(1)
        loss = torch.zeros((), dtype=acc_dtype, device=syn.device)
        DS = DT = S.new_empty((0,))
        if has_spatial:
            DS = (real_spatial.to(acc_dtype) / real_counts[:, None]
                  - _class_sums(_normalized(S, NS), syn_labels, num_classes) / denom[:, None])
            loss = loss + spatial_weight * DS.pow(2).sum()
        if has_channel:
            DT = (real_channel.to(acc_dtype) / real_counts[:, None]
                  - _class_sums(_normalized(T, NT), syn_labels, num_classes) / denom[:, None])
            loss = loss + channel_weight * DT.pow(2).sum()
        ctx.save_for_backward(syn, S, T, NS, NT, DS, DT, syn_labels, syn_counts)
        ctx.params = (spatial_power, channel_power, spatial_weight, channel_weight, per_class)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        kernels = _kernels()
        syn, S, T, NS, NT, DS, DT, syn_labels, syn_counts = ctx.saved_tensors
        ps, pc, ws, wc, per_class = ctx.params
        if syn_labels is None:
            side = {"per_class": per_class}
        else:
            side = {"labels": syn_labels, "counts": syn_counts}
        go = grad_output.reshape(1).to(S.dtype)
        GS, GT = kernels.vector_grad((S, T, NS, NT), DS, DT, go, side, -1.0, ws, wc, ps, pc)
        grad = kernels.attention_backward(syn, GS, GT, ps, pc, ws != 0, wc != 0)
        return (None,) * 9 + (grad,)


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight):
    """The attention loss of one layer with the real side given as class sums (SPEC 2.1).

    ``ws * sum_k ||S_k / n_k - mean_syn_k(s_hat)||^2 + wc * sum_k ||T_k / n_k - mean_syn_k(t_hat)||^2``,
    0-dim, float32 (float64 for float64 syn), differentiable w.r.t. ``syn`` with the fused backward.
    """
    if spatial_weight == 0 and channel_weight == 0:
        # A zero still connected to syn: backward gives zero gradients.
        acc_dtype = torch.float64 if syn.dtype == torch.float64 else torch.float32
        return syn.reshape(-1)[:0].sum().to(acc_dtype)
    if syn_labels is not None:
        syn_labels = syn_labels.contiguous()  # the kernels index labels with unit stride
    return AttentionLossFromSums.apply(
        real_spatial.detach() if real_spatial is not None else None,
        real_channel.detach() if real_channel is not None else None,
        real_counts, syn_labels, num_classes, spatial_power, channel_power, spatial_weight,
        channel_weight, syn)
