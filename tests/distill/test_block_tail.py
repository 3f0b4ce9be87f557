"""The native ConvNet block tail (``atom_fast::instance_norm_relu_pool`` and its backward): the same
values and gradients as GroupNorm(C, C) + ReLU + 2x2 average pooling, and the driver's ConvNet gives
the same features, logits and gradients with it as with the modules."""

import pytest
import torch
import torch.nn.functional as F

from atom_fast.distill import block_tail as _native
from atom_fast.distill import networks
from atom_fast.distill.networks import ConvNet

ops = torch.ops.atom_fast
# the op's OpenMP loops run with torch's default thread count here (conftest.py: one thread elsewhere)
pytestmark = pytest.mark.default_threads

SHAPES = [(3, 5, 7, 9), (2, 4, 8, 8), (2, 3, 6, 5), (1, 1, 2, 2), (2, 2, 2, 7), (2, 2, 1, 6), (4, 16, 32, 32)]


def _modules(x, weight, bias, eps, pool):
    f = torch.relu(F.group_norm(x, x.shape[1], weight, bias, eps))
    return f, (F.avg_pool2d(f, 2) if pool else None)


def _inputs(shape, dtype, affine, requires_grad=False):
    C = shape[1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    w = torch.rand(C, dtype=dtype) + 0.5 if affine else None
    b = torch.rand(C, dtype=dtype) - 0.5 if affine else None
    return [t.requires_grad_(requires_grad) if t is not None else None for t in (x, w, b)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "nopool"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_values_and_gradients(shape, pool, affine, dtype, tol):
    if pool and min(shape[2:]) < 2:
        pytest.skip("avg_pool2d refuses a 1-pixel side (the op's own error is tested below)")
    x, w, b = _inputs(shape, dtype, affine, requires_grad=True)
    f, p = _native.instance_norm_relu_pool(x, w, b, 1e-5, pool)
    fr, pr = _modules(x, w, b, 1e-5, pool)
    torch.testing.assert_close(f, fr, rtol=tol, atol=tol)
    assert (p is None) == (not pool)
    if pool:
        torch.testing.assert_close(p, pr, rtol=tol, atol=tol)
    gf = torch.randn_like(f)
    gp = torch.randn_like(pr) if pool else None
    inputs = [t for t in (x, w, b) if t is not None]
    loss = (f * gf).sum() + ((p * gp).sum() if pool else 0)
    ref = (fr * gf).sum() + ((pr * gp).sum() if pool else 0)
    for g, gr in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g, gr, rtol=tol, atol=tol * max(1.0, gr.abs().max().item()))


@pytest.mark.parametrize("pool", [True, False], ids=["pool", "nopool"])
def test_gradcheck(pool):
    x, w, b = _inputs((2, 3, 5, 6), torch.float64, True, requires_grad=True)

    def run(x, w, b):
        f, p = _native.instance_norm_relu_pool(x, w, b, 1e-5, pool)
        return (f, p) if pool else f

    assert torch.autograd.gradcheck(run, (x, w, b))


@pytest.mark.parametrize("used", ["f", "pooled"])
def test_gradient_of_one_output(used):
    """Only one output reaching the loss: the other's gradient arrives as None."""
    x, w, b = _inputs((2, 3, 6, 6), torch.float64, True, requires_grad=True)
    f, p = _native.instance_norm_relu_pool(x, w, b, 1e-5, True)
    fr, pr = _modules(x, w, b, 1e-5, True)
    out, ref = (f, fr) if used == "f" else (p, pr)
    g = torch.autograd.grad(out.square().sum(), (x, w, b))
    gr = torch.autograd.grad(ref.square().sum(), (x, w, b))
    for a, e in zip(g, gr):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_relu_mask_matches_forward():
    """Rows where the normalized value sits exactly at the ReLU kink (constant rows, bias 0) get the
    forward's mask: no gradient through zeros the forward produced. (grad_x is 0 there whatever the
    mask; grad_bias = sum of the masked upstream gradient is what a wrong mask would change.)"""
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    f, p = _native.instance_norm_relu_pool(x, w, b, 1e-5, True)
    assert f.abs().max() == 0
    up = (f + p.repeat_interleave(2, 2).repeat_interleave(2, 3)).sum()
    gx, gw, gb = torch.autograd.grad(up, (x, w, b))
    assert gx.abs().max() == 0 and gw.abs().max() == 0
    assert gb.abs().max() == 0


def test_no_grad_path_saves_nothing():
    x, w, b = _inputs((2, 3, 4, 4), torch.float32, True)
    with torch.no_grad():
        f, p = _native.instance_norm_relu_pool(x, w, b, 1e-5, True)
    assert f.grad_fn is None and p.grad_fn is None


def test_double_backward_raises():
    x, w, b = _inputs((1, 2, 4, 4), torch.float64, True, requires_grad=True)
    f, _ = _native.instance_norm_relu_pool(x, w, b, 1e-5, False)
    (g,) = torch.autograd.grad(f.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        g.sum().backward()


def test_opcheck():
    x, w, b = _inputs((2, 3, 6, 5), torch.float32, True)
    torch.library.opcheck(ops.instance_norm_relu_pool, (x, w, b, 1e-5, True))
    torch.library.opcheck(ops.instance_norm_relu_pool, (x, None, None, 1e-5, False))
    _, _, mean, rstd = ops.instance_norm_relu_pool(x, w, b, 1e-5, True)
    gf, gp = torch.randn_like(x), torch.randn(2, 3, 3, 2)
    torch.library.opcheck(ops.instance_norm_relu_pool_backward, (gf, gp, x, w, b, mean, rstd))
    torch.library.opcheck(ops.instance_norm_relu_pool_backward, (None, gp, x, None, None, mean, rstd))


@pytest.mark.parametrize("case,error,match", [
    (dict(x=torch.zeros(2, 3, 4, 4, dtype=torch.float16)), TypeError, "input must be float32 or float64"),
    (dict(x=torch.zeros(2, 3, 4)), RuntimeError, "input must be 4-D"),
    (dict(w=torch.ones(4)), ValueError, r"weight must have shape \(3\)"),
    (dict(b=torch.ones(3, dtype=torch.float64)), TypeError, "bias has dtype Double"),
    (dict(eps=-1.0), ValueError, "eps must be finite"),
    (dict(x=torch.zeros(2, 3, 1, 4)), ValueError, "2x2 pooling needs H, W >= 2"),
])
def test_bad_arguments(case, error, match):
    args = dict(x=torch.zeros(2, 3, 4, 4), w=torch.ones(3), b=torch.zeros(3), eps=1e-5)
    args.update(case)
    with pytest.raises(error, match=match):
        ops.instance_norm_relu_pool(args["x"], args["w"], args["b"], args["eps"], True)


def test_backward_bad_arguments():
    x = torch.randn(2, 3, 4, 4)
    _, _, mean, rstd = ops.instance_norm_relu_pool(x, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="grad_pooled must have shape"):
        ops.instance_norm_relu_pool_backward(None, torch.zeros(2, 3, 4, 4), x, None, None, mean, rstd)
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        ops.instance_norm_relu_pool_backward(x, None, x, None, None, mean[:1], rstd)


# ---- the driver's ConvNet ---------------------------------------------------------------------

def _net_outputs(net, x, fused, monkeypatch):
    monkeypatch.setattr(networks, "FUSED_BLOCK_TAIL", fused)
    x = x.clone().requires_grad_(True)
    maps, emb = net.features(x)
    logits = net(x)
    loss = sum((m * torch.linspace(-1, 1, m.numel(), dtype=m.dtype).view_as(m)).sum() for m in maps)
    loss = loss + emb.square().sum() + logits.square().sum()
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x] + params)
    with torch.no_grad():
        frozen = net.features(x)
    return [*maps, emb, logits, *grads, *frozen[0], frozen[1]]


@pytest.mark.parametrize("channels,size,depth,pooling", [
    (1, (28, 28), 3, "avgpooling"), (3, (32, 32), 3, "avgpooling"), (3, (17, 13), 2, "avgpooling"),
    (3, (8, 8), 2, "none")])
def test_convnet_same_with_fused_tail(channels, size, depth, pooling, monkeypatch):
    net = ConvNet(channels, 10, size, width=8, depth=depth, pooling=pooling).double()
    with torch.no_grad():
        for blk in net.blocks:  # not the default affine (1, 0): the affine must be applied
            blk.norm.weight.uniform_(0.5, 1.5)
            blk.norm.bias.uniform_(-0.5, 0.5)
    assert all(blk._tail is not None for blk in net.blocks)
    x = torch.randn(3, channels, *size, dtype=torch.float64)
    fused = _net_outputs(net, x, True, monkeypatch)
    plain = _net_outputs(net, x, False, monkeypatch)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_convnet_tail_is_used_and_skipped(monkeypatch):
    """The fused tail runs the native op (not GroupNorm) unless a hook watches the ReLU; batch norm
    and max pooling keep the modules."""
    calls = []
    monkeypatch.setattr(F, "group_norm", lambda *a, **k: calls.append(1) or torch.group_norm(*a))
    net = ConvNet(3, 10, (16, 16), width=4, depth=2)
    x = torch.randn(2, 3, 16, 16)
    net(x)
    assert not calls
    hooked = []
    handle = net.blocks[0].act.register_forward_hook(lambda m, i, o: hooked.append(o))
    net(x)
    handle.remove()
    assert len(hooked) == 1 and calls == [1]
    assert ConvNet(3, 10, (16, 16), width=4, depth=2, norm="batchnorm").blocks[0]._tail is None
    assert ConvNet(3, 10, (16, 16), width=4, depth=2, pooling="maxpooling").blocks[0]._tail is None


@pytest.mark.parametrize("swap", ["pool", "act", "norm"])
def test_convnet_swapped_module_falls_back(swap, monkeypatch):
    """A module replaced after construction is used as it is: the fused tail is decided per call."""
    net = ConvNet(3, 10, (8, 8), width=4, depth=1).double()
    blk = net.blocks[0]
    new = {"pool": torch.nn.MaxPool2d(2, 2), "act": torch.nn.Identity(),
           "norm": torch.nn.BatchNorm2d(4).double().eval()}[swap]
    setattr(blk, swap, new)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        f, p = blk(x)
        y = blk.conv(x)
        f_want = blk.act(blk.norm(y))
        torch.testing.assert_close(f, f_want)
        torch.testing.assert_close(p, blk.pool(f_want))


def test_convnet_global_and_backward_hooks_fall_back():
    net = ConvNet(3, 10, (8, 8), width=4, depth=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m)))
    try:
        net(x)
    finally:
        handle.remove()
    assert torch.nn.ReLU in seen
    fired = []
    # (on the pooling: a full backward hook on the in-place ReLU is refused by torch itself)
    h = net.blocks[0].pool.register_full_backward_pre_hook(lambda m, g: fired.append(1))
    net(x).sum().backward()
    h.remove()
    assert fired == [1]
