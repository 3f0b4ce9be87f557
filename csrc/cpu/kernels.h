// The CPU op's row kernels, one table per instruction set, chosen at run time.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "constants.h"

namespace atom_fast {
namespace cpu {

// The row kernels' template index of a power: the integer power p itself in 1..kMaxUnrolledPower
// (unrolled multiplications, as in the Triton kernels); kMaxUnrolledPower + k for the half-integer
// p = k + 1/2, k in 1..kMaxUnrolledPower - 1 (|x|^k sqrt|x|: the multiplications and one
// correctly rounded square root); 0 for every other power (the general path, 2^(p log2 |x|)).
constexpr int kHalfPowerIndex = kMaxUnrolledPower;  // index of p = k + 1/2 is kHalfPowerIndex + k
inline int power_index(double p) {
  if (p >= 1 && p <= kMaxUnrolledPower && p == std::floor(p)) return static_cast<int>(p);
  const double k = p - 0.5;
  if (k >= 1 && k <= kMaxUnrolledPower - 1 && k == std::floor(k))
    return kHalfPowerIndex + static_cast<int>(k);
  return 0;
}

template <typename acc_t>
struct RowKernels {
  // the last acc_t argument `inv` scales the row: x' = x * inv (1/m of its sample)
  // the power p is a double in every type (a float32 p would move |x|^p by |p log x| ulps)
  using Spatial = acc_t (*)(const acc_t*, acc_t*, int64_t, double, acc_t);
  using Channel = acc_t (*)(const acc_t*, int64_t, double, acc_t);
  using Both = acc_t (*)(const acc_t*, acc_t*, int64_t, double, acc_t, acc_t*);
  using Spatial4 = acc_t (*)(const acc_t* const*, acc_t*, int64_t, double, acc_t);
  using Both4 = acc_t (*)(const acc_t* const*, acc_t*, int64_t, double, acc_t, acc_t*);
  using GradSpatial = void (*)(const acc_t*, const acc_t*, acc_t*, int64_t, double, acc_t);
  using GradChannel = void (*)(const acc_t*, acc_t, acc_t*, int64_t, double, acc_t, bool);
  using GradBoth = void (*)(const acc_t*, const acc_t*, acc_t, acc_t*, int64_t, double, acc_t);
  using Reduce = acc_t (*)(const acc_t*, int64_t);
  using Scale = void (*)(acc_t*, int64_t, acc_t);
  using Power = void (*)(const acc_t*, acc_t*, int64_t, double);
  Spatial spatial;          // s[i] += |x'[i]|^ps, returns max_i |x[i]|
  Channel channel;          // returns sum_i |x'[i]|^pc
  Both both;                // both when ps == pc (*t = the sum), returns max_i |x[i]|
  // the same for four rows x[0..3] of one spatial range at once (s read and written once for
  // the four; t[j] the sum of row j); return the max over the four rows
  Spatial4 spatial4;
  Both4 both4;
  GradSpatial grad_spatial; // out[i] = |x'|^(ps-1) sgn(x) gs[i]
  GradChannel grad_channel; // out[i] (+)= |x'|^(pc-1) sgn(x) gt
  GradBoth grad_both;       // out[i] = |x'|^(p-1) sgn(x) (gs[i] + gt) when ps == pc
  Reduce row_max;           // max_i |x[i]|
  Reduce sum_squares;       // sum_i x[i]^2
  Scale scale;              // x[i] *= f
  Power power;              // out[i] = |x[i]|^p by the non-integer path (the test hook's)
};

// 0 (general), 1..16 (integers), 17..31 (1.5 .. 15.5)
using PowerSequence = std::make_integer_sequence<int, 2 * kMaxUnrolledPower>;

// One definition per instruction set (kernels_default.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
namespace isa_default {
RowKernels<float> row_kernels_float(int spatial_index, int channel_index);
RowKernels<double> row_kernels_double(int spatial_index, int channel_index);
}  // namespace isa_default
namespace isa_avx2 {
RowKernels<float> row_kernels_float(int spatial_index, int channel_index);
RowKernels<double> row_kernels_double(int spatial_index, int channel_index);
}  // namespace isa_avx2
namespace isa_avx512 {  // the AVX2 kernels with an AVX-512F float32 general power
RowKernels<float> row_kernels_float(int spatial_index, int channel_index);
RowKernels<double> row_kernels_double(int spatial_index, int channel_index);
}  // namespace isa_avx512

// The best the CPU has of "avx512" (AVX-512F, AVX2 and FMA), "avx2" (AVX2 and FMA) and "default",
// unless ATOM_FAST_CPU_ISA names one (it must be one the CPU has).
const char* selected_isa();

template <typename acc_t>
RowKernels<acc_t> row_kernels(double ps, double pc);

}  // namespace cpu
}  // namespace atom_fast
