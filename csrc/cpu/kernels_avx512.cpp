// Row kernels for CPUs with AVX-512F: the AVX2 + FMA row kernels of kernels_avx2.cpp, except the
// float32 rows of a non-integer power up to |p| = 64: they take |x|^p sixteen lanes at a time in
// float32 arithmetic (pow16 below) instead of eight lanes in float64 (row_kernels.h's pow8), in AVX-512 row loops
// that compute the powers in the same pass as the sums (the other copies go through an L1 buffer).
// Every other kernel is the same code compiled for the same instructions.
// Every header is included before the target pragmas (see row_kernels.h).
#include <algorithm>
#include <limits>

#include "kernels.h"

namespace atom_fast {
namespace cpu {
namespace isa_avx512 {
// the powers Pow16 (below) is checked for: the rounding errors of its ~|p| r^2 Q terms grow
// with |p|
inline bool pow16_covers(double p) { return p >= -64.0 && p <= 64.0; }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace atom_fast

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), which -Wmaybe-uninitialized flags
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace atom_fast {
namespace cpu {
namespace isa_avx512 {
namespace {

// a^p = 2^(p log2 a) for a >= 0 in float32 only, division-free, within 1 float32 ulp of the exact
// value on every input tested over the whole finite float range (subnormal inputs and results
// included; tests/backends/test_native_pow.py sweeps it against float64 for p in -0.5 .. 64):
//
// 1. a = 2^k z, z in [1, 2) (getexp/getmant, subnormal a included). The top 4 mantissa bits of z
//    pick one of 16 intervals j (a register permute is the table lookup); each has a reciprocal c_j
//    with at most 5 fraction bits, chosen so that r = z c_j - 1 is exact in float32 (one FMA) and
//    r in [-0.038, 1/16) (c = 1 on the interval holding 1). log2 a = k - log2 c_j + log2(1 + r).
// 2. y = p log2 a = S + PC r + M with S = PH k + DH_j exact: PH is p rounded to 15 significant
//    bits, so PH k (|k| <= 149) and DH_j (p (-log2 c_j) rounded to PH's last bit) lie on one grid
//    and their sum has at most 24 bits. The rest: M = PL k + DL_j + r (PCL + r R(r)) with
//    PL = p - PH, DL_j = p (-log2 c_j) - DH_j, p / ln 2 = PC + PCL (floats) and
//    log2(1 + r) = r / ln 2 + r^2 Q(r), R = p Q of degree 4 (Q's abs. error 2^-35 on the interval).
//    The per-power constants (DH, DL, R, ...) are made once per thread and power (pow16_tables).
// 3. N = y rounded to a multiple of 1/16 (adding 1.5 * 2^19 leaves it in the low mantissa bits;
//    |y| <= ~9600 here); T = (PC r + (S - N)) + M: S - N is exact and the FMA rounds once a value
//    of at most ~1/4, so |T| <= 1/32 + 2^-10.
// 4. 2^y = 2^floor(N) 2^(frac(N)) 2^T: the middle factor from a 16-entry table as TH + TL (a
//    permute on N's low 4 bits, 16 frac(N) for negative N too); 2^T - 1 = T E(T), E of degree 2
//    (abs. error 2^-28.5); W = TH + (TH (2^T - 1) + TL): one rounding at the end, then scalef by
//    floor(N), exact unless the result is subnormal (then a second rounding, to the subnormal
//    spacing).
// The error before the last rounding is mostly the roundings of the terms of y of size up to
// ~|p| r^2 |Q| (about 0.18 at |p| = 64 and r near 1/16): R's coefficients, the last Horner steps, M
// and the FMA of step 3, each within 2^-27 of y there. Their worst cases added up come to ~1.03 ulp
// at |p| ~ 64; the largest error found (a search at |p| in 40..64 and r near 1/16, 300 random
// powers, the test's sweep) is 0.86 ulp for normal results and 0.87 for subnormal ones (0.79 and
// 0.86 with the terms formed exactly in the loop, 7 more instructions), 0.77 on the sweep's
// inputs (bench/results/cpu-pow-ulps-2026-12-04-b.json); below |p| = 40 the largest is 0.70.
// a == 0 gives 0 for every p (a masked lane), NaN gives NaN.
// About 33 instructions per 16 lanes, where the double-float products formed in the loop took 40
// and pow8 takes about 80 per 8 (the forward's statistics pass at p = 3.7: 0.55 ns per element on
// one Zen 4 core, 0.65 before, bench/results/cpu-op-min-times-avx512-2026-12-04-b.json and
// -2026-12-04.json). The bound is checked up to |p| = 64 (pow16_covers); larger powers take the
// AVX2 copy's float64 pow8 (row_kernels.h). An infinite input gives NaN (the row kernels never
// pass one: a row is scaled by 1/max|x|, and an infinite max makes every x' NaN already).
alignas(64) constexpr float kInvC[16] = {1.0f,     0.90625f, 0.875f,  0.8125f, 0.78125f, 0.75f,
                                         0.71875f, 0.6875f,  0.65625f, 0.625f, 0.59375f, 0.59375f,
                                         0.5625f,  0.53125f, 0.53125f, 0.5f};
// 2^(j/16) = kT2Hi[j] + kT2Lo[j]
alignas(64) constexpr float kT2Hi[16] = {
    1.0f, 1.0442737340927124f, 1.0905077457427979f, 1.1387885808944702f, 1.1892070770263672f,
    1.2418577671051025f, 1.2968395948410034f, 1.3542555570602417f, 1.4142135381698608f,
    1.4768261909484863f, 1.5422108173370361f, 1.610490322113037f, 1.6817928552627563f,
    1.7562521696090698f, 1.8340080976486206f, 1.9152065515518188f};
alignas(64) constexpr float kT2Lo[16] = {
    0.0f, 4.8334701574503924e-08f, -1.3077539939843064e-08f, 5.386222312608879e-08f,
    3.797635272917432e-08f, 4.496838101886169e-08f, -4.018999533172973e-08f,
    -1.0123349269974824e-08f, 2.4203234971764687e-08f, -4.500898853621038e-08f,
    8.070904833346049e-09f, 9.836217174097328e-09f, -2.4755326677450284e-08f,
    -9.235770370707996e-09f, -1.1239277952768134e-08f, 9.845328108326612e-09f};
// (log2(1 + r) - r/ln 2) / r^2 on [-0.0371, 1/16], lowest degree first (Chebyshev interpolation)
constexpr double kQ[5] = {-0.7213475108146667, 0.4808982312679291, -0.36069273948669434,
                          0.2888466715812683, -0.22830940783023834};
// (2^t - 1) / t on |t| <= 1/32 + 2^-10, lowest degree first
constexpr float kE[3] = {0.6931471824645996f, 0.24023400247097015f, 0.05550514906644821f};

// The per-power constants of step 2 (floats; ph + pl = p, pch + pcl = p / ln 2).
struct alignas(64) Pow16Tables {
  float dh[16], dl[16];
  float ph, pl, pch, pcl, q[5];
};
Pow16Tables make_pow16_tables(double p) {
  Pow16Tables t;
  int e;
  std::frexp(p, &e);  // |p| in [2^(e-1), 2^e)
  // the last bit of PH; for |p| < 2^-100 PH = 0 and p is all PL (y is ~0 then; a grid of
  // 2^(e - 15) itself would underflow to 0 for |p| < 2^-1060 and make every table entry NaN)
  const double grid = std::ldexp(1.0, std::max(e, -100) - 15);
  const auto on_grid = [grid](double x) { return std::nearbyint(x / grid) * grid; };
  const double ph = on_grid(p);
  t.ph = static_cast<float>(ph);  // exact: 15 significant bits
  t.pl = static_cast<float>(p - ph);
  const double pc = p * 1.4426950408889634;
  t.pch = static_cast<float>(pc);
  t.pcl = static_cast<float>(pc - static_cast<double>(t.pch));
  for (int j = 0; j < 16; ++j) {
    const double d = -p * std::log2(static_cast<double>(kInvC[j]));
    const double h = on_grid(d);  // |h| <= |p|: on the grid, 15 bits
    t.dh[j] = static_cast<float>(h);
    t.dl[j] = static_cast<float>(d - h);
  }
  for (int j = 0; j < 5; ++j) t.q[j] = static_cast<float>(p * kQ[j]);
  return t;
}
// The tables of p, made on first use in each thread (a row call passes its power, the forward
// alternates between at most two, the backward uses p - 1): a few entries, replaced in turn.
const Pow16Tables& pow16_tables(double p) {
  constexpr int kEntries = 4;
  constexpr double kNone = std::numeric_limits<double>::quiet_NaN();  // equal to no power
  thread_local double key[kEntries] = {kNone, kNone, kNone, kNone};
  thread_local Pow16Tables entry[kEntries];
  thread_local int next = 0;
  for (int j = 0; j < kEntries; ++j)
    if (key[j] == p) return entry[j];
  const int j = next;
  next = (next + 1) % kEntries;
  entry[j] = make_pow16_tables(p);
  key[j] = p;
  return entry[j];
}
// |x inv|^p on 16 lanes: the steps above with p's constants in registers
struct Pow16 {
  __m512 invc, dh, dl, th, tl, ph, pl, pch, pcl, q[5], inv;
  Pow16(double p, float row_inv) {
    const Pow16Tables& t = pow16_tables(p);
    invc = _mm512_load_ps(kInvC);
    dh = _mm512_load_ps(t.dh);
    dl = _mm512_load_ps(t.dl);
    th = _mm512_load_ps(kT2Hi);
    tl = _mm512_load_ps(kT2Lo);
    ph = _mm512_set1_ps(t.ph);
    pl = _mm512_set1_ps(t.pl);
    pch = _mm512_set1_ps(t.pch);
    pcl = _mm512_set1_ps(t.pcl);
    for (int j = 0; j < 5; ++j) q[j] = _mm512_set1_ps(t.q[j]);
    inv = _mm512_set1_ps(row_inv);
  }
  // a^p for a = abs_x inv >= 0 or NaN
  __m512 operator()(__m512 abs_x) const {
    const __m512 a = _mm512_mul_ps(abs_x, inv);
    const __m512 z = _mm512_getmant_ps(a, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    const __m512 k = _mm512_getexp_ps(a);
    const __m512i j = _mm512_srli_epi32(_mm512_castps_si512(z), 19);  // the permutes read bits 0..3
    const __m512 c = _mm512_permutexvar_ps(j, invc);
    const __m512 r = _mm512_fmsub_ps(z, c, _mm512_set1_ps(1.0f));  // exact
    __m512 rq = q[4];
    for (int i = 3; i >= 0; --i) rq = _mm512_fmadd_ps(rq, r, q[i]);
    rq = _mm512_fmadd_ps(rq, r, pcl);                                       // PCL + r R(r)
    const __m512 big = _mm512_fmadd_ps(ph, k, _mm512_permutexvar_ps(j, dh));  // S, exact
    __m512 m = _mm512_fmadd_ps(k, pl, _mm512_permutexvar_ps(j, dl));
    m = _mm512_fmadd_ps(r, rq, m);  // M
    // a == 0 makes these -inf or NaN: that lane is masked below
    const __m512 round = _mm512_set1_ps(786432.0f);  // 1.5 * 2^19: sums round to multiples of 1/16
    const __m512 nb = _mm512_add_ps(_mm512_add_ps(big, _mm512_fmadd_ps(pch, r, m)), round);
    const __m512 n = _mm512_sub_ps(nb, round);  // N
    const __m512 t = _mm512_add_ps(_mm512_fmadd_ps(pch, r, _mm512_sub_ps(big, n)), m);
    __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(kE[2]), t, _mm512_set1_ps(kE[1]));
    e = _mm512_fmadd_ps(e, t, _mm512_set1_ps(kE[0]));
    const __m512 u = _mm512_mul_ps(e, t);  // 2^T - 1
    const __m512i low = _mm512_castps_si512(nb);  // 16 frac(N) in bits 0..3
    const __m512 hi = _mm512_permutexvar_ps(low, th);
    const __m512 w = _mm512_add_ps(hi, _mm512_fmadd_ps(hi, u, _mm512_permutexvar_ps(low, tl)));
    // a != 0 ? w 2^floor(N) : 0 (scalef floors its exponent; NaN stays NaN)
    const __mmask16 nonzero = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    return _mm512_maskz_scalef_ps(nonzero, w, n);
  }
};

inline __mmask16 first_lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }

// v with the sign bit of x (v >= 0 or NaN): copysign
inline __m512 with_sign_of(__m512 v, __m512 x) {
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}

// The forward's row loops with the power computed in the same pass (no L1 buffer): s[i] += v[i]
// (kS), *t = sum_i v[i] (kT), v[i] = |x[i] inv|^p; returns max_i |x[i]| (NaN ignored, as the
// other copies' a > m ? a : m). Masked lanes of the tail hold 0 and give v = 0. The sum is one
// 16-lane accumulator reduced in a fixed order, so it does not depend on the thread count.
template <bool kS, bool kT>
float stats_row(const float* __restrict x, float* __restrict s, int64_t n, double p, float inv,
                float* __restrict t_out) {
  const Pow16 pw(p, inv);
  __m512 m = _mm512_setzero_ps(), t = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
    m = _mm512_max_ps(a, m);  // the second operand when a is NaN
    const __m512 v = pw(a);
    if constexpr (kS) _mm512_storeu_ps(s + i, _mm512_add_ps(_mm512_loadu_ps(s + i), v));
    if constexpr (kT) t = _mm512_add_ps(t, v);
  }
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i));
    m = _mm512_max_ps(a, m);
    const __m512 v = pw(a);
    if constexpr (kS) _mm512_mask_storeu_ps(s + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, s + i), v));
    if constexpr (kT) t = _mm512_add_ps(t, v);
  }
  if constexpr (kT) *t_out = _mm512_reduce_add_ps(t);
  return _mm512_reduce_max_ps(m);
}

// The backward's row loops, u[i] = |x[i] inv|^(p-1) sgn(x[i]) computed in the same pass:
// kSpatial: out[i] = u[i] gs[i]; kChannel: out[i] (+)= u[i] gt; kBoth: out[i] = u[i] (gs[i] + gt).
enum GradKind { kSpatial, kChannel, kChannelAdd, kBoth };
template <GradKind kKind>
void grad_row(const float* __restrict x, const float* __restrict gs, float gt, float* __restrict out,
              int64_t n, double p, float inv) {
  const Pow16 pw(p - 1.0, inv);
  const __m512 vgt = _mm512_set1_ps(gt);
  auto value = [&](__m512 xv, __m512 g, __m512 o) {
    const __m512 u = with_sign_of(pw(_mm512_abs_ps(xv)), xv);
    if constexpr (kKind == kSpatial) return _mm512_mul_ps(u, g);
    if constexpr (kKind == kChannel) return _mm512_mul_ps(u, vgt);
    if constexpr (kKind == kChannelAdd) return _mm512_add_ps(o, _mm512_mul_ps(u, vgt));
    if constexpr (kKind == kBoth) return _mm512_mul_ps(u, _mm512_add_ps(g, vgt));
  };
  constexpr bool kReadsGs = kKind == kSpatial || kKind == kBoth;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = kReadsGs ? _mm512_loadu_ps(gs + i) : _mm512_setzero_ps();
    const __m512 o = kKind == kChannelAdd ? _mm512_loadu_ps(out + i) : _mm512_setzero_ps();
    _mm512_storeu_ps(out + i, value(_mm512_loadu_ps(x + i), g, o));
  }
  if (i < n) {
    const __mmask16 k = first_lanes(n - i);
    const __m512 g = kReadsGs ? _mm512_maskz_loadu_ps(k, gs + i) : _mm512_setzero_ps();
    const __m512 o = kKind == kChannelAdd ? _mm512_maskz_loadu_ps(k, out + i) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(out + i, k, value(_mm512_maskz_loadu_ps(k, x + i), g, o));
  }
}

}  // namespace

void pow_chunk16(const float* __restrict x, float inv, double p, float* __restrict v, int64_t n) {
  const Pow16 pw(p, inv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(v + i, pw(_mm512_abs_ps(_mm512_loadu_ps(x + i))));
  if (i < n) {  // the tail through the same code on masked lanes, so no value depends on its position
    const __mmask16 k = first_lanes(n - i);
    _mm512_mask_storeu_ps(v + i, k, pw(_mm512_abs_ps(_mm512_maskz_loadu_ps(k, x + i))));
  }
}

float pow16_spatial_row(const float* x, float* s, int64_t n, double p, float inv) {
  return stats_row<true, false>(x, s, n, p, inv, nullptr);
}
float pow16_channel_row(const float* x, int64_t n, double p, float inv) {
  float t;
  stats_row<false, true>(x, nullptr, n, p, inv, &t);
  return t;
}
float pow16_both_row(const float* x, float* s, int64_t n, double p, float inv, float* t_out) {
  return stats_row<true, true>(x, s, n, p, inv, t_out);
}
void pow16_grad_spatial_row(const float* x, const float* gs, float* out, int64_t n, double p, float inv) {
  grad_row<kSpatial>(x, gs, 0.0f, out, n, p, inv);
}
void pow16_grad_channel_row(const float* x, float gt, float* out, int64_t n, double p, float inv,
                            bool accumulate) {
  if (accumulate)
    grad_row<kChannelAdd>(x, nullptr, gt, out, n, p, inv);
  else
    grad_row<kChannel>(x, nullptr, gt, out, n, p, inv);
}
void pow16_grad_both_row(const float* x, const float* gs, float gt, float* out, int64_t n, double p,
                         float inv) {
  grad_row<kBoth>(x, gs, gt, out, n, p, inv);
}

}  // namespace isa_avx512
}  // namespace cpu
}  // namespace atom_fast
#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ATOM_FAST_ISA isa_avx512
#define ATOM_FAST_POW16 1  // row_kernels.h: pow_chunk calls pow_chunk16 for |p| <= 64
#define ATOM_FAST_POW8 1   // and the AVX2 pow8 for larger powers
#include "row_kernels.h"
#pragma GCC pop_options


namespace atom_fast {
namespace cpu {
namespace isa_avx512 {
RowKernels<float> row_kernels_float(int s, int c) { return make_table<float>(s, c, PowerSequence{}); }
RowKernels<double> row_kernels_double(int s, int c) { return make_table<double>(s, c, PowerSequence{}); }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace atom_fast
#else
// Not x86-64 with GCC/Clang: the AVX-512 table is the baseline one (never selected there).
namespace atom_fast {
namespace cpu {
namespace isa_avx512 {
RowKernels<float> row_kernels_float(int s, int c) { return isa_default::row_kernels_float(s, c); }
RowKernels<double> row_kernels_double(int s, int c) { return isa_default::row_kernels_double(s, c); }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace atom_fast
#endif
