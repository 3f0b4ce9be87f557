"""Fused Triton kernels for the attention-matching loss (installed as ``atom_fast.kernels.attention``).

For one layer with features ``F`` of shape ``(N, C, H*W)`` (post-ReLU, pre-pool) and powers ``ps, pc``:

    s_n[hw] = sum_c  |F[n, c, hw]|^ps        spatial attention, length H*W
    t_n[c]  = sum_hw |F[n, c, hw]|^pc        channel attention, length C
    x_hat   = x / max(||x||_2, eps)          per sample, eps = 1e-12 (torch.nn.functional.normalize)
    D_k     = mean_{n in real_k} x_hat_n - mean_{n in syn_k} x_hat_n
    loss    = ws * sum_k ||D_k(s)||^2 + wc * sum_k ||D_k(t)||^2

Scaled per sample, so large powers neither overflow nor underflow: with m_n = max |F[n]| (1 for a
sample of zeros) the kernels form x'_n = x_n / m_n^p = sum |F / m_n|^p, whose largest element is at
least 1, and never m_n^p itself. x_hat = x' / max(||x'||, phi_n) with phi_n = eps / m_n^p =
exp2(log2(eps) - p log2(m_n)): the eps floor is decided on the unscaled norm, and x_hat is exactly
the normalized x, floor included. m_n is a constant of the computation (x_hat does not depend on it).

Forward, per side (real, syn):
    ``_attention_stats_kernel``  per sample: a pass for m_n, then one pass over F -> scaled s'_n, t'_n,
                                 their norms and m_n (N*(H*W + C) + 3N floats)
then once per layer:
    ``_class_diff_kernel``       per class: D_k for s and t, and the weighted per-class loss terms

Backward, per side that needs a gradient, with g the upstream gradient of the loss:
    ``_vector_grad_kernel``      per sample: dL/ds'_n and dL/dt'_n through the normalization,
                                 dL/dx' = (G - x_hat (x_hat . G)) / ||x'||  with G = +-2 w g D_k / count_k
                                 (G / phi_n below the floor, as torch does), times p / m_n
    ``_attention_bwd_kernel``    one pass: dF = |F/m|^(ps-1) sgn(F) GS[hw] + |F/m|^(pc-1) sgn(F) GT[c]
                                 (GS, GT: the previous kernel's output, which holds the factors p / m)

Nothing full-size is saved between forward and backward: only the per-sample vectors, norms, scales
and D_k.
Every reduction runs in a fixed order inside one program, so results are bitwise reproducible.
Integer powers are constexpr and unrolled into multiplications; other powers use exp2(p * log2|x|).

The float scalars (powers, weights, log2 of eps) reach every kernel in a small tensor of the
accumulation dtype (``loss_scalars``), read with ``tl.load``, never as Python float arguments: the
Triton interpreter turns a float argument into a float32 value whatever the kernel declares (0.3
arrives as 0.30000001192..., which moves a float64 loss and its gradient by ~5e-8 relative), and a
float constexpr becomes a float32 constant as well. A tensor holds the values exactly in the
interpreter and in compiled code alike. The only other scalar, the side's sign, is an int (+1 or -1).
"""

import collections
import contextlib
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# NORM_EPS: normalization floor of torch.nn.functional.normalize. MAX_UNROLLED_POWER: largest integer
# power unrolled into multiplications (p - 1 multiplies per element, one kernel variant per power);
# the paper's grid stops at 8. Larger or fractional powers use exp2/log2.
from atom_fast.constants import MAX_UNROLLED_POWER, NORM_EPS, norm_floor
from atom_fast.layout import faking

# Tile sizes. HW <= MAX_BLOCK_HW keeps a sample's whole spatial vector in registers (one block covers
# the 64x64 TinyImageNet layer 1); TILE_ELEMENTS bounds a (BLOCK_C, BLOCK_HW) tile of the F-streaming
# kernels. 4096 elements on 4 warps is 32 per thread (eight 16-byte loads in flight): the sm_90
# ahead-of-time compile (tools/compile_check/sm90.py) shows 8192 spilling for bf16 with a fractional power.
# Not yet tuned on a GPU (docs/gpu.md).
MAX_BLOCK_HW = 4096
TILE_ELEMENTS = 4096
# Class kernel: members of one class summed per step (the real batches per class of DataDAM, ATOM
# and DM, 64/128/256, are whole multiples of 16; not timed on a GPU yet), bounded so a (BLOCK_MEMBERS, BLOCK_L) tile stays
# within CLASS_TILE_BYTES (in the sm_90 compile, 16 x 1024 fp32 needed 243 registers; fp64 tiles of
# 4096 elements spilled).
BLOCK_MEMBERS = 16
CLASS_TILE_BYTES = 8192
# Vector block of the small per-sample / per-class kernels: one block covers a 32x32 spatial vector
# and every channel count of the ConvNets used; these kernels move O(N * (H*W + C)) bytes only.
MAX_BLOCK_VEC = 1024

# Entries of the scalars tensor (``loss_scalars``) that every kernel takes as ``Scalars_ptr``.
SCALAR_PS = tl.constexpr(0)  # spatial power
SCALAR_PC = tl.constexpr(1)  # channel power
SCALAR_WS = tl.constexpr(2)  # spatial weight
SCALAR_WC = tl.constexpr(3)  # channel weight
SCALAR_LOG2_EPS = tl.constexpr(4)  # log2(NORM_EPS)
NUM_SCALARS = 5


def integer_power(p):
    """The constexpr for power ``p``: ``p`` itself when it is a small integer, else 0 (general path)."""
    p = float(p)
    return int(p) if p.is_integer() and 1 <= p <= MAX_UNROLLED_POWER else 0


def _num_warps(elements, per_warp=1024):
    # One warp per ``per_warp`` elements, rounded down to a power of two, between 1 and 8.
    return 1 << min(3, max(0, (elements // per_warp).bit_length() - 1))


def feature_launch_config(C, HW, acc_bytes=4):
    """Tile (BLOCK_C, BLOCK_HW) and warps for the kernels that stream over F.

    Warps follow the live registers of the main pass: the tile plus the running spatial vector, in
    32-bit words (float64 accumulation doubles them), one warp per 1024 words. The stats kernel's
    first pass (the per-sample max |F|) holds two tiles in F's dtype instead, at most as many words
    for 16-bit features and up to 1.6x for float32 (4096 + 4096 vs 4096 + 1024) at the same warps;
    in the sm_90 compile check (tools/compile_check/sm90.py --quick, 80 variants) that pass moved the
    float64 fractional-power stats variant at 128x32x32 from 0 to 20 spilled bytes (limit 64) and
    left every other stats variant unspilled; registers per variant rose by up to 24. Reading that
    power from the scalars tensor (a loaded register through the pass, which ptxas cannot reload
    from the parameter bank as it can a kernel argument) took the variant to 28 bytes.
    """
    block_hw = min(triton.next_power_of_2(HW), MAX_BLOCK_HW)
    block_c = max(1, min(triton.next_power_of_2(C), TILE_ELEMENTS // block_hw))
    words = (block_c * block_hw + block_hw) * acc_bytes // 4
    return block_c, block_hw, _num_warps(words)


# --------------------------------------------------------------------------------------------------
# elementwise helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _abs_pow(a, P_INT: tl.constexpr, p):
    """|x|^p for ``a = |x|``: unrolled multiplications for integer P_INT > 0, else exp2(p log2 a)."""
    if P_INT == 0:
        # a == 0 is masked so log2 never sees 0; NaN stays NaN.
        r = tl.where(a == 0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0, 1.0, a))))
    else:
        r = a
        for _ in tl.static_range(P_INT - 1):
            r = r * a
    return r


@triton.jit
def _abs_pow_grad(x, P_INT: tl.constexpr, p):
    """|x|^(p-1) sgn(x), the derivative of |x|^p divided by p; 0 at x == 0 for every p > 0."""
    if P_INT == 1:
        r = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif P_INT >= 2:
        r = x
        for _ in tl.static_range(P_INT - 2):
            r = r * tl.abs(x)
    else:
        a = tl.abs(x)
        mag = tl.exp2((p - 1.0) * tl.log2(tl.where(a == 0, 1.0, a)))
        r = tl.where(x > 0, mag, tl.where(x < 0, -mag, tl.where(a == 0, 0.0, x)))
    return r


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _norm_floor(m, power, log2_eps):
    """phi = eps / m^power, the floor on ||x'|| that is eps on the unscaled ||x|| = m^power ||x'||;
    formed in log space, so it is 0 where m^power overflows and inf where it underflows (the
    in-kernel form of ``atom_fast.constants.norm_floor``)."""
    return tl.exp2(log2_eps - power * tl.log2(m))


@triton.jit
def _attention_stats_kernel(
    # pointers (Scalars_ptr: the ``loss_scalars`` tensor, of which the powers are read)
    F_ptr, S_ptr, T_ptr, NS_ptr, NT_ptr, M_ptr, FS_ptr, FT_ptr, Scalars_ptr,
    # shapes
    C, HW,
    # strides (a sample's C*H*W block is contiguous)
    F_stride_n,
    PS_INT: tl.constexpr, PC_INT: tl.constexpr, SAME_POWER: tl.constexpr,
    HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr, SINGLE_HW_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """One program per sample n: M[n] = m_n = max |F[n]| (1 if that is 0), S[n, :] = s'_n,
    T[n, :] = t'_n (scaled by 1/m_n^p, unnormalized), NS[n] = ||s'_n||, NT[n] = ||t'_n||, and the
    norm floors FS[n] = phi_n(ps), FT[n] = phi_n(pc) (eps / m_n^p, formed once per sample here so that
    the class kernels only compare).

    F: (N, C, HW) with stride F_stride_n between samples; S: (N, HW), T: (N, C), NS, NT, M: (N,) in
    the accumulation dtype (float32, or float64 for float64 features). SINGLE_HW_BLOCK: HW <= BLOCK_HW,
    so t_n is complete after each channel block and T is written once; otherwise T arrives zeroed and
    is accumulated in place over the spatial blocks.
    """
    n = tl.program_id(0).to(tl.int64)
    acc_dtype = S_ptr.dtype.element_ty
    f_base = F_ptr + n * F_stride_n
    s_base = S_ptr + n * HW
    t_base = T_ptr + n * C
    c_offs = tl.arange(0, BLOCK_C)
    hw_offs = tl.arange(0, BLOCK_HW)

    # First pass: m = max |F[n]|, elementwise over the tiles and reduced once (exact in F's dtype).
    # A NaN may be dropped by the max; it still reaches s and t through its own element below.
    m_tile = tl.zeros([BLOCK_C, BLOCK_HW], dtype=F_ptr.dtype.element_ty)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + hw_offs
        for c0 in range(0, C, BLOCK_C):
            c = c0 + c_offs
            mask = (c < C)[:, None] & (hw < HW)[None, :]
            x = tl.load(f_base + c[:, None] * HW + hw[None, :], mask=mask, other=0.0)
            m_tile = tl.maximum(m_tile, tl.abs(x))
    m = tl.max(tl.max(m_tile, axis=1), axis=0).to(acc_dtype)
    m = tl.where(m == 0, 1.0, m)
    tl.store(M_ptr + n, m)
    inv_m = 1.0 / m
    ps = tl.load(Scalars_ptr + SCALAR_PS)
    pc = tl.load(Scalars_ptr + SCALAR_PC)
    log2_eps = tl.load(Scalars_ptr + SCALAR_LOG2_EPS)
    if HAS_SPATIAL:
        tl.store(FS_ptr + n, _norm_floor(m, ps, log2_eps))
    if HAS_CHANNEL:
        tl.store(FT_ptr + n, _norm_floor(m, pc, log2_eps))

    s_sq = tl.zeros([1], dtype=acc_dtype)  # ||s||^2, one partial sum per spatial block
    t_sq = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + hw_offs
        hw_mask = hw < HW
        s = tl.zeros([BLOCK_HW], dtype=acc_dtype)
        if not SINGLE_HW_BLOCK:
            # T is read back and added to below: make the previous block's stores visible.
            tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            c = c0 + c_offs
            c_mask = c < C
            mask = c_mask[:, None] & hw_mask[None, :]
            x = tl.load(f_base + c[:, None] * HW + hw[None, :], mask=mask, other=0.0)
            a = tl.abs(x.to(acc_dtype)) * inv_m
            if HAS_SPATIAL:
                s += tl.sum(_abs_pow(a, PS_INT, ps), axis=0)
            if HAS_CHANNEL:
                if HAS_SPATIAL and SAME_POWER:
                    t_part = tl.sum(_abs_pow(a, PS_INT, ps), axis=1)
                else:
                    t_part = tl.sum(_abs_pow(a, PC_INT, pc), axis=1)
                if SINGLE_HW_BLOCK:
                    # t for these channels is complete: store it and fold it into the norm now.
                    tl.store(t_base + c, t_part, mask=c_mask)
                    t_sq += t_part * t_part
                else:
                    t_prev = tl.load(t_base + c, mask=c_mask, other=0.0)
                    tl.store(t_base + c, t_prev + t_part, mask=c_mask)
        if HAS_SPATIAL:
            tl.store(s_base + hw, s, mask=hw_mask)
            s_sq += tl.sum(s * s, axis=0)
    if HAS_SPATIAL:
        tl.store(NS_ptr + n, tl.sqrt(tl.sum(s_sq, axis=0)))
    if HAS_CHANNEL:
        if not SINGLE_HW_BLOCK:
            # t is complete only after every spatial block: read it back for the norm.
            tl.debug_barrier()
            for c0 in range(0, C, BLOCK_C):
                c = c0 + c_offs
                t = tl.load(t_base + c, mask=c < C, other=0.0)
                t_sq += t * t
        tl.store(NT_ptr + n, tl.sqrt(tl.sum(t_sq, axis=0)))


@triton.jit
def _class_sum(X_ptr, NX_ptr, FX_ptr, ORDER_ptr, start, stop, offs, mask, L,
               HAS_ORDER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """sum over members i in [start, stop) of X[row_i, offs] / max(NX[row_i], FX[row_i]), the
    normalized vectors (FX: the floors phi); row_i = ORDER[i]."""
    acc = tl.zeros([BLOCK_L], dtype=X_ptr.dtype.element_ty)
    m_offs = tl.arange(0, BLOCK_M)
    for m0 in range(start, stop, BLOCK_M):
        m = m0 + m_offs
        m_mask = m < stop
        if HAS_ORDER:
            rows = tl.load(ORDER_ptr + m, mask=m_mask, other=0)
        else:
            rows = m
        rows = rows.to(tl.int64)
        nrm = tl.load(NX_ptr + rows, mask=m_mask, other=1.0)
        floor = tl.load(FX_ptr + rows, mask=m_mask, other=0.0)
        inv = 1.0 / tl.maximum(nrm, floor, propagate_nan=tl.PropagateNan.ALL)
        x = tl.load(X_ptr + rows[:, None] * L + offs[None, :], mask=m_mask[:, None] & mask[None, :],
                    other=0.0)
        acc += tl.sum(x * inv[:, None], axis=0)
    return acc


@triton.jit
def _class_range(Offs_ptr, k, per_class, HAS_OFFSETS: tl.constexpr):
    """(start, stop) of class k: from the class offsets, or the k-th block of per_class samples."""
    if HAS_OFFSETS:
        start = tl.load(Offs_ptr + k)
        stop = tl.load(Offs_ptr + k + 1)
    else:
        start = k * per_class
        stop = start + per_class
    return start, stop


@triton.jit
def _class_diff(XR_ptr, NR_ptr, FR_ptr, XS_ptr, NS_ptr, FS_ptr, D_ptr, ROrder_ptr, SOrder_ptr,
                k, r0, r1, s0, s1, L,
                REAL_SUMS: tl.constexpr, HAS_ORDER: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_L: tl.constexpr):
    """D[k, :] = mean real_k(x_hat) - mean syn_k(x_hat); returns ||D[k, :]||^2. REAL_SUMS: XR holds
    the real side's class sums (K, L) and r1 - r0 its count (NR, FR, ROrder unused)."""
    offs0 = tl.arange(0, BLOCK_L)
    acc_dtype = XS_ptr.dtype.element_ty
    inv_r = 1.0 / tl.maximum((r1 - r0).to(acc_dtype), 1.0)
    inv_s = 1.0 / tl.maximum(s1 - s0, 1).to(acc_dtype)
    sq = tl.zeros([BLOCK_L], dtype=acc_dtype)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + offs0
        mask = offs < L
        if REAL_SUMS:
            mean_r = tl.load(XR_ptr + k * L + offs, mask=mask, other=0.0).to(acc_dtype) * inv_r
        else:
            mean_r = _class_sum(XR_ptr, NR_ptr, FR_ptr, ROrder_ptr, r0, r1, offs, mask, L,
                                HAS_ORDER, BLOCK_M, BLOCK_L) * inv_r
        mean_s = _class_sum(XS_ptr, NS_ptr, FS_ptr, SOrder_ptr, s0, s1, offs, mask, L,
                            HAS_ORDER, BLOCK_M, BLOCK_L) * inv_s
        d = tl.where(mask, mean_r - mean_s, 0.0)
        tl.store(D_ptr + k * L + offs, d, mask=mask)
        sq += d * d
    return tl.sum(sq, axis=0)


@triton.jit(do_not_specialize=["real_per_class", "syn_per_class"])
def _class_diff_kernel(
    # per-sample statistics (scaled vectors, their norms, their floors phi), real then synthetic;
    # with REAL_SUMS the real side is its class sums SR (K, HW), TR (K, C) and NSR, FSR, NTR, FTR
    # are unused
    SR_ptr, NSR_ptr, FSR_ptr, TR_ptr, NTR_ptr, FTR_ptr,
    SS_ptr, NSS_ptr, FSS_ptr, TS_ptr, NTS_ptr, FTS_ptr,
    # outputs: class differences (K, HW) and (K, C), weighted loss terms (K, 2)
    DS_ptr, DT_ptr, P_ptr,
    # class layout: class offsets and the sample order sorted by class (HAS_ORDER; offsets alone:
    # contiguous classes), else equal blocks; with REAL_SUMS, ROffs holds the real class counts
    ROrder_ptr, ROffs_ptr, SOrder_ptr, SOffs_ptr, real_per_class, syn_per_class,
    # the ``loss_scalars`` tensor (the weights are read from it), shapes
    Scalars_ptr, C, HW,
    REAL_SUMS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_ORDER: tl.constexpr,
    HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per class k: D_k for spatial and channel attention and ws ||D_k(s)||^2,
    wc ||D_k(t)||^2 (0 for a disabled term)."""
    k = tl.program_id(0).to(tl.int64)
    if REAL_SUMS:
        r0 = 0
        r1 = tl.load(ROffs_ptr + k)
    else:
        r0, r1 = _class_range(ROffs_ptr, k, real_per_class, HAS_OFFSETS)
    s0, s1 = _class_range(SOffs_ptr, k, syn_per_class, HAS_OFFSETS)
    acc_dtype = SS_ptr.dtype.element_ty
    if HAS_SPATIAL:
        sq = _class_diff(SR_ptr, NSR_ptr, FSR_ptr, SS_ptr, NSS_ptr, FSS_ptr, DS_ptr, ROrder_ptr,
                         SOrder_ptr, k, r0, r1, s0, s1, HW, REAL_SUMS, HAS_ORDER, BLOCK_M, BLOCK_HW)
        tl.store(P_ptr + 2 * k, tl.load(Scalars_ptr + SCALAR_WS) * sq)
    else:
        tl.store(P_ptr + 2 * k, tl.zeros([1], dtype=acc_dtype).sum(axis=0))
    if HAS_CHANNEL:
        sq = _class_diff(TR_ptr, NTR_ptr, FTR_ptr, TS_ptr, NTS_ptr, FTS_ptr, DT_ptr, ROrder_ptr,
                         SOrder_ptr, k, r0, r1, s0, s1, C, REAL_SUMS, HAS_ORDER, BLOCK_M, BLOCK_C)
        tl.store(P_ptr + 2 * k + 1, tl.load(Scalars_ptr + SCALAR_WC) * sq)
    else:
        tl.store(P_ptr + 2 * k + 1, tl.zeros([1], dtype=acc_dtype).sum(axis=0))


@triton.jit
def _store_class_sum(X_ptr, NX_ptr, FX_ptr, O_ptr, Order_ptr, k, start, stop, L,
                     HAS_ORDER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    """O[k, :] = sum of x_hat over the members start..stop of class k, block by block."""
    offs0 = tl.arange(0, BLOCK_L)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + offs0
        mask = offs < L
        acc = _class_sum(X_ptr, NX_ptr, FX_ptr, Order_ptr, start, stop, offs, mask, L,
                         HAS_ORDER, BLOCK_M, BLOCK_L)
        tl.store(O_ptr + k * L + offs, acc, mask=mask)


@triton.jit(do_not_specialize=["per_class"])
def _class_sums_kernel(
    # per-sample statistics of one side (scaled vectors, their norms, their floors phi)
    S_ptr, NS_ptr, FS_ptr, T_ptr, NT_ptr, FT_ptr,
    # outputs: class sums of the normalized vectors (K, HW) and (K, C)
    OS_ptr, OT_ptr,
    # class layout: class offsets and the sample order sorted by class (HAS_ORDER; offsets alone:
    # contiguous classes), else equal blocks of per_class samples
    Order_ptr, Offs_ptr, per_class,
    C, HW,
    HAS_OFFSETS: tl.constexpr, HAS_ORDER: tl.constexpr,
    HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per class k: OS[k] = sum of s_hat_n, OT[k] = sum of t_hat_n over its members (the
    real side of a distillation step as class statistics)."""
    k = tl.program_id(0).to(tl.int64)
    start, stop = _class_range(Offs_ptr, k, per_class, HAS_OFFSETS)
    if HAS_SPATIAL:
        _store_class_sum(S_ptr, NS_ptr, FS_ptr, OS_ptr, Order_ptr, k, start, stop, HW, HAS_ORDER,
                         BLOCK_M, BLOCK_HW)
    if HAS_CHANNEL:
        _store_class_sum(T_ptr, NT_ptr, FT_ptr, OT_ptr, Order_ptr, k, start, stop, C, HAS_ORDER,
                         BLOCK_M, BLOCK_C)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _normalize_grad(X_ptr, NX_ptr, D_ptr, G_ptr, n, k, L, coef, power, scale, log2_eps,
                    BLOCK_L: tl.constexpr):
    """G[n, :] = (power / scale) * d loss / d x'_n, where loss depends on x_hat_n through
    coef * D[k, :] and x'_n = x_n / scale^power (so that G times |F/scale|^(power-1) sgn F is dF)."""
    offs0 = tl.arange(0, BLOCK_L)
    nrm = tl.load(NX_ptr + n)
    floor = _norm_floor(scale, power, log2_eps)
    # x_hat . g, accumulated from raw x and divided once.
    dot_acc = tl.zeros([BLOCK_L], dtype=X_ptr.dtype.element_ty)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + offs0
        mask = offs < L
        x = tl.load(X_ptr + n * L + offs, mask=mask, other=0.0)
        g = coef * tl.load(D_ptr + k * L + offs, mask=mask, other=0.0)
        dot_acc += x * g
    # torch: x / clamp_min(||x||, eps); below the floor the denominator is a constant.
    above = nrm >= floor
    inv = 1.0 / tl.where(above, nrm, floor)
    proj = tl.where(above, tl.sum(dot_acc, axis=0) * inv * inv * inv, 0.0)
    factor = power / scale
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + offs0
        mask = offs < L
        x = tl.load(X_ptr + n * L + offs, mask=mask, other=0.0)
        g = coef * tl.load(D_ptr + k * L + offs, mask=mask, other=0.0)
        tl.store(G_ptr + n * L + offs, factor * (g * inv - x * proj), mask=mask)


@triton.jit(do_not_specialize=["per_class", "side_sign"])
def _vector_grad_kernel(
    # per-sample statistics of this side, class differences, upstream gradient
    S_ptr, NS_ptr, T_ptr, NT_ptr, M_ptr, DS_ptr, DT_ptr, GO_ptr,
    # outputs: per-sample gradients (N, HW) and (N, C), premultiplied by power / scale
    GS_ptr, GT_ptr,
    # class layout: labels and class offsets (HAS_ORDER), else equal blocks of per_class samples
    Labels_ptr, Offs_ptr, per_class,
    # the ``loss_scalars`` tensor (powers, weights, log2 eps), shapes, the side's sign (int)
    Scalars_ptr, C, HW, side_sign,
    HAS_ORDER: tl.constexpr, HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per sample: side_sign is +1 for real samples and -1 for synthetic ones (an int,
    not specialized, so both sides share one compiled variant)."""
    n = tl.program_id(0).to(tl.int64)
    if HAS_ORDER:
        k = tl.load(Labels_ptr + n).to(tl.int64)
        count = tl.load(Offs_ptr + k + 1) - tl.load(Offs_ptr + k)
    else:
        k = n // per_class
        count = per_class
    acc_dtype = S_ptr.dtype.element_ty
    log2_eps = tl.load(Scalars_ptr + SCALAR_LOG2_EPS)
    go = tl.load(GO_ptr).to(acc_dtype)
    scale = tl.load(M_ptr + n)
    # d/d mean_k of ||D_k||^2 is 2 D_k; each member contributes 1/count of its side's mean.
    coef = side_sign.to(acc_dtype) * 2.0 * go / count.to(acc_dtype)
    if HAS_SPATIAL:
        _normalize_grad(S_ptr, NS_ptr, DS_ptr, GS_ptr, n, k, HW,
                        coef * tl.load(Scalars_ptr + SCALAR_WS), tl.load(Scalars_ptr + SCALAR_PS),
                        scale, log2_eps, BLOCK_HW)
    if HAS_CHANNEL:
        _normalize_grad(T_ptr, NT_ptr, DT_ptr, GT_ptr, n, k, C,
                        coef * tl.load(Scalars_ptr + SCALAR_WC), tl.load(Scalars_ptr + SCALAR_PC),
                        scale, log2_eps, BLOCK_C)


@triton.jit
def _attention_bwd_kernel(
    # pointers (Scalars_ptr: the ``loss_scalars`` tensor, of which the powers are read)
    F_ptr, M_ptr, GS_ptr, GT_ptr, DF_ptr, Scalars_ptr,
    # shapes
    C, HW,
    # strides (F as in the forward; DF is contiguous)
    F_stride_n,
    PS_INT: tl.constexpr, PC_INT: tl.constexpr, SAME_POWER: tl.constexpr,
    HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Program (n, c-block): DF[n, c, hw] = |F/m|^(ps-1) sgn(F) GS[n, hw] + |F/m|^(pc-1) sgn(F) GT[n, c]
    with m = M[n], the forward's per-sample scale.

    GS/GT already hold the factor power / m; reads F once and writes DF once.
    """
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    acc_dtype = GS_ptr.dtype.element_ty
    # read only by the general power path (PS_INT or PC_INT 0); the compiler drops them otherwise
    ps = tl.load(Scalars_ptr + SCALAR_PS)
    pc = tl.load(Scalars_ptr + SCALAR_PC)
    f_base = F_ptr + n * F_stride_n
    df_base = DF_ptr + n * C * HW
    hw_offs = tl.arange(0, BLOCK_HW)
    inv_m = 1.0 / tl.load(M_ptr + n)
    if HAS_CHANNEL:
        gt = tl.load(GT_ptr + n * C + c, mask=c_mask, other=0.0)
    for hw0 in range(0, HW, BLOCK_HW):
        hw = hw0 + hw_offs
        hw_mask = hw < HW
        mask = c_mask[:, None] & hw_mask[None, :]
        offs = c[:, None] * HW + hw[None, :]
        x = tl.load(f_base + offs, mask=mask, other=0.0).to(acc_dtype) * inv_m
        if HAS_SPATIAL:
            gs = tl.load(GS_ptr + n * HW + hw, mask=hw_mask, other=0.0)
            ds = _abs_pow_grad(x, PS_INT, ps)
            if HAS_CHANNEL:
                if SAME_POWER:
                    df = ds * (gs[None, :] + gt[:, None])
                else:
                    df = ds * gs[None, :] + _abs_pow_grad(x, PC_INT, pc) * gt[:, None]
            else:
                df = ds * gs[None, :]
        else:
            df = _abs_pow_grad(x, PC_INT, pc) * gt[:, None]
        tl.store(df_base + offs, df.to(DF_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------


class SideStats(NamedTuple):
    """Per-sample statistics of one side (real or synthetic) of one layer, from ``attention_stats``.

    All in the accumulation dtype. With m_n = max |F[n]| (1 for a sample of zeros) and p the power:
    ``spatial`` (N, H*W) = s_n / m_n^ps and ``channel`` (N, C) = t_n / m_n^pc (unnormalized),
    ``spatial_norm``/``channel_norm`` (N,) their L2 norms, ``scale`` (N,) m_n, and
    ``spatial_floor``/``channel_floor`` (N,) the norm floors phi_n = eps / m_n^p (x_hat = x' /
    max(||x'||, phi_n)). A disabled side's vectors, norm and floor are left unwritten.
    """

    spatial: torch.Tensor
    channel: torch.Tensor
    spatial_norm: torch.Tensor
    channel_norm: torch.Tensor
    scale: torch.Tensor
    spatial_floor: torch.Tensor
    channel_floor: torch.Tensor


def _launch_device(t):
    """Make t's GPU current for a launch: Triton launches on the current device, which need not be t's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _sample_contiguous(F):
    """F with each sample's (C, H, W) block contiguous (a batch slice stays a view; else a copy)."""
    _, C, H, W = F.shape
    if F.stride(3) == 1 and F.stride(2) == W and F.stride(1) == H * W:
        return F
    return F.contiguous()


def _vector_block(L):
    return min(triton.next_power_of_2(L), MAX_BLOCK_VEC)


# loss_scalars tensors by (values, dtype, device[, stream]): a run uses a handful of them
_SCALARS_CACHE = collections.OrderedDict()
_SCALARS_CACHE_SIZE = 64


def loss_scalars(ps, pc, ws=0.0, wc=0.0, *, dtype, device):
    """The float scalars the kernels read, as a (NUM_SCALARS,) tensor of ``dtype`` (the accumulation
    dtype) on ``device``: [ps, pc, ws, wc, log2(NORM_EPS)] at the SCALAR_* indices, each Python float
    rounded once to ``dtype`` (so exactly the value in float64). Weights that a call does not use may
    stay 0. Never written after it is made: callers only read it.

    Made once per (values, dtype, device) and kept (the last ``_SCALARS_CACHE_SIZE`` of them), so a
    loss call normally costs no device work for its scalars. On CUDA the key also holds the current
    stream: a tensor is read only on the stream that filled it, after its fills in stream order, with
    no synchronization. It is made by ``fill_`` with each value as a kernel argument (a double for a
    float64 tensor): one-element fill kernels, no host-to-device copy (``torch.tensor(values,
    device=...)`` from pageable memory waits for the stream to drain). Not cached while a CUDA graph
    is being captured (a graph replays its own fills), while ``torch.compile`` traces (the tensor
    is then part of the graph) or under a fake-tensor mode (a real tensor cannot enter it).
    """
    values = (float(ps), float(pc), float(ws), float(wc), math.log2(NORM_EPS))
    device = torch.device(device)
    key = None
    if not (torch.compiler.is_compiling() or faking()):
        if device.type == "cuda":
            if not torch.cuda.is_current_stream_capturing():
                stream = torch.cuda.current_stream(device)
                key = (values, dtype, device.type, stream.device_index, stream.cuda_stream)
        else:
            key = (values, dtype, device.type, device.index)
    if key is not None:
        scalars = _SCALARS_CACHE.get(key)
        if scalars is not None:
            _SCALARS_CACHE.move_to_end(key)
            return scalars
    # a plain tensor even when first asked for under inference mode or no_grad
    with torch.inference_mode(False), torch.no_grad():
        scalars = torch.empty(NUM_SCALARS, dtype=dtype, device=device)
        for i, value in enumerate(values):
            scalars[i].fill_(value)
    if key is not None:
        _SCALARS_CACHE[key] = scalars
        if len(_SCALARS_CACHE) > _SCALARS_CACHE_SIZE:
            _SCALARS_CACHE.popitem(last=False)
    return scalars


def _scalars(scalars, ps, pc, ws, wc, dtype, device):
    """The caller's ``loss_scalars`` tensor, or one built for this launch (for direct callers)."""
    if scalars is None:
        return loss_scalars(ps, pc, ws, wc, dtype=dtype, device=device)
    if scalars.dtype != dtype or scalars.device != torch.device(device) or scalars.shape != (NUM_SCALARS,):
        raise ValueError(f"scalars must be a ({NUM_SCALARS},) {dtype} tensor on {device} "
                         f"(loss_scalars), got {tuple(scalars.shape)} {scalars.dtype} on {scalars.device}")
    return scalars


def attention_stats(F, ps, pc, has_spatial, has_channel, acc_dtype, scalars=None):
    """Per-sample scaled attention vectors, norms and scales of F (N, C, H, W): a ``SideStats``.

    ``scalars``: the ``loss_scalars`` of ``ps, pc`` in ``acc_dtype`` on F's device, or None to build
    them here. The launchers take the powers and weights as Python numbers as well: they choose the
    kernel variant (integer powers, disabled terms); the kernels read the values from ``scalars``.
    """
    scalars = _scalars(scalars, ps, pc, 0.0, 0.0, acc_dtype, F.device)
    F = _sample_contiguous(F)
    N, C, H, W = F.shape
    HW = H * W
    acc_bytes = torch.empty((), dtype=acc_dtype).element_size()
    block_c, block_hw, num_warps = feature_launch_config(C, HW, acc_bytes)
    single = HW <= block_hw
    S = torch.empty((N, HW), dtype=acc_dtype, device=F.device)
    # T is accumulated in place over spatial blocks when one block does not cover H*W.
    T = (torch.empty if single else torch.zeros)((N, C), dtype=acc_dtype, device=F.device)
    NS, NT, M, FS, FT = (torch.empty((N,), dtype=acc_dtype, device=F.device) for _ in range(5))
    with _launch_device(F):
        _attention_stats_kernel[(N,)](
            F, S, T, NS, NT, M, FS, FT, scalars,
            C, HW, F.stride(0),
            PS_INT=integer_power(ps), PC_INT=integer_power(pc), SAME_POWER=float(ps) == float(pc),
            HAS_SPATIAL=has_spatial, HAS_CHANNEL=has_channel, SINGLE_HW_BLOCK=single,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )
    return SideStats(S, T, NS, NT, M, FS, FT)


def _class_layout(order, offsets, per_class):
    """(HAS_OFFSETS, HAS_ORDER) of a class layout: ``offsets`` (K + 1 class starts, int64) with or
    without ``order`` (sample indices sorted by class; without: each class contiguous), or
    ``per_class`` equal contiguous blocks."""
    if order is not None and offsets is None:
        raise ValueError("a class order needs its offsets")
    return offsets is not None, order is not None


def _class_config(stats_vector, block_hw, block_c):
    """(BLOCK_M, num_warps) of the class kernels: members per step bounded by CLASS_TILE_BYTES."""
    elem = stats_vector.element_size()
    block_m = max(1, min(BLOCK_MEMBERS, CLASS_TILE_BYTES // elem // max(block_hw, block_c)))
    return block_m, _num_warps(block_m * max(block_hw, block_c) * elem // 4)


def class_differences(real, syn, num_classes, ps, pc, ws, wc, partials, *, scalars=None,
                      real_order=None, real_offsets=None, syn_order=None, syn_offsets=None,
                      real_per_class=0, syn_per_class=0):
    """Per-class mean differences D_s (K, H*W), D_t (K, C) of the normalized vectors.

    ``real``/``syn``: ``SideStats``. Class layout of each side: ``*_offsets`` (K + 1 class starts,
    int64) with ``*_order`` (sample indices sorted by class, int64) or without it (classes
    contiguous), or ``*_per_class`` (equal contiguous blocks); both sides the same kind. Writes
    ``ws ||D_k(s)||^2`` and ``wc ||D_k(t)||^2`` into ``partials`` (K, 2), 0 for a disabled term.
    ``scalars``: as in ``attention_stats``.
    """
    has_offsets, has_order = _class_layout(real_order, real_offsets, real_per_class)
    if (has_offsets, has_order) != _class_layout(syn_order, syn_offsets, syn_per_class):
        raise ValueError("real and syn class layouts must be of one kind (offsets with or without "
                         "order, or equal blocks)")
    return _class_differences(real, syn, None, num_classes, ps, pc, ws, wc, partials, scalars,
                              real_order, real_offsets, syn_order, syn_offsets, real_per_class,
                              syn_per_class, has_offsets, has_order)


def class_differences_from_sums(real_spatial, real_channel, real_counts, syn, num_classes, ps, pc,
                                ws, wc, partials, *, scalars=None, syn_order=None,
                                syn_offsets=None, syn_per_class=0):
    """``class_differences`` with the real side given as its class sums ``real_spatial`` (K, H*W)
    and ``real_channel`` (K, C) of the normalized vectors (None for a disabled term) and its class
    counts ``real_counts`` (K,) int64: D_k = sums_k / max(count_k, 1) - mean syn_k(x_hat)."""
    has_offsets, has_order = _class_layout(syn_order, syn_offsets, syn_per_class)
    return _class_differences(None, syn, (real_spatial, real_channel), num_classes, ps, pc, ws, wc,
                              partials, scalars, None, real_counts, syn_order, syn_offsets, 0,
                              syn_per_class, has_offsets, has_order)


def _class_differences(real, syn, real_sums, K, ps, pc, ws, wc, partials, scalars, real_order,
                       real_offsets, syn_order, syn_offsets, real_per_class, syn_per_class,
                       has_offsets, has_order):
    HW, C = syn.spatial.shape[1], syn.channel.shape[1]
    dtype, device = syn.spatial.dtype, syn.spatial.device
    scalars = _scalars(scalars, ps, pc, ws, wc, dtype, device)
    DS = torch.empty((K, HW), dtype=dtype, device=device)
    DT = torch.empty((K, C), dtype=dtype, device=device)
    block_hw, block_c = _vector_block(HW), _vector_block(C)
    block_m, num_warps = _class_config(syn.spatial, block_hw, block_c)
    if real_sums is None:
        real_args = (real.spatial, real.spatial_norm, real.spatial_floor,
                     real.channel, real.channel_norm, real.channel_floor)
    else:
        real_args = (real_sums[0], None, None, real_sums[1], None, None)
    with _launch_device(syn.spatial):
        _class_diff_kernel[(K,)](
            *real_args,
            syn.spatial, syn.spatial_norm, syn.spatial_floor,
            syn.channel, syn.channel_norm, syn.channel_floor,
            DS, DT, partials,
            real_order, real_offsets, syn_order, syn_offsets, real_per_class, syn_per_class,
            scalars, C, HW,
            REAL_SUMS=real_sums is not None, HAS_OFFSETS=has_offsets, HAS_ORDER=has_order,
            HAS_SPATIAL=ws != 0, HAS_CHANNEL=wc != 0,
            BLOCK_M=block_m, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )
    return DS, DT


def class_sums(stats, num_classes, has_spatial, has_channel, *, order=None, offsets=None,
               per_class=0):
    """Class sums of one side's normalized vectors: (K, H*W) and (K, C) in the accumulation dtype
    (a disabled term's left unwritten). ``stats``: its ``SideStats``; class layout as one side's in
    ``class_differences``."""
    has_offsets, has_order = _class_layout(order, offsets, per_class)
    HW, C = stats.spatial.shape[1], stats.channel.shape[1]
    dtype, device = stats.spatial.dtype, stats.spatial.device
    OS = torch.empty((num_classes, HW), dtype=dtype, device=device)
    OT = torch.empty((num_classes, C), dtype=dtype, device=device)
    block_hw, block_c = _vector_block(HW), _vector_block(C)
    block_m, num_warps = _class_config(stats.spatial, block_hw, block_c)
    with _launch_device(stats.spatial):
        _class_sums_kernel[(num_classes,)](
            stats.spatial, stats.spatial_norm, stats.spatial_floor,
            stats.channel, stats.channel_norm, stats.channel_floor,
            OS, OT, order, offsets, per_class, C, HW,
            HAS_OFFSETS=has_offsets, HAS_ORDER=has_order,
            HAS_SPATIAL=has_spatial, HAS_CHANNEL=has_channel,
            BLOCK_M=block_m, BLOCK_HW=block_hw, BLOCK_C=block_c, num_warps=num_warps,
        )
    return OS, OT


def vector_grad(stats, DS, DT, grad_output, side_sign, ps, pc, ws, wc, *, scalars=None,
                labels=None, offsets=None, per_class=0):
    """Per-sample gradients w.r.t. the scaled attention vectors, premultiplied by power / scale.

    ``stats``: this side's ``SideStats``; ``side_sign`` +1 for the real side, -1 for the synthetic one.
    Class layout: ``labels`` (N,) and the class ``offsets`` (K + 1,) of the side, int64 on the
    device, or ``per_class``. ``scalars``: as in ``attention_stats``. Returns GS (N, H*W), GT (N, C).
    """
    if side_sign not in (1, -1):
        raise ValueError(f"side_sign must be +1 or -1, got {side_sign!r}")
    if (labels is None) != (offsets is None):
        raise ValueError("labels and offsets come together (or neither, with per_class)")
    scalars = _scalars(scalars, ps, pc, ws, wc, stats.spatial.dtype, stats.spatial.device)
    N, HW = stats.spatial.shape
    C = stats.channel.shape[1]
    GS = torch.empty_like(stats.spatial)
    GT = torch.empty_like(stats.channel)
    block_hw, block_c = _vector_block(HW), _vector_block(C)
    with _launch_device(GS):
        _vector_grad_kernel[(N,)](
            stats.spatial, stats.spatial_norm, stats.channel, stats.channel_norm, stats.scale,
            DS, DT, grad_output,
            GS, GT,
            labels, offsets, per_class,
            scalars, C, HW, int(side_sign),
            HAS_ORDER=labels is not None, HAS_SPATIAL=ws != 0, HAS_CHANNEL=wc != 0,
            BLOCK_HW=block_hw, BLOCK_C=block_c,
            num_warps=_num_warps(max(block_hw, block_c), per_warp=256),
        )
    return GS, GT


def attention_backward(F, scale, GS, GT, ps, pc, has_spatial, has_channel, scalars=None):
    """dF (same shape and dtype as F, contiguous) from the per-sample gradients GS, GT and the
    forward's per-sample scales (``SideStats.scale``). ``scalars``: as in ``attention_stats``."""
    F = _sample_contiguous(F)
    N, C, H, W = F.shape
    HW = H * W
    dF = torch.empty((N, C, H, W), dtype=F.dtype, device=F.device)
    if not (has_spatial or has_channel):
        return dF.zero_()
    block_c, block_hw, num_warps = feature_launch_config(C, HW, GS.element_size())
    scalars = _scalars(scalars, ps, pc, 0.0, 0.0, GS.dtype, GS.device)
    with _launch_device(F):
        _attention_bwd_kernel[(N, triton.cdiv(C, block_c))](
            F, scale, GS, GT, dF, scalars,
            C, HW, F.stride(0),
            PS_INT=integer_power(ps), PC_INT=integer_power(pc), SAME_POWER=float(ps) == float(pc),
            HAS_SPATIAL=has_spatial, HAS_CHANNEL=has_channel,
            BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
        )
    return dF
