// Innermost loops of the CPU op: one channel row F[n, c, 0:HW] at a time, in the accumulation type.
//
// This header is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp); each
// copy lives in its own namespace atom_fast::cpu::ATOM_FAST_ISA, so the copies never meet at link
// time. It includes nothing: the including file puts every system header before its
// `#pragma GCC target`, so no inline library function is ever compiled for the wider instruction set.
//
// Every kernel reads x' = |x| * inv, the row scaled by its sample's 1/m (see constants.h), so
// |x'| <= 1 and no power overflows. Integer powers 1..kMaxUnrolledPower are template parameters
// (the multiplications unroll and the loops vectorize); any other power (P == 0) is
// exp(p * log x'), with a branch-free log and exp below that vectorize in float32 (float64 keeps
// std::pow).

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

inline int32_t bits_of(float x) {
  int32_t b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
}
inline float float_of(int32_t b) {
  float x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
}

// log(a) for a normal float a > 0 (subnormals read as a normal of the same bits; callers only
// feed |x'| <= 1, where they contribute < 1e-38^p). a = 2^e * q with q in [sqrt(1/2), sqrt(2)),
// log q = 2 atanh(z), z = (q - 1) / (q + 1), |z| <= 0.1716: the odd series to z^13 leaves a
// relative error below 1e-10, so the result is within ~1 ulp.
inline float log_pos(float a) {
  const int32_t b = bits_of(a);
  const int32_t mant = (b & 0x007fffff) | 0x3f800000;  // q in [1, 2)
  int32_t e = ((b >> 23) & 0xff) - 127;
  float q = float_of(mant);
  const bool big = q > 1.41421356f;
  q = big ? q * 0.5f : q;
  e = big ? e + 1 : e;
  const float z = (q - 1.0f) / (q + 1.0f);
  const float z2 = z * z;
  // 2 * (1 + z2/3 + z2^2/5 + ... + z2^6/13)
  float poly = 2.0f / 13.0f;
  poly = poly * z2 + 2.0f / 11.0f;
  poly = poly * z2 + 2.0f / 9.0f;
  poly = poly * z2 + 2.0f / 7.0f;
  poly = poly * z2 + 2.0f / 5.0f;
  poly = poly * z2 + 2.0f / 3.0f;
  const float log_q = z * (poly * z2 + 2.0f);
  const float ef = static_cast<float>(e);
  // e * ln 2 in two parts (the high part has 9 bits, so e * high is exact for |e| < 2^15)
  return ef * 0.693359375f + (log_q + ef * -2.12194440e-4f);
}

// exp(y) for y <= 88 (above 88.72: +inf; in between it returns e^88), 0 below -86. The result
// stays a normal float: a subnormal one would cost a ~100-cycle microcode assist per element, and
// every exact zero of post-ReLU features lands at the lower clamp. y = n ln2 + r, |r| <= ln2/2;
// exp(r) by its Taylor series to r^7 (truncation < 6e-9 relative), times 2^n.
inline float exp_(float y) {
  const float yc = y < -86.0f ? -86.0f : (y > 88.0f ? 88.0f : y);
  const float n = __builtin_roundf(yc * 1.44269504f);
  const float r = (yc - n * 0.693359375f) - n * -2.12194440e-4f;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float v = poly * float_of((static_cast<int32_t>(n) + 127) << 23);
  return y < -86.0f ? 0.0f : (y > 88.72f ? __builtin_inff() : v);
}

// a^p for a >= 0 (a NaN gives NaN), p not an unrolled integer.
inline float pow_general(float a, float p) {
  const float v = exp_(p * log_pos(a));
  return a > 0.0f ? v : a * 0.0f;
}
inline double pow_general(double a, double p) { return a > 0.0 ? std::pow(a, p) : a * 0.0; }

// |x|^p for a = |x| >= 0 (or NaN).
template <typename acc_t, int P>
inline acc_t abs_pow(acc_t a, acc_t p) {
  if constexpr (P == 0) {
    return pow_general(a, p);
  } else {
    acc_t r = a;
    for (int i = 1; i < P; ++i) r *= a;
    return r;
  }
}

// |x|^(p-1) sgn(x): d|x|^p/dx divided by p; 0 at x == 0 for every p > 0 (as the reference).
template <typename acc_t, int P>
inline acc_t abs_pow_grad(acc_t x, acc_t p) {
  if constexpr (P == 1) {
    return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : acc_t(0));
  } else if constexpr (P >= 2) {
    const acc_t a = fabs_(x);
    acc_t r = x;
    for (int i = 2; i < P; ++i) r *= a;
    return r;
  } else {
    // 0 at x == 0 (pow_general gives a * 0); NaN stays NaN
    const acc_t mag = pow_general(fabs_(x), p - acc_t(1));
    return copysign_(mag, x);
  }
}


// s[i] += |x[i] inv|^p; returns max_i |x[i]| (taken in the same pass: the caller rescales when a
// row raises the sample's max, see side_stats).
template <typename acc_t, int P>
acc_t spatial_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, acc_t p, acc_t inv) {
  acc_t m = 0;
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
acc_t channel_row(const acc_t* __restrict x, int64_t n, acc_t p, acc_t inv) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += abs_pow<acc_t, P>(fabs_(x[i]) * inv, p);
  return t;
}

// Both at once when ps == pc: s[i] += |x[i] inv|^p, *t = sum_i |x[i] inv|^p; returns max_i |x[i]|.
template <typename acc_t, int P>
acc_t both_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, acc_t p, acc_t inv,
               acc_t* __restrict t_out) {
  acc_t t = 0, m = 0;
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
                      int64_t n, acc_t p, acc_t inv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i] * inv, p) * gs[i];
}

// out[i] (+)= |x inv|^(p-1) sgn(x) * gt
template <typename acc_t, int P>
void grad_channel_row(const acc_t* __restrict x, acc_t gt, acc_t* __restrict out, int64_t n,
                      acc_t p, acc_t inv, bool accumulate) {
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
                   acc_t* __restrict out, int64_t n, acc_t p, acc_t inv) {
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

// x[i] *= f
template <typename acc_t>
void scale_row(acc_t* __restrict x, int64_t n, acc_t f) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

// Function tables, indexed by power_index(p): 0 for the general path, else the integer power.
template <typename acc_t, int... Ps>
RowKernels<acc_t> make_table(int spatial_index, int channel_index, std::integer_sequence<int, Ps...>) {
  using K = RowKernels<acc_t>;
  static constexpr typename K::Spatial spatial[] = {&spatial_row<acc_t, Ps>...};
  static constexpr typename K::Channel channel[] = {&channel_row<acc_t, Ps>...};
  static constexpr typename K::Both both[] = {&both_row<acc_t, Ps>...};
  static constexpr typename K::GradSpatial grad_spatial[] = {&grad_spatial_row<acc_t, Ps>...};
  static constexpr typename K::GradChannel grad_channel[] = {&grad_channel_row<acc_t, Ps>...};
  static constexpr typename K::GradBoth grad_both[] = {&grad_both_row<acc_t, Ps>...};
  K k;
  k.spatial = spatial[spatial_index];
  k.channel = channel[channel_index];
  k.both = both[spatial_index];
  k.grad_spatial = grad_spatial[spatial_index];
  k.grad_channel = grad_channel[channel_index];
  k.grad_both = grad_both[spatial_index];
  k.row_max = &row_max<acc_t>;
  k.sum_squares = &sum_squares<acc_t>;
  k.scale = &scale_row<acc_t>;
  return k;
}

}  // namespace ATOM_FAST_ISA
}  // namespace cpu
}  // namespace atom_fast
