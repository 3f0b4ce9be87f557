"""The Triton backend's streamed real-statistics interface (docs/scale.md): class sums of the normalized
attention vectors, and the loss from those sums, against the full-feature Triton loss and the
reference."""

import pytest
import torch

import atom_fast
from atom_fast.backends import reference, triton as _triton
from _data import class_labels, make_layers
from conftest import DEVICE

# (dtype, relative tolerance) of the loss and gradient against the full-feature loss.
DTYPE_ROWS = [pytest.param(torch.float64, 1e-10, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32")]
SHAPES = [(7, 5, 3), (1, 3, 2), (6, 4, 4), (5, 1, 1)]


def _chunked_sums(real, labels, K, ps, pc, has_s, has_c, chunk):
    """Class sums added up over chunks of ``chunk`` samples (chunks split classes)."""
    S = T = None
    for start in range(0, real.shape[0], chunk):
        part = real[start:start + chunk]
        if labels is None:
            # Equal blocks: give each chunk explicit labels, since a chunk is not whole blocks.
            part_labels = torch.arange(start, start + part.shape[0], device=real.device) // (
                real.shape[0] // K)
        else:
            part_labels = labels[start:start + chunk]
        s, t = _triton.class_attention_sums(part, part_labels, K, ps, pc, has_s, has_c)
        S = s if S is None else S + s
        T = t if T is None else T + t
    return S, T


def _check_against_full(shape, K, B, IPC, dtype, tol, labels, ps=4.0, pc=4.0, ws=1.0, wc=1.0,
                        chunk=5, upstream=0.7):
    reals, syns = make_layers([shape], K * B, K * IPC, dtype, DEVICE)
    real = reals[0]
    rl = sl = None
    if labels:
        rl, sl = class_labels(K, B, True).to(DEVICE), class_labels(K, IPC, True).to(DEVICE)
    kw = dict(spatial_power=ps, channel_power=pc, spatial_weight=ws, channel_weight=wc)

    syn = syns[0].clone().requires_grad_()
    if labels:
        full = atom_fast.attention_loss(real, syn, real_labels=rl, syn_labels=sl, backend="triton", **kw)
    else:
        full = atom_fast.attention_loss(real, syn, K, backend="triton", **kw)
    (g_full,) = torch.autograd.grad(full, syn, torch.tensor(upstream, dtype=full.dtype, device=DEVICE))

    S, T = _chunked_sums(real, rl, K, ps, pc, ws != 0, wc != 0, chunk)
    counts = torch.full((K,), B) if rl is None else torch.bincount(rl, minlength=K)
    syn2 = syns[0].clone().requires_grad_()
    loss = _triton.attention_loss_from_sums(S, T, counts, syn2, sl, K, ps, pc, ws, wc)
    (g,) = torch.autograd.grad(loss, syn2, torch.tensor(upstream, dtype=loss.dtype, device=DEVICE))

    assert loss.dtype == full.dtype and loss.shape == ()
    assert full.item() > 1e-4
    torch.testing.assert_close(loss, full, rtol=tol, atol=0)
    assert g.dtype == syn.dtype and g.abs().max() > 0
    torch.testing.assert_close(g, g_full, rtol=tol, atol=tol * g_full.abs().max().item())


@pytest.mark.parametrize("dtype,tol", DTYPE_ROWS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("labels", [False, True])
def test_loss_from_sums_equals_full_feature_loss(dtype, tol, shape, labels):
    _check_against_full(shape, K=3, B=4, IPC=2, dtype=dtype, tol=tol, labels=labels, ps=2.5, pc=8)


@pytest.mark.parametrize("ws,wc", [(1, 0), (0, 1), (0.3, 1 / 3)])
@pytest.mark.parametrize("ps,pc", [(4, 4), (1, 2)])
def test_weights_and_powers(ws, wc, ps, pc):
    _check_against_full((7, 5, 3), K=2, B=3, IPC=2, dtype=torch.float64, tol=1e-10, labels=True,
                        ps=ps, pc=pc, ws=ws, wc=wc, chunk=4)


def test_ipc1_many_classes_chunk_of_one():
    _check_against_full((3, 2, 5), K=5, B=2, IPC=1, dtype=torch.float64, tol=1e-10, labels=False,
                        chunk=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_class_sums_equal_the_reference(dtype):
    K, B = 3, 4
    reals, _ = make_layers([(7, 5, 3)], K * B, 1, dtype, DEVICE)
    real = reals[0]
    labels = class_labels(K, B, True).to(DEVICE)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for lab in (None, labels):
        S, T = _triton.class_attention_sums(real, lab, K, 2.5, 8, True, True)
        ref_labels = lab if lab is not None else torch.arange(K * B, device=DEVICE) // B
        sr = torch.zeros(K, 15, dtype=acc, device=DEVICE).index_add_(
            0, ref_labels, reference.spatial_attention(real, 2.5))
        tr = torch.zeros(K, 7, dtype=acc, device=DEVICE).index_add_(
            0, ref_labels, reference.channel_attention(real, 8))
        assert S.dtype == acc and T.dtype == acc
        torch.testing.assert_close(S, sr, rtol=tol, atol=tol)
        torch.testing.assert_close(T, tr, rtol=tol, atol=tol)


def test_class_sums_flags_strided_views_empty_classes_and_no_graph():
    K = 4
    reals, _ = make_layers([(6, 3, 5)], 10, 1, torch.float32, DEVICE)
    full = reals[0].requires_grad_()
    view = full[2:8]  # a batch slice
    cl = reals[0].detach().to(memory_format=torch.channels_last)[2:8]
    labels = torch.tensor([0, 2, 0, 2, 2, 0], device=DEVICE)  # classes 1 and 3 have no samples
    S, T = _triton.class_attention_sums(view, labels, K, 4, 4, True, False)
    assert T is None and S.shape == (K, 15) and not S.requires_grad
    assert S[1].abs().max() == 0 and S[3].abs().max() == 0
    S2, T2 = _triton.class_attention_sums(cl, labels, K, 4, 4, False, True)
    assert S2 is None and T2.shape == (K, 6)
    ref = reference.spatial_attention(view.detach(), 4)
    torch.testing.assert_close(S[0], ref[[0, 2, 5]].sum(0), rtol=1e-6, atol=1e-7)
    ref_t = reference.channel_attention(view.detach(), 4)
    torch.testing.assert_close(T2[2], ref_t[[1, 3, 4]].sum(0), rtol=1e-6, atol=1e-7)


def test_empty_class_on_both_sides_and_zero_weights():
    K = 3
    reals, syns = make_layers([(5, 2, 3)], 4, 3, torch.float64, DEVICE)
    rl = torch.tensor([0, 2, 2, 0], device=DEVICE)
    sl = torch.tensor([2, 0, 0], device=DEVICE)  # class 1 has no samples on either side
    S, T = _triton.class_attention_sums(reals[0], rl, K, 4, 4, True, True)
    counts = torch.tensor([2, 0, 2])
    syn = syns[0].requires_grad_()
    loss = _triton.attention_loss_from_sums(S, T, counts, syn, sl, K, 4, 4, 1, 1)
    (g,) = torch.autograd.grad(loss, syn)
    full = atom_fast.attention_loss(reals[0], syn, real_labels=rl, syn_labels=sl, backend="reference")
    (g_ref,) = torch.autograd.grad(full, syn)
    torch.testing.assert_close(loss, full, rtol=1e-10, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    zero = _triton.attention_loss_from_sums(None, None, counts, syn, sl, K, 4, 4, 0, 0)
    assert zero.item() == 0 and zero.dtype == torch.float64
    (g0,) = torch.autograd.grad(zero, syn)
    assert g0.abs().max() == 0


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_syn(dtype, grad_tol):
    # Sums accumulate in float32; the gradient is rounded to syn's dtype, as the full-feature loss's.
    K, B, IPC = 3, 4, 2
    reals, syns = make_layers([(7, 5, 3)], K * B, K * IPC, dtype, DEVICE)
    syn = syns[0].requires_grad_()
    full = atom_fast.attention_loss(reals[0], syn, K, spatial_power=2.5, channel_power=4, backend="triton")
    (g_full,) = torch.autograd.grad(full, syn)
    S, T = _chunked_sums(reals[0], None, K, 2.5, 4, True, True, chunk=5)
    assert S.dtype == torch.float32
    loss = _triton.attention_loss_from_sums(S, T, torch.full((K,), B), syn, None, K, 2.5, 4, 1.0, 1.0)
    (g,) = torch.autograd.grad(loss, syn)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.float(), g_full.float(), rtol=grad_tol,
                               atol=grad_tol * g_full.abs().max().item())


def test_sums_that_ask_for_a_gradient_get_none_and_cost_no_backward_pass(monkeypatch):
    """Real class sums that require grad (statistics built by hand): backward leaves them without a
    gradient, and when syn needs none either, no kernel of the backward runs."""
    import atom_fast.kernels.attention as kernels

    calls = []
    for name in ("vector_grad", "attention_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    K, B, IPC = 3, 2, 1
    reals, syns = make_layers([(4, 2, 3)], K * B, K * IPC, torch.float64, DEVICE)
    S, T = _triton.class_attention_sums(reals[0], None, K, 4.0, 4.0, True, True)
    S.requires_grad_()
    counts = torch.full((K,), B, device=DEVICE)
    loss = _triton.attention_loss_from_sums(S, T, counts, syns[0], None, K, 4.0, 4.0, 1.0, 1.0)
    loss.backward()
    assert S.grad is None and calls == []
    syn = syns[0].clone().requires_grad_()
    _triton.attention_loss_from_sums(S, T, counts, syn, None, K, 4.0, 4.0, 1.0, 1.0).backward()
    assert S.grad is None and syn.grad is not None and calls == ["vector_grad", "attention_backward"]
