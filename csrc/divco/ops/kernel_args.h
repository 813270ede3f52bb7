// Plain-data descriptions of one call of each fused op, filled by the host code from
// tensors (ops/*.cpp) and read by the CPU and CUDA kernels. Keeping tensors out of the
// kernel files lets the .cu files include no ATen header, which keeps nvcc builds short.
#pragma once

#include <cstdint>

namespace divco {
namespace ops {

enum class LogitsDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class CotrainKind : int { kJensenShannon = 0, kPairwiseKL = 1 };

enum class EnsembleMode : int { kMeanLogits = 0, kMeanProbs = 1, kGeoMean = 2, kMax = 3, kMaxProbs = 4, kVote = 5 };

// The mode strings of the ops (divco/vocabulary.py spells the same), in the order
// build_info()["ensemble_modes"] lists them.
struct EnsembleModeName {
  const char* name;
  EnsembleMode mode;
};
inline constexpr EnsembleModeName kEnsembleModes[] = {
    {"mean_logits", EnsembleMode::kMeanLogits}, {"mean_probs", EnsembleMode::kMeanProbs},
    {"geo_mean", EnsembleMode::kGeoMean},       {"max", EnsembleMode::kMax},
    {"max_probs", EnsembleMode::kMaxProbs},     {"vote", EnsembleMode::kVote},
};

// The modes that take per-branch weights (divco/vocabulary.py WEIGHTED_ENSEMBLE_MODES).
inline constexpr bool takes_weights(EnsembleMode mode) {
  return mode != EnsembleMode::kMax && mode != EnsembleMode::kMaxProbs;
}

// Version of the edge-value semantics the kernels implement (build_info()["semantics_version"]):
// 2 = -inf logits have probability 0 and contribute 0 (gradient 0) to every entropy and KL
// term, an all -inf row is NaN; logits near +-3e38 stay finite (the mean of logits is
// accumulated in double); the max / max_probs gradient goes to the first branch holding
// NaN, else the first maximal branch (torch.max).
inline constexpr int kSemanticsVersion = 2;

// Logits [N, S, K] with arbitrary element strides (no copy is made).
struct LogitsView {
  const void* data;
  LogitsDtype dtype;
  int64_t rows;      // N
  int64_t branches;  // S
  int64_t classes;   // K
  int64_t stride_row;
  int64_t stride_branch;
  int64_t stride_class;
  double inv_branches;  // 1 / S, computed on the host (see math::mean_logit_finish)
};

struct CotrainArgs {
  LogitsView logits;
  // Exactly one target is set: class indices int64 [N], or soft targets float32 [N, K].
  const int64_t* target_index;
  int64_t target_index_stride;
  const float* target_soft;
  int64_t target_soft_stride_row;
  int64_t target_soft_stride_class;
  const float* weight;  // 0-dim, on the logits' device: read by the kernel, never by the host
  // Per-sample weights v_n, float32 [N] (strided) on the logits' device, or nullptr: row n's
  // cross-entropies, co-training term and gradient are scaled by v_n (math::row_weight).
  const float* sample_weight;
  int64_t sample_weight_stride;
  CotrainKind kind;
  float inv_temperature;
  // Per-row partial results, reduced in a fixed order afterwards (deterministic):
  float* row_ce;      // [N, S]
  float* row_cot;     // [N]
  int32_t* row_hits;  // [N, S + 1]: 1 where the branch (then the ensemble) predicts the target
  // Outputs.
  void* ensemble;  // [N, K] contiguous, logits dtype (the mean of the branch logits)
  void* grad;      // [N, S, K] contiguous, stored_grad_t (float32 for float16 logits, else the
                   // logits dtype); nullptr when no gradient is wanted
  float* loss;     // 0-dim
  float* ce;       // [S]
  float* cot;      // 0-dim
  int64_t* correct;  // [S + 1]
};

struct EnsembleArgs {
  LogitsView logits;
  EnsembleMode mode;
  // Per-branch weights [S] float32 (contiguous), normalised to sum 1 (prepare_ensemble);
  // nullptr: equal weights, the unweighted formulas.
  const float* weights;
  void* out;  // [N, K] contiguous, logits dtype
};

struct EnsembleBackwardArgs {
  LogitsView logits;
  EnsembleMode mode;
  const float* weights;  // as EnsembleArgs::weights
  // grad_out [N, K] in the logits dtype, arbitrary strides.
  const void* grad_out;
  int64_t grad_out_stride_row;
  int64_t grad_out_stride_class;
  void* grad_logits;  // [N, S, K] contiguous, logits dtype
};

// x [N, C, H, W] contiguous (NCHW) or channels_last; value (n, c, hw) lives at
// (n·C + c)·HW + hw (NCHW) or (n·HW + hw)·C + c (channels_last). Every tensor of x's shape
// that a call reads or writes has these offsets.
struct BatchNormLayout {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 0;   // H·W
  bool channels_last = false;
  LogitsDtype dtype = LogitsDtype::kFloat32;
};

struct BatchNormArgs {
  BatchNormLayout layout;
  // forward
  const void* x = nullptr;
  const void* residual = nullptr;  // nullptr: none
  void* out = nullptr;
  // backward
  const void* grad = nullptr;       // grad_out
  const void* saved_out = nullptr;  // the forward's output (ReLU mask); nullptr without ReLU
  void* grad_x = nullptr;
  void* grad_residual = nullptr;  // dy', written when not nullptr
  // per channel, float32 [C]
  const float* weight = nullptr;  // nullptr: 1
  const float* bias = nullptr;    // nullptr: 0
  float* mean = nullptr;  // forward training: written; eval and backward: read (batch or running)
  float* var = nullptr;   // biased variance, likewise
  float* grad_weight = nullptr;  // backward: Σdy'·x̂
  float* grad_bias = nullptr;    // backward: Σdy'
  bool training = true;
  bool relu = false;
  float eps = 1e-5f;
};

// The running-statistics update of batch_norm_update_stats_native: float32 [C] tensors, in place.
struct BatchNormUpdateArgs {
  int64_t channels = 0;
  float* running_mean = nullptr;
  float* running_var = nullptr;
  const float* mean = nullptr;  // the batch mean
  const float* var = nullptr;   // the biased batch variance
  const int64_t* num_batches_tracked = nullptr;  // read on the device when cumulative
  bool cumulative = false;  // momentum=None: factor 1 / num_batches_tracked
  float momentum = 0.1f;
  float unbias = 1.0f;  // count / (count - 1)
};

}  // namespace ops
}  // namespace divco
