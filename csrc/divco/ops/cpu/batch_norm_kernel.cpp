// CPU kernels of divco::batch_norm_native and divco::batch_norm_backward_native, registered
// for the CPU dispatch key at the end (host checks: ../op_common.cpp).
//
// NCHW: channels in parallel (at::parallel_for); a thread reduces its channel, then writes
// it, so the second read of the channel's N·H·W values usually hits the cache.
// channels_last: blocks of kChannelBlock channels in parallel for the reductions (rows of
// the block are contiguous; the sums vectorise across channels), then rows in parallel for
// the elementwise pass (vectorised along C with per-channel coefficient arrays).
// Per-channel sums: float lanes within a row (or a batch of rows), double across them; each
// channel is reduced by one thread in a fixed order, so the results do not depend on the
// thread count. Math: ../../batch_norm_math.h.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../../batch_norm_math.h"
#include "../op_common.h"
#include "row_loops.h"

namespace divco {
namespace ops {

// -- CPU kernels ----------------------------------------------------------------------------------

namespace cpu {
namespace {

using math::BatchNormAffine;
using math::BatchNormBackward;

constexpr int64_t kChannelBlock = 16;     // channels_last reductions: one 64-byte line of float32
constexpr int64_t kRowsPerFloatSum = 256;  // channels_last: float partial sums, flushed to double
constexpr int64_t kWorkPerTask = 32768;    // fewest elements worth a thread

// Σ term(i) over i < count: kLanes partial sums and the tail, combined in a fixed order. The
// second sum is accumulated in Acc2: double for the forward's squares (a float square of a
// difference above 1.8e19 would overflow while the variance still fits float32).
template <typename Acc2 = float, typename Term>
DIVCO_CPU_INLINE void lane_sums2(int64_t count, Term&& term, double& s1, double& s2) {
  float a1[kLanes] = {};
  Acc2 a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      float t1;
      Acc2 t2;
      term(i + l, t1, t2);
      a1[l] += t1;
      a2[l] += t2;
    }
  }
  float tail1 = 0.0f;
  Acc2 tail2 = 0;
  for (; i < count; ++i) {
    float t1;
    Acc2 t2;
    term(i, t1, t2);
    tail1 += t1;
    tail2 += t2;
  }
  Acc2 sum2 = 0;
  for (int l = 0; l < kLanes; ++l) sum2 += a2[l];
  s1 += static_cast<double>(combine_lanes(a1) + tail1);
  s2 += static_cast<double>(sum2 + tail2);
}

// ---- NCHW: one task = a range of channels -----------------------------------------------------

template <typename scalar_t, bool kResidual, bool kRelu>
DIVCO_CPU_INLINE void forward_row(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t count, BatchNormAffine af) {
  for (int64_t i = 0; i < count; ++i) {
    const float res = kResidual ? to_float(r[i]) : 0.0f;
    out[i] = from_float<scalar_t>(math::batch_norm_forward_value(to_float(x[i]), af, res, kRelu));
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void forward_channels_nchw(const BatchNormArgs& a, int64_t begin, int64_t end) {
  const BatchNormLayout& l = a.layout;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* r = static_cast<const scalar_t*>(a.residual);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t HW = l.spatial;
  for (int64_t c = begin; c < end; ++c) {
    if (a.training) {
      // one tile per row (n, c), shifted by the row's first value, merged in row order
      math::Moments moments{0.0, 0.0, 0.0};
      for (int64_t n = 0; n < l.batch; ++n) {
        const scalar_t* row = x + (n * l.channels + c) * HW;
        const float pivot = to_float(row[0]);
        double s1 = 0.0, s2 = 0.0;
        lane_sums2<double>(HW, [&](int64_t i, float& t1, double& t2) {
          const float d = to_float(row[i]) - pivot;
          t1 = d;
          t2 = static_cast<double>(d) * d;
        }, s1, s2);
        moments = math::merge_moments(moments, math::moments_from_shifted_sums(pivot, s1, s2, static_cast<double>(HW)));
      }
      const auto stats = math::batch_norm_stats(moments);
      a.mean[c] = stats.mean;
      a.var[c] = stats.var;
    }
    const BatchNormAffine af = math::batch_norm_affine(a.mean[c], a.var[c], a.eps, a.weight, a.bias, c);
    for (int64_t n = 0; n < l.batch; ++n) {
      const int64_t o = (n * l.channels + c) * HW;
      if (r != nullptr) {
        if (a.relu) forward_row<scalar_t, true, true>(x + o, r + o, out + o, HW, af);
        else forward_row<scalar_t, true, false>(x + o, r + o, out + o, HW, af);
      } else {
        if (a.relu) forward_row<scalar_t, false, true>(x + o, nullptr, out + o, HW, af);
        else forward_row<scalar_t, false, false>(x + o, nullptr, out + o, HW, af);
      }
    }
  }
}

template <typename scalar_t, bool kRelu>
DIVCO_CPU_INLINE void backward_sums_row(const scalar_t* g, const scalar_t* o, const scalar_t* x, float mean,
                                        int64_t count, double& s1, double& s2) {
  lane_sums2(count, [&](int64_t i, float& t1, float& t2) {
    const float dy = math::relu_masked_grad(to_float(g[i]), kRelu ? to_float(o[i]) : 1.0f, kRelu);
    t1 = dy;
    t2 = dy * (to_float(x[i]) - mean);
  }, s1, s2);
}

template <typename scalar_t, bool kRelu, bool kTraining, bool kWriteResidual>
DIVCO_CPU_INLINE void backward_row(const scalar_t* g, const scalar_t* o, const scalar_t* x, scalar_t* dx, scalar_t* dr,
                                   int64_t count, float mean, BatchNormBackward co) {
  for (int64_t i = 0; i < count; ++i) {
    const float dy = math::relu_masked_grad(to_float(g[i]), kRelu ? to_float(o[i]) : 1.0f, kRelu);
    const float xv = kTraining ? to_float(x[i]) : mean;
    dx[i] = from_float<scalar_t>(math::batch_norm_backward_value(dy, xv, mean, co));
    if (kWriteResidual) dr[i] = from_float<scalar_t>(dy);
  }
}

template <typename scalar_t, bool kRelu>
DIVCO_CPU_INLINE void backward_rows_dispatch(const BatchNormArgs& a, const scalar_t* g, const scalar_t* o,
                                             const scalar_t* x, scalar_t* dx, scalar_t* dr, int64_t count, float mean,
                                             BatchNormBackward co) {
  if (a.training) {
    if (dr != nullptr) backward_row<scalar_t, kRelu, true, true>(g, o, x, dx, dr, count, mean, co);
    else backward_row<scalar_t, kRelu, true, false>(g, o, x, dx, dr, count, mean, co);
  } else {
    if (dr != nullptr) backward_row<scalar_t, kRelu, false, true>(g, o, x, dx, dr, count, mean, co);
    else backward_row<scalar_t, kRelu, false, false>(g, o, x, dx, dr, count, mean, co);
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void backward_channels_nchw(const BatchNormArgs& a, int64_t begin, int64_t end) {
  const BatchNormLayout& l = a.layout;
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* o = static_cast<const scalar_t*>(a.saved_out);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dx = static_cast<scalar_t*>(a.grad_x);
  auto* dr = static_cast<scalar_t*>(a.grad_residual);
  const int64_t HW = l.spatial;
  const float count = static_cast<float>(l.batch * HW);
  for (int64_t c = begin; c < end; ++c) {
    const float mean = a.mean[c];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t n = 0; n < l.batch; ++n) {
      const int64_t off = (n * l.channels + c) * HW;
      if (a.relu) backward_sums_row<scalar_t, true>(g + off, o + off, x + off, mean, HW, s1, s2);
      else backward_sums_row<scalar_t, false>(g + off, nullptr, x + off, mean, HW, s1, s2);
    }
    const float sum_dy = static_cast<float>(s1);
    const float sum_dy_xhat = static_cast<float>(s2) * math::batch_norm_invstd(a.var[c], a.eps);
    a.grad_bias[c] = sum_dy;
    a.grad_weight[c] = sum_dy_xhat;
    const BatchNormBackward co =
        math::batch_norm_backward_coefficients(a.var[c], a.eps, a.weight, c, sum_dy, sum_dy_xhat, count, a.training);
    for (int64_t n = 0; n < l.batch; ++n) {
      const int64_t off = (n * l.channels + c) * HW;
      scalar_t* drow = dr != nullptr ? dr + off : nullptr;
      if (a.relu) backward_rows_dispatch<scalar_t, true>(a, g + off, o + off, x + off, dx + off, drow, HW, mean, co);
      else backward_rows_dispatch<scalar_t, false>(a, g + off, nullptr, x + off, dx + off, drow, HW, mean, co);
    }
  }
}

// ---- channels_last: reductions over blocks of channels, elementwise over rows --------------------

// Σ over all rows m of term(m, j) for the channels [c0, c0 + width), width <= kChannelBlock
// (the second sum in Acc2, as lane_sums2).
template <typename Acc2 = float, typename Term>
DIVCO_CPU_INLINE void block_sums(int64_t rows, int64_t width, Term&& term, double* s1, double* s2) {
  for (int64_t j = 0; j < width; ++j) s1[j] = s2[j] = 0.0;
  for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerFloatSum) {
    float a1[kChannelBlock] = {};
    Acc2 a2[kChannelBlock] = {};
    const int64_t m1 = std::min(rows, m0 + kRowsPerFloatSum);
    for (int64_t m = m0; m < m1; ++m) {
      if (width == kChannelBlock) {
        for (int64_t j = 0; j < kChannelBlock; ++j) {
          float t1;
          Acc2 t2;
          term(m, j, t1, t2);
          a1[j] += t1;
          a2[j] += t2;
        }
      } else {
        for (int64_t j = 0; j < width; ++j) {
          float t1;
          Acc2 t2;
          term(m, j, t1, t2);
          a1[j] += t1;
          a2[j] += t2;
        }
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += static_cast<double>(a1[j]);
      s2[j] += static_cast<double>(a2[j]);
    }
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void forward_stats_nhwc(const BatchNormArgs& a, int64_t block_begin, int64_t block_end) {
  const BatchNormLayout& l = a.layout;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const int64_t C = l.channels, rows = l.batch * l.spatial;
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t c0 = block * kChannelBlock, width = std::min(kChannelBlock, C - c0);
    // one tile per kRowsPerFloatSum rows, shifted by the tile's first row, merged in row order
    math::Moments moments[kChannelBlock];
    for (int64_t j = 0; j < width; ++j) moments[j] = {0.0, 0.0, 0.0};
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerFloatSum) {
      const int64_t tile_rows = std::min(kRowsPerFloatSum, rows - m0);
      float pivot[kChannelBlock] = {};
      for (int64_t j = 0; j < width; ++j) pivot[j] = to_float(x[m0 * C + c0 + j]);
      double s1[kChannelBlock], s2[kChannelBlock];
      block_sums<double>(tile_rows, width, [&](int64_t m, int64_t j, float& t1, double& t2) {
        const float d = to_float(x[(m0 + m) * C + c0 + j]) - pivot[j];
        t1 = d;
        t2 = static_cast<double>(d) * d;
      }, s1, s2);
      for (int64_t j = 0; j < width; ++j) {
        moments[j] = math::merge_moments(
            moments[j], math::moments_from_shifted_sums(pivot[j], s1[j], s2[j], static_cast<double>(tile_rows)));
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const auto stats = math::batch_norm_stats(moments[j]);
      a.mean[c0 + j] = stats.mean;
      a.var[c0 + j] = stats.var;
    }
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
DIVCO_CPU_INLINE void forward_rows_nhwc_impl(const BatchNormArgs& a, const BatchNormAffine* affine, int64_t begin,
                                             int64_t end) {
  const int64_t C = a.layout.channels;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* r = static_cast<const scalar_t*>(a.residual);
  auto* out = static_cast<scalar_t*>(a.out);
  for (int64_t m = begin; m < end; ++m) {
    const scalar_t* xr = x + m * C;
    const scalar_t* rr = kResidual ? r + m * C : nullptr;
    scalar_t* orow = out + m * C;
    for (int64_t c = 0; c < C; ++c) {
      const float res = kResidual ? to_float(rr[c]) : 0.0f;
      orow[c] = from_float<scalar_t>(math::batch_norm_forward_value(to_float(xr[c]), affine[c], res, kRelu));
    }
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void forward_rows_nhwc(const BatchNormArgs& a, const BatchNormAffine* affine, int64_t begin,
                                        int64_t end) {
  if (a.residual != nullptr) {
    if (a.relu) forward_rows_nhwc_impl<scalar_t, true, true>(a, affine, begin, end);
    else forward_rows_nhwc_impl<scalar_t, true, false>(a, affine, begin, end);
  } else {
    if (a.relu) forward_rows_nhwc_impl<scalar_t, false, true>(a, affine, begin, end);
    else forward_rows_nhwc_impl<scalar_t, false, false>(a, affine, begin, end);
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void backward_sums_nhwc(const BatchNormArgs& a, int64_t block_begin, int64_t block_end) {
  const BatchNormLayout& l = a.layout;
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* o = static_cast<const scalar_t*>(a.saved_out);
  const auto* x = static_cast<const scalar_t*>(a.x);
  const int64_t C = l.channels, rows = l.batch * l.spatial;
  for (int64_t block = block_begin; block < block_end; ++block) {
    const int64_t c0 = block * kChannelBlock, width = std::min(kChannelBlock, C - c0);
    float mean[kChannelBlock] = {};
    for (int64_t j = 0; j < width; ++j) mean[j] = a.mean[c0 + j];
    double s1[kChannelBlock], s2[kChannelBlock];
    auto sums = [&](auto relu_tag) {
      constexpr bool kRelu = decltype(relu_tag)::value;
      block_sums(rows, width, [&](int64_t m, int64_t j, float& t1, float& t2) {
        const int64_t i = m * C + c0 + j;
        const float dy = math::relu_masked_grad(to_float(g[i]), kRelu ? to_float(o[i]) : 1.0f, kRelu);
        t1 = dy;
        t2 = dy * (to_float(x[i]) - mean[j]);
      }, s1, s2);
    };
    if (a.relu) sums(std::true_type{});
    else sums(std::false_type{});
    for (int64_t j = 0; j < width; ++j) {
      a.grad_bias[c0 + j] = static_cast<float>(s1[j]);
      a.grad_weight[c0 + j] = static_cast<float>(s2[j]) * math::batch_norm_invstd(a.var[c0 + j], a.eps);
    }
  }
}

template <typename scalar_t, bool kRelu, bool kTraining, bool kWriteResidual>
DIVCO_CPU_INLINE void backward_rows_nhwc_impl(const BatchNormArgs& a, const float* k, const float* b, const float* cc,
                                              int64_t begin, int64_t end) {
  const int64_t C = a.layout.channels;
  const auto* g = static_cast<const scalar_t*>(a.grad);
  const auto* o = static_cast<const scalar_t*>(a.saved_out);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dx = static_cast<scalar_t*>(a.grad_x);
  auto* dr = static_cast<scalar_t*>(a.grad_residual);
  for (int64_t m = begin; m < end; ++m) {
    const int64_t base = m * C;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = base + c;
      const float dy = math::relu_masked_grad(to_float(g[i]), kRelu ? to_float(o[i]) : 1.0f, kRelu);
      const float mean = a.mean[c];
      const float xv = kTraining ? to_float(x[i]) : mean;
      dx[i] = from_float<scalar_t>(math::batch_norm_backward_value(dy, xv, mean, BatchNormBackward{k[c], b[c], cc[c]}));
      if (kWriteResidual) dr[i] = from_float<scalar_t>(dy);
    }
  }
}

template <typename scalar_t>
DIVCO_CPU_INLINE void backward_rows_nhwc(const BatchNormArgs& a, const float* k, const float* b, const float* cc,
                                         int64_t begin, int64_t end) {
  const bool res = a.grad_residual != nullptr;
#define DIVCO_BN_ROWS(R, T, W) backward_rows_nhwc_impl<scalar_t, R, T, W>(a, k, b, cc, begin, end)
  if (a.relu) {
    if (a.training) { if (res) DIVCO_BN_ROWS(true, true, true); else DIVCO_BN_ROWS(true, true, false); }
    else { if (res) DIVCO_BN_ROWS(true, false, true); else DIVCO_BN_ROWS(true, false, false); }
  } else {
    // Without ReLU the residual's gradient is grad_out itself: never written here.
    if (a.training) DIVCO_BN_ROWS(false, true, false);
    else DIVCO_BN_ROWS(false, false, false);
  }
#undef DIVCO_BN_ROWS
}

// The per-dtype entry points, compiled for AVX2 and baseline x86-64 (row_loops.h).
#define DIVCO_BN_CLONES(name, ...)                                                                        \
  DIVCO_CPU_TARGET_CLONES void name##_f32(const BatchNormArgs& a, __VA_ARGS__) { name<float>(a, ARGS); }  \
  DIVCO_CPU_TARGET_CLONES void name##_bf16(const BatchNormArgs& a, __VA_ARGS__) {                        \
    name<c10::BFloat16>(a, ARGS);                                                                         \
  }                                                                                                       \
  DIVCO_CPU_TARGET_CLONES void name##_f16(const BatchNormArgs& a, __VA_ARGS__) { name<c10::Half>(a, ARGS); }

#define ARGS begin, end
DIVCO_BN_CLONES(forward_channels_nchw, int64_t begin, int64_t end)
DIVCO_BN_CLONES(backward_channels_nchw, int64_t begin, int64_t end)
DIVCO_BN_CLONES(forward_stats_nhwc, int64_t begin, int64_t end)
DIVCO_BN_CLONES(backward_sums_nhwc, int64_t begin, int64_t end)
#undef ARGS
#define ARGS affine, begin, end
DIVCO_BN_CLONES(forward_rows_nhwc, const BatchNormAffine* affine, int64_t begin, int64_t end)
#undef ARGS
#define ARGS k, b, cc, begin, end
DIVCO_BN_CLONES(backward_rows_nhwc, const float* k, const float* b, const float* cc, int64_t begin, int64_t end)
#undef ARGS
#undef DIVCO_BN_CLONES

template <typename F32, typename BF16, typename F16>
auto by_dtype(LogitsDtype dtype, F32 f32, BF16 bf16, F16 f16) {
  return dtype == LogitsDtype::kFloat32 ? f32 : dtype == LogitsDtype::kBFloat16 ? bf16 : f16;
}

int64_t grain(int64_t work_per_item) { return std::max<int64_t>(1, kWorkPerTask / std::max<int64_t>(work_per_item, 1)); }

}  // namespace

void run_batch_norm(const BatchNormArgs& a) {
  const BatchNormLayout& l = a.layout;
  const int64_t C = l.channels, rows = l.batch * l.spatial;
  if (!l.channels_last) {
    auto fn = by_dtype(l.dtype, forward_channels_nchw_f32, forward_channels_nchw_bf16, forward_channels_nchw_f16);
    at::parallel_for(0, C, grain(rows), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
    return;
  }
  if (a.training) {
    auto stats = by_dtype(l.dtype, forward_stats_nhwc_f32, forward_stats_nhwc_bf16, forward_stats_nhwc_f16);
    const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
    at::parallel_for(0, blocks, grain(rows * kChannelBlock), [&](int64_t begin, int64_t end) { stats(a, begin, end); });
  }
  std::vector<BatchNormAffine> affine(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) affine[c] = math::batch_norm_affine(a.mean[c], a.var[c], a.eps, a.weight, a.bias, c);
  auto fn = by_dtype(l.dtype, forward_rows_nhwc_f32, forward_rows_nhwc_bf16, forward_rows_nhwc_f16);
  at::parallel_for(0, rows, grain(C), [&](int64_t begin, int64_t end) { fn(a, affine.data(), begin, end); });
}

void run_batch_norm_backward(const BatchNormArgs& a) {
  const BatchNormLayout& l = a.layout;
  const int64_t C = l.channels, rows = l.batch * l.spatial;
  if (!l.channels_last) {
    auto fn = by_dtype(l.dtype, backward_channels_nchw_f32, backward_channels_nchw_bf16, backward_channels_nchw_f16);
    at::parallel_for(0, C, grain(rows), [&](int64_t begin, int64_t end) { fn(a, begin, end); });
    return;
  }
  auto sums = by_dtype(l.dtype, backward_sums_nhwc_f32, backward_sums_nhwc_bf16, backward_sums_nhwc_f16);
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, grain(rows * kChannelBlock), [&](int64_t begin, int64_t end) { sums(a, begin, end); });
  std::vector<float> k(static_cast<size_t>(C)), b(static_cast<size_t>(C)), cc(static_cast<size_t>(C));
  const float count = static_cast<float>(rows);
  for (int64_t c = 0; c < C; ++c) {
    const auto co = math::batch_norm_backward_coefficients(a.var[c], a.eps, a.weight, c, a.grad_bias[c],
                                                           a.grad_weight[c], count, a.training);
    k[c] = co.k;
    b[c] = co.b;
    cc[c] = co.c;
  }
  auto fn = by_dtype(l.dtype, backward_rows_nhwc_f32, backward_rows_nhwc_bf16, backward_rows_nhwc_f16);
  at::parallel_for(0, rows, grain(C), [&](int64_t begin, int64_t end) { fn(a, k.data(), b.data(), cc.data(), begin, end); });
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& residual, bool training, double eps, bool relu) {
  BatchNormForwardCall call = prepare_batch_norm(x, weight, bias, running_mean, running_var, residual, training, eps,
                                                 relu, c10::DeviceType::CPU);
  cpu::run_batch_norm(call.args);
  return {call.out, call.mean, call.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, bool training, double eps,
    bool relu, bool residual_grad) {
  BatchNormBackwardCall call = prepare_batch_norm_backward(grad_out, x, out, weight, mean, var, training, eps, relu,
                                                           residual_grad, c10::DeviceType::CPU);
  cpu::run_batch_norm_backward(call.args);
  return {call.grad_x, call.grad_residual, call.grad_weight, call.grad_bias};
}

void batch_norm_update_stats_cpu(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& var, const std::optional<at::Tensor>& num_batches_tracked,
                                 std::optional<double> momentum, int64_t count) {
  const BatchNormUpdateArgs a = prepare_batch_norm_update_stats(running_mean, running_var, mean, var,
                                                                num_batches_tracked, momentum, count,
                                                                c10::DeviceType::CPU);
  const float factor = math::running_factor(a.cumulative, a.momentum,
                                            a.num_batches_tracked != nullptr ? *a.num_batches_tracked : 0);
  for (int64_t c = 0; c < a.channels; ++c) {
    a.running_mean[c] = math::running_update(a.running_mean[c], a.mean[c], factor, 1.0f);
    a.running_var[c] = math::running_update(a.running_var[c], a.var[c], factor, a.unbias);
  }
}

}  // namespace

}  // namespace ops
}  // namespace divco

TORCH_LIBRARY_IMPL(divco, CPU, m) {
  m.impl("batch_norm_native", &divco::ops::batch_norm_cpu);
  m.impl("batch_norm_backward_native", &divco::ops::batch_norm_backward_cpu);
  m.impl("batch_norm_update_stats_native", &divco::ops::batch_norm_update_stats_cpu);
}
