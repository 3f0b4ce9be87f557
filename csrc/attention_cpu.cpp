// CPU implementation of the atom_fast ops: the fused one-pass algorithm of the Triton kernels.
//
// Forward, per side, parallel over samples (at::parallel_for: OpenMP, torch.get_num_threads()):
//   one pass over F[n] channel row by channel row: s'[hw] += |x/m|^ps, t'[c] = sum_hw |x/m|^pc
//   with m = max |F[n]| found on the way (side_stats), then the two norms. The running s' (H*W
//   values) stays in L1/L2 while F streams through once. Powers of |x/m| <= 1 cannot overflow;
//   the eps floor is decided on the unscaled norm m^p ||s'|| (constants.h).
// Then per class (parallel over classes): D_k from the normalized per-sample vectors, and the loss.
// Backward, per sample: the gradient w.r.t. s'_n and t'_n through the normalization (O(H*W + C)),
// then one pass F -> dF. Nothing full-size is allocated besides dF. The attention_stats op is the
// forward's first step alone (the real side of the class-statistics interface, docs/scale.md).
//
// Every sum runs in a fixed order inside one sample or class, whatever the thread count, so the
// results are bitwise reproducible. float16/bfloat16 rows are widened to float32 one row at a time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "checks.h"
#include "cpu/kernels.h"

namespace atom_fast {
namespace cpu {

const char* selected_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f");
  const char* forced = std::getenv("ATOM_FAST_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    const bool is_default = std::strcmp(forced, "default") == 0;
    const bool is_avx2 = std::strcmp(forced, "avx2") == 0;
    const bool is_avx512 = std::strcmp(forced, "avx512") == 0;
    TORCH_CHECK(is_default || is_avx2 || is_avx512,
                "ATOM_FAST_CPU_ISA must be 'default', 'avx2' or 'avx512' (or unset), got '", forced,
                "'");
    TORCH_CHECK(!is_avx2 || has_avx2, "ATOM_FAST_CPU_ISA=avx2, but this CPU lacks AVX2 or FMA");
    TORCH_CHECK(!is_avx512 || has_avx512,
                "ATOM_FAST_CPU_ISA=avx512, but this CPU lacks AVX-512F (or AVX2 and FMA)");
    return is_default ? "default" : (is_avx2 ? "avx2" : "avx512");
  }
  return has_avx512 ? "avx512" : (has_avx2 ? "avx2" : "default");
#else
  const char* forced = std::getenv("ATOM_FAST_CPU_ISA");
  TORCH_CHECK(forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "default") == 0,
              "ATOM_FAST_CPU_ISA: only 'default' exists on this architecture, got '", forced, "'");
  return "default";
#endif
}

template <>
RowKernels<float> row_kernels<float>(double ps, double pc) {
  const char* isa = selected_isa();
  const int s = power_index(ps), c = power_index(pc);
  if (std::strcmp(isa, "avx512") == 0) return isa_avx512::row_kernels_float(s, c);
  if (std::strcmp(isa, "avx2") == 0) return isa_avx2::row_kernels_float(s, c);
  return isa_default::row_kernels_float(s, c);
}

template <>
RowKernels<double> row_kernels<double>(double ps, double pc) {
  const char* isa = selected_isa();
  const int s = power_index(ps), c = power_index(pc);
  if (std::strcmp(isa, "avx512") == 0) return isa_avx512::row_kernels_double(s, c);
  if (std::strcmp(isa, "avx2") == 0) return isa_avx2::row_kernels_double(s, c);
  return isa_default::row_kernels_double(s, c);
}

}  // namespace cpu

namespace {

// An output of `bytes` bytes about to be written for the first time (dF): ask Linux for
// transparent huge pages on it. Fresh memory is faulted in and zeroed by the kernel on first
// touch; with 4 KiB pages those faults cost more than writing dF itself (measured here:
// fill_ of a fresh 52 MB tensor 0.7 GB/s, of a reused one 2.7 GB/s, of a fresh one advised
// this way 1.4 GB/s). A no-op where THP is off or the call fails.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t{1} << 21;
  if (bytes < int64_t{4} << 20) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Software prefetch of the next rows, [p, p + bytes), before their powers are taken: off by default.
// It was added (2026-12-03) because the hardware streamer stops at every 4 KiB page, i.e. at every
// row of a 32x32 layer, and measured then to gain 3-7 points of copy bandwidth at 16x16 and 32x32.
// On a quiet 2-core AMD EPYC it costs instead: loss fwd+bwd at p = 4 took 6.2 / 32.5 / 144.8 ms at
// 16x16 / 32x32 / 64x64 with it and 5.7 / 21.4 / 115.8 without (bench/results/
// cpu-prefetch-2026-12-04.json, bench/prefetch_table.py). ATOM_FAST_CPU_PREFETCH=all turns it back
// on for every row, =rows for rows shorter than a page (a group of four such rows is one page), for
// machines whose memory system differs. A prefetch never faults, so running past the end of F is
// harmless.
constexpr int64_t kPrefetchBelowBytes = 4096;

enum class Prefetch { kNone, kRows, kAll };

Prefetch prefetch_setting() {
  const char* v = std::getenv("ATOM_FAST_CPU_PREFETCH");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "none") == 0) return Prefetch::kNone;
  if (std::strcmp(v, "all") == 0) return Prefetch::kAll;
  TORCH_CHECK(std::strcmp(v, "rows") == 0,
              "ATOM_FAST_CPU_PREFETCH must be 'none', 'rows' or 'all' (or unset), got '", v, "'");
  return Prefetch::kRows;
}
// Largest map (H*W) whose statistics take four channel rows at once (see side_stats).
constexpr int64_t kQuadMaxMap = 64;

inline void prefetch(const void* p, size_t bytes) {
  const char* a = static_cast<const char*>(p);
  for (const char* end = a + bytes; a < end; a += 64) __builtin_prefetch(a, 0, 3);
}

// Samples per task: at least ~64K feature elements, so small layers are not split too finely.
int64_t grain(int64_t per_item) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(per_item, 1)); }

// Row c of a sample in the accumulation type: the row itself, or widened into `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_row(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Class of each sample and the per-class counts from offsets (and order), validating them.
struct Classes {
  std::vector<int64_t> of_sample;  // class of sample n
  std::vector<int64_t> rows;       // samples grouped by class: rows[offsets[k]:offsets[k+1]]
  std::vector<int64_t> offsets;
};

Classes read_classes(const at::Tensor& offsets_t, const c10::optional<at::Tensor>& order_t,
                     int64_t N, const char* offsets_name, const char* order_name, const char* op) {
  Classes out;
  const auto off = offsets_t.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t K = off.numel() - 1;
  out.offsets.assign(o, o + K + 1);
  TORCH_CHECK(o[0] == 0 && o[K] == N, op, ": ", offsets_name, " must start at 0 and end at N = ", N,
              ", got ", o[0], " .. ", o[K]);
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(o[k] <= o[k + 1], op, ": ", offsets_name, " must be non-decreasing, but entry ",
                k + 1, " (", o[k + 1], ") < entry ", k, " (", o[k], ")");
  out.rows.resize(N);
  if (order_t.has_value()) {
    const auto ord = order_t->contiguous();
    const int64_t* r = ord.data_ptr<int64_t>();
    std::vector<char> seen(N, 0);
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(r[i] >= 0 && r[i] < N && !seen[r[i]], op, ": ", order_name,
                  " must be a permutation of 0..", N - 1, ", entry ", i, " is ", r[i]);
      seen[r[i]] = 1;
      out.rows[i] = r[i];
    }
  } else {
    for (int64_t i = 0; i < N; ++i) out.rows[i] = i;
  }
  out.of_sample.resize(N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = o[k]; i < o[k + 1]; ++i) out.of_sample[out.rows[i]] = k;
  return out;
}

// stats[n] = [s' (HW) | t' (C) | m | ||s'|| | ||t'||] with x' = x / m^p, m = max |F[n]| (1 for an
// all-zero or non-finite sample); a disabled term is written as zeros.
//
// One pass over F[n], row by row, with the running max m of the rows so far: each row is added
// with 1/m while the same loop takes its max. A row that raises the max was added on the old
// scale, which is exact once everything so far is multiplied by (m_old / m_new)^p (the running max
// of random data has ~ln(C) records, so a few O(H*W + C) rescales per sample). Only when a row
// exceeds m by so much that (m_new / m_old)^p could overflow the sums is the sample redone with its
// full max taken first. (Taking every row's max in a separate pass cost ~15% of the forward's
// bandwidth, a scratch row of powers ~10%, on the 2-core machine.) The rows are read in order, one
// after the other, as one stream the hardware prefetcher follows. Only small maps (H*W <= 64,
// where a row is a few vectors) take four channel rows at once when the rows are summed into the
// spatial vector (float rows; both terms at one power, or the spatial term alone): the spatial
// vector is read and written once per four rows. On larger maps the four interleaved streams cost
// more than that saves once the features come from memory: loss fwd+bwd at p = 4 and 32x32 took
// 40.2 ms four rows at a time and 21.4 one at a time on the 2-core AMD EPYC (2026-12-04). 64x64
// maps went through spatial tiles of 1024 as well; without them p = 4 took 119.6-154.2 ms against
// 113.5 and p = 3.7 276-288 against 329 (bench/results/cpu-native-powers-avx512-2026-12-04-32.json
// and -64.json before, cpu-native-powers-2026-12-04-rows-32.json, -rows-64.json and
// -rows-64-second.json after).
template <typename scalar_t, typename acc_t>
void side_stats(const at::Tensor& F, at::Tensor& stats, double ps, double pc, bool has_s,
                bool has_t) {
  const int64_t N = F.size(0), C = F.size(1), HW = F.size(2) * F.size(3), L = HW + C + kStatsExtra;
  const int64_t stride_n = F.stride(0);
  const scalar_t* f = F.data_ptr<scalar_t>();
  acc_t* out = stats.data_ptr<acc_t>();
  const auto k = cpu::row_kernels<acc_t>(ps, pc);
  const Prefetch setting = prefetch_setting();
  const bool prefetch_rows =
      setting == Prefetch::kAll ||
      (setting == Prefetch::kRows && HW * static_cast<int64_t>(sizeof(scalar_t)) < kPrefetchBelowBytes);
  const bool same = has_s && has_t && ps == pc;
  // rows taken four at a time: s summed into and each row's powers needed once (float rows,
  // read in place)
  const bool quad = std::is_same_v<scalar_t, acc_t> && (same || (has_s && !has_t)) && HW <= kQuadMaxMap;
  const double p_max = std::max(has_s ? ps : 0.0, has_t ? pc : 0.0);
  // largest log2 of a rescale factor (m_new / m_old)^p that keeps C * H * W such terms finite
  const double log2_limit = std::is_same_v<acc_t, float> ? 80.0 : 900.0;
  constexpr acc_t tiny = std::numeric_limits<acc_t>::min();  // 1/m of a subnormal m overflows
  at::parallel_for(0, N, grain(C * HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : HW);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* fn = f + n * stride_n;
      acc_t* s = out + n * L;
      acc_t* t = s + HW;
      std::fill(s, s + L, acc_t(0));
      acc_t m = 0;        // running max |F| of the rows so far (0: none above `tiny` yet)
      bool fixed = false;  // m is the sample's max (after a restart)
      // Rescaling covers all of s and t: what is not reached yet is zero.
      for (int64_t c = 0; c < C && (has_s || has_t);) {
        // four channel rows at once where s is summed into (s loaded and stored once for the four)
        const int64_t g = (quad && c % 4 == 0 && c + 4 <= C) ? 4 : 1;
        for (int64_t j = 0; j < (prefetch_rows ? g : 0); ++j) {
          const int64_t q = c + g + j;
          prefetch(q < C ? fn + q * HW : fn + stride_n, HW * sizeof(scalar_t));
        }
        const acc_t* rows[4];
        rows[0] = load_row<scalar_t, acc_t>(fn + c * HW, buf.data(), HW);
        for (int64_t j = 1; j < g; ++j) rows[j] = reinterpret_cast<const acc_t*>(fn + (c + j) * HW);
        const acc_t* x = rows[0];
        if (m == 0) {  // no scale yet (first row, or all rows so far zero)
          acc_t first = 0;
          for (int64_t j = 0; j < g; ++j) first = std::max(first, k.row_max(rows[j], HW));
          if (first >= tiny) m = first;
        }
        const acc_t inv = m > 0 ? acc_t(1) / m : acc_t(1);
        acc_t row_m, part = 0;
        if (g == 4) {
          if (same) {
            acc_t parts[4];
            row_m = k.both4(rows, s, HW, ps, inv, parts);
            for (int j = 0; j < 4; ++j) t[c + j] = parts[j];
          } else {
            row_m = k.spatial4(rows, s, HW, ps, inv);
          }
        } else {
          if (same) {
            row_m = k.both(x, s, HW, ps, inv, &part);
          } else {
            row_m = has_s ? k.spatial(x, s, HW, ps, inv) : k.row_max(x, HW);
            if (has_t) part = k.channel(x, HW, pc, inv);
          }
          if (has_t) t[c] = part;
        }
        c += g;
        if (row_m > m && row_m >= tiny && !fixed) {  // these rows raised the max (then m > 0)
          const double ratio = static_cast<double>(m) / static_cast<double>(row_m);
          if (-p_max * std::log2(ratio) > log2_limit) {
            // the sums may have overflowed on the old scale: redo the sample with its max
            acc_t full = m;
            for (int64_t q = 0; q < C; ++q) {
              const acc_t* y = load_row<scalar_t, acc_t>(fn + q * HW, buf.data(), HW);
              full = std::max(full, k.row_max(y, HW));
            }
            std::fill(s, s + HW + C, acc_t(0));
            m = full;
            fixed = true;
            c = 0;
            continue;
          }
          if (has_s) k.scale(s, HW, static_cast<acc_t>(std::pow(ratio, ps)));
          if (has_t) k.scale(t, C, static_cast<acc_t>(std::pow(ratio, pc)));
          m = row_m;
        }
      }
      // an infinite feature makes m infinite and x' = inf * 0 = NaN: the reference's NaN too
      s[HW + C] = (m > 0 && std::isfinite(m)) ? m : acc_t(1);
      if (has_s) s[HW + C + 1] = std::sqrt(k.sum_squares(s, HW));
      if (has_t) s[HW + C + 2] = std::sqrt(k.sum_squares(t, C));
    }
  });
}

// (r_s, r_t): x_hat = x' * r for the spatial and channel parts of a stats row (constants.h).
template <typename acc_t>
inline std::pair<Normalizer, Normalizer> normalizers(const acc_t* row, int64_t HW, int64_t C,
                                                     double ps, double pc) {
  const double m = row[HW + C];
  return {normalizer(m, row[HW + C + 1], ps), normalizer(m, row[HW + C + 2], pc)};
}

// D_k = real(l) / nr - syn_sum[l] / ns into dk (real(l): the real side's class sum of entry l,
// read before dk[l] is written); returns ws ||D_k(s)||^2 + wc ||D_k(t)||^2 (a zero weight: 0).
template <typename acc_t, typename Real>
acc_t class_difference(Real real, const acc_t* syn_sum, acc_t nr, acc_t ns, int64_t HW, int64_t C,
                       double ws, double wc, acc_t* dk) {
  acc_t sq_s = 0, sq_t = 0;
  for (int64_t l = 0; l < HW + C; ++l) {
    const acc_t v = real(l) / nr - syn_sum[l] / ns;
    dk[l] = v;
    (l < HW ? sq_s : sq_t) += v * v;
  }
  return (ws != 0 ? static_cast<acc_t>(ws) * sq_s : acc_t(0)) +
         (wc != 0 ? static_cast<acc_t>(wc) * sq_t : acc_t(0));
}

// Sum over the class's samples of the normalized vectors: acc[l] += x'[l] * r.
template <typename acc_t>
void class_sum(const acc_t* stats, const Classes& cls, int64_t k, int64_t HW, int64_t C, double ps,
               double pc, acc_t* acc) {
  const int64_t L = HW + C + kStatsExtra;
  std::fill(acc, acc + HW + C, acc_t(0));
  for (int64_t i = cls.offsets[k]; i < cls.offsets[k + 1]; ++i) {
    const acc_t* x = stats + cls.rows[i] * L;
    const auto [ns, nt] = normalizers(x, HW, C, ps, pc);
    const acc_t rs = static_cast<acc_t>(ns.r), rt = static_cast<acc_t>(nt.r);
    for (int64_t l = 0; l < HW; ++l) acc[l] += x[l] * rs;
    for (int64_t l = HW; l < HW + C; ++l) acc[l] += x[l] * rt;
  }
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_typed(
    const at::Tensor& real, const at::Tensor& syn, const Classes& rc, const Classes& sc, int64_t K,
    double ps, double pc, double ws, double wc) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t C = real.size(1), HW = real.size(2) * real.size(3);
  const auto opts = real.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool has_s = ws != 0, has_t = wc != 0;
  at::Tensor real_stats = at::empty({real.size(0), HW + C + kStatsExtra}, opts);
  at::Tensor syn_stats = at::empty({syn.size(0), HW + C + kStatsExtra}, opts);
  at::Tensor diffs = at::empty({K, HW + C}, opts);
  side_stats<scalar_t, acc_t>(real, real_stats, ps, pc, has_s, has_t);
  side_stats<scalar_t, acc_t>(syn, syn_stats, ps, pc, has_s, has_t);

  const acc_t* rs = real_stats.data_ptr<acc_t>();
  const acc_t* ss = syn_stats.data_ptr<acc_t>();
  acc_t* d = diffs.data_ptr<acc_t>();
  std::vector<acc_t> terms(K);  // ws ||D_k(s)||^2 + wc ||D_k(t)||^2
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean_s(HW + C);
    for (int64_t k = begin; k < end; ++k) {
      acc_t* dk = d + k * (HW + C);
      class_sum(rs, rc, k, HW, C, ps, pc, dk);
      class_sum(ss, sc, k, HW, C, ps, pc, mean_s.data());
      const acc_t nr = static_cast<acc_t>(std::max<int64_t>(rc.offsets[k + 1] - rc.offsets[k], 1));
      const acc_t ns = static_cast<acc_t>(std::max<int64_t>(sc.offsets[k + 1] - sc.offsets[k], 1));
      terms[k] = class_difference([dk](int64_t l) { return dk[l]; }, mean_s.data(), nr, ns, HW, C,
                                  ws, wc, dk);
    }
  });
  acc_t loss = 0;
  for (int64_t k = 0; k < K; ++k) loss += terms[k];
  return {at::scalar_tensor(loss, opts), real_stats, syn_stats, diffs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& real, const at::Tensor& syn, const at::Tensor& real_offsets,
    const at::Tensor& syn_offsets, const c10::optional<at::Tensor>& real_order,
    const c10::optional<at::Tensor>& syn_order, double ps, double pc, double ws, double wc) {
  const char* op = "atom_fast::attention_forward";
  const auto a = check_forward(real, syn, real_offsets, syn_offsets, real_order, syn_order, ps, pc,
                               ws, wc);
  const Classes rc = read_classes(real_offsets, real_order, real.size(0), "real_offsets",
                                  "real_order", op);
  const Classes sc = read_classes(syn_offsets, syn_order, syn.size(0), "syn_offsets", "syn_order",
                                  op);
  // Each sample's (C, H, W) block must be contiguous (a batch slice is; channels_last is copied).
  const at::Tensor r = sample_contiguous(real), s = sample_contiguous(syn);
  for (int64_t k = 0; k < a.K; ++k) {
    const bool has_real = rc.offsets[k + 1] > rc.offsets[k];
    const bool has_syn = sc.offsets[k + 1] > sc.offsets[k];
    TORCH_CHECK(has_real == has_syn, op, ": class ", k, " has ", has_real ? "real" : "synthetic",
                " samples but no ", has_real ? "synthetic" : "real", " ones; every class needs "
                "samples on both sides (or on neither)");
  }
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "attention_forward_cpu", [&] {
    return forward_typed<scalar_t>(r, s, rc, sc, a.K, ps, pc, ws, wc);
  });
}

// G = power * dL/dx' / m for x' the scaled s_n or t_n (stats layout), with dL/dx_hat = coef * D_k:
// above the floor (r = 1/||x'||) dL/dx' = (g - x_hat (x_hat . g)) r, below it g r (torch's
// clamp_min). dF = |F/m|^(p-1) sgn(F) * G, so the 1/m of the chain rule is folded in here.
template <typename acc_t>
void normalize_grad(const acc_t* x, Normalizer nz, acc_t inv_m, const acc_t* D, acc_t coef,
                    acc_t power, int64_t L, acc_t* out) {
  const acc_t r = static_cast<acc_t>(nz.r);
  acc_t dot = 0;
  for (int64_t l = 0; l < L; ++l) dot += x[l] * (coef * D[l]);
  const acc_t proj = nz.above ? dot * r * r * r : acc_t(0);
  const acc_t f = power * inv_m;
  for (int64_t l = 0; l < L; ++l) out[l] = f * ((coef * D[l]) * r - x[l] * proj);
}

template <typename scalar_t>
at::Tensor backward_typed(const at::Tensor& grad_loss, const at::Tensor& F, const at::Tensor& stats,
                          const at::Tensor& diffs, const Classes& cls, double sign, double ps,
                          double pc, double ws, double wc) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t N = F.size(0), C = F.size(1), HW = F.size(2) * F.size(3), L = HW + C + kStatsExtra;
  at::Tensor dF = at::empty(F.sizes(), F.options().memory_format(at::MemoryFormat::Contiguous));
  const bool has_s = ws != 0, has_t = wc != 0;
  if (!has_s && !has_t) return dF.zero_();
  advise_huge_pages(dF.data_ptr(), dF.nbytes());
  const acc_t go = grad_loss.item<acc_t>();
  const int64_t stride_n = F.stride(0);
  const scalar_t* f = F.data_ptr<scalar_t>();
  scalar_t* df = dF.data_ptr<scalar_t>();
  const acc_t* st = stats.data_ptr<acc_t>();
  const acc_t* d = diffs.data_ptr<acc_t>();
  const auto k = cpu::row_kernels<acc_t>(ps, pc);
  const bool same = has_s && has_t && ps == pc;
  const acc_t aps = static_cast<acc_t>(ps), apc = static_cast<acc_t>(pc);
  constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, N, grain(C * HW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gs(HW), gt(C), xbuf(direct ? 0 : HW), obuf(direct ? 0 : HW);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t cl = cls.of_sample[n];
      const acc_t count = static_cast<acc_t>(cls.offsets[cl + 1] - cls.offsets[cl]);
      const acc_t coef = static_cast<acc_t>(sign) * acc_t(2) * go / count;
      const acc_t* sn = st + n * L;
      const acc_t* Dk = d + cl * (HW + C);
      const auto [ns, nt] = normalizers(sn, HW, C, ps, pc);
      const acc_t inv = acc_t(1) / sn[HW + C];
      if (has_s) normalize_grad(sn, ns, inv, Dk, coef * static_cast<acc_t>(ws), aps, HW, gs.data());
      if (has_t)
        normalize_grad(sn + HW, nt, inv, Dk + HW, coef * static_cast<acc_t>(wc), apc, C, gt.data());
      for (int64_t c = 0; c < C; ++c) {
        const int64_t off = (n * C + c) * HW;  // in dF (contiguous)
        const acc_t* x = load_row<scalar_t, acc_t>(f + n * stride_n + c * HW, xbuf.data(), HW);
        acc_t* o;
        if constexpr (direct) o = df + off; else o = obuf.data();
        if (same) {
          k.grad_both(x, gs.data(), gt[c], o, HW, ps, inv);
        } else {
          if (has_s) k.grad_spatial(x, gs.data(), o, HW, ps, inv);
          if (has_t) k.grad_channel(x, gt[c], o, HW, pc, inv, has_s);
        }
        if constexpr (!direct)
          for (int64_t i = 0; i < HW; ++i) df[off + i] = static_cast<scalar_t>(o[i]);
      }
    }
  });
  return dF;
}

at::Tensor attention_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& features,
                                  const at::Tensor& stats, const at::Tensor& diffs,
                                  const at::Tensor& offsets, const c10::optional<at::Tensor>& order,
                                  double sign, double ps, double pc, double ws, double wc) {
  const char* op = "atom_fast::attention_backward";
  check_backward(grad_loss, features, stats, diffs, offsets, order, sign, ps, pc, ws, wc);
  const Classes cls = read_classes(offsets, order, features.size(0), "offsets", "order", op);
  const at::Tensor F = sample_contiguous(features);
  const at::Tensor st = stats.contiguous(), d = diffs.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_backward_cpu", [&] {
    return backward_typed<scalar_t>(grad_loss, F, st, d, cls, sign, ps, pc, ws, wc);
  });
}

at::Tensor attention_stats_cpu(const at::Tensor& features, double ps, double pc, bool spatial,
                              bool channel) {
  const char* op = "atom_fast::attention_stats";
  check_features(features, "features", op);
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  const at::Tensor F = sample_contiguous(features);
  const int64_t C = F.size(1), HW = F.size(2) * F.size(3);
  at::Tensor stats = at::empty({F.size(0), HW + C + kStatsExtra},
                               F.options().dtype(accumulation_type(F.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_stats_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    side_stats<scalar_t, acc_t>(F, stats, ps, pc, spatial, channel);
  });
  return stats;
}

// Per-class sums of the normalized attention vectors of one side: the forward's statistics pass,
// then per class (parallel over classes, members in offsets/order order) sum_n x'_n * r_n. The
// stats rows live only inside the op; what leaves it is K * (H*W + C) values.
std::tuple<at::Tensor, at::Tensor> attention_class_sums_cpu(const at::Tensor& features,
                                                           const at::Tensor& offsets,
                                                           const c10::optional<at::Tensor>& order,
                                                           double ps, double pc, bool spatial,
                                                           bool channel) {
  const int64_t K = check_class_sums(features, offsets, order, ps, pc);
  const int64_t N = features.size(0);
  const Classes cls = read_classes(offsets, order, N, "offsets", "order",
                                   "atom_fast::attention_class_sums");
  const at::Tensor F = sample_contiguous(features);
  const int64_t C = F.size(1), HW = F.size(2) * F.size(3);
  const auto opts = F.options().dtype(accumulation_type(F.scalar_type()));
  at::Tensor stats = at::empty({N, HW + C + kStatsExtra}, opts);
  at::Tensor S = at::empty({K, HW}, opts), T = at::empty({K, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, F.scalar_type(), "attention_class_sums_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    side_stats<scalar_t, acc_t>(F, stats, ps, pc, spatial, channel);
    const acc_t* st = stats.data_ptr<acc_t>();
    acc_t* s_out = S.data_ptr<acc_t>();
    acc_t* t_out = T.data_ptr<acc_t>();
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(HW + C);
      for (int64_t k = begin; k < end; ++k) {
        class_sum(st, cls, k, HW, C, ps, pc, acc.data());
        std::copy(acc.begin(), acc.begin() + HW, s_out + k * HW);
        std::copy(acc.begin() + HW, acc.end(), t_out + k * C);
      }
    });
  });
  return {S, T};
}

// The forward with the real side given as class sums (real_spatial (K, H*W), real_channel (K, C),
// real_counts (K,)): syn's statistics pass, then per class D_k = sums_k / n_k - mean_syn_k(x_hat)
// and the loss, as attention_forward computes them. attention_backward (sign -1) is its backward.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_sums_typed(
    const at::Tensor& rs_t, const at::Tensor& rc_t, const at::Tensor& counts_t,
    const at::Tensor& syn, const Classes& sc, int64_t K, double ps, double pc, double ws,
    double wc) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t C = syn.size(1), HW = syn.size(2) * syn.size(3);
  const auto opts = syn.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool has_s = ws != 0, has_t = wc != 0;
  at::Tensor syn_stats = at::empty({syn.size(0), HW + C + kStatsExtra}, opts);
  at::Tensor diffs = at::empty({K, HW + C}, opts);
  side_stats<scalar_t, acc_t>(syn, syn_stats, ps, pc, has_s, has_t);
  const acc_t* rs = rs_t.defined() ? rs_t.data_ptr<acc_t>() : nullptr;
  const acc_t* rc = rc_t.defined() ? rc_t.data_ptr<acc_t>() : nullptr;
  const int64_t* counts = counts_t.data_ptr<int64_t>();
  const acc_t* ss = syn_stats.data_ptr<acc_t>();
  acc_t* d = diffs.data_ptr<acc_t>();
  std::vector<acc_t> terms(K);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean_s(HW + C);
    for (int64_t k = begin; k < end; ++k) {
      acc_t* dk = d + k * (HW + C);
      class_sum(ss, sc, k, HW, C, ps, pc, mean_s.data());
      const acc_t nr = static_cast<acc_t>(std::max<int64_t>(counts[k], 1));
      const acc_t ns = static_cast<acc_t>(std::max<int64_t>(sc.offsets[k + 1] - sc.offsets[k], 1));
      const auto real = [rs, rc, k, HW, C](int64_t l) {
        return l < HW ? (rs != nullptr ? rs[k * HW + l] : acc_t(0))
                      : (rc != nullptr ? rc[k * C + l - HW] : acc_t(0));
      };
      terms[k] = class_difference(real, mean_s.data(), nr, ns, HW, C, ws, wc, dk);
    }
  });
  acc_t loss = 0;
  for (int64_t k = 0; k < K; ++k) loss += terms[k];
  return {at::scalar_tensor(loss, opts), syn_stats, diffs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_sums_cpu(
    const c10::optional<at::Tensor>& real_spatial, const c10::optional<at::Tensor>& real_channel,
    const at::Tensor& real_counts, const at::Tensor& syn, const at::Tensor& syn_offsets,
    const c10::optional<at::Tensor>& syn_order, double ps, double pc, double ws, double wc) {
  const char* op = "atom_fast::attention_forward_sums";
  const auto a = check_forward_sums(real_spatial, real_channel, real_counts, syn, syn_offsets,
                                    syn_order, ps, pc, ws, wc);
  const Classes sc = read_classes(syn_offsets, syn_order, syn.size(0), "syn_offsets", "syn_order",
                                  op);
  const at::Tensor s = sample_contiguous(syn);
  const at::Tensor rs = ws != 0 ? real_spatial->contiguous() : at::Tensor();
  const at::Tensor rc = wc != 0 ? real_channel->contiguous() : at::Tensor();
  const at::Tensor counts = real_counts.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "attention_forward_sums_cpu", [&] {
    return forward_sums_typed<scalar_t>(rs, rc, counts, s, sc, a.K, ps, pc, ws, wc);
  });
}

// |x|^p elementwise by the row kernels' non-integer power path (for any p; a test hook).
at::Tensor general_power_cpu(const at::Tensor& x, double p) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "atom_fast::_general_power: x must be float32 or float64, got ", x.scalar_type());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "general_power_cpu", [&] {
    const auto k = cpu::row_kernels<scalar_t>(p, p);
    k.power(in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), in.numel(), p);
  });
  return out;
}

}  // namespace
}  // namespace atom_fast

TORCH_LIBRARY_IMPL(atom_fast, CPU, m) {
  m.impl("attention_forward", &atom_fast::attention_forward_cpu);
  m.impl("attention_backward", &atom_fast::attention_backward_cpu);
  m.impl("attention_stats", &atom_fast::attention_stats_cpu);
  m.impl("attention_class_sums", &atom_fast::attention_class_sums_cpu);
  m.impl("attention_forward_sums", &atom_fast::attention_forward_sums_cpu);
  m.impl("_general_power", &atom_fast::general_power_cpu);
}
