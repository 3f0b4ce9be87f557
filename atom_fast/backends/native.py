"""The native backend: the C++/CUDA ops of ``csrc/`` (``torch.ops.atom_fast``), made differentiable and
traceable here. It implements the contract of :mod:`atom_fast.backends`.

This module loads ``atom_fast._C``, which registers these ops (see csrc/ops.cpp for their contracts),
one layer per call: ``attention_forward`` (loss and the small per-sample statistics),
``attention_backward`` (one side's feature gradient from those statistics), ``attention_stats``
(one side's statistics alone), ``attention_class_sums`` (one side's per-class sums of normalized
vectors) and ``attention_forward_sums`` (the forward with the real side given as those sums). The same library also holds the driver's ConvNet block-tail op
(``instance_norm_relu_pool``), whose Python side is ``atom_fast.distill.block_tail``. This module
adds the loss ops' fake (meta) kernels, so they trace under ``torch.compile``, and the autograd
formula of the forward op. It saves only the statistics
(``N*(H*W + C + 3)`` values per side), the class
differences and the features of the sides that need a gradient: real features computed under
``no_grad`` are not kept alive until backward.

The real side can also be given as per-class sums of normalized attention vectors (docs/scale.md):
``class_attention_sums`` computes them (chunk by chunk, summable across processes) and
``attention_loss_from_sums`` is the loss from them, with the same one-pass backward: one op call
per layer each, the normalization and class sums inside the ops.
"""

import contextlib
import importlib.util

import torch

from atom_fast.backends.reference import attention_loss as _reference_attention_loss
from atom_fast.constants import accumulation_dtype
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
    """Instruction set of the CPU row kernels ('avx512', 'avx2' or 'default'), or None when not
    built. ``ATOM_FAST_CPU_ISA`` forces one; a value that is not one of these, or one this CPU
    lacks, raises RuntimeError."""
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
        ctx.set_materialize_grads(False)  # no zero gradients made for the three outputs above

    def _layer_gradients(grad_loss, real, syn, real_stats, syn_stats, diffs, real_offsets,
                         syn_offsets, real_order, syn_order, params, need_real, need_syn):
        """One layer's (grad_real, grad_syn) from its saved statistics: ``attention_backward`` for
        each side that needs a gradient (None for the other)."""
        grad_real = grad_syn = None
        if need_real:
            grad_real = ops.attention_backward(grad_loss, real, real_stats, diffs, real_offsets,
                                               real_order, 1.0, *params)
        if need_syn:
            grad_syn = ops.attention_backward(grad_loss, syn, syn_stats, diffs, syn_offsets,
                                              syn_order, -1.0, *params)
        return grad_real, grad_syn

    def _backward(ctx, grad_loss, _grad_real_stats, _grad_syn_stats, _grad_diffs):
        (real, syn, real_offsets, syn_offsets, real_order, syn_order, real_stats, syn_stats,
         diffs) = ctx.saved_tensors
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return None, None, None, None, None, None, None, None, None, None
        grads = _layer_gradients(grad_loss, real, syn, real_stats, syn_stats, diffs, real_offsets,
                                 syn_offsets, real_order, syn_order, ctx.params,
                                 ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (*grads, None, None, None, None, None, None, None, None)

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


# Inside these Functions' forward and backward the ops are called below the autograd dispatch key:
# the Function is the autograd node, and the ops' registered autograd (a Python wrapper that would
# only find grad mode off and pass the call on) is skipped.
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _backward_mode():
    """Where a Function's backward calls the ops: below the autograd key, unless create_graph=True
    asked for a graph of the backward (then the ops' registered autograd raises on a second one)."""
    return contextlib.nullcontext() if torch.is_grad_enabled() else _below_autograd()


class _Loss(torch.autograd.Function):
    """The features path's autograd node, one for all layers of a call: ``attention_forward`` per
    layer (the losses summed), then ``attention_backward`` per layer and side that needs a gradient.
    The same formula as the ops' registered autograd (which serves direct callers of
    ``torch.ops.atom_fast.attention_forward`` and torch.compile), without its per-call dispatch
    through torch.library's Python wrapper, and one node instead of one per layer (their overhead
    is most of a small call's host time: bench/launch_budget.py).

    Arguments: the four layout tensors, the four terms, the layer count L, then the L real and the
    L synthetic feature tensors."""

    @staticmethod
    def forward(ctx, real_offsets, syn_offsets, real_order, syn_order, ps, pc, ws, wc, layers,
                *features):
        reals, syns = features[:layers], features[layers:]
        need = ctx.needs_input_grad[9:]
        total, saved = None, []
        with _below_autograd():
            for i, (real, syn) in enumerate(zip(reals, syns)):
                loss, real_stats, syn_stats, diffs = ops.attention_forward(
                    real, syn, real_offsets, syn_offsets, real_order, syn_order, ps, pc, ws, wc)
                total = loss if total is None else total + loss
                need_real, need_syn = need[i], need[layers + i]
                saved += [real if need_real else None, syn if need_syn else None,
                          real_stats if need_real else None, syn_stats if need_syn else None,
                          diffs]
        ctx.save_for_backward(real_offsets, syn_offsets, real_order, syn_order, *saved)
        ctx.params = (ps, pc, ws, wc)
        ctx.layers = layers
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        real_offsets, syn_offsets, real_order, syn_order, *saved = ctx.saved_tensors
        layers, params = ctx.layers, ctx.params
        need = ctx.needs_input_grad[9:]
        grads = [None] * (2 * layers)
        with _backward_mode():
            for i in range(layers):
                grads[i], grads[layers + i] = _layer_gradients(
                    grad_loss, *saved[5 * i:5 * i + 5], real_offsets, syn_offsets, real_order,
                    syn_order, params, need[i], need[layers + i])
        return (None,) * 9 + tuple(grads)


class _LossFromSums(torch.autograd.Function):
    """``attention_forward_sums`` and its backward (``attention_backward`` on syn), as
    :class:`_Loss` for the features path."""

    @staticmethod
    def forward(ctx, real_spatial, real_channel, real_counts, syn, syn_offsets, syn_order, ps, pc,
                ws, wc):
        with _below_autograd():
            output = ops.attention_forward_sums(real_spatial, real_channel, real_counts, syn,
                                                syn_offsets, syn_order, ps, pc, ws, wc)
        _setup_sums_context(ctx, (real_spatial, real_channel, real_counts, syn, syn_offsets,
                                  syn_order, ps, pc, ws, wc), output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        with _backward_mode():
            return _sums_backward(ctx, grad_loss, None, None)


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
    terms = (spatial_power, channel_power, spatial_weight, channel_weight)
    if not torch.compiler.is_compiling():
        return _Loss.apply(real_offsets, syn_offsets, real_order, syn_order, *terms, len(reals),
                           *reals, *syns)
    # torch.compile traces the op with its registered autograd (and removes the host overhead)
    total = None
    for real, syn in zip(reals, syns):
        loss = ops.attention_forward(real, syn, real_offsets, syn_offsets, real_order, syn_order,
                                     *terms)[0]
        total = loss if total is None else total + loss
    return total


# ---- the real side as class statistics (docs/scale.md) ------------------------------------------------
# Two ops, one call per layer each: attention_class_sums (the statistics pass and the per-class sums
# of the normalized vectors, inside the op) and attention_forward_sums (the forward with the real
# side given as those sums), whose backward is attention_backward on the synthetic side.

if AVAILABLE:

    @torch.library.register_fake("atom_fast::attention_class_sums")
    def _class_sums_fake(features, offsets, order, spatial_power, channel_power, spatial, channel):
        torch._check(offsets.device == features.device,
                     lambda: f"atom_fast::attention_class_sums: offsets is on {offsets.device} but "
                             f"features is on {features.device}")
        acc = accumulation_dtype(features.dtype)
        _, C, H, W = features.shape
        K = offsets.shape[0] - 1
        return (features.new_empty((K, H * W), dtype=acc), features.new_empty((K, C), dtype=acc))

    @torch.library.register_fake("atom_fast::attention_forward_sums")
    def _forward_sums_fake(real_spatial, real_channel, real_counts, syn, syn_offsets, syn_order,
                           spatial_power, channel_power, spatial_weight, channel_weight):
        for t, name in ((real_spatial, "real_spatial"), (real_channel, "real_channel"),
                        (real_counts, "real_counts"), (syn_offsets, "syn_offsets"),
                        (syn_order, "syn_order")):
            torch._check(t is None or t.device == syn.device,
                         lambda: f"atom_fast::attention_forward_sums: {name} is on {t.device} but "
                                 f"syn is on {syn.device}")
        acc = accumulation_dtype(syn.dtype)
        _, C, H, W = syn.shape
        K = syn_offsets.shape[0] - 1
        return (syn.new_empty((), dtype=acc),
                syn.new_empty((syn.shape[0], H * W + C + STATS_EXTRA), dtype=acc),
                syn.new_empty((K, H * W + C), dtype=acc))

    def _setup_sums_context(ctx, inputs, output):
        _, _, _, syn, syn_offsets, syn_order, ps, pc, ws, wc = inputs
        _, syn_stats, diffs = output
        need = ctx.needs_input_grad[3]
        ctx.save_for_backward(syn if need else None, syn_stats if need else None, diffs,
                              syn_offsets, syn_order)
        ctx.params = (ps, pc, ws, wc)
        ctx.mark_non_differentiable(syn_stats, diffs)
        ctx.set_materialize_grads(False)

    def _sums_backward(ctx, grad_loss, _grad_stats, _grad_diffs):
        syn, syn_stats, diffs, syn_offsets, syn_order = ctx.saved_tensors
        grad_syn = None
        if grad_loss is not None and ctx.needs_input_grad[3]:
            grad_syn = ops.attention_backward(grad_loss, syn, syn_stats, diffs, syn_offsets,
                                              syn_order, -1.0, *ctx.params)
        return None, None, None, grad_syn, None, None, None, None, None, None

    torch.library.register_autograd("atom_fast::attention_forward_sums", _sums_backward,
                                    setup_context=_setup_sums_context)


def class_attention_sums(features, labels, num_classes, spatial_power, channel_power, has_spatial,
                         has_channel, grouped=None):
    """Per-class sums of the normalized attention vectors of ``features`` (N, C, H, W).

    labels: int64 (N,) in [0, num_classes), or None for equal contiguous blocks; ``grouped``: their
    ``(offsets, order)`` (:func:`atom_fast.layout.grouping`) when the caller already has them (one
    per batch, shared by its layers). Returns (S, T): S (num_classes, H*W), T (num_classes, C),
    each None when its flag is False; float32 (float64 for float64 features), detached. Arguments
    are checked by the caller (atom_fast.statistics).
    """
    offsets, order = grouped if grouped is not None else grouping(labels, features.shape[0],
                                                                  num_classes, features.device)
    S, T = ops.attention_class_sums(features.detach(), offsets, order, float(spatial_power),
                                    float(channel_power), bool(has_spatial), bool(has_channel))
    return (S if has_spatial else None), (T if has_channel else None)


def attention_loss_from_sums(real_spatial, real_channel, real_counts, syn, syn_labels, num_classes,
                             spatial_power, channel_power, spatial_weight, channel_weight,
                             grouped=None):
    """The attention loss of one layer with the real side given as class sums (docs/scale.md).

    real_spatial (K, H*W) / real_channel (K, C): sums of the real samples' normalized vectors (None
    where that term's weight is 0), in syn's accumulation dtype; real_counts (K,): int64 samples per
    class, on syn's device. syn (M, C, H, W); syn_labels int64 (M,) or None (equal blocks);
    ``grouped``: their ``(offsets, order)`` when the caller already has them (one per batch, shared
    by its layers). Returns the 0-dim loss, equal in value and gradient w.r.t. syn to the
    full-feature loss on the real features behind the sums. Arguments are checked by the caller
    (atom_fast.loss).
    """
    ws, wc = float(spatial_weight), float(channel_weight)
    if real_counts.dtype != torch.int64:  # counts given as floats (whole numbers)
        real_counts = real_counts.to(torch.int64)
    offsets, order = grouped if grouped is not None else grouping(syn_labels, syn.shape[0],
                                                                  num_classes, syn.device)
    args = (real_spatial if ws != 0 else None, real_channel if wc != 0 else None, real_counts, syn,
            offsets, order, float(spatial_power), float(channel_power), ws, wc)
    if torch.compiler.is_compiling():
        return ops.attention_forward_sums(*args)[0]
    return _LossFromSums.apply(*args)
