// Numbers and the normalization rule shared by the CPU and CUDA code of the native op, defined once
// here (atom_fast/constants.py is their Python home; tests/backends/test_native_scale.py checks they agree,
// through atom_fast._C.constants()).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ATOM_FAST_HOST_DEVICE __host__ __device__
#else
#define ATOM_FAST_HOST_DEVICE
#endif

namespace atom_fast {

// torch.nn.functional.normalize's floor on the L2 norm: x / max(||x||, kNormEps).
constexpr double kNormEps = 1e-12;

// Integer powers 1..kMaxUnrolledPower are unrolled into multiplications; others take a general path.
constexpr int kMaxUnrolledPower = 16;

// A sample's stats row: [s' (H*W) | t' (C) | m | ||s'|| | ||t'||], H*W + C + kStatsExtra values.
constexpr int kStatsExtra = 3;

// Per-sample scaling (docs/scale.md). The stats hold x' = x / m^p for a scale m > 0 (the sample's
// largest |F|), so nothing overflows at large p; x_hat = x / max(||x||, eps) = x' * r, with
//   r = 1 / ||x'||         when ||x|| = m^p ||x'|| >= eps (the unit vector, independent of m),
//   r = m^p / eps          below the floor (then r < 1 / ||x'||, so it cannot overflow).
// The floor is decided on the unscaled norm, in log space. `above` says which case holds (the
// backward drops the projection term below the floor, as torch's clamp_min does).
struct Normalizer {
  double r;
  bool above;
};

ATOM_FAST_HOST_DEVICE inline Normalizer normalizer(double m, double scaled_norm, double p) {
  const double log_scale = p * log(m);
  if (log_scale + log(scaled_norm) >= log(kNormEps)) return {1.0 / scaled_norm, true};
  return {exp(log_scale - log(kNormEps)), false};
}

}  // namespace atom_fast
