"""Triton backend: an autograd.Function over the fused kernels in ``atom_fast.kernels.attention``.

Forward saves only per-sample attention vectors and norms (N*(H*W + C) + 2N floats per side and
layer) and the class differences (K*(H*W + C)); the features themselves are the caller's tensors.
No host synchronization happens in forward or backward: the upstream gradient is read on the device.
"""

import torch


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
