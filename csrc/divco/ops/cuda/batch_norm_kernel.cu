// CUDA kernels of divco::batch_norm_native and divco::batch_norm_backward_native.
//
// Three launches each way, all on the caller's stream, no host synchronisation:
//   1. partial sums: grid (channel tiles, chunks of positions); a block owns one channel (NCHW:
//      256 threads walk its contiguous H·W runs) or 32 channels x 8 rows (channels_last: each
//      warp reads 32 neighbouring channels of a row). Threads sum in float, the block combines
//      its threads in a fixed order in double -> partial[chunk, 0|1, c].
//   2. finalize, one thread per channel: chunks merged in order (double; forward: each chunk's
//      moments about its own pivot, Chan's formula) -> forward: mean, biased variance, scale,
//      bias; backward: grad_bias, grad_weight and the dx coefficients.
//   3. one elementwise pass (grid-stride): forward out; backward dx and the residual's gradient.
// Per-channel formulas: ../../batch_norm_math.h (shared with the CPU kernels). Deterministic:
// the chunking depends on the shape only.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../../batch_norm_math.h"
#include "../kernel_args.h"
#include "launchers.h"
#include "typed_access.cuh"

namespace divco {
namespace ops {
namespace cuda {
namespace {

namespace m = divco::math;

constexpr int kThreads = 256;
constexpr int64_t kReductionBlocks = 1024;  // blocks the reductions aim for (several per SM)
constexpr int64_t kMinPositionsPerThread = 4;

template <bool kChannelsLast>
__device__ __forceinline__ int64_t offset_of(const BatchNormLayout& l, int64_t position, int64_t c) {
  if (kChannelsLast) return position * l.channels + c;
  const int64_t n = position / l.spatial;
  return (n * l.channels + c) * l.spatial + (position - n * l.spatial);
}

template <bool kChannelsLast>
__host__ __device__ constexpr int channels_per_block() {
  return kChannelsLast ? 32 : 1;
}

int64_t positions_per_chunk(const BatchNormLayout& l, bool channels_last) {
  const int64_t positions = l.batch * l.spatial;
  const int64_t tile = channels_last ? 32 : 1;
  const int64_t rows_per_block = kThreads / tile;
  const int64_t channel_tiles = (l.channels + tile - 1) / tile;
  const int64_t wanted_chunks = std::max<int64_t>(1, kReductionBlocks / channel_tiles);
  const int64_t per_chunk = (positions + wanted_chunks - 1) / wanted_chunks;
  return std::max<int64_t>(per_chunk, rows_per_block * kMinPositionsPerThread);
}

// Forward: Σ(x - pivot), Σ(x - pivot)²; backward: Σdy', Σdy'·(x - mean).
template <typename scalar_t, bool kChannelsLast, bool kBackward, bool kRelu>
__global__ void __launch_bounds__(kThreads) partial_sums_kernel(const BatchNormArgs a, double* partial,
                                                                int64_t per_chunk) {
  constexpr int kTile = channels_per_block<kChannelsLast>();
  constexpr int kRows = kThreads / kTile;
  const BatchNormLayout& l = a.layout;
  const int tc = threadIdx.x % kTile, tr = threadIdx.x / kTile;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kTile + tc;
  const int64_t chunk = blockIdx.y;
  const int64_t positions = l.batch * l.spatial;
  const int64_t p0 = chunk * per_chunk;
  const int64_t p1 = p0 + per_chunk < positions ? p0 + per_chunk : positions;
  // forward: double, since a float square of a difference above 1.8e19 overflows while the
  // variance still fits float32; backward: float (products of gradients and centred x)
  using acc_t = typename std::conditional<kBackward, float, double>::type;
  acc_t s1 = 0, s2 = 0;
  // forward: the chunk's own pivot (its first value), so far-apart chunks keep their digits
  const float centre = c >= l.channels ? 0.0f
                       : kBackward     ? a.mean[c]
                                       : load<scalar_t>(a.x, offset_of<kChannelsLast>(l, p0 < positions ? p0 : 0, c));
  if (c < l.channels) {
    for (int64_t p = p0 + tr; p < p1; p += kRows) {
      const int64_t i = offset_of<kChannelsLast>(l, p, c);
      const float d = load<scalar_t>(a.x, i) - centre;
      if (kBackward) {
        const float dy = m::relu_masked_grad(load<scalar_t>(a.grad, i), kRelu ? load<scalar_t>(a.saved_out, i) : 1.0f, kRelu);
        s1 += dy;
        s2 += dy * d;
      } else {
        s1 += d;
        s2 += static_cast<acc_t>(d) * d;
      }
    }
  }
  __shared__ acc_t shared1[kThreads], shared2[kThreads];
  shared1[threadIdx.x] = s1;
  shared2[threadIdx.x] = s2;
  __syncthreads();
  if (tr == 0 && c < l.channels) {
    double t1 = 0.0, t2 = 0.0;
    for (int r = 0; r < kRows; ++r) {
      t1 += static_cast<double>(shared1[r * kTile + tc]);
      t2 += static_cast<double>(shared2[r * kTile + tc]);
    }
    if (!kBackward) {  // the chunk's moments: mean and M2 (Chan's merge in finalize)
      const m::Moments mo = m::moments_from_shifted_sums(centre, t1, t2, static_cast<double>(p1 > p0 ? p1 - p0 : 0));
      t1 = mo.mean;
      t2 = mo.m2;
    }
    partial[(chunk * 2) * l.channels + c] = t1;
    partial[(chunk * 2 + 1) * l.channels + c] = t2;
  }
}

// coefficients [3, C]: forward scale, bias, mean; backward k, b, c.
template <typename scalar_t, bool kChannelsLast, bool kBackward>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const BatchNormArgs a, const double* partial, int64_t chunks,
                                                            int64_t per_chunk, float* coefficients) {
  const BatchNormLayout& l = a.layout;
  const int64_t C = l.channels;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const double count = static_cast<double>(l.batch * l.spatial);
  double s1 = 0.0, s2 = 0.0;
  if (!kBackward && a.training) {  // chunks' moments merged in chunk order
    const int64_t positions = l.batch * l.spatial;
    m::Moments moments{0.0, 0.0, 0.0};
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t p0 = k * per_chunk;
      const int64_t n = (p0 + per_chunk < positions ? p0 + per_chunk : positions) - p0;
      moments = m::merge_moments(moments, m::Moments{static_cast<double>(n), partial[(k * 2) * C + c],
                                                     partial[(k * 2 + 1) * C + c]});
    }
    const m::BatchNormStats stats = m::batch_norm_stats(moments);
    a.mean[c] = stats.mean;
    a.var[c] = stats.var;
  }
  if (kBackward) {
    for (int64_t k = 0; k < chunks; ++k) {
      s1 += partial[(k * 2) * C + c];
      s2 += partial[(k * 2 + 1) * C + c];
    }
  }
  if (kBackward) {
    const float sum_dy = static_cast<float>(s1);
    const float sum_dy_xhat = static_cast<float>(s2) * m::batch_norm_invstd(a.var[c], a.eps);
    a.grad_bias[c] = sum_dy;
    a.grad_weight[c] = sum_dy_xhat;
    const m::BatchNormBackward co = m::batch_norm_backward_coefficients(
        a.var[c], a.eps, a.weight, c, sum_dy, sum_dy_xhat, static_cast<float>(count), a.training);
    coefficients[c] = co.k;
    coefficients[C + c] = co.b;
    coefficients[2 * C + c] = co.c;
    return;
  }
  const m::BatchNormAffine af = m::batch_norm_affine(a.mean[c], a.var[c], a.eps, a.weight, a.bias, c);
  coefficients[c] = af.scale;
  coefficients[C + c] = af.bias;
  coefficients[2 * C + c] = af.mean;
}

// One thread per channel; the factor is read on the device (no host sync for momentum=None).
__global__ void __launch_bounds__(kThreads) update_stats_kernel(const BatchNormUpdateArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.channels) return;
  const float factor = m::running_factor(a.cumulative, a.momentum,
                                         a.num_batches_tracked != nullptr ? *a.num_batches_tracked : 0);
  a.running_mean[c] = m::running_update(a.running_mean[c], a.mean[c], factor, 1.0f);
  a.running_var[c] = m::running_update(a.running_var[c], a.var[c], factor, a.unbias);
}

__device__ __forceinline__ int64_t channel_of(const BatchNormLayout& l, int64_t i) {
  return l.channels_last ? i % l.channels : (i / l.spatial) % l.channels;
}

template <typename scalar_t, bool kResidual, bool kRelu>
__global__ void __launch_bounds__(kThreads) forward_kernel(const BatchNormArgs a, const float* coefficients,
                                                           int64_t numel) {
  const int64_t C = a.layout.channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = channel_of(a.layout, i);
    const float res = kResidual ? load<scalar_t>(a.residual, i) : 0.0f;
    const m::BatchNormAffine af{coefficients[2 * C + c], coefficients[c], coefficients[C + c]};
    store<scalar_t>(a.out, i, m::batch_norm_forward_value(load<scalar_t>(a.x, i), af, res, kRelu));
  }
}

template <typename scalar_t, bool kRelu, bool kWriteResidual>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BatchNormArgs a, const float* coefficients,
                                                            int64_t numel) {
  const int64_t C = a.layout.channels;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = channel_of(a.layout, i);
    const float dy = m::relu_masked_grad(load<scalar_t>(a.grad, i), kRelu ? load<scalar_t>(a.saved_out, i) : 1.0f, kRelu);
    const float mean = a.mean[c];
    const float x = a.training ? load<scalar_t>(a.x, i) : mean;
    const m::BatchNormBackward co{coefficients[c], coefficients[C + c], coefficients[2 * C + c]};
    store<scalar_t>(a.grad_x, i, m::batch_norm_backward_value(dy, x, mean, co));
    if (kWriteResidual) store<scalar_t>(a.grad_residual, i, dy);
  }
}

int elementwise_blocks(int64_t numel) {
  const int64_t wanted = (numel + kThreads * 4 - 1) / (kThreads * 4);  // about 4 values per thread
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(wanted, 1), int64_t{1} << 20));
}

template <typename scalar_t, bool kChannelsLast>
void forward(const BatchNormArgs& a, double* partial, float* coefficients, cudaStream_t stream) {
  const BatchNormLayout& l = a.layout;
  constexpr int kTile = channels_per_block<kChannelsLast>();
  const int64_t per_chunk = positions_per_chunk(l, kChannelsLast);
  const int64_t chunks = (l.batch * l.spatial + per_chunk - 1) / per_chunk;
  if (a.training) {
    const dim3 grid(static_cast<unsigned>((l.channels + kTile - 1) / kTile), static_cast<unsigned>(chunks));
    partial_sums_kernel<scalar_t, kChannelsLast, false, false><<<grid, kThreads, 0, stream>>>(a, partial, per_chunk);
  }
  const unsigned channel_blocks = static_cast<unsigned>((l.channels + kThreads - 1) / kThreads);
  finalize_kernel<scalar_t, kChannelsLast, false><<<channel_blocks, kThreads, 0, stream>>>(a, partial, chunks, per_chunk,
                                                                                         coefficients);
  const int64_t numel = l.batch * l.channels * l.spatial;
  const int blocks = elementwise_blocks(numel);
  if (a.residual != nullptr) {
    if (a.relu) forward_kernel<scalar_t, true, true><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
    else forward_kernel<scalar_t, true, false><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
  } else {
    if (a.relu) forward_kernel<scalar_t, false, true><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
    else forward_kernel<scalar_t, false, false><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
  }
}

template <typename scalar_t, bool kChannelsLast>
void backward(const BatchNormArgs& a, double* partial, float* coefficients, cudaStream_t stream) {
  const BatchNormLayout& l = a.layout;
  constexpr int kTile = channels_per_block<kChannelsLast>();
  const int64_t per_chunk = positions_per_chunk(l, kChannelsLast);
  const int64_t chunks = (l.batch * l.spatial + per_chunk - 1) / per_chunk;
  const dim3 grid(static_cast<unsigned>((l.channels + kTile - 1) / kTile), static_cast<unsigned>(chunks));
  if (a.relu) partial_sums_kernel<scalar_t, kChannelsLast, true, true><<<grid, kThreads, 0, stream>>>(a, partial, per_chunk);
  else partial_sums_kernel<scalar_t, kChannelsLast, true, false><<<grid, kThreads, 0, stream>>>(a, partial, per_chunk);
  const unsigned channel_blocks = static_cast<unsigned>((l.channels + kThreads - 1) / kThreads);
  finalize_kernel<scalar_t, kChannelsLast, true><<<channel_blocks, kThreads, 0, stream>>>(a, partial, chunks, per_chunk,
                                                                                        coefficients);
  const int64_t numel = l.batch * l.channels * l.spatial;
  const int blocks = elementwise_blocks(numel);
  if (a.relu) {
    if (a.grad_residual != nullptr) backward_kernel<scalar_t, true, true><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
    else backward_kernel<scalar_t, true, false><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
  } else {
    backward_kernel<scalar_t, false, false><<<blocks, kThreads, 0, stream>>>(a, coefficients, numel);
  }
}


#define DIVCO_BN_DISPATCH(fn, a, ...)                                                        \
  switch ((a).layout.dtype) {                                                              \
    case LogitsDtype::kFloat32:                                                            \
      (a).layout.channels_last ? fn<float, true>(a, __VA_ARGS__) : fn<float, false>(a, __VA_ARGS__); \
      break;                                                                               \
    case LogitsDtype::kBFloat16:                                                           \
      (a).layout.channels_last ? fn<c10::BFloat16, true>(a, __VA_ARGS__)                   \
                               : fn<c10::BFloat16, false>(a, __VA_ARGS__);                 \
      break;                                                                               \
    case LogitsDtype::kFloat16:                                                            \
      (a).layout.channels_last ? fn<c10::Half, true>(a, __VA_ARGS__) : fn<c10::Half, false>(a, __VA_ARGS__); \
      break;                                                                               \
  }

}  // namespace

int64_t batch_norm_chunks(const BatchNormLayout& layout) {
  const int64_t per_chunk = positions_per_chunk(layout, layout.channels_last);
  return (layout.batch * layout.spatial + per_chunk - 1) / per_chunk;
}

cudaError_t launch_batch_norm(const BatchNormArgs& args, double* partial, float* coefficients, cudaStream_t stream) {
  DIVCO_BN_DISPATCH(forward, args, partial, coefficients, stream)
  return cudaGetLastError();
}

cudaError_t launch_batch_norm_backward(const BatchNormArgs& args, double* partial, float* coefficients,
                                       cudaStream_t stream) {
  DIVCO_BN_DISPATCH(backward, args, partial, coefficients, stream)
  return cudaGetLastError();
}

cudaError_t launch_batch_norm_update_stats(const BatchNormUpdateArgs& args, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((args.channels + kThreads - 1) / kThreads);
  if (blocks > 0) update_stats_kernel<<<blocks, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
