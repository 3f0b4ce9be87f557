// CUDA implementation of the atom_fast ops (schemas in csrc/ops.cpp): the same fused algorithm as
// the CPU op and the Triton kernels, for machines where Triton is not installed.
//
// Forward, per side:  stats_kernel       one block per sample: the sample's max |F| = m first (a
//                                         block reduction), then one pass over F[n]: each warp takes
//                                         channel rows (coalesced along H*W), adds |x|^ps into its
//                                         own shared-memory copy of the spatial vector and reduces
//                                         |x|^pc along the row with shuffles; the warps' copies are
//                                         then summed in a fixed order. H*W is walked in chunks
//                                         that fit shared memory. Powers are of |F| / m (<= 1), so
//                                         nothing overflows at large p (constants.h).
//                      factor_kernel      per sample, r with x_hat = x' * r (the eps floor decided
//                                         on the unscaled norm, in log space);
// Then per layer:      class_kernel       one block per class: D_k and the weighted loss terms;
//                      sum_kernel         the loss, summed over classes in order.
// Backward, per side:  class_of_kernel    the class of each sample from offsets/order;
//                      vector_grad_kernel one block per sample: d loss / d s_n, d t_n through the
//                                         normalization (premultiplied by the power);
//                      grad_kernel        one pass: dF = |F/m|^(ps-1) sgn(F) gs[hw] + |F/m|^(pc-1) sgn(F) gt[c]
//                                         (the 1/m of the chain rule is folded into gs, gt).
// No atomics: every sum has a fixed order, so results are bitwise reproducible. No host sync.
// Launch sizes are first choices, not tuned on a GPU yet (docs/gpu.md).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"

namespace atom_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunkBytes = 4096;  // per warp: its copy of one chunk of the spatial vector

// |x|^p for a = |x|: integer powers 1..kMaxUnrolledPower by repeated multiplication, others with pow.
struct Power {
  int ip;     // the power if it is an integer in 1..kMaxUnrolledPower, else 0
  double p;
};

inline Power make_power(double p) {
  const bool integer = p >= 1 && p <= kMaxUnrolledPower && p == std::floor(p);
  return {integer ? static_cast<int>(p) : 0, p};
}

template <typename acc_t>
__device__ __forceinline__ acc_t abs_pow(acc_t a, Power pw) {
  if (pw.ip > 0) {
    acc_t r = a;
    for (int i = 1; i < pw.ip; ++i) r *= a;
    return r;
  }
  return a == acc_t(0) ? acc_t(0) : pow(a, static_cast<acc_t>(pw.p));
}

// |x|^(p-1) sgn(x), 0 at x == 0.
template <typename acc_t>
__device__ __forceinline__ acc_t abs_pow_grad(acc_t x, Power pw) {
  if (pw.ip == 1) return x > acc_t(0) ? acc_t(1) : (x < acc_t(0) ? acc_t(-1) : acc_t(0));
  const acc_t a = fabs(x);
  if (pw.ip >= 2) {
    acc_t r = x;
    for (int i = 2; i < pw.ip; ++i) r *= a;
    return r;
  }
  if (a == acc_t(0)) return acc_t(0);
  const acc_t mag = pow(a, static_cast<acc_t>(pw.p - 1.0));
  return x > acc_t(0) ? mag : (x < acc_t(0) ? -mag : x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block in a fixed order; every thread gets the result. `scratch` holds kWarps values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Max over the block; every thread gets the result. NaN may be skipped (it reaches the stats
// through x' anyway).
template <typename acc_t>
__device__ acc_t block_max(acc_t v, acc_t* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total = fmax(total, scratch[w]);
  return total;
}

// stats[n] = [s' (HW) | t' (C) | m | ||s'|| | ||t'||], x' = x / m^p with m = max |F[n]| (1 for an
// all-zero, subnormal or non-finite sample); a disabled term is written as zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) stats_kernel(
    const scalar_t* __restrict__ F, acc_t* __restrict__ stats, int64_t C, int64_t HW,
    int64_t stride_n, Power ps, Power pc, bool has_s, bool has_t, bool same) {
  constexpr int chunk = kChunkBytes / sizeof(acc_t);
  __shared__ acc_t part[kWarps][chunk];
  __shared__ acc_t scratch[kWarps];
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* f = F + n * stride_n;
  acc_t* s = stats + n * (HW + C + kStatsExtra);
  acc_t* t = s + HW;
  acc_t m = 0;
  for (int64_t i = threadIdx.x; i < C * HW; i += kThreads) m = fmax(m, fabs(static_cast<acc_t>(f[i])));
  m = block_max(m, scratch);
  // inf: x' = inf * 0 = NaN, the reference's NaN; 0 or subnormal: no scaling
  const acc_t inv = m >= std::numeric_limits<acc_t>::min() ? acc_t(1) / m : acc_t(1);
  acc_t s_sq = 0;
  for (int64_t h0 = 0; h0 < HW; h0 += chunk) {
    const int len = static_cast<int>(HW - h0 < chunk ? HW - h0 : chunk);
    for (int i = lane; i < len; i += 32) part[warp][i] = 0;
    // Row c belongs to warp c % kWarps in every chunk, so t[c] has a single writer.
    for (int64_t c = warp; c < C; c += kWarps) {
      const scalar_t* row = f + c * HW + h0;
      acc_t t_part = 0;
      for (int i = lane; i < len; i += 32) {
        const acc_t a = fabs(static_cast<acc_t>(row[i])) * inv;
        if (has_s) {
          const acc_t v = abs_pow(a, ps);
          part[warp][i] += v;
          if (same) t_part += v;
        }
        if (has_t && !same) t_part += abs_pow(a, pc);
      }
      t_part = warp_sum(t_part);
      if (lane == 0) t[c] = (h0 == 0 ? acc_t(0) : t[c]) + (has_t ? t_part : acc_t(0));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < len; i += kThreads) {
      acc_t v = 0;
      for (int w = 0; w < kWarps; ++w) v += part[w][i];
      s[h0 + i] = v;
      s_sq += v * v;
    }
    __syncthreads();  // part is reused by the next chunk; t[] stores become visible
  }
  const acc_t ns = block_sum(s_sq, scratch);
  acc_t t_sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) t_sq += t[c] * t[c];
  const acc_t nt = block_sum(t_sq, scratch);
  if (threadIdx.x == 0) {
    s[HW + C] = (m >= std::numeric_limits<acc_t>::min() && isfinite(m)) ? m : acc_t(1);
    s[HW + C + 1] = sqrt(ns);
    s[HW + C + 2] = sqrt(nt);
  }
}

// factors[n] = (r_s, r_t): x_hat = x' * r for sample n's spatial and channel parts.
template <typename acc_t>
__global__ void factor_kernel(const acc_t* __restrict__ stats, acc_t* __restrict__ factors,
                              int64_t N, int64_t C, int64_t HW, double ps, double pc) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  const acc_t* x = stats + n * (HW + C + kStatsExtra);
  const double m = x[HW + C];
  factors[2 * n] = static_cast<acc_t>(normalizer(m, x[HW + C + 1], ps).r);
  factors[2 * n + 1] = static_cast<acc_t>(normalizer(m, x[HW + C + 2], pc).r);
}

// Members of class k: rows order[offsets[k] .. offsets[k+1]) (or the indices themselves).
__device__ __forceinline__ int64_t member(const int64_t* order, int64_t i) {
  return order != nullptr ? order[i] : i;
}

// Entry l of class members rows[i0:i1) summed: sum_i stats[row_i, l] * factors[row_i, part].
template <typename acc_t>
__device__ __forceinline__ acc_t member_sum(const acc_t* __restrict stats,
                                            const acc_t* __restrict factors,
                                            const int64_t* __restrict order, int64_t i0,
                                            int64_t i1, int64_t row_len, int64_t l, int part) {
  acc_t sum = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t row = member(order, i);
    sum += stats[row * row_len + l] * factors[2 * row + part];
  }
  return sum;
}

// Class k's differences (one block per class): D_k[l] = real(l) / nr - (the synthetic members'
// sum of entry l) / ns into diffs, and terms[k] = ws ||D_k(s)||^2 + wc ||D_k(t)||^2. real(l) is the
// real side's class sum of entry l (from its members' stats, or given as sums).
template <typename acc_t, typename Real>
__device__ __forceinline__ void class_difference(Real real, const acc_t* __restrict__ syn_stats,
                                 const acc_t* __restrict__ syn_factors,
                                 const int64_t* __restrict__ syn_order, int64_t s0, int64_t s1,
                                 acc_t nr, acc_t ns, int64_t k, int64_t C, int64_t HW, acc_t ws,
                                 acc_t wc, acc_t* __restrict__ diffs, acc_t* __restrict__ terms,
                                 acc_t* scratch) {
  const int64_t L = HW + C, row_len = HW + C + kStatsExtra;
  acc_t sq_s = 0, sq_t = 0;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    const acc_t sum_r = real(l);
    const acc_t sum_s = member_sum(syn_stats, syn_factors, syn_order, s0, s1, row_len, l,
                                   l < HW ? 0 : 1);
    const acc_t d = sum_r / nr - sum_s / ns;
    diffs[k * L + l] = d;
    if (l < HW) sq_s += d * d; else sq_t += d * d;
  }
  sq_s = block_sum(sq_s, scratch);
  sq_t = block_sum(sq_t, scratch);
  if (threadIdx.x == 0) terms[k] = ws * sq_s + wc * sq_t;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) class_kernel(
    const acc_t* __restrict__ real_stats, const acc_t* __restrict__ syn_stats,
    const acc_t* __restrict__ real_factors, const acc_t* __restrict__ syn_factors,
    const int64_t* __restrict__ real_offsets, const int64_t* __restrict__ syn_offsets,
    const int64_t* __restrict__ real_order, const int64_t* __restrict__ syn_order,
    acc_t* __restrict__ diffs, acc_t* __restrict__ terms, int64_t C, int64_t HW, acc_t ws,
    acc_t wc) {
  __shared__ acc_t scratch[kWarps];
  const int64_t k = blockIdx.x, row_len = HW + C + kStatsExtra;
  const int64_t r0 = real_offsets[k], r1 = real_offsets[k + 1];
  const int64_t s0 = syn_offsets[k], s1 = syn_offsets[k + 1];
  const acc_t nr = static_cast<acc_t>(r1 - r0 > 0 ? r1 - r0 : 1);
  const acc_t ns = static_cast<acc_t>(s1 - s0 > 0 ? s1 - s0 : 1);
  const auto real = [=](int64_t l) {
    return member_sum(real_stats, real_factors, real_order, r0, r1, row_len, l, l < HW ? 0 : 1);
  };
  class_difference(real, syn_stats, syn_factors, syn_order, s0, s1, nr, ns, k, C, HW, ws, wc,
                   diffs, terms, scratch);
}

// S_k, T_k = sum over class k's members of x' * r (one block per class, members in order).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) sums_kernel(
    const acc_t* __restrict__ stats, const acc_t* __restrict__ factors,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ order, acc_t* __restrict__ S,
    acc_t* __restrict__ T, int64_t C, int64_t HW) {
  const int64_t k = blockIdx.x, L = HW + C, row_len = HW + C + kStatsExtra;
  const int64_t i0 = offsets[k], i1 = offsets[k + 1];
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    const acc_t sum = member_sum(stats, factors, order, i0, i1, row_len, l, l < HW ? 0 : 1);
    if (l < HW) S[k * HW + l] = sum; else T[k * C + l - HW] = sum;
  }
}

// class_kernel with the real side given as class sums and counts (a null sums pointer: zeros).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) class_from_sums_kernel(
    const acc_t* __restrict__ real_spatial, const acc_t* __restrict__ real_channel,
    const int64_t* __restrict__ real_counts, const acc_t* __restrict__ syn_stats,
    const acc_t* __restrict__ syn_factors, const int64_t* __restrict__ syn_offsets,
    const int64_t* __restrict__ syn_order, acc_t* __restrict__ diffs, acc_t* __restrict__ terms,
    int64_t C, int64_t HW, acc_t ws, acc_t wc) {
  __shared__ acc_t scratch[kWarps];
  const int64_t k = blockIdx.x;
  const int64_t s0 = syn_offsets[k], s1 = syn_offsets[k + 1];
  const acc_t nr = static_cast<acc_t>(real_counts[k] > 0 ? real_counts[k] : 1);
  const acc_t ns = static_cast<acc_t>(s1 - s0 > 0 ? s1 - s0 : 1);
  const auto real = [=](int64_t l) {
    return l < HW ? (real_spatial != nullptr ? real_spatial[k * HW + l] : acc_t(0))
                  : (real_channel != nullptr ? real_channel[k * C + l - HW] : acc_t(0));
  };
  class_difference(real, syn_stats, syn_factors, syn_order, s0, s1, nr, ns, k, C, HW, ws, wc,
                   diffs, terms, scratch);
}

template <typename acc_t>
__global__ void sum_kernel(const acc_t* __restrict__ terms, int64_t K, acc_t* __restrict__ loss) {
  acc_t total = 0;
  for (int64_t k = 0; k < K; ++k) total += terms[k];
  *loss = total;
}

__global__ void class_of_kernel(const int64_t* __restrict__ offsets,
                                const int64_t* __restrict__ order, int64_t* __restrict__ cls) {
  const int64_t k = blockIdx.x;
  for (int64_t i = offsets[k] + threadIdx.x; i < offsets[k + 1]; i += blockDim.x)
    cls[member(order, i)] = k;
}

// out = power / m * d loss / d x' for x' = a scaled part of a stats row (see the CPU op's
// normalize_grad): above the floor (x_hat . g) projects out, below it not.
template <typename acc_t>
__device__ void normalize_grad(const acc_t* x, Normalizer nz, acc_t inv_m, const acc_t* D,
                               acc_t coef, acc_t power, int64_t len, acc_t* out, acc_t* scratch) {
  const acc_t r = static_cast<acc_t>(nz.r);
  acc_t dot = 0;
  for (int64_t l = threadIdx.x; l < len; l += kThreads) dot += x[l] * (coef * D[l]);
  dot = block_sum(dot, scratch);
  const acc_t proj = nz.above ? dot * r * r * r : acc_t(0);
  const acc_t f = power * inv_m;
  for (int64_t l = threadIdx.x; l < len; l += kThreads)
    out[l] = f * ((coef * D[l]) * r - x[l] * proj);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) vector_grad_kernel(
    const acc_t* __restrict__ stats, const acc_t* __restrict__ diffs,
    const int64_t* __restrict__ offsets, const int64_t* __restrict__ cls,
    const acc_t* __restrict__ grad_loss, acc_t* __restrict__ G, int64_t C, int64_t HW, acc_t sign,
    acc_t ws, acc_t wc, double ps, double pc, bool has_s, bool has_t) {
  // ps, pc stay double: normalizer() decides the eps floor in float64 with them, as the CPU op
  // does (a float32 p would move that decision for float32 features)
  __shared__ acc_t scratch[kWarps];
  const int64_t n = blockIdx.x, k = cls[n], L = HW + C;
  const acc_t count = static_cast<acc_t>(offsets[k + 1] - offsets[k]);
  const acc_t coef = sign * acc_t(2) * grad_loss[0] / count;
  const acc_t* x = stats + n * (L + kStatsExtra);
  const acc_t inv_m = acc_t(1) / x[L];
  if (has_s)
    normalize_grad(x, normalizer(x[L], x[L + 1], ps), inv_m, diffs + k * L, coef * ws,
                   static_cast<acc_t>(ps), HW, G + n * L, scratch);
  if (has_t)
    normalize_grad(x + HW, normalizer(x[L], x[L + 2], pc), inv_m, diffs + k * L + HW, coef * wc,
                   static_cast<acc_t>(pc), C, G + n * L + HW, scratch);
}

// Block (n, row group): rows c of sample n, flattened over (c, hw) so small H*W keeps threads busy.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_kernel(
    const scalar_t* __restrict__ F, const acc_t* __restrict__ stats, const acc_t* __restrict__ G,
    scalar_t* __restrict__ dF, int64_t C, int64_t HW, int64_t rows, Power ps, Power pc, bool has_s,
    bool has_t, bool same) {
  const int64_t n = blockIdx.x, c0 = blockIdx.y * rows;
  const int64_t c1 = c0 + rows < C ? c0 + rows : C;
  const int64_t base = (n * C + c0) * HW, count = (c1 - c0) * HW;
  const acc_t* gs = G + n * (HW + C);
  const acc_t* gt = gs + HW;
  const acc_t inv_m = acc_t(1) / stats[n * (HW + C + kStatsExtra) + HW + C];
  for (int64_t idx = threadIdx.x; idx < count; idx += kThreads) {
    const int64_t c = c0 + idx / HW, hw = idx % HW;
    const acc_t x = static_cast<acc_t>(F[base + idx]) * inv_m;
    acc_t g;
    if (same) {
      g = abs_pow_grad(x, ps) * (gs[hw] + gt[c]);
    } else {
      g = has_s ? abs_pow_grad(x, ps) * gs[hw] : acc_t(0);
      if (has_t) g += abs_pow_grad(x, pc) * gt[c];
    }
    dF[base + idx] = static_cast<scalar_t>(g);
  }
}

const int64_t* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& real_in, const at::Tensor& syn_in, const at::Tensor& real_offsets_in,
    const at::Tensor& syn_offsets_in, const c10::optional<at::Tensor>& real_order_in,
    const c10::optional<at::Tensor>& syn_order_in, double ps, double pc, double ws, double wc) {
  const auto a = check_forward(real_in, syn_in, real_offsets_in, syn_offsets_in, real_order_in,
                               syn_order_in, ps, pc, ws, wc);
  const c10::cuda::CUDAGuard guard(real_in.device());
  const at::Tensor real = sample_contiguous(real_in), syn = sample_contiguous(syn_in);
  const at::Tensor real_offsets = real_offsets_in.contiguous(), syn_offsets = syn_offsets_in.contiguous();
  c10::optional<at::Tensor> real_order, syn_order;
  if (real_order_in.has_value()) real_order = real_order_in->contiguous();
  if (syn_order_in.has_value()) syn_order = syn_order_in->contiguous();
  const int64_t C = a.C, HW = a.HW, K = a.K;
  const auto acc_type = accumulation_type(real.scalar_type());
  const auto opts = real.options().dtype(acc_type);
  at::Tensor real_stats = at::empty({real.size(0), HW + C + kStatsExtra}, opts);
  at::Tensor syn_stats = at::empty({syn.size(0), HW + C + kStatsExtra}, opts);
  at::Tensor real_factors = at::empty({real.size(0), 2}, opts);
  at::Tensor syn_factors = at::empty({syn.size(0), 2}, opts);
  at::Tensor diffs = at::empty({K, HW + C}, opts);
  at::Tensor terms = at::empty({K}, opts);
  at::Tensor loss = at::empty({}, opts);
  const bool has_s = ws != 0, has_t = wc != 0, same = has_s && has_t && ps == pc;
  const Power pws = make_power(ps), pwc = make_power(pc);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const auto& [F, st, fac] :
         {std::tuple<const at::Tensor*, at::Tensor*, at::Tensor*>{&real, &real_stats, &real_factors},
          {&syn, &syn_stats, &syn_factors}}) {
      const int64_t N = F->size(0);
      stats_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
          F->data_ptr<scalar_t>(), st->data_ptr<acc_t>(), C, HW, F->stride(0), pws, pwc, has_s, has_t, same);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      factor_kernel<acc_t><<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          st->data_ptr<acc_t>(), fac->data_ptr<acc_t>(), N, C, HW, ps, pc);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    class_kernel<acc_t><<<K, kThreads, 0, stream>>>(
        real_stats.data_ptr<acc_t>(), syn_stats.data_ptr<acc_t>(), real_factors.data_ptr<acc_t>(),
        syn_factors.data_ptr<acc_t>(), real_offsets.data_ptr<int64_t>(),
        syn_offsets.data_ptr<int64_t>(), optional_ptr(real_order), optional_ptr(syn_order),
        diffs.data_ptr<acc_t>(), terms.data_ptr<acc_t>(), C, HW,
        static_cast<acc_t>(has_s ? ws : 0.0), static_cast<acc_t>(has_t ? wc : 0.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_kernel<acc_t><<<1, 1, 0, stream>>>(terms.data_ptr<acc_t>(), K, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, real_stats, syn_stats, diffs};
}

at::Tensor attention_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& features,
                                   const at::Tensor& stats_in, const at::Tensor& diffs_in,
                                   const at::Tensor& offsets_in,
                                   const c10::optional<at::Tensor>& order_in, double sign,
                                   double ps, double pc, double ws, double wc) {
  check_backward(grad_loss, features, stats_in, diffs_in, offsets_in, order_in, sign, ps, pc, ws, wc);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor F = features.contiguous(), stats = stats_in.contiguous();
  const at::Tensor diffs = diffs_in.contiguous(), offsets = offsets_in.contiguous();
  c10::optional<at::Tensor> order;
  if (order_in.has_value()) order = order_in->contiguous();
  const int64_t N = F.size(0), C = F.size(1), HW = F.size(2) * F.size(3);
  const int64_t K = offsets.numel() - 1;
  at::Tensor dF = at::empty(F.sizes(), F.options().memory_format(at::MemoryFormat::Contiguous));
  const bool has_s = ws != 0, has_t = wc != 0, same = has_s && has_t && ps == pc;
  if (!has_s && !has_t) return dF.zero_();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor cls = at::empty({N}, offsets.options());
  class_of_kernel<<<K, kThreads, 0, stream>>>(offsets.data_ptr<int64_t>(), optional_ptr(order),
                                              cls.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor G = at::zeros({N, HW + C}, stats.options());
  const at::Tensor go = grad_loss.reshape({1}).contiguous();
  // Enough rows per block for ~4 elements per thread.
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(C, 4 * kThreads / HW));
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((C + rows - 1) / rows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    vector_grad_kernel<acc_t><<<N, kThreads, 0, stream>>>(
        stats.data_ptr<acc_t>(), diffs.data_ptr<acc_t>(), offsets.data_ptr<int64_t>(),
        cls.data_ptr<int64_t>(), go.data_ptr<acc_t>(), G.data_ptr<acc_t>(), C, HW,
        static_cast<acc_t>(sign), static_cast<acc_t>(ws), static_cast<acc_t>(wc),
        ps, pc, has_s, has_t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        F.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), G.data_ptr<acc_t>(), dF.data_ptr<scalar_t>(), C, HW, rows,
        make_power(ps), make_power(pc), has_s, has_t, same);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dF;
}

at::Tensor attention_stats_cuda(const at::Tensor& features, double ps, double pc, bool spatial,
                               bool channel) {
  const char* op = "atom_fast::attention_stats";
  check_features(features, "features", op);
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor F = sample_contiguous(features);
  const int64_t C = F.size(1), HW = F.size(2) * F.size(3);
  at::Tensor stats = at::empty({F.size(0), HW + C + kStatsExtra},
                               F.options().dtype(accumulation_type(F.scalar_type())));
  const bool same = spatial && channel && ps == pc;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t><<<F.size(0), kThreads, 0, stream>>>(
        F.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), C, HW, F.stride(0), make_power(ps),
        make_power(pc), spatial, channel, same);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> attention_class_sums_cuda(const at::Tensor& features,
                                                            const at::Tensor& offsets_in,
                                                            const c10::optional<at::Tensor>& order_in,
                                                            double ps, double pc, bool spatial,
                                                            bool channel) {
  const int64_t K = check_class_sums(features, offsets_in, order_in, ps, pc);
  const int64_t N = features.size(0);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor F = sample_contiguous(features), offsets = offsets_in.contiguous();
  c10::optional<at::Tensor> order;
  if (order_in.has_value()) order = order_in->contiguous();
  const int64_t C = F.size(1), HW = F.size(2) * F.size(3);
  const auto opts = F.options().dtype(accumulation_type(F.scalar_type()));
  at::Tensor stats = at::empty({N, HW + C + kStatsExtra}, opts);
  at::Tensor factors = at::empty({N, 2}, opts);
  at::Tensor S = at::empty({K, HW}, opts), T = at::empty({K, C}, opts);
  const bool same = spatial && channel && ps == pc;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_class_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        F.data_ptr<scalar_t>(), stats.data_ptr<acc_t>(), C, HW, F.stride(0), make_power(ps),
        make_power(pc), spatial, channel, same);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    factor_kernel<acc_t><<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        stats.data_ptr<acc_t>(), factors.data_ptr<acc_t>(), N, C, HW, ps, pc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums_kernel<acc_t><<<K, kThreads, 0, stream>>>(
        stats.data_ptr<acc_t>(), factors.data_ptr<acc_t>(), offsets.data_ptr<int64_t>(),
        optional_ptr(order), S.data_ptr<acc_t>(), T.data_ptr<acc_t>(), C, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {S, T};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_sums_cuda(
    const c10::optional<at::Tensor>& real_spatial, const c10::optional<at::Tensor>& real_channel,
    const at::Tensor& real_counts_in, const at::Tensor& syn_in, const at::Tensor& syn_offsets_in,
    const c10::optional<at::Tensor>& syn_order_in, double ps, double pc, double ws, double wc) {
  const auto a = check_forward_sums(real_spatial, real_channel, real_counts_in, syn_in,
                                    syn_offsets_in, syn_order_in, ps, pc, ws, wc);
  const c10::cuda::CUDAGuard guard(syn_in.device());
  const at::Tensor syn = sample_contiguous(syn_in), syn_offsets = syn_offsets_in.contiguous();
  const at::Tensor counts = real_counts_in.contiguous();
  c10::optional<at::Tensor> syn_order;
  if (syn_order_in.has_value()) syn_order = syn_order_in->contiguous();
  const bool has_s = ws != 0, has_t = wc != 0, same = has_s && has_t && ps == pc;
  const at::Tensor rs = has_s ? real_spatial->contiguous() : at::Tensor();
  const at::Tensor rc = has_t ? real_channel->contiguous() : at::Tensor();
  const int64_t C = a.C, HW = a.HW, K = a.K, N = syn.size(0);
  const auto opts = syn.options().dtype(accumulation_type(syn.scalar_type()));
  at::Tensor syn_stats = at::empty({N, HW + C + kStatsExtra}, opts);
  at::Tensor syn_factors = at::empty({N, 2}, opts);
  at::Tensor diffs = at::empty({K, HW + C}, opts);
  at::Tensor terms = at::empty({K}, opts);
  at::Tensor loss = at::empty({}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, syn.scalar_type(), "attention_forward_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t><<<N, kThreads, 0, stream>>>(
        syn.data_ptr<scalar_t>(), syn_stats.data_ptr<acc_t>(), C, HW, syn.stride(0),
        make_power(ps), make_power(pc), has_s, has_t, same);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    factor_kernel<acc_t><<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        syn_stats.data_ptr<acc_t>(), syn_factors.data_ptr<acc_t>(), N, C, HW, ps, pc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    class_from_sums_kernel<acc_t><<<K, kThreads, 0, stream>>>(
        has_s ? rs.data_ptr<acc_t>() : nullptr, has_t ? rc.data_ptr<acc_t>() : nullptr,
        counts.data_ptr<int64_t>(), syn_stats.data_ptr<acc_t>(), syn_factors.data_ptr<acc_t>(),
        syn_offsets.data_ptr<int64_t>(), optional_ptr(syn_order), diffs.data_ptr<acc_t>(),
        terms.data_ptr<acc_t>(), C, HW, static_cast<acc_t>(has_s ? ws : 0.0),
        static_cast<acc_t>(has_t ? wc : 0.0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_kernel<acc_t><<<1, 1, 0, stream>>>(terms.data_ptr<acc_t>(), K, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, syn_stats, diffs};
}

}  // namespace
}  // namespace cuda
}  // namespace atom_fast

TORCH_LIBRARY_IMPL(atom_fast, CUDA, m) {
  m.impl("attention_forward", &atom_fast::cuda::attention_forward_cuda);
  m.impl("attention_backward", &atom_fast::cuda::attention_backward_cuda);
  m.impl("attention_stats", &atom_fast::cuda::attention_stats_cuda);
  m.impl("attention_class_sums", &atom_fast::cuda::attention_class_sums_cuda);
  m.impl("attention_forward_sums", &atom_fast::cuda::attention_forward_sums_cuda);
}
