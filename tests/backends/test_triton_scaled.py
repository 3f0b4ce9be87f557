"""The Triton backend at large powers (per-sample scale m = max |F|), its double-backward error, its
device guard and what it keeps for backward. (Values and gradients at ordinary powers are in
test_fused.py, block loops in test_triton_kernels.py.)"""

import pytest
import torch

import atom_fast
import atom_fast.kernels.attention as kernels
from atom_fast import constants
from atom_fast.backends import reference, triton as _triton
from _data import class_labels, make_layers
from conftest import DEVICE
from test_fused import ODD
from .test_reference import LARGE_POWER_ROWS, numpy_attention_loss, per_sample_magnitudes


def _loss_and_grad(real, syn, K, p, backend, dtype):
    s = syn.to(dtype).requires_grad_()
    loss = atom_fast.attention_loss(real.to(dtype), s, K, spatial_power=p, channel_power=p,
                                    backend=backend)
    return loss, torch.autograd.grad(loss, s)[0].double()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy, in the interpreter
@pytest.mark.parametrize("p,lo,hi", LARGE_POWER_ROWS)
def test_large_powers_agree_with_float64_reference(p, lo, hi):
    K, B, IPC, shape = 2, 3, 2, (5, 3, 2)
    real = per_sample_magnitudes(K * B, *shape, lo, hi, signed=False).float().to(DEVICE)
    syn = per_sample_magnitudes(K * IPC, *shape, lo, hi).float().to(DEVICE)
    ref_loss, ref_grad = _loss_and_grad(real, syn, K, p, "reference", torch.float64)
    assert ref_loss.item() > 1e-3
    for dtype in (torch.float32, torch.float64):
        loss, grad = _loss_and_grad(real, syn, K, p, "triton", dtype)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0)
        # float32: the normalization's backward cancels at large p (the reference in float32 has the
        # same error, see test_reference.py).
        grad_tol = 1e-3 if dtype == torch.float32 else 1e-9
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=grad_tol * ref_grad.abs().max().item())


def test_large_power_float64_matches_unscaled_numpy_with_labels():
    K, B, IPC, shape = 3, 2, 2, (4, 3, 2)
    real = per_sample_magnitudes(K * B, *shape, 1e-2, 1e2, signed=False)
    syn = per_sample_magnitudes(K * IPC, *shape, 1e-2, 1e2)
    rl, sl = class_labels(K, B, True), class_labels(K, IPC, True)
    loss = atom_fast.attention_loss(real.to(DEVICE), syn.to(DEVICE), real_labels=rl.to(DEVICE),
                                    syn_labels=sl.to(DEVICE), spatial_power=64, channel_power=2.5,
                                    backend="triton")
    expected = numpy_attention_loss([real], [syn], rl, sl, 64, 2.5, 1.0, 1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_eps_floor_on_the_unscaled_norm_in_the_kernels():
    # p = 50, |F| around eps^(1/50): some unscaled norms below 1e-12, some above (see test_reference).
    K, B, IPC, p = 2, 4, 2, 50
    real = per_sample_magnitudes(K * B, 3, 2, 2, 1, 1, signed=False)
    real = (real * torch.linspace(0.4, 0.8, K * B, dtype=torch.float64)[:, None, None, None]).to(DEVICE)
    syn = per_sample_magnitudes(K * IPC, 3, 2, 2, 1, 1)
    syn = (syn * torch.tensor([0.45, 0.75, 0.5, 0.8], dtype=torch.float64)[:, None, None, None]).to(DEVICE)
    norms = (syn.abs() ** p).sum(dim=1).flatten(1).norm(dim=1)
    assert (norms < 1e-12).any() and (norms > 1e-12).any()
    ref_loss, ref_grad = _loss_and_grad(real, syn, K, p, "reference", torch.float64)
    loss, grad = _loss_and_grad(real, syn, K, p, "triton", torch.float64)
    tol = 1e-10
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=tol * ref_grad.abs().max().item())


def test_stats_kernel_scale_and_scaled_vectors():
    F = torch.randn(3, 5, 2, 3, dtype=torch.float64, device=DEVICE) * 7
    F[1] = 0
    stats = kernels.attention_stats(F, 50.0, 3.0, True, True, torch.float64)
    m = F.abs().amax(dim=(1, 2, 3))
    m[1] = 1
    torch.testing.assert_close(stats.scale, m, rtol=0, atol=0)
    raw_s = ((F / m[:, None, None, None]).abs() ** 50).sum(dim=1).flatten(1)
    torch.testing.assert_close(stats.spatial, raw_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.spatial_norm, raw_s.norm(dim=1), rtol=1e-12, atol=0)


# ---- double backward ------------------------------------------------------------------------------


def test_double_backward_raises_the_native_ops_message():
    reals, syns = make_layers(ODD, 6, 3, torch.float64, DEVICE)
    s = syns[0].requires_grad_()
    loss = atom_fast.attention_loss(reals, [s], 3, backend="triton")
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    # the first-order gradient is still right
    (g_ref,) = torch.autograd.grad(atom_fast.attention_loss(reals, [s], 3, backend="reference"), s)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"^backend='triton' does not support double backward "
                                           r".*use backend='reference'"):
        torch.autograd.grad(g.sum(), s)


def test_double_backward_of_the_loss_from_sums_raises():
    reals, syns = make_layers(ODD, 6, 3, torch.float64, DEVICE)
    S, T = _triton.class_attention_sums(reals[0], None, 3, 4.0, 4.0, True, True)
    s = syns[0].requires_grad_()
    loss = _triton.attention_loss_from_sums(S, T, torch.full((3,), 2), s, None, 3, 4.0, 4.0, 1.0, 1.0)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    with pytest.raises(RuntimeError, match=r"^backend='triton' does not support double backward"):
        torch.autograd.grad(g.sum(), s)


# ---- state kept for backward, constants, device guard --------------------------------------------


def test_real_statistics_are_not_kept_when_real_needs_no_gradient():
    K, B, IPC, (C, H, W) = 3, 4, 2, (8, 4, 4)
    reals, syns = make_layers([(C, H, W)], K * B, K * IPC, torch.float32, DEVICE)
    syn = syns[0].requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = atom_fast.attention_loss(reals, [syn], K, backend="triton")
    extra = sum(t.numel() for t in saved if t.data_ptr() != syn.data_ptr())
    # synthetic vectors, their norms, scales and norm floors, and the class differences; nothing
    # of the real side
    assert extra == K * IPC * (H * W + C + 5) + K * (H * W + C)
    loss.backward()


def test_constants_have_one_home():
    assert kernels.NORM_EPS is constants.NORM_EPS and kernels.norm_floor is reference.norm_floor is constants.norm_floor
    assert kernels.MAX_UNROLLED_POWER is constants.MAX_UNROLLED_POWER
    assert not hasattr(kernels, "_next_pow2")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_a_gpu_that_is_not_the_current_device():
    device = torch.device("cuda", 1)
    reals, syns = make_layers(ODD, 6, 3, torch.float32, device)
    s = syns[0].requires_grad_()
    assert torch.cuda.current_device() == 0
    loss = atom_fast.attention_loss(reals, [s], 3, backend="triton")
    (g,) = torch.autograd.grad(loss, s)
    S, T = _triton.class_attention_sums(reals[0], None, 3, 4.0, 4.0, True, True)
    loss_sums = _triton.attention_loss_from_sums(S, T, torch.full((3,), 2), s, None, 3, 4.0, 4.0, 1.0, 1.0)
    (g_sums,) = torch.autograd.grad(loss_sums, s)
    r_cpu, s_cpu = reals[0].cpu(), s.detach().cpu().requires_grad_()
    ref = atom_fast.attention_loss(r_cpu, s_cpu, 3, backend="reference")
    (g_ref,) = torch.autograd.grad(ref, s_cpu)
    for value, grad in ((loss, g), (loss_sums, g_sums)):
        assert value.device == device and grad.device == device
        torch.testing.assert_close(value.cpu(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad.cpu(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_large_power_with_block_loops_that_run_more_than_once(monkeypatch):
    # The scale pass and the main pass over several spatial and channel blocks (T accumulated in place).
    monkeypatch.setattr(kernels, "MAX_BLOCK_HW", 4)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 8)
    monkeypatch.setattr(kernels, "MAX_BLOCK_VEC", 4)
    monkeypatch.setattr(kernels, "BLOCK_MEMBERS", 2)
    K, B, IPC, shape = 2, 3, 2, (7, 5, 3)
    real = per_sample_magnitudes(K * B, *shape, 1.0, 10.0, signed=False).float().to(DEVICE)
    syn = per_sample_magnitudes(K * IPC, *shape, 1.0, 10.0).float().to(DEVICE)
    ref_loss, ref_grad = _loss_and_grad(real, syn, K, 50, "reference", torch.float64)
    loss, grad = _loss_and_grad(real, syn, K, 50, "triton", torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-3 * ref_grad.abs().max().item())
