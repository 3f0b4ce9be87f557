"""The ConvNet block tail as one native op: GroupNorm(C, C) + ReLU (+ 2x2 average pooling), forward
and backward each one pass over the block's map (CPU, float32/float64).

The op (``torch.ops.atom_fast.instance_norm_relu_pool`` and its backward, ``csrc/norm_relu_pool_cpu.cpp``)
is built into the same library as the loss's native backend, which loads it; this module, its only
user's side, adds the fake (meta) kernels and the autograd. ``networks.ConvBlock`` takes it on CPU
when its modules are exactly that tail and nothing hooks them.
"""

import torch

from atom_fast.backends import native_available

AVAILABLE = native_available()

if AVAILABLE:
    ops = torch.ops.atom_fast

    @torch.library.register_fake("atom_fast::instance_norm_relu_pool")
    def _norm_relu_pool_fake(input, weight, bias, eps, pool):
        N, C, H, W = input.shape
        pooled = input.new_empty((N, C, H // 2, W // 2) if pool else (0,))
        return (torch.empty_like(input, memory_format=torch.contiguous_format), pooled,
                input.new_empty((N, C)), input.new_empty((N, C)))

    @torch.library.register_fake("atom_fast::instance_norm_relu_pool_backward")
    def _norm_relu_pool_backward_fake(grad_f, grad_pooled, input, weight, bias, mean, rstd):
        N, C = input.shape[:2]
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                input.new_empty((N, C)), input.new_empty((N, C)))


class _NormReluPool(torch.autograd.Function):
    """GroupNorm(C, C) + ReLU (+ 2x2 average pooling) of a ConvNet block, forward and backward each
    one pass (the native CPU ops); saves the input and the per-row mean and rstd."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pool):
        f, pooled, mean, rstd = ops.instance_norm_relu_pool(x, weight, bias, eps, pool)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return f, pooled

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_f, grad_pooled):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad_pooled is not None and grad_pooled.numel() == 0:  # pool=False: the empty output
            grad_pooled = None
        if grad_f is None and grad_pooled is None:
            return None, None, None, None, None
        gx, gw_rows, gb_rows = ops.instance_norm_relu_pool_backward(grad_f, grad_pooled, x, weight,
                                                                    bias, mean, rstd)
        gw = gw_rows.sum(0) if weight is not None and ctx.needs_input_grad[1] else None
        gb = gb_rows.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def instance_norm_relu_pool(x, weight, bias, eps, pool):
    """A ConvNet block's tail in one pass (CPU, float32/float64, native ops):
    ``f = relu(group_norm(x, C, weight, bias, eps))`` and, when ``pool``, ``avg_pool2d(f, 2)``
    (else None). Returns ``(f, pooled)``; differentiable once in x, weight and bias (no double
    backward, forward-mode AD or vmap: ConvBlock users who need them set
    ATOM_FAST_FUSED_BLOCK_TAIL=0)."""
    eps, pool = float(eps), bool(pool)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        f, pooled = _NormReluPool.apply(x, weight, bias, eps, pool)
    else:
        f, pooled, _, _ = ops.instance_norm_relu_pool(x, weight, bias, eps, pool)
    return f, (pooled if pool else None)
