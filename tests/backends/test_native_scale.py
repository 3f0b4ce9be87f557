"""The native op at every power: the per-sample scale m = max |F[n]| keeps float32 finite and equal to
the float64 reference at large powers (eps floor decided on the unscaled norm), the vectorized
exp/log path of non-integer powers is accurate, and the C++ constants equal the Python ones."""

import math

import pytest
import torch

import atom_fast
from atom_fast import constants
from atom_fast.backends import native as _native
from _data import class_labels
from conftest import CPU_ISAS, DEVICE, use_cpu_isa
from test_fused import ODD, _check_once

ops = torch.ops.atom_fast
# the op's OpenMP loops run with torch's default thread count here (conftest.py: one thread elsewhere)
pytestmark = pytest.mark.default_threads
FP32_RANGE = (1e-30, 1e30)  # reference values outside it cannot be compared in float32


def test_constants_have_one_value_in_both_languages():
    c = _native._C.constants()
    assert c["NORM_EPS"] == constants.NORM_EPS
    assert c["MAX_UNROLLED_POWER"] == constants.MAX_UNROLLED_POWER
    F = torch.ones(2, 5, 3, 4, device=DEVICE)
    assert ops.attention_stats(F, 4.0, 4.0, True, True).shape == (2, 12 + 5 + c["STATS_EXTRA"])
    assert _native._stats_fake(F, 4.0, 4.0, True, True).shape == (2, 12 + 5 + c["STATS_EXTRA"])


def _layers(scale_real, scale_syn, C=5, H=3, W=4, K=3, B=4, IPC=2, seed=0):
    """float32 features of the given magnitudes (real post-ReLU, synthetic signed) and their float64
    copies (the same rounded values)."""
    g = torch.Generator().manual_seed(seed)
    real = (torch.randn(K * B, C, H, W, generator=g, dtype=torch.float64).relu() * scale_real)
    syn = torch.randn(K * IPC, C, H, W, generator=g, dtype=torch.float64) * scale_syn
    real32, syn32 = real.float().to(DEVICE), syn.float().to(DEVICE)
    return real32, syn32, real32.double(), syn32.double()


def _loss_and_grad(real, syn, K, backend, **kw):
    s = syn.detach().clone().requires_grad_()
    loss = atom_fast.attention_loss(real, s, K, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, s)
    return loss, g


def _reference_overflows(F, p):
    """Whether the float64 reference overflows inside (|F|^p, its sums or their squared norms)."""
    a = F.abs().pow(p)
    return not all(torch.isfinite(x.square().sum(1)).all()
                   for x in (a.sum(1).flatten(1), a.flatten(2).sum(2)))


def _compare(real_scale, syn_scale, p, rtol, **kw):
    real32, syn32, real64, syn64 = _layers(real_scale, syn_scale)
    kw = dict(spatial_power=p, channel_power=p, **kw)
    want, g_want = _loss_and_grad(real64, syn64, 3, "reference", **kw)
    if (_reference_overflows(real64, p) or _reference_overflows(syn64, p)
            or not (torch.isfinite(want) and torch.isfinite(g_want).all())):
        pytest.skip("the float64 reference itself overflows here")
    got, g_got = _loss_and_grad(real32, syn32, 3, "native", **kw)
    assert torch.isfinite(got) and torch.isfinite(g_got).all()
    if FP32_RANGE[0] < want.item() < FP32_RANGE[1]:
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0)
    else:
        assert got.item() <= FP32_RANGE[0]  # below float32's range: ~0 there too
    gmax = g_want.abs().max().item()
    if FP32_RANGE[0] < gmax < FP32_RANGE[1]:
        # at large p a sample's x_hat is nearly one-hot and (g - x_hat (x_hat . g)) cancels at its
        # peak: float32 rounding of that cancellation (the float32 reference, where finite, has
        # the same error) grows ~ p * 1e-6 of the largest gradient
        torch.testing.assert_close(g_got.double(), g_want, rtol=rtol, atol=max(rtol, 2e-5 * p) * gmax)
    return want.item()


@pytest.mark.parametrize("p", [16, 24.5, 32, 50, 64])
@pytest.mark.parametrize("magnitude", [1e-2, 0.3, 3.0, 10.0, 1e2])
def test_float32_equals_float64_at_large_powers(p, magnitude):
    _compare(magnitude, magnitude, p, rtol=1e-4)


@pytest.mark.parametrize("p", [16, 50])
@pytest.mark.parametrize("real_scale,syn_scale", [(1e-2, 10.0), (1e2, 0.3), (3.0, 1e-2)])
def test_large_powers_with_sides_of_different_magnitude(p, real_scale, syn_scale):
    _compare(real_scale, syn_scale, p, rtol=1e-4, channel_weight=0.5)


def test_p50_at_magnitudes_3_and_10():
    # before the per-sample scale: float32 with p = 50 gave a loss of exactly 0 at magnitude 3 and NaN at magnitude 10
    for magnitude in (3.0, 10.0):
        value = _compare(magnitude, magnitude, 50, rtol=1e-4)
        assert value > 0.1


@pytest.mark.parametrize("p", [6, 7, 8, 8.5, 9])
def test_eps_floor_is_decided_on_the_unscaled_norm(p):
    # features ~1e-2: ||s|| = m^p ||s'|| crosses the 1e-12 floor at p = 7 (some samples) and is
    # below it for every sample from p = 8, where x_hat = x / eps is not a unit vector and the loss
    # is still far from 0; the scaled norm ||s'|| >= 1 is never below the floor
    real32, syn32, real64, _ = _layers(1e-2, 1e-2)
    s = real64.abs().pow(p).sum(1).flatten(1).norm(dim=1)
    below = (s < constants.NORM_EPS).sum().item() / s.numel()
    value = _compare(1e-2, 1e-2, p, rtol=1e-4)
    assert below == {6: 0, 7: 2 / 12}.get(p, 1) and value > 1e-5
    stats = ops.attention_stats(real32, float(p), float(p), True, True)
    assert (stats[:, -2] >= 1).all()


def test_eps_floor_in_the_statistics_interface():
    real32, syn32, real64, _ = _layers(1e-2, 1e-2)
    S, T = _native.class_attention_sums(real32, None, 3, 8.0, 8.0, True, True)
    s_hat = torch.nn.functional.normalize(real64.abs().pow(8).sum(1).flatten(1), dim=1)
    want = s_hat.view(3, 4, -1).sum(1)
    assert s_hat.norm(dim=1).max() < 0.5  # below the floor: not unit vectors
    torch.testing.assert_close(S.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("p", [0.5, 1.5, 2.5, 3.7, 7.3])
@pytest.mark.parametrize("dtype_tols", [(torch.float32, 2e-5, 2e-5), (torch.float64, 1e-10, 1e-10)],
                         ids=["fp32", "fp64"])
def test_non_integer_powers_against_float64_reference(p, dtype_tols):
    _check_once("native", ODD, K=3, B=4, IPC=2, ps=p, pc=p, dtype_tols=dtype_tols)
    _check_once("native", ODD, K=3, B=4, IPC=2, ps=p, pc=2.0 + p, dtype_tols=dtype_tols,
                labels=True)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_vectorized_power_is_accurate_elementwise(monkeypatch, isa):
    # one channel: s' = |x / m|^p exactly one element each, against float64 pow
    if DEVICE.type != "cpu":
        pytest.skip("CPU row kernels")
    use_cpu_isa(monkeypatch, isa)
    x = torch.logspace(-6, 0, 4001, dtype=torch.float64)
    x = torch.cat([x, torch.rand(4000, dtype=torch.float64)]).float()
    x[0] = 1.0  # m = 1 exactly
    F = x.view(1, 1, 1, -1)
    for p in (0.5, 1.5, 2.5, 3.7, 7.3, 24.5):
        got = ops.attention_stats(F, p, p, True, False)[0, :x.numel()].double()
        want = x.double().pow(p)
        keep = want > 1e-37
        rel = ((got - want).abs() / want)[keep]
        # the rounding of p * log(x) in float32 scales with |p log x|: 1 ulp of it is ~6e-8 * |y|
        bound = 2.4e-7 * (1 + (p * x.double().log()).abs())[keep]
        assert (rel <= bound).all(), (p, rel.max().item())
        assert torch.isfinite(got).all()


def test_zero_nan_and_inf_features():
    real32, syn32, _, _ = _layers(1.0, 1.0)
    real32[1] = 0  # an all-zero sample: zero attention, finite loss
    loss = atom_fast.attention_loss(real32, syn32, 3, spatial_power=50, channel_power=2.5,
                                    backend="native")
    assert torch.isfinite(loss)
    for bad in (float("nan"), float("inf")):
        r = real32.clone()
        r[2, 1, 0, 0] = bad
        loss = atom_fast.attention_loss(r, syn32, 3, spatial_power=50, channel_power=2.5,
                                        backend="native")
        assert torch.isnan(loss)
    s = syn32.clone().requires_grad_()
    loss = atom_fast.attention_loss(real32, s, 3, spatial_power=3.7, backend="native")
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(g).all()


def test_labels_at_a_large_power():
    K, B, IPC = 3, 4, 2
    real32, syn32, real64, syn64 = _layers(10.0, 10.0)
    rl, sl = class_labels(K, B, True).to(DEVICE), class_labels(K, IPC, True).to(DEVICE)
    kw = dict(spatial_power=64, channel_power=40, real_labels=rl, syn_labels=sl)
    s32 = syn32.clone().requires_grad_()
    s64 = syn64.clone().requires_grad_()
    got = atom_fast.attention_loss(real32, s32, backend="native", **kw)
    want = atom_fast.attention_loss(real64, s64, backend="reference", **kw)
    assert math.isfinite(want.item()) and want.item() > 1e-3
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    (g32,) = torch.autograd.grad(got, s32)
    (g64,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4 * g64.abs().max().item())


@pytest.mark.parametrize("p", [4, 16, 50])
@pytest.mark.parametrize("growth", [4.0, 0.25, 30.0])
@pytest.mark.parametrize("shape,axis", [((6, 3, 5), "channel"), ((4, 48, 50), "channel"),
                                        ((4, 48, 50), "spatial")],
                         ids=["6x3x5", "4x48x50-tiled", "4x48x50-tiled-spatial-growth"])
def test_channels_of_growing_magnitude(p, growth, shape, axis):
    # The forward keeps the running max of the rows read so far: a row that raises it rescales the
    # partial sums by (m_old / m_new)^p (growth 4 at p <= 16), one that would overflow them on the
    # old scale restarts the sample with its max (growth 4 at p = 50, growth 30); shrinking
    # channels (0.25) never rescale. H*W = 2400 > 2 * 1024 goes tile by tile (1024, 1024, 352
    # positions of every channel in turn): the growth along the channels, or along the spatial
    # tiles, then rescales partial channel sums of earlier tiles too.
    K, B, IPC, (C, H, W) = 3, 4, 2, shape
    g = torch.Generator().manual_seed(1)
    if axis == "channel":
        scale = growth ** torch.arange(C, dtype=torch.float64).view(1, C, 1, 1) / growth ** (C / 2)
    else:  # three steps along the flattened positions, one per tile
        step = (torch.arange(H * W, dtype=torch.float64) // 1024).view(1, 1, H, W)
        scale = growth ** step / growth
    real = torch.randn(K * B, C, H, W, generator=g, dtype=torch.float64).relu() * scale
    syn = torch.randn(K * IPC, C, H, W, generator=g, dtype=torch.float64) * scale
    if _reference_overflows(real, p) or _reference_overflows(syn, p):
        pytest.skip("the float64 reference itself overflows here")
    kw = dict(spatial_power=p, channel_power=p)
    for wc in (1.0, 0.0):  # both terms (one fused kernel) and spatial alone
        kw["channel_weight"] = wc
        want, g_want = _loss_and_grad(real.float().double(), syn.float().double(), K, "reference", **kw)
        got, g_got = _loss_and_grad(real.float().to(DEVICE), syn.float().to(DEVICE), K, "native", **kw)
        assert want.item() > 1e-3
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
        gmax = g_want.abs().max().item()
        # on the 2400-position maps at p = 50 the gradient is tiny (max ~5e-8) next to the O(1)
        # normalized values it cancels from, so float32 leaves ~3e-7 absolute (the untiled 40x50
        # map the same): an absolute floor there
        floor = 1e-6 if H * W > 1000 else 0.0
        torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4,
                                   atol=max(max(1e-4, 2e-5 * p) * gmax, floor))


@pytest.mark.parametrize("p", [4, 2.5])
@pytest.mark.parametrize("shape", [(3, 48, 50), (2, 33, 97)], ids=["48x50", "33x97"])
def test_tiled_maps_match_the_reference_in_float64(p, shape):
    """Maps above 2048 positions go tile by tile in the forward (1024 positions of every channel,
    then the next tile): float64 equals the reference to 1e-10, loss and gradient, with both terms,
    one term, and different powers."""
    K, B, IPC = 2, 3, 2
    g = torch.Generator().manual_seed(2)
    real = torch.randn(K * B, *shape, generator=g, dtype=torch.float64).relu().to(DEVICE)
    syn = torch.randn(K * IPC, *shape, generator=g, dtype=torch.float64).to(DEVICE)
    for kw in (dict(spatial_power=p, channel_power=p), dict(spatial_power=p, channel_power=3.0),
               dict(spatial_power=p, channel_power=p, channel_weight=0.0),
               dict(spatial_power=p, channel_power=p, spatial_weight=0.0)):
        want, g_want = _loss_and_grad(real, syn, K, "reference", **kw)
        got, g_got = _loss_and_grad(real, syn, K, "native", **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10 * g_want.abs().max().item())
