// Innermost loops of the CPU op: one channel row F[n, c, 0:HW] at a time, in the accumulation type.
//
// This header is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp); each copy lives in its own namespace atom_fast::cpu::ATOM_FAST_ISA, so the
// copies never meet at link time. It includes nothing: the including file puts every system header
// before its `#pragma GCC target`, so no inline library function is ever compiled for the wider
// instruction set.
//
// Every kernel reads x' = |x| * inv, the row scaled by its sample's 1/m (see constants.h), so
// |x'| <= 1 and no power overflows. Integer powers 1..kMaxUnrolledPower are template parameters
// (the multiplications unroll and the loops vectorize), half-integer ones k + 1/2 too (sqrt x' times
// x'^k: one more instruction per element); any other power (P == 0) is
// 2^(p log2 x') (pow_general below: AVX2 intrinsics in the AVX2 copy, scalar code in the baseline
// one; float64 keeps std::pow), computed a chunk of the row at a time into an L1 buffer; the AVX-512
// copy computes it inside its own row loops instead (kernels_avx512.cpp, for |p| <= 64).

#ifndef ATOM_FAST_ISA
#error "define ATOM_FAST_ISA before including row_kernels.h"
#endif

namespace atom_fast {
namespace cpu {
namespace ATOM_FAST_ISA {

inline float fabs_(float x) { return __builtin_fabsf(x); }
inline double fabs_(double x) { return __builtin_fabs(x); }
inline float copysign_(float m, float x) { return __builtin_copysignf(m, x); }
inline double copysign_(double m, double x) { return __builtin_copysign(m, x); }
// the square root instruction (correctly rounded; -fno-math-errno keeps it inline and vectorizable)
inline float sqrt_(float x) { return __builtin_sqrtf(x); }
inline double sqrt_(double x) { return __builtin_sqrt(x); }

// The bits of a value as another type of the same size (std::bit_cast, which needs <bit>).
template <typename To, typename From>
inline To bit_cast_(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_ between types of different sizes");
  To y;
  __builtin_memcpy(&y, &x, sizeof y);
  return y;
}

// ---- |x|^p for a non-integer p in float32 -------------------------------------------------------
//
// a^p = 2^(p log2 a), division-free, accurate to 1 ulp of float32 over the whole float range
// (subnormal a and results included; tests/backends/test_native_pow.py sweeps it against float64):
//   a = 2^k z, z in [0.7, 1.4) split into 8 intervals by the top mantissa bits (the interval holding
//   1 has c = 1); r = z / c - 1 = z * invc - 1 is exact in float (invc has 4 significant bits), so
//   log2 a = k + log2 c + log2(1 + r), |r| < 0.077, the last term a degree-6 polynomial times r in
//   float64 (relative error 2^-35); y = p log2 a in float64; 2^y = 2^n 2^(y - n) with a degree-6
//   polynomial on [-1/2, 1/2] (relative error 2^-28.5) and n added to the float64 exponent. The one
//   float64 -> float32 rounding at the end rounds subnormal results and overflows to inf correctly.
// (The former float32 exp(p log a) lost |p log a| ulps in the rounding of p log a: ~35 at p = 2.5,
// a = 1e-6.) The 8-entry tables are the lanes of one AVX2 register (kernels_avx2.cpp's pow8).

constexpr int32_t kPowOff = 0x3f330000;  // bits of 0.69921875: z in [0.7, 1.4)
alignas(32) constexpr float kPowInvC[8] = {1.375f, 1.25f, 1.125f, 1.125f, 1.0f, 0.9375f, 0.8125f, 0.75f};
// -log2(invc) = hi + lo
alignas(32) constexpr float kPowLogCHi[8] = {
    -0.45943161845207214f, -0.32192808389663696f, -0.1699250042438507f, -0.1699250042438507f,
    0.0f, 0.09310940653085709f, 0.2995602786540985f, 0.41503751277923584f};
alignas(32) constexpr float kPowLogCLo[8] = {
    -1.8522511302521139e-10f, -1.0990725662907153e-08f, 2.8015383346513545e-09f,
    2.8015383346513545e-09f, 0.0f, -2.13937556559074e-09f, 3.2048093068226535e-09f,
    -1.3500391915499677e-08f};
// log2(1 + r) / r on [-0.0728, 0.0767], highest degree first (Chebyshev interpolation)
constexpr double kPowLog[7] = {0.20520075648032707, -0.24219980680539702, 0.2885517757947468,
                               -0.3606689104895846, 0.48089832140953875, -0.7213475238086545,
                               1.442695040895595};
// 2^t on [-1/2, 1/2], highest degree first
constexpr double kPowExp2[7] = {0.00015461444683652947, 0.0013400428178361574,
                                0.00961805667859009, 0.055503272266688435, 0.24022650922288005,
                                0.6931472067028333, 1.0};
constexpr double kPowRound = 6755399441055744.0;  // 1.5 * 2^52: y + it rounds y to an integer
constexpr float kFloatMin = 1.17549435e-38f;      // smallest normal float

// 2^y in float64 for y in [-160, 130] (clamped there: the float32 rounding then gives 0 or inf).
inline double exp2_double(double y) {
  const double yc = y < -160.0 ? -160.0 : (y > 130.0 ? 130.0 : y);
  const double kd = yc + kPowRound;
  const double n = kd - kPowRound;
  const double t = yc - n;
  double e = kPowExp2[0];
  for (int j = 1; j < 7; ++j) e = e * t + kPowExp2[j];
  // kd's low mantissa bits hold n: shifted into the exponent field, adding them multiplies by 2^n
  return bit_cast_<double>(bit_cast_<int64_t>(e) +
                           static_cast<int64_t>(static_cast<uint64_t>(bit_cast_<int64_t>(kd)) << 52));
}

// a^p for a >= 0 (a NaN gives NaN, a == 0 gives 0 for every p), p not an unrolled integer.
inline float pow_general(float a, double p) {
  const bool sub = a < kFloatMin;
  const float as = sub ? a * 16777216.0f : a;  // subnormal: times 2^24, exponent taken back below
  const int32_t ix = bit_cast_<int32_t>(as) - (sub ? (24 << 23) : 0);
  const int32_t tmp = ix - kPowOff;
  const int i = (tmp >> 20) & 7;
  const int32_t top = static_cast<int32_t>(static_cast<uint32_t>(tmp) & 0xff800000u);
  const float z = bit_cast_<float>(ix - top);
  const double k = static_cast<double>(top >> 23);
  const double r = static_cast<double>(z) * static_cast<double>(kPowInvC[i]) - 1.0;  // exact
  double q = kPowLog[0];
  for (int j = 1; j < 7; ++j) q = q * r + kPowLog[j];
  const double c = static_cast<double>(kPowLogCHi[i]) + static_cast<double>(kPowLogCLo[i]);
  const double y = p * (r * q + (k + c));
  const float v = static_cast<float>(exp2_double(y));
  return a > 0.0f ? v : a * 0.0f;
}
inline double pow_general(double a, double p) { return a > 0.0 ? std::pow(a, p) : a * 0.0; }

#if defined(ATOM_FAST_POW8)
// pow_general on 8 lanes (AVX2 + FMA): the same steps; the table lookups are register permutes.
inline __m256d pow8_half(__m128 r, __m128 k, __m128 chi, __m128 clo, __m256d p) {
  const __m256d rd = _mm256_cvtps_pd(r);
  __m256d q = _mm256_set1_pd(kPowLog[0]);
  for (int j = 1; j < 7; ++j) q = _mm256_fmadd_pd(q, rd, _mm256_set1_pd(kPowLog[j]));
  const __m256d c = _mm256_add_pd(_mm256_cvtps_pd(chi), _mm256_cvtps_pd(clo));
  const __m256d kc = _mm256_add_pd(_mm256_cvtps_pd(k), c);
  const __m256d y = _mm256_mul_pd(p, _mm256_fmadd_pd(rd, q, kc));
  const __m256d yc = _mm256_min_pd(_mm256_max_pd(y, _mm256_set1_pd(-160.0)), _mm256_set1_pd(130.0));
  const __m256d kd = _mm256_add_pd(yc, _mm256_set1_pd(kPowRound));
  const __m256d t = _mm256_sub_pd(yc, _mm256_sub_pd(kd, _mm256_set1_pd(kPowRound)));
  __m256d e = _mm256_set1_pd(kPowExp2[0]);
  for (int j = 1; j < 7; ++j) e = _mm256_fmadd_pd(e, t, _mm256_set1_pd(kPowExp2[j]));
  const __m256i scale = _mm256_slli_epi64(_mm256_castpd_si256(kd), 52);
  return _mm256_castsi256_pd(_mm256_add_epi64(_mm256_castpd_si256(e), scale));
}

inline __m256 pow8(__m256 a, __m256d p) {
  const __m256 sub = _mm256_cmp_ps(a, _mm256_set1_ps(kFloatMin), _CMP_LT_OQ);
  const __m256 as = _mm256_blendv_ps(a, _mm256_mul_ps(a, _mm256_set1_ps(16777216.0f)), sub);
  const __m256i ix = _mm256_sub_epi32(_mm256_castps_si256(as),
                                      _mm256_and_si256(_mm256_castps_si256(sub), _mm256_set1_epi32(24 << 23)));
  const __m256i tmp = _mm256_sub_epi32(ix, _mm256_set1_epi32(kPowOff));
  const __m256i i = _mm256_and_si256(_mm256_srli_epi32(tmp, 20), _mm256_set1_epi32(7));
  const __m256i top = _mm256_and_si256(tmp, _mm256_set1_epi32(static_cast<int32_t>(0xff800000u)));
  const __m256 z = _mm256_castsi256_ps(_mm256_sub_epi32(ix, top));
  const __m256 k = _mm256_cvtepi32_ps(_mm256_srai_epi32(top, 23));
  const __m256 invc = _mm256_permutevar8x32_ps(_mm256_load_ps(kPowInvC), i);
  const __m256 r = _mm256_fmsub_ps(z, invc, _mm256_set1_ps(1.0f));  // exact
  const __m256 chi = _mm256_permutevar8x32_ps(_mm256_load_ps(kPowLogCHi), i);
  const __m256 clo = _mm256_permutevar8x32_ps(_mm256_load_ps(kPowLogCLo), i);
  const __m256d lo = pow8_half(_mm256_castps256_ps128(r), _mm256_castps256_ps128(k),
                               _mm256_castps256_ps128(chi), _mm256_castps256_ps128(clo), p);
  const __m256d hi = pow8_half(_mm256_extractf128_ps(r, 1), _mm256_extractf128_ps(k, 1),
                               _mm256_extractf128_ps(chi, 1), _mm256_extractf128_ps(clo, 1), p);
  const __m256 v = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
  // a > 0 ? v : a * 0 (0 for a == 0, NaN for NaN)
  const __m256 pos = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ);
  return _mm256_blendv_ps(_mm256_mul_ps(a, _mm256_setzero_ps()), v, pos);
}
#endif

// v[i] = (|x[i]| inv)^p for i < n (float32 rows of a non-integer power; chunks of the row loops).
inline void pow_chunk(const float* __restrict x, float inv, double p, float* __restrict v, int64_t n) {
#if defined(ATOM_FAST_POW16)
  // the AVX-512 copy's float32 general power, 16 lanes at a time: kernels_avx512.cpp defines it,
  // compiled for AVX-512F, before it includes this header (a call, never inlined into AVX2 code);
  // its error bound holds for |p| <= 64 (pow16_covers), larger powers take pow8 below
  if (pow16_covers(p)) {
    pow_chunk16(x, inv, p, v, n);
    return;
  }
#endif
#if defined(ATOM_FAST_POW8)
  const __m256d pd = _mm256_set1_pd(p);
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(v + i, pow8(_mm256_mul_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), vinv), pd));
  if (i < n) {  // the tail through the same vector code, so no value depends on its position
    alignas(32) float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = i; j < n; ++j) a[j - i] = fabs_(x[j]) * inv;
    alignas(32) float out[8];
    _mm256_store_ps(out, pow8(_mm256_load_ps(a), pd));
    for (int64_t j = i; j < n; ++j) v[j] = out[j - i];
  }
  return;
#endif
  for (int64_t i = 0; i < n; ++i) v[i] = pow_general(fabs_(x[i]) * inv, p);
}

// |x|^p for a = |x| >= 0 (or NaN).
template <typename acc_t, int P>
inline acc_t abs_pow(acc_t a, double p) {
  if constexpr (P == 0) {
    return pow_general(a, p);
  } else if constexpr (P > kHalfPowerIndex) {  // p = k + 1/2: sqrt(a) a^k
    acc_t r = sqrt_(a);
    for (int i = 0; i < P - kHalfPowerIndex; ++i) r *= a;
    return r;
  } else {
    acc_t r = a;
    for (int i = 1; i < P; ++i) r *= a;
    return r;
  }
}

// |x|^(p-1) sgn(x): d|x|^p/dx divided by p; 0 at x == 0 for every p > 0 (as the reference).
template <typename acc_t, int P>
inline acc_t abs_pow_grad(acc_t x, double p) {
  if constexpr (P == kHalfPowerIndex + 1) {  // p = 3/2: sqrt|x| sgn(x)
    return copysign_(sqrt_(fabs_(x)), x);
  } else if constexpr (P > kHalfPowerIndex + 1) {  // p = k + 1/2, k >= 2: x sqrt|x| |x|^(k-2)
    const acc_t a = fabs_(x);
    acc_t r = x * sqrt_(a);
    for (int i = 2; i < P - kHalfPowerIndex; ++i) r *= a;
    return r;
  } else if constexpr (P == 1) {
    return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : acc_t(0));
  } else if constexpr (P >= 2) {
    const acc_t a = fabs_(x);
    acc_t r = x;
    for (int i = 2; i < P; ++i) r *= a;
    return r;
  } else {
    // 0 at x == 0 (pow_general gives a * 0); NaN stays NaN
    const acc_t mag = pow_general(fabs_(x), p - 1.0);
    return copysign_(mag, x);
  }
}


// s[i] += |x[i] inv|^p; returns max_i |x[i]| (taken in the same pass: the caller rescales when a
// row raises the sample's max, see side_stats).
// float32 rows of a non-integer power go chunk by chunk: the powers of a chunk into a buffer in L1
// (pow_chunk), then the loop of the integer powers over it.
constexpr int64_t kPowChunk = 256;
template <typename acc_t, int P>
constexpr bool kChunked = P == 0 && sizeof(acc_t) == sizeof(float);

template <typename acc_t, int P>
acc_t spatial_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, double p, acc_t inv) {
  acc_t m = 0;
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p)) return pow16_spatial_row(x, s, n, p, inv);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p, v, len);
#pragma omp simd reduction(max : m)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t a = fabs_(x[b + i]);
        s[b + i] += v[i];
        m = a > m ? a : m;
      }
    }
    return m;
  }
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = fabs_(x[i]);
    s[i] += abs_pow<acc_t, P>(a * inv, p);
    m = a > m ? a : m;
  }
  return m;
}

// sum_i |x[i] inv|^p
template <typename acc_t, int P>
acc_t channel_row(const acc_t* __restrict x, int64_t n, double p, acc_t inv) {
  acc_t t = 0;
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p)) return pow16_channel_row(x, n, p, inv);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p, v, len);
      acc_t u = 0;
#pragma omp simd reduction(+ : u)
      for (int64_t i = 0; i < len; ++i) u += v[i];
      t += u;
    }
    return t;
  }
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += abs_pow<acc_t, P>(fabs_(x[i]) * inv, p);
  return t;
}

// Both at once when ps == pc: s[i] += |x[i] inv|^p, *t = sum_i |x[i] inv|^p; returns max_i |x[i]|.
template <typename acc_t, int P>
acc_t both_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, double p, acc_t inv,
               acc_t* __restrict t_out) {
  acc_t t = 0, m = 0;
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p)) return pow16_both_row(x, s, n, p, inv, t_out);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p, v, len);
      acc_t u = 0;
#pragma omp simd reduction(+ : u) reduction(max : m)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t a = fabs_(x[b + i]);
        s[b + i] += v[i];
        u += v[i];
        m = a > m ? a : m;
      }
      t += u;
    }
    *t_out = t;
    return m;
  }
#pragma omp simd reduction(+ : t) reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = fabs_(x[i]);
    const acc_t v = abs_pow<acc_t, P>(a * inv, p);
    s[i] += v;
    t += v;
    m = a > m ? a : m;
  }
  *t_out = t;
  return m;
}

// Four rows x[0..3] (the same spatial range of four channels) at once: s[i] += sum_j |x[j][i] inv|^p
// with s loaded and stored once per element for the four (the single-row loop's load and store of s
// per element competed with the feature stream for the load/store ports); t_out[j] = sum_i of row
// j (both4 only). Returns the max |x| over the four rows. The general power (chunked) runs the
// single-row loops.
template <typename acc_t, int P>
acc_t spatial4_row(const acc_t* const* x, acc_t* __restrict s, int64_t n, double p, acc_t inv) {
  if constexpr (kChunked<acc_t, P>) {
    acc_t m = 0;
    for (int j = 0; j < 4; ++j) {
      const acc_t mj = spatial_row<acc_t, P>(x[j], s, n, p, inv);
      m = mj > m ? mj : m;
    }
    return m;
  } else {
    const acc_t* __restrict x0 = x[0];
    const acc_t* __restrict x1 = x[1];
    const acc_t* __restrict x2 = x[2];
    const acc_t* __restrict x3 = x[3];
    acc_t m = 0;
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a0 = fabs_(x0[i]), a1 = fabs_(x1[i]), a2 = fabs_(x2[i]), a3 = fabs_(x3[i]);
      s[i] += (abs_pow<acc_t, P>(a0 * inv, p) + abs_pow<acc_t, P>(a1 * inv, p)) +
              (abs_pow<acc_t, P>(a2 * inv, p) + abs_pow<acc_t, P>(a3 * inv, p));
      const acc_t m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3;
      const acc_t mi = m01 > m23 ? m01 : m23;
      m = mi > m ? mi : m;
    }
    return m;
  }
}

template <typename acc_t, int P>
acc_t both4_row(const acc_t* const* x, acc_t* __restrict s, int64_t n, double p, acc_t inv,
                acc_t* __restrict t_out) {
  if constexpr (kChunked<acc_t, P>) {
    acc_t m = 0;
    for (int j = 0; j < 4; ++j) {
      const acc_t mj = both_row<acc_t, P>(x[j], s, n, p, inv, t_out + j);
      m = mj > m ? mj : m;
    }
    return m;
  } else {
    const acc_t* __restrict x0 = x[0];
    const acc_t* __restrict x1 = x[1];
    const acc_t* __restrict x2 = x[2];
    const acc_t* __restrict x3 = x[3];
    acc_t m = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#pragma omp simd reduction(max : m) reduction(+ : t0, t1, t2, t3)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t a0 = fabs_(x0[i]), a1 = fabs_(x1[i]), a2 = fabs_(x2[i]), a3 = fabs_(x3[i]);
      const acc_t v0 = abs_pow<acc_t, P>(a0 * inv, p), v1 = abs_pow<acc_t, P>(a1 * inv, p);
      const acc_t v2 = abs_pow<acc_t, P>(a2 * inv, p), v3 = abs_pow<acc_t, P>(a3 * inv, p);
      s[i] += (v0 + v1) + (v2 + v3);
      t0 += v0;
      t1 += v1;
      t2 += v2;
      t3 += v3;
      const acc_t m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3;
      const acc_t mi = m01 > m23 ? m01 : m23;
      m = mi > m ? mi : m;
    }
    t_out[0] = t0;
    t_out[1] = t1;
    t_out[2] = t2;
    t_out[3] = t3;
    return m;
  }
}

// max_i |x[i]|
template <typename acc_t>
acc_t row_max(const acc_t* __restrict x, int64_t n) {
  acc_t m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = fabs_(x[i]) > m ? fabs_(x[i]) : m;
  return m;
}

// out[i] = |x inv|^(p-1) sgn(x) * gs[i]
template <typename acc_t, int P>
void grad_spatial_row(const acc_t* __restrict x, const acc_t* __restrict gs, acc_t* __restrict out,
                      int64_t n, double p, acc_t inv) {
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p - 1.0)) return pow16_grad_spatial_row(x, gs, out, n, p, inv);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p - 1.0, v, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[b + i] = copysign_(v[i], x[b + i]) * gs[b + i];
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i] * inv, p) * gs[i];
}

// out[i] (+)= |x inv|^(p-1) sgn(x) * gt
template <typename acc_t, int P>
void grad_channel_row(const acc_t* __restrict x, acc_t gt, acc_t* __restrict out, int64_t n,
                      double p, acc_t inv, bool accumulate) {
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p - 1.0)) return pow16_grad_channel_row(x, gt, out, n, p, inv, accumulate);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p - 1.0, v, len);
      acc_t* __restrict o = out + b;
      if (accumulate) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] += copysign_(v[i], x[b + i]) * gt;
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) o[i] = copysign_(v[i], x[b + i]) * gt;
      }
    }
    return;
  }
  if (accumulate) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += abs_pow_grad<acc_t, P>(x[i] * inv, p) * gt;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i] * inv, p) * gt;
  }
}

// ps == pc: out[i] = |x inv|^(p-1) sgn(x) * (gs[i] + gt)
template <typename acc_t, int P>
void grad_both_row(const acc_t* __restrict x, const acc_t* __restrict gs, acc_t gt,
                   acc_t* __restrict out, int64_t n, double p, acc_t inv) {
  if constexpr (kChunked<acc_t, P>) {
#if defined(ATOM_FAST_POW16)
    if (pow16_covers(p - 1.0)) return pow16_grad_both_row(x, gs, gt, out, n, p, inv);
#endif
    alignas(32) float v[kPowChunk];
    for (int64_t b = 0; b < n; b += kPowChunk) {
      const int64_t len = n - b < kPowChunk ? n - b : kPowChunk;
      pow_chunk(x + b, inv, p - 1.0, v, len);
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) out[b + i] = copysign_(v[i], x[b + i]) * (gs[b + i] + gt);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i] * inv, p) * (gs[i] + gt);
}

// sum_i x[i]^2
template <typename acc_t>
acc_t sum_squares(const acc_t* __restrict x, int64_t n) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += x[i] * x[i];
  return t;
}

// out[i] = |x[i]|^p through the non-integer path whatever p is (atom_fast::_general_power, a test
// hook: the row kernels call it only for the powers power_index maps to 0)
template <typename acc_t>
void power_row(const acc_t* __restrict x, acc_t* __restrict out, int64_t n, double p) {
  if constexpr (sizeof(acc_t) == sizeof(float)) {
    pow_chunk(x, acc_t(1), p, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = pow_general(fabs_(x[i]), p);
  }
}

// x[i] *= f
template <typename acc_t>
void scale_row(acc_t* __restrict x, int64_t n, acc_t f) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

// Function tables, indexed by power_index(p): 0 for the general path, the integer powers, then the
// half-integer ones (kernels.h).
template <typename acc_t, int... Ps>
RowKernels<acc_t> make_table(int spatial_index, int channel_index, std::integer_sequence<int, Ps...>) {
  using K = RowKernels<acc_t>;
  static constexpr typename K::Spatial spatial[] = {&spatial_row<acc_t, Ps>...};
  static constexpr typename K::Channel channel[] = {&channel_row<acc_t, Ps>...};
  static constexpr typename K::Both both[] = {&both_row<acc_t, Ps>...};
  static constexpr typename K::Spatial4 spatial4[] = {&spatial4_row<acc_t, Ps>...};
  static constexpr typename K::Both4 both4[] = {&both4_row<acc_t, Ps>...};
  static constexpr typename K::GradSpatial grad_spatial[] = {&grad_spatial_row<acc_t, Ps>...};
  static constexpr typename K::GradChannel grad_channel[] = {&grad_channel_row<acc_t, Ps>...};
  static constexpr typename K::GradBoth grad_both[] = {&grad_both_row<acc_t, Ps>...};
  K k;
  k.spatial = spatial[spatial_index];
  k.channel = channel[channel_index];
  k.both = both[spatial_index];
  k.spatial4 = spatial4[spatial_index];
  k.both4 = both4[spatial_index];
  k.grad_spatial = grad_spatial[spatial_index];
  k.grad_channel = grad_channel[channel_index];
  k.grad_both = grad_both[spatial_index];
  k.row_max = &row_max<acc_t>;
  k.sum_squares = &sum_squares<acc_t>;
  k.scale = &scale_row<acc_t>;
  k.power = &power_row<acc_t>;
  return k;
}

}  // namespace ATOM_FAST_ISA
}  // namespace cpu
}  // namespace atom_fast
