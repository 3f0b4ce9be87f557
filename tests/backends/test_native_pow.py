"""The native CPU op's non-integer power |x|^p (csrc/cpu/row_kernels.h's pow_general and pow8,
csrc/cpu/kernels_avx512.cpp's pow16) against float64, elementwise, through the test hook
``atom_fast::_general_power`` (the row kernels' own path), on every instruction set (baseline: scalar,
float64 inside; AVX2: 8 lanes, float64 inside; AVX-512: 16 lanes, float32 only): within 1 float32
ulp over the whole float32 range (subnormal inputs and results, zero, overflow to inf) for powers
0.5..100 and the gradient's p - 1."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atom_fast.backends import native as _native
from conftest import CPU_ISAS, use_cpu_isa

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pytest` without `python -m`: the repository root is not on sys.path
    sys.path.insert(0, str(ROOT))
# the sweep's inputs and its ulp measure, shared with the benchmark that reports the errors
from bench.pow_ulps import FLOAT_MAX  # noqa: E402
from bench.pow_ulps import magnitudes as _magnitudes  # noqa: E402
from bench.pow_ulps import near_overflow as _near_overflow  # noqa: E402
from bench.pow_ulps import ulps as _ulps  # noqa: E402

pytestmark = pytest.mark.skipif(not _native.AVAILABLE, reason="native op not built")

ops = torch.ops.atom_fast

# (AVX-512: above |p| = 64, the AVX2 copy's pow8)
POWERS = [0.5, 0.75, 1.5, 2.5, 3.7, 7.3, 15.5, 24.5, 33.3, 63.9, 64.0, 64.5, 100.3]
GRAD_POWERS = [-0.5, -0.25, 0.5, 2.7]  # p - 1 of the gradient, for p = 0.5, 0.75, 1.5, 3.7
ULP_BOUND = 1.0  # measured: 0.531 ulp at most in float64 inside (one float64 -> float32 rounding
# plus ~0.03 ulp), 0.77 in float32 on these inputs and over 300 random powers (AVX-512: its last
# rounding plus up to ~0.27 ulp from the steps before it, or the second rounding of a subnormal
# result; bench/results/cpu-pow-ulps-2026-12-04-b.json), 0.87 at most in a search at |p| 40..64
# with r near 1/16 (HARD_CASES below)


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    use_cpu_isa(monkeypatch, request.param)
    return request.param


def _check(x, p):
    got = ops._general_power(x, p)
    want = x.double().pow(p)
    want[x == 0] = 0  # the op's convention: 0 for every p (0^p of a gradient with p - 1 < 0)
    rounded = want.float()  # float64 -> float32 rounds to 0, subnormals and inf as float32 would
    over = torch.isinf(rounded)
    assert torch.equal(torch.isinf(got), over), (p, x[torch.isinf(got) != over][:5])
    finite = ~over
    err = _ulps(got[finite], want[finite])
    assert err.max().item() <= ULP_BOUND, (p, err.max().item(), x[finite][err.argmax()].item())
    return err.max().item()


@pytest.mark.parametrize("p", POWERS + GRAD_POWERS)
def test_power_within_one_ulp_over_the_float_range(isa, p):
    x = _magnitudes()
    _check(x, p)
    if p > 1:  # below 1 no finite input overflows
        _check(_near_overflow(p), p)
    # the sign is dropped: |x|^p
    torch.testing.assert_close(ops._general_power(-x, p), ops._general_power(x, p), rtol=0, atol=0)


# Inputs an independent check found over 1 ulp on the AVX-512 path at |p| ~ 60-63 (1.003 and 1.004
# ulp) before its T took PH (r^2 Q(r) + CLO), up to ~2.5 there, in the one rounding of an FMA; then
# the largest errors a search found once p's constants moved out of the loop (0.863 ulp, and 0.872
# for a subnormal result).
HARD_CASES = [(0x3E87B932, 62.670293357213126), (0x3F0799BF, 60.00783332380685),
              (0x3F87E70F, 56.872836821153761), (0x4086F337, -60.723778494074942)]


def test_large_powers_near_the_bound(isa):
    for bits, p in HARD_CASES:
        _check(torch.tensor([bits], dtype=torch.int32).view(torch.float32), p)
    # the top of the first reduction interval (mantissas 0x070000..0x07ffff: r near 1/16, where the
    # r^2 term is largest) and random mantissas, every exponent, at random powers 56..64 of either
    # sign and 0.5..56
    g = np.random.default_rng(0)
    for p in list(g.uniform(56, 64, 4)) + list(-g.uniform(56, 64, 4)) + list(g.uniform(0.5, 56, 4)):
        m = g.integers(0, 0x800000, 8000)
        m[:4000] = g.integers(0x070000, 0x080000, 4000)
        bits = (g.integers(1, 254, 8000) << 23) | m
        _check(torch.from_numpy(bits.astype(np.int32)).view(torch.float32), float(p))


@pytest.mark.parametrize("p", [5e-324, 1e-35, -1e-35, 1e-9])
def test_tiny_powers(isa, p):
    # |p| below 2^-1060 made the AVX-512 path's per-power tables NaN (its grid for p underflowed)
    _check(_magnitudes(), p)


def test_a_result_at_the_overflow_threshold(isa):
    # x^p = FLT_MAX (1 + 2.80e-8), 0.06 ulp below the point from which float32 rounds to inf
    # (FLT_MAX (1 + 2.98e-8)): FLT_MAX is the rounded value and inf is one step above it, so both
    # are within the 1-ulp bound (the AVX-512 path, whose value before its last rounding can be off
    # by a few tenths of an ulp, may give either; the float64 paths give FLT_MAX). The row kernels
    # never get here: their x' are <= 1.
    x = torch.tensor([0x4087B6F7], dtype=torch.int32).view(torch.float32)
    got = ops._general_power(x, 61.407579131593174).item()
    assert got == FLOAT_MAX or got == float("inf")
    if isa != "avx512":
        assert got == FLOAT_MAX


def test_zero_nan_and_integer_powers(isa):
    x = torch.tensor([0.0, -0.0, float("nan"), 1.0, 2.0, 0.5])
    for p in (0.5, 2.5, -0.5):
        got = ops._general_power(x, p)
        assert got[0] == 0 and got[1] == 0 and torch.isnan(got[2])
    # the general path at integer powers (the row kernels unroll these; the hook does not)
    x = _magnitudes()
    for p in (1.0, 2.0, 4.0, 16.0):
        _check(x, p)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 255, 256, 257, 1001])
def test_value_does_not_depend_on_position(isa, n):
    # the AVX2 loop does 8 at a time and the tail through the same vector code: an element's value
    # is the same wherever it sits in a row
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n + 5, generator=g) * torch.exp2(torch.randint(-140, 20, (n + 5,), generator=g).float())
    full = ops._general_power(x, 2.5)
    for start in (0, 1, 3, 5):
        part = ops._general_power(x[start:start + n].clone(), 2.5)
        assert torch.equal(part, full[start:start + n])


def test_float64_keeps_std_pow():
    x = torch.rand(1000, dtype=torch.float64) * 10
    torch.testing.assert_close(ops._general_power(x, 2.5), x.pow(2.5), rtol=1e-15, atol=0)


def test_row_kernels_use_it(isa):
    # one channel: the stats' spatial entries are |x / m|^p one element each (m = 1 here), by the
    # chunked row loop, for a row longer than a chunk with an odd tail
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1000, generator=g) * torch.exp2(torch.randint(-30, 1, (1000,), generator=g).float())
    x[0] = 1.0
    for p in (0.5, 3.7, 15.25, 24.5):  # half-integers up to 15.5 take the square root (below)
        got = ops.attention_stats(x.view(1, 1, 1, -1), p, p, True, False)[0, :x.numel()]
        assert torch.equal(got, ops._general_power(x, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_half_integer_powers_take_the_square_root(isa, dtype):
    # p = k + 1/2 (k = 1..15): |x|^k sqrt|x| by k multiplications and one correctly rounded square
    # root, so k + 1 roundings: within (k + 1) half-ulps of the exact value (relative (k+1) 2^-24 in
    # float32, 2^-53 in float64), by the row loop of the forward (one channel, m = 1: the stats'
    # spatial entries are |x|^p one element each). The gradient's |x|^(p-1) is the same code one
    # power lower; the loss tests hold it against the reference in float64.
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(1001, generator=g, dtype=torch.float64) * 0.9375 + 0.0625).to(dtype)
    x[0] = 1.0
    half_ulp = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    for k in (1, 2, 3, 7, 15):
        p = k + 0.5
        got = ops.attention_stats(x.view(1, 1, 1, -1), p, p, True, False)[0, :x.numel()]
        want = x.double().pow(p) if dtype == torch.float32 else _exact_pow(x, k)
        rel = ((got.double() - want).abs() / want).max().item()
        # float64: the reference itself is one rounding off the exact value
        bound = (k + 1 if dtype == torch.float32 else k + 2) * half_ulp
        assert rel <= bound, (p, rel / half_ulp)


def _exact_pow(x, k):
    """x^(k + 1/2) of float64 x to ~2^-100 relative, with Python's exact rationals for x^k and a
    float64 square root corrected by one Newton step in extended (fractions) arithmetic."""
    from fractions import Fraction

    out = []
    for v in x.tolist():
        f = Fraction(v)
        r = Fraction(v ** 0.5)
        r = (r + f / r) / 2  # one Newton step: error squared
        out.append(float(f ** k * r))
    return torch.tensor(out, dtype=torch.float64)
