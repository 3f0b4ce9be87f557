"""The native backend: the C++/CUDA ops of ``csrc/`` (``torch.ops.atom_fast``), made differentiable and
traceable here. It implements the contract of :mod:`atom_fast.backends`.

This module loads ``atom_fast._C``, which registers these ops (see csrc/ops.cpp for their contracts),
one layer per call: ``attention_forward`` (loss and the small per-sample statistics),
``attention_backward`` (one side's feature gradient from those statistics) and ``attention_stats``
(one side's statistics alone). The same library also holds the driver's ConvNet block-tail op
(``instance_norm_relu_pool``), whose Python side is ``atom_fast.distill.block_tail``. This module
adds the loss ops' fake (meta) kernels, so they trace under ``torch.compile``, and the autograd
formula of the forward op. It saves only the statistics
(``N*(H*W + C + 3)`` values per side), the class
differences and the features of the sides that need a gradient: real features computed under
``no_grad`` are not kept alive until backward.

The real side can also be given as per-class sums of normalized attention vectors (docs/scale.md):
``class_attention_sums`` computes them (chunk by chunk, summable across processes) and
``attention_loss_from_sums`` is the loss from them, with the same one-pass backward.
"""

import importlib.util

import torch

from atom_fast.backends.reference import attention_loss as _reference_attention_loss
from atom_fast.backends.reference import class_sums
from atom_fast.constants import accumulation_dtype, norm_floor
from atom_fast.layout import grouping

if importlib.util.find_spec("atom_fast._C") is None:
    # not built: no compiler, ATOM_FAST_BUILD_NATIVE=0, or installed with build isolation
    _C = None
    LOAD_ERROR = "atom_fast._C was not built"
else:
    try:
        from atom_fast import _C
    except ImportError as exc:  # built, but does not load (e.g. against another torch)
        _C = None
        LOAD_ERROR = f"atom_fast._C does not load: {type(exc).__name__}: {exc}"
    else:
        LOAD_ERROR = None

AVAILABLE = _C is not None
# values per stats row beyond the H*W + C attention entries: m, ||s'||, ||t'|| (csrc/constants.h)
STATS_EXTRA = _C.constants()["STATS_EXTRA"] if AVAILABLE else None
HAS_CUDA = AVAILABLE and _C.has_cuda()


def cpu_isa():
    """Instruction set of the CPU row kernels ('avx2' or 'default'), or None when not built."""
    return _C.cpu_isa() if AVAILABLE else None


if AVAILABLE:
    ops = torch.ops.atom_fast

    @torch.library.register_fake("atom_fast::attention_forward")
    def _forward_fake(real, syn, real_offsets, syn_offsets, real_order, syn_order, spatial_power,
                      channel_power, spatial_weight, channel_weight):
        for t, name in ((syn, "syn"), (real_offsets, "real_offsets"), (syn_offsets, "syn_offsets"),
                        (real_order, "real_order"), (syn_order, "syn_order")):
            torch._check(t is None or t.device == real.device,
                         lambda: f"atom_fast::attention_forward: {name} is on {t.device} but real "
                                 f"is on {real.device}")
        acc = accumulation_dtype(real.dtype)
        _, C, H, W = real.shape
        L = H * W + C
        K = real_offsets.shape[0] - 1
        return (real.new_empty((), dtype=acc),
                real.new_empty((real.shape[0], L + STATS_EXTRA), dtype=acc),
                syn.new_empty((syn.shape[0], L + STATS_EXTRA), dtype=acc),
                real.new_empty((K, L), dtype=acc))

    @torch.library.register_fake("atom_fast::attention_backward")
    def _backward_fake(grad_loss, features, stats, diffs, offsets, order, sign, spatial_power,
                       channel_power, spatial_weight, channel_weight):
        return torch.empty_like(features, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        real, syn, real_offsets, syn_offsets, real_order, syn_order, ps, pc, ws, wc = inputs
        _, real_stats, syn_stats, diffs = output
        need_real, need_syn = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(real if need_real else None, syn if need_syn else None,
                              real_offsets, syn_offsets, real_order, syn_order,
                              real_stats if need_real else None, syn_stats if need_syn else None,
                              diffs)
        ctx.params = (ps, pc, ws, wc)
        ctx.mark_non_differentiable(real_stats, syn_stats, diffs)

    def _backward(ctx, grad_loss, _grad_real_stats, _grad_syn_stats, _grad_diffs):
        (real, syn, real_offsets, syn_offsets, real_order, syn_order, real_stats, syn_stats,
         diffs) = ctx.saved_tensors
        params = ctx.params
        grad_real = grad_syn = None
        if ctx.needs_input_grad[0]:
            grad_real = ops.attention_backward(grad_loss, real, real_stats, diffs, real_offsets,
                                               real_order, 1.0, *params)
        if ctx.needs_input_grad[1]:
            grad_syn = ops.attention_backward(grad_loss, syn, syn_stats, diffs, syn_offsets,
                                              syn_order, -1.0, *params)
        return grad_real, grad_syn, None, None, None, None, None, None, None, None

    torch.library.register_autograd("atom_fast::attention_forward", _backward,
                                    setup_context=_setup_context)

    def _no_double_backward(ctx, grad):
        raise RuntimeError("backend='native' does not support double backward (a gradient of the "
                           "attention loss's gradient); use backend='reference' for that")

    def _setup_backward_context(ctx, inputs, output):
        pass

    @torch.library.register_fake("atom_fast::attention_stats")
    def _stats_fake(features, spatial_power, channel_power, spatial, channel):
        _, C, H, W = features.shape
        return features.new_empty((features.shape[0], H * W + C + STATS_EXTRA),
                                  dtype=accumulation_dtype(features.dtype))

    # Without this, create_graph=True would give a gradient that claims to require grad but whose
    # own gradient is silently wrong; with it, asking for that second gradient raises.
    torch.library.register_autograd("atom_fast::attention_backward", _no_double_backward,
                                    setup_context=_setup_backward_context)


def layout_arguments(layout, device):
    """(real_offsets, syn_offsets, real_order, syn_order) of the ops for a ClassLayout."""
    real_offsets, real_order = layout.offsets_and_order("real", device)
    syn_offsets, syn_order = layout.offsets_and_order("syn", device)
    return real_offsets, syn_offsets, real_order, syn_order


def attention_loss(reals, syns, layout, spatial_power, channel_power, spatial_weight,
                   channel_weight):
    """Sum over layers of the native op's loss (arguments already validated by atom_fast.loss).
    With both weights 0 the op has nothing to compute: the reference's connected zero."""
    if spatial_weight == 0 and channel_weight == 0:
        return _reference_attention_loss(reals, syns, layout, spatial_power, channel_power,
                                         spatial_weight, channel_weight)
    real_offsets, syn_offsets, real_order, syn_order = layout_arguments(layout, reals[0].device)
    total = None
    for real, syn in zip(reals, syns):
        loss = ops.attention_forward(real, syn, real_offsets, syn_offsets, real_order, syn_order,
                                     spatial_power, channel_power, spatial_weight,
                                     channel_weight)[0]
        total = loss if total is None else total + loss
    return total


# ---- the real side as class statistics (docs/scale.md) ------------------------------------------------


def _parts(stats, HW, C, ps, pc):
    """``(s', t', den_s, den_t)`` from the ops' stats layout [s' | t' | m | ||s'|| | ||t'||] (views
    of it, and the (N, 1) denominators max(||x'||, norm_floor(m, p)); x' = x / m^p). The floor is
    formed once when the two powers are equal."""
    s, t, m, norms = stats.split([HW, C, 1, 2], 1)
    floor = norm_floor(m, ps)
    if pc != ps:
        floor = torch.cat([floor, norm_floor(m, pc)], 1)
    den_s, den_t = torch.maximum(norms, floor).split(1, 1)
    return s, t, den_s, den_t


def _normalized(stats, HW, C, ps, pc):
    """(N, H*W + C) normalized per-sample vectors [s_hat | t_hat] from the ops' stats layout."""
    s, t, den_s, den_t = _parts(stats, HW, C, ps, pc)
    return torch.cat([s / den_s, t / den_t], 1)


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power, has_spatial,
                         has_channel):
    """Per-class sums of the normalized attention vectors of ``features`` (N, C, H, W).

    labels: int64 (N,) in [0, num_classes), or None for equal contiguous blocks. Returns (S, T):
    S (num_classes, H*W), T (num_classes, C), each None when its flag is False; float32 (float64 for
    float64 features), detached. Arguments are checked by the caller (atom_fast.loss).
    """
    _, C, H, W = features.shape
    HW = H * W
    stats = ops.attention_stats(features.detach(), float(spatial_power), float(channel_power),
                                bool(has_spatial), bool(has_channel))
    # the op's fresh stats are normalized in place (no per-sample copy), then summed by class
    s, t, den_s, den_t = _parts(stats, HW, C, spatial_power, channel_power)
    if has_spatial:
        s.div_(den_s)
    if has_channel:
        t.div_(den_t)
    S, T = class_sums(stats[:, :HW + C], labels, num_classes).split([HW, C], 1)
    return (S if has_spatial else None), (T if has_channel else None)


class _LossFromSums(torch.autograd.Function):
    """ws ||S/n - mean_syn(s_hat)||^2 + wc ||T/n - mean_syn(t_hat)||^2 summed over classes; the
    backward is the op's one pass over syn (read F, write dF) with the class differences D_k."""

    @staticmethod
    def forward(ctx, syn, real_means, offsets, order, syn_labels, num_classes, ps, pc, ws, wc):
        M, C, H, W = syn.shape
        HW = H * W
        has_s, has_t = ws != 0, wc != 0
        stats = ops.attention_stats(syn, ps, pc, has_s, has_t)
        vectors = _normalized(stats, HW, C, ps, pc)
        if syn_labels is None:  # equal blocks: the class means need no counts
            per_class = M // num_classes
            syn_means = vectors.view(num_classes, per_class, HW + C).sum(dim=1) / per_class
        else:
            counts = (offsets[1:] - offsets[:-1]).clamp_min(1).to(stats.dtype)
            syn_means = class_sums(vectors, syn_labels, num_classes) / counts[:, None]
        diffs = real_means - syn_means
        if ws == wc:  # one weighted sum over both terms
            loss = ws * diffs.square().sum()
        elif not has_t:
            loss = ws * diffs[:, :HW].square().sum()
        elif not has_s:
            loss = wc * diffs[:, HW:].square().sum()
        else:
            loss = ws * diffs[:, :HW].square().sum() + wc * diffs[:, HW:].square().sum()
        ctx.save_for_backward(syn, stats, diffs, offsets, order)
        ctx.params = (ps, pc, ws, wc)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        syn, stats, diffs, offsets, order = ctx.saved_tensors
        grad = ops.attention_backward(grad_loss, syn, stats, diffs, offsets, order, -1.0, *ctx.params)
        return grad, None, None, None, None, None, None, None, None, None


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight):
    """The attention loss of one layer with the real side given as class sums (docs/scale.md).

    real_spatial (K, H*W) / real_channel (K, C): sums of the real samples' normalized vectors (None
    where that term's weight is 0), in syn's accumulation dtype; real_counts (K,): samples per class.
    syn (M, C, H, W); syn_labels int64 (M,) or None (equal blocks). Returns the 0-dim loss, equal in
    value and gradient w.r.t. syn to the full-feature loss on the real features behind the sums.
    Arguments are checked by the caller (atom_fast.loss).
    """
    M, C, H, W = syn.shape
    HW = H * W
    ps, pc = float(spatial_power), float(channel_power)
    ws, wc = float(spatial_weight), float(channel_weight)
    acc = accumulation_dtype(syn.dtype)
    n = real_counts.clamp_min(1).to(device=syn.device, dtype=acc, non_blocking=True)[:, None]
    real_means = torch.cat([
        real_spatial if ws != 0 else syn.new_zeros((num_classes, HW), dtype=acc),
        real_channel if wc != 0 else syn.new_zeros((num_classes, C), dtype=acc)], 1).to(acc) / n
    offsets, order = grouping(syn_labels, M, num_classes, syn.device)
    return _LossFromSums.apply(syn, real_means, offsets, order, syn_labels, num_classes, ps, pc, ws, wc)
