// Argument checks shared by the CPU and CUDA implementations. Messages name the argument.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "constants.h"

namespace atom_fast {

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_features(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK(t.size(0) > 0 && t.size(1) > 0 && t.size(2) > 0 && t.size(3) > 0, op, ": ", name,
              " must have non-empty N, C, H, W, got ", t.sizes());
}

// F itself when each sample's (C, H, W) block is contiguous (any batch stride, e.g. a slice or
// x[::2] of a contiguous batch), else a contiguous copy (channels_last, transposed views).
inline at::Tensor sample_contiguous(const at::Tensor& F) {
  const int64_t H = F.size(2), W = F.size(3);
  const bool ok = (W == 1 || F.stride(3) == 1) && (H == 1 || F.stride(2) == W) &&
                  (F.size(1) == 1 || F.stride(1) == H * W) && F.stride(0) >= 0;
  return ok ? F : F.contiguous();
}

inline void check_power(double p, const char* name, const char* op) {
  TORCH_CHECK(std::isfinite(p) && p > 0, op, ": ", name, " must be finite and positive, got ", p);
}

inline void check_weight(double w, const char* name, const char* op) {
  TORCH_CHECK(std::isfinite(w) && w >= 0, op, ": ", name, " must be finite and non-negative, got ",
              w);
}

// offsets: int64 (K + 1,), K >= 1; order: int64 (N,) when given. Shapes and dtypes only: the
// values are checked by the CPU kernels (reading them on a GPU would synchronize).
inline int64_t check_layout(const at::Tensor& offsets, const c10::optional<at::Tensor>& order,
                            int64_t n, const at::Tensor& features, const char* offsets_name,
                            const char* order_name, const char* op) {
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, op, ": ", offsets_name,
                   " must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 2, op, ": ", offsets_name,
              " must be 1-D with K + 1 >= 2 entries, got shape ", offsets.sizes());
  TORCH_CHECK(offsets.device() == features.device(), op, ": ", offsets_name, " is on ",
              offsets.device(), " but the features are on ", features.device());
  if (order.has_value()) {
    const auto& o = *order;
    TORCH_CHECK_TYPE(o.scalar_type() == at::kLong, op, ": ", order_name, " must be int64, got ",
                     o.scalar_type());
    TORCH_CHECK(o.dim() == 1 && o.numel() == n, op, ": ", order_name, " must have shape (", n,
                ",), got ", o.sizes());
    TORCH_CHECK(o.device() == features.device(), op, ": ", order_name, " is on ", o.device(),
                " but the features are on ", features.device());
  }
  return offsets.numel() - 1;
}

struct ForwardArgs {
  int64_t C, HW, K;
};

inline ForwardArgs check_forward(const at::Tensor& real, const at::Tensor& syn,
                                 const at::Tensor& real_offsets, const at::Tensor& syn_offsets,
                                 const c10::optional<at::Tensor>& real_order,
                                 const c10::optional<at::Tensor>& syn_order, double ps, double pc,
                                 double ws, double wc) {
  const char* op = "atom_fast::attention_forward";
  check_features(real, "real", op);
  check_features(syn, "syn", op);
  TORCH_CHECK_TYPE(real.scalar_type() == syn.scalar_type(), op, ": syn has dtype ",
                   syn.scalar_type(), " but real has ", real.scalar_type());
  TORCH_CHECK(real.device() == syn.device(), op, ": syn is on ", syn.device(), " but real is on ",
              real.device());
  TORCH_CHECK(real.sizes().slice(1) == syn.sizes().slice(1), op, ": syn has (C, H, W) = ",
              syn.sizes().slice(1), " but real has ", real.sizes().slice(1));
  const int64_t K = check_layout(real_offsets, real_order, real.size(0), real, "real_offsets",
                                 "real_order", op);
  const int64_t Ks = check_layout(syn_offsets, syn_order, syn.size(0), syn, "syn_offsets",
                                  "syn_order", op);
  TORCH_CHECK(K == Ks, op, ": real_offsets has ", K + 1, " entries but syn_offsets has ", Ks + 1,
              "; both sides need the same number of classes");
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  check_weight(ws, "spatial_weight", op);
  check_weight(wc, "channel_weight", op);
  return {real.size(1), real.size(2) * real.size(3), K};
}

// attention_class_sums: features, powers and the class layout; returns K.
inline int64_t check_class_sums(const at::Tensor& features, const at::Tensor& offsets,
                                const c10::optional<at::Tensor>& order, double ps, double pc) {
  const char* op = "atom_fast::attention_class_sums";
  check_features(features, "features", op);
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  return check_layout(offsets, order, features.size(0), features, "offsets", "order", op);
}

// attention_forward_sums: the real side as class sums in syn's accumulation dtype (a term's sums
// are required when its weight is nonzero) and int64 counts (K,), all on syn's device.
inline ForwardArgs check_forward_sums(const c10::optional<at::Tensor>& real_spatial,
                                      const c10::optional<at::Tensor>& real_channel,
                                      const at::Tensor& real_counts, const at::Tensor& syn,
                                      const at::Tensor& syn_offsets,
                                      const c10::optional<at::Tensor>& syn_order, double ps,
                                      double pc, double ws, double wc) {
  const char* op = "atom_fast::attention_forward_sums";
  check_features(syn, "syn", op);
  const int64_t K = check_layout(syn_offsets, syn_order, syn.size(0), syn, "syn_offsets",
                                 "syn_order", op);
  const int64_t C = syn.size(1), HW = syn.size(2) * syn.size(3);
  const auto acc = accumulation_type(syn.scalar_type());
  auto check_sums = [&](const c10::optional<at::Tensor>& t, int64_t len, double w,
                        const char* name, const char* weight) {
    TORCH_CHECK(w == 0 || t.has_value(), op, ": ", name, " is required when ", weight,
                " is nonzero");
    if (!t.has_value()) return;
    TORCH_CHECK_TYPE(t->scalar_type() == acc, op, ": ", name, " must be ", acc, " for ",
                     syn.scalar_type(), " syn, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2 && t->size(0) == K && t->size(1) == len, op, ": ", name,
                " must have shape (", K, ", ", len, "), got ", t->sizes());
    TORCH_CHECK(t->device() == syn.device(), op, ": ", name, " is on ", t->device(),
                " but syn is on ", syn.device());
  };
  check_sums(real_spatial, HW, ws, "real_spatial", "spatial_weight");
  check_sums(real_channel, C, wc, "real_channel", "channel_weight");
  TORCH_CHECK_TYPE(real_counts.scalar_type() == at::kLong, op, ": real_counts must be int64, got ",
                   real_counts.scalar_type());
  TORCH_CHECK(real_counts.dim() == 1 && real_counts.numel() == K, op,
              ": real_counts must have shape (", K, ",), got ", real_counts.sizes());
  TORCH_CHECK(real_counts.device() == syn.device(), op, ": real_counts is on ",
              real_counts.device(), " but syn is on ", syn.device());
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  check_weight(ws, "spatial_weight", op);
  check_weight(wc, "channel_weight", op);
  return {C, HW, K};
}

inline void check_backward(const at::Tensor& grad_loss, const at::Tensor& features,
                           const at::Tensor& stats, const at::Tensor& diffs,
                           const at::Tensor& offsets, const c10::optional<at::Tensor>& order,
                           double sign, double ps, double pc, double ws, double wc) {
  const char* op = "atom_fast::attention_backward";
  check_features(features, "features", op);
  const auto acc = accumulation_type(features.scalar_type());
  const int64_t N = features.size(0), C = features.size(1), HW = features.size(2) * features.size(3);
  auto check_acc = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " for ",
                     features.scalar_type(), " features, got ", t.scalar_type());
    TORCH_CHECK(t.device() == features.device(), op, ": ", name, " is on ", t.device(),
                " but features are on ", features.device());
  };
  check_acc(grad_loss, "grad_loss");
  check_acc(stats, "stats");
  check_acc(diffs, "diffs");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one element, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == HW + C + kStatsExtra, op,
              ": stats must have shape (", N, ", ", HW + C + kStatsExtra, "), got ", stats.sizes());
  const int64_t K = check_layout(offsets, order, N, features, "offsets", "order", op);
  TORCH_CHECK(diffs.dim() == 2 && diffs.size(0) == K && diffs.size(1) == HW + C, op,
              ": diffs must have shape (", K, ", ", HW + C, "), got ", diffs.sizes());
  TORCH_CHECK(sign == 1.0 || sign == -1.0, op, ": sign must be +1 (real) or -1 (syn), got ", sign);
  check_power(ps, "spatial_power", op);
  check_power(pc, "channel_power", op);
  check_weight(ws, "spatial_weight", op);
  check_weight(wc, "channel_weight", op);
}

}  // namespace atom_fast
