// Loops over one row of K floats for the CPU kernels, written so that GCC and Clang
// vectorise them at -O3 (with -fno-trapping-math, which lets them turn the selects of
// exp_f32/log_f32 into blends; NaN handling is unchanged):
// - reductions keep kLanes independent accumulators combined in a fixed order at the end,
//   so the result does not depend on the vector width, the thread count or the CPU;
// - the row functions are compiled twice (AVX2 and baseline x86-64) and picked when the
//   library loads (target_clones), so a wheel built anywhere runs everywhere.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "../../cotrain_math.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DIVCO_NO_TARGET_CLONES)
#define DIVCO_CPU_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DIVCO_CPU_TARGET_CLONES
#endif

#if defined(__GNUC__)
// The loops below must be inlined into the cloned row functions to be compiled for AVX2.
#define DIVCO_CPU_INLINE __attribute__((always_inline)) inline
#else
#define DIVCO_CPU_INLINE inline
#endif

namespace divco {
namespace ops {
namespace cpu {

constexpr int kLanes = 8;

// Fewest logits worth a thread: about 4096 (some 20 us of work) amortise the OpenMP
// fork/join and the row workspace. Every CPU kernel splits its rows with this grain.
constexpr int64_t kMinLogitsPerThread = 4096;

// The grain of at::parallel_for over rows of S x K logits.
inline int64_t row_grain_size(int64_t branches, int64_t classes) {
  return std::max<int64_t>(1, kMinLogitsPerThread / std::max<int64_t>(branches * classes, 1));
}

// Defines `name(args, begin, end, scalar_t{})`: rows_template<scalar_t>(args, begin, end)
// behind one entry point per logits dtype, each compiled with target_clones (which does
// not apply to templates). Pick one with dispatch_logits_dtype.
#define DIVCO_CPU_CLONED_ROWS(name, Args, rows_template)                                        \
  DIVCO_CPU_TARGET_CLONES void name(const Args& a, int64_t begin, int64_t end, float) {         \
    rows_template<float>(a, begin, end);                                                        \
  }                                                                                             \
  DIVCO_CPU_TARGET_CLONES void name(const Args& a, int64_t begin, int64_t end, c10::BFloat16) { \
    rows_template<c10::BFloat16>(a, begin, end);                                                \
  }                                                                                             \
  DIVCO_CPU_TARGET_CLONES void name(const Args& a, int64_t begin, int64_t end, c10::Half) {     \
    rows_template<c10::Half>(a, begin, end);                                                    \
  }

// Whether the CPU kernels were compiled with an AVX2 clone (reported by divco._C).
constexpr bool kHasAvx2Clone =
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DIVCO_NO_TARGET_CLONES)
    true;
#else
    false;
#endif

template <typename scalar_t>
DIVCO_CPU_INLINE float to_float(scalar_t v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
DIVCO_CPU_INLINE scalar_t from_float(float v) {
  return static_cast<scalar_t>(v);
}

DIVCO_CPU_INLINE float combine_lanes(const float (&acc)[kLanes]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sum_k term(k) in a fixed order: kLanes interleaved partial sums, then the tail.
template <typename Term>
DIVCO_CPU_INLINE float lane_sum(int64_t count, Term&& term) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += term(k + l);
  }
  float tail = 0.0f;
  for (; k < count; ++k) tail += term(k);
  return combine_lanes(acc) + tail;
}

// max_k x[k], NaN if any x[k] is NaN; -inf for an empty row.
DIVCO_CPU_INLINE float lane_max(const float* x, int64_t count) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -math::positive_infinity();
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] = math::max_nan(acc[l], x[k + l]);
  }
  float m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = math::max_nan(m, acc[l]);
  for (; k < count; ++k) m = math::max_nan(m, x[k]);
  return m;
}

// max_k x[k] and torch.argmax (the first index of the max; NaN counts as the largest
// value, the first NaN wins). One pass; NaN if any x[k] is NaN; {-inf, 0} for an empty row.
struct MaxArgMax {
  float max;
  int64_t index;
};

#if defined(__GNUC__) && !defined(__clang__)
// GCC vector extensions: compilers do not vectorise an argmax loop by themselves. Eight
// lanes, lowered to two SSE registers or one AVX2 register. (Other compilers: scalar loop.)
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

DIVCO_CPU_INLINE MaxArgMax lane_max_argmax(const float* x, int64_t count) {
  Float8 best;
  Int8 best_index, index;
  for (int l = 0; l < kLanes; ++l) {
    best[l] = -math::positive_infinity();
    best_index[l] = static_cast<int32_t>(count);  // loses every tie against a real index
    index[l] = l;
  }
  int64_t k = 0;
  if (count <= INT32_MAX - kLanes) {
    for (; k + kLanes <= count; k += kLanes) {
      Float8 v;
      std::memcpy(&v, x + k, sizeof(v));
      // Within a lane indices grow, so "strictly greater" keeps the first occurrence.
      const Int8 take = (v > best) | ((v != v) & (best == best));
      best = take ? v : best;
      best_index = take ? index : best_index;
      index += kLanes;
    }
  }
  MaxArgMax result{-math::positive_infinity(), count};
  for (int l = 0; l < kLanes; ++l) {
    if (math::argmax_prefers(best[l], best_index[l], result.max, result.index)) {
      result.max = best[l];
      result.index = best_index[l];
    }
  }
  for (; k < count; ++k) {
    if (math::argmax_prefers(x[k], k, result.max, result.index)) result = {x[k], k};
  }
  if (result.index == count) result.index = 0;  // empty row
  return result;
}
#else
DIVCO_CPU_INLINE MaxArgMax lane_max_argmax(const float* x, int64_t count) {
  MaxArgMax result{-math::positive_infinity(), 0};
  for (int64_t k = 0; k < count; ++k) {
    if (math::argmax_prefers(x[k], k, result.max, result.index)) result = {x[k], k};
  }
  return result;
}
#endif

// Converts `count` values at `src` with element stride `stride` to floats.
template <typename scalar_t>
DIVCO_CPU_INLINE void load_row(const scalar_t* src, int64_t stride, int64_t count, float* dst) {
  if (stride == 1) {
    for (int64_t k = 0; k < count; ++k) dst[k] = to_float(src[k]);
  } else {
    for (int64_t k = 0; k < count; ++k) dst[k] = to_float(src[k * stride]);
  }
}

}  // namespace cpu
}  // namespace ops
}  // namespace divco
