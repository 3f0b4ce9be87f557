// atom_fast::instance_norm_relu_pool (CPU): the tail of a ConvNet block in one pass over the
// convolution's output instead of three (GroupNorm(C, C), ReLU, 2x2 average pooling):
//
//   f = relu((x - mean_hw(x)) / sqrt(var_hw(x) + eps) * weight[c] + bias[c])   (N, C, H, W)
//   pooled = avg_pool2d(f, 2, 2) (floor: an odd last row/column is dropped)    (N, C, H/2, W/2)
//
// mean and the biased variance are per (sample, channel) over H*W, as GroupNorm with one channel per
// group computes them (two passes over the row, which stays in L1: 16 KB at 64x64 float32). The row
// is read from memory once; f and pooled are written once. The backward op recomputes the ReLU mask
// and the normalized row from the saved input, mean and rstd, and is one pass too. The autograd
// Function over both is in atom_fast/distill/block_tail.py; atom_fast/distill/networks.py's ConvBlock uses them.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "checks.h"

namespace atom_fast {
namespace {

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize the reductions

template <typename scalar_t, typename acc_t>
acc_t row_sum(const scalar_t* x, int64_t n) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += static_cast<acc_t>(x[i + j]);
  acc_t s = 0;
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]);
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

template <typename scalar_t, typename acc_t>
acc_t row_centered_squares(const scalar_t* x, int64_t n, acc_t mean) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(x[i + j]) - mean;
      part[j] += d * d;
    }
  acc_t s = 0;
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    s += d * d;
  }
  for (int j = 0; j < kLanes; ++j) s += part[j];
  return s;
}

// one image row: out[w] = max(0, x[w] * a + b)
template <typename scalar_t, typename acc_t>
inline void affine_relu(const scalar_t* x, scalar_t* out, int64_t n, acc_t a, acc_t b) {
  for (int64_t w = 0; w < n; ++w) {
    const acc_t y = static_cast<acc_t>(x[w]) * a + b;
    out[w] = static_cast<scalar_t>(y > acc_t(0) ? y : acc_t(0));
  }
}

// weight/bias: undefined (not given) or (C,), the input's dtype, on the CPU.
at::Tensor affine_arg(const c10::optional<at::Tensor>& t, const at::Tensor& input, const char* name,
                      const char* op) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (", C,
                    "), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ",
                   t->scalar_type(), " but input has ", input.scalar_type());
  TORCH_CHECK(t->device() == input.device(), op, ": ", name, " must be on the CPU");
  return t->contiguous();
}

void check_input(const at::Tensor& input, const char* op) {
  check_features(input, "input", op);
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be on the CPU");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
                   ": input must be float32 or float64, got ", input.scalar_type());
}

// The gradient of the block tail for one (sample, channel) row, from the saved conv output x and its
// row's mean and rstd. With a = weight * rstd, b = bias - mean * a (the forward's exact affine, so
// the ReLU mask is the forward's), xhat = (x - mean) * rstd and g = (grad_f + grad_pooled / 4 spread
// over its 2x2 window) * [x a + b > 0]:
//   grad_x = a (g - mean(g) - xhat mean(g xhat)),  grad_weight += sum(g xhat),  grad_bias += sum(g).
template <typename scalar_t>
void norm_relu_pool_backward_kernel(const scalar_t* gf, const scalar_t* gp, const at::Tensor& x,
                                    const at::Tensor& weight, const at::Tensor& bias,
                                    const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& gx,
                                    at::Tensor& gw_rows, at::Tensor& gb_rows) {
  using acc_t = scalar_t;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Ho = H / 2, Wo = W / 2;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  const scalar_t* mp = mean.data_ptr<scalar_t>();
  const scalar_t* rp = rstd.data_ptr<scalar_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  scalar_t* gwp = gw_rows.data_ptr<scalar_t>();
  scalar_t* gbp = gb_rows.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(HW);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C;
      const scalar_t* xr = xp + row * HW;
      const acc_t m = mp[row], r = rp[row];
      const acc_t a = (wp ? static_cast<acc_t>(wp[c]) : acc_t(1)) * r;
      const acc_t b = (bp ? static_cast<acc_t>(bp[c]) : acc_t(0)) - m * a;
      // g = upstream gradient of f (both outputs), before the ReLU mask
      if (gf) {
        const scalar_t* gr = gf + row * HW;
        for (int64_t i = 0; i < HW; ++i) g[i] = gr[i];
      } else {
        std::fill(g.begin(), g.end(), acc_t(0));
      }
      if (gp) {
        const scalar_t* pr = gp + row * Ho * Wo;
        for (int64_t h = 0; h < 2 * Ho; ++h) {
          const scalar_t* prow = pr + (h / 2) * Wo;
          acc_t* grow = g.data() + h * W;
          for (int64_t w = 0; w < 2 * Wo; ++w) grow[w] += static_cast<acc_t>(prow[w / 2]) * acc_t(0.25);
        }
      }
      acc_t sum_g[kLanes] = {}, sum_gx[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= HW; i += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const acc_t xv = static_cast<acc_t>(xr[i + j]);
          const acc_t gv = xv * a + b > acc_t(0) ? g[i + j] : acc_t(0);
          g[i + j] = gv;
          sum_g[j] += gv;
          sum_gx[j] += gv * ((xv - m) * r);
        }
      acc_t A = 0, B = 0;
      for (; i < HW; ++i) {
        const acc_t xv = static_cast<acc_t>(xr[i]);
        const acc_t gv = xv * a + b > acc_t(0) ? g[i] : acc_t(0);
        g[i] = gv;
        A += gv;
        B += gv * ((xv - m) * r);
      }
      for (int j = 0; j < kLanes; ++j) {
        A += sum_g[j];
        B += sum_gx[j];
      }
      gwp[row] = B;
      gbp[row] = A;
      const acc_t ma = A / static_cast<acc_t>(HW), mb = B / static_cast<acc_t>(HW);
      scalar_t* out = gxp + row * HW;
      for (int64_t k = 0; k < HW; ++k) {
        const acc_t xhat = (static_cast<acc_t>(xr[k]) - m) * r;
        out[k] = static_cast<scalar_t>(a * (g[k] - ma - xhat * mb));
      }
    }
  });
}

template <typename scalar_t>
void norm_relu_pool_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, at::Tensor& f, at::Tensor* pooled, at::Tensor& mean_out,
                           at::Tensor& rstd_out) {
  using acc_t = scalar_t;  // float accumulates in float (16 lanes of at most H*W/16 terms), double in double
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int64_t Ho = H / 2, Wo = W / 2;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* fp = f.data_ptr<scalar_t>();
  scalar_t* pp = pooled ? pooled->data_ptr<scalar_t>() : nullptr;
  const scalar_t* wp = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* mp = mean_out.data_ptr<scalar_t>();
  scalar_t* rp = rstd_out.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(HW, 1));
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t c = row % C;
      const scalar_t* xr = xp + row * HW;
      scalar_t* fr = fp + row * HW;
      const acc_t mean = row_sum<scalar_t, acc_t>(xr, HW) / static_cast<acc_t>(HW);
      const acc_t var = row_centered_squares<scalar_t, acc_t>(xr, HW, mean) / static_cast<acc_t>(HW);
      const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      const acc_t a = (wp ? static_cast<acc_t>(wp[c]) : acc_t(1)) * rstd;
      const acc_t b = (bp ? static_cast<acc_t>(bp[c]) : acc_t(0)) - mean * a;
      mp[row] = mean;
      rp[row] = rstd;
      if (!pp) {
        affine_relu<scalar_t, acc_t>(xr, fr, HW, a, b);
        continue;
      }
      scalar_t* pr = pp + row * Ho * Wo;
      for (int64_t h = 0; h < H; h += 2) {
        affine_relu<scalar_t, acc_t>(xr + h * W, fr + h * W, W, a, b);
        if (h + 1 >= H) break;  // odd H: the last row has no pooled output
        affine_relu<scalar_t, acc_t>(xr + (h + 1) * W, fr + (h + 1) * W, W, a, b);
        const scalar_t* top = fr + h * W;
        const scalar_t* bottom = top + W;
        scalar_t* out = pr + (h / 2) * Wo;
        for (int64_t w = 0; w < Wo; ++w)
          out[w] = ((top[2 * w] + top[2 * w + 1]) + (bottom[2 * w] + bottom[2 * w + 1])) *
                   static_cast<scalar_t>(0.25);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_cpu(const at::Tensor& input,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const c10::optional<at::Tensor>& bias,
                                                               double eps, bool pool) {
  const char* op = "atom_fast::instance_norm_relu_pool";
  check_input(input, op);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(!pool || (input.size(2) >= 2 && input.size(3) >= 2), op,
                    ": 2x2 pooling needs H, W >= 2, got ", input.sizes());
  const at::Tensor w = affine_arg(weight, input, "weight", op), b = affine_arg(bias, input, "bias", op);
  const at::Tensor x = input.contiguous();
  at::Tensor f = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor pooled = pool ? at::empty({x.size(0), C, x.size(2) / 2, x.size(3) / 2}, x.options())
                           : at::empty({0}, x.options());
  at::Tensor mean = at::empty({x.size(0), C}, x.options()), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_norm_relu_pool_cpu", [&] {
    norm_relu_pool_kernel<scalar_t>(x, w, b, eps, f, pool ? &pooled : nullptr, mean, rstd);
  });
  return {f, pooled, mean, rstd};
}

// (grad_input, grad_weight_rows, grad_bias_rows): the rows are per (sample, channel), (N, C); the
// caller sums them over N when weight/bias need a gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> instance_norm_relu_pool_backward_cpu(
    const c10::optional<at::Tensor>& grad_f, const c10::optional<at::Tensor>& grad_pooled,
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  const char* op = "atom_fast::instance_norm_relu_pool_backward";
  check_input(input, op);
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const at::Tensor w = affine_arg(weight, input, "weight", op), b = affine_arg(bias, input, "bias", op);
  const at::Tensor x = input.contiguous();
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({N, C}) && t->scalar_type() == x.scalar_type() &&
                    t->device().is_cpu(),
                op, ": mean and rstd must be (N, C) of the input's dtype on the CPU");
  at::Tensor gf, gp;
  if (grad_f.has_value() && grad_f->defined()) {
    TORCH_CHECK(grad_f->sizes() == x.sizes() && grad_f->scalar_type() == x.scalar_type(), op,
                ": grad_f must have the input's shape and dtype");
    gf = grad_f->contiguous();
  }
  if (grad_pooled.has_value() && grad_pooled->defined()) {
    TORCH_CHECK(grad_pooled->sizes() == at::IntArrayRef({N, C, H / 2, W / 2}) &&
                    grad_pooled->scalar_type() == x.scalar_type(),
                op, ": grad_pooled must have shape (N, C, H/2, W/2) and the input's dtype");
    gp = grad_pooled->contiguous();
  }
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor gw = at::empty({N, C}, x.options()), gb = at::empty({N, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "instance_norm_relu_pool_backward_cpu", [&] {
    norm_relu_pool_backward_kernel<scalar_t>(gf.defined() ? gf.data_ptr<scalar_t>() : nullptr,
                                             gp.defined() ? gp.data_ptr<scalar_t>() : nullptr, x,
                                             w, b, m, r, gx, gw, gb);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(atom_fast, CPU, m) {
  m.impl("instance_norm_relu_pool", &instance_norm_relu_pool_cpu);
  m.impl("instance_norm_relu_pool_backward", &instance_norm_relu_pool_backward_cpu);
}

}  // namespace atom_fast
