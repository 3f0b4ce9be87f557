// Innermost loops of the CPU op: one channel row F[n, c, 0:HW] at a time, in the accumulation type.
//
// This header is compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp); each
// copy lives in its own namespace atom_fast::cpu::ATOM_FAST_ISA, so the copies never meet at link
// time. It includes nothing: the including file puts every system header before its
// `#pragma GCC target`, so no inline library function is ever compiled for the wider instruction set.
//
// Integer powers 1..kMaxPower are template parameters (the multiplications unroll and the loops
// vectorize); any other power (P == 0) calls std::pow per element.

#ifndef ATOM_FAST_ISA
#error "define ATOM_FAST_ISA before including row_kernels.h"
#endif

namespace atom_fast {
namespace cpu {
namespace ATOM_FAST_ISA {

inline float fabs_(float x) { return __builtin_fabsf(x); }
inline double fabs_(double x) { return __builtin_fabs(x); }

// |x|^p for a = |x| >= 0 (or NaN).
template <typename acc_t, int P>
inline acc_t abs_pow(acc_t a, acc_t p) {
  if constexpr (P == 0) {
    return a == acc_t(0) ? acc_t(0) : std::pow(a, p);
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
    const acc_t a = fabs_(x);
    if (a == acc_t(0)) return acc_t(0);
    const acc_t mag = std::pow(a, p - acc_t(1));
    return x > acc_t(0) ? mag : (x < acc_t(0) ? -mag : x);  // NaN stays NaN
  }
}

// s[i] += |x[i]|^p
template <typename acc_t, int P>
void spatial_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, acc_t p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] += abs_pow<acc_t, P>(fabs_(x[i]), p);
}

// sum_i |x[i]|^p
template <typename acc_t, int P>
acc_t channel_row(const acc_t* __restrict x, int64_t n, acc_t p) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += abs_pow<acc_t, P>(fabs_(x[i]), p);
  return t;
}

// Both at once when ps == pc: s[i] += |x[i]|^p, returns sum_i |x[i]|^p.
template <typename acc_t, int P>
acc_t both_row(const acc_t* __restrict x, acc_t* __restrict s, int64_t n, acc_t p) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = abs_pow<acc_t, P>(fabs_(x[i]), p);
    s[i] += v;
    t += v;
  }
  return t;
}

// out[i] = |x|^(p-1) sgn(x) * gs[i]
template <typename acc_t, int P>
void grad_spatial_row(const acc_t* __restrict x, const acc_t* __restrict gs, acc_t* __restrict out,
                      int64_t n, acc_t p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i], p) * gs[i];
}

// out[i] (+)= |x|^(p-1) sgn(x) * gt
template <typename acc_t, int P>
void grad_channel_row(const acc_t* __restrict x, acc_t gt, acc_t* __restrict out, int64_t n,
                      acc_t p, bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += abs_pow_grad<acc_t, P>(x[i], p) * gt;
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i], p) * gt;
  }
}

// ps == pc: out[i] = |x|^(p-1) sgn(x) * (gs[i] + gt)
template <typename acc_t, int P>
void grad_both_row(const acc_t* __restrict x, const acc_t* __restrict gs, acc_t gt,
                   acc_t* __restrict out, int64_t n, acc_t p) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = abs_pow_grad<acc_t, P>(x[i], p) * (gs[i] + gt);
}

// sum_i x[i]^2
template <typename acc_t>
acc_t sum_squares(const acc_t* __restrict x, int64_t n) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += x[i] * x[i];
  return t;
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
  k.sum_squares = &sum_squares<acc_t>;
  return k;
}

}  // namespace ATOM_FAST_ISA
}  // namespace cpu
}  // namespace atom_fast
