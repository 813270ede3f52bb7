#include "op_common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

namespace divco {
namespace ops {
namespace {

std::string shape_string(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) s += ", ";
    s += std::to_string(t.size(d));
  }
  return s + "]";
}

LogitsView check_logits(const at::Tensor& logits, const char* op, c10::DeviceType expected_device) {
  TORCH_CHECK_VALUE(logits.defined(), op, ": logits must be a tensor [N, S, K]; got an undefined tensor");
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must have 3 dims [N, S, K]; got ", logits.dim(),
                    " dims with shape ", shape_string(logits));
  const auto st = logits.scalar_type();
  LogitsDtype dtype;
  if (st == at::kFloat) {
    dtype = LogitsDtype::kFloat32;
  } else if (st == at::kBFloat16) {
    dtype = LogitsDtype::kBFloat16;
  } else if (st == at::kHalf) {
    dtype = LogitsDtype::kFloat16;
  } else {
    TORCH_CHECK_VALUE(false, op, ": logits must be float32, bfloat16 or float16; got ", st);
  }
  TORCH_CHECK_VALUE(logits.device().type() == expected_device, op, ": this kernel runs on ",
                    c10::DeviceTypeName(expected_device, /*lower_case=*/true), " tensors; got logits on ",
                    logits.device());
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits need at least one branch (S >= 1); got shape ",
                    shape_string(logits));
  TORCH_CHECK_VALUE(logits.size(2) >= 1, op, ": logits need at least one class (K >= 1); got shape ",
                    shape_string(logits));
  return {logits.data_ptr(), dtype,           logits.size(0),   logits.size(1),          logits.size(2),
          logits.stride(0),  logits.stride(1), logits.stride(2), 1.0 / static_cast<double>(logits.size(1))};
}

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name, " must be on the logits' device ",
                    logits.device(), "; got ", t.device());
}

CotrainKind parse_kind(std::string_view kind) {
  if (kind == "js") return CotrainKind::kJensenShannon;
  if (kind == "kl") return CotrainKind::kPairwiseKL;
  TORCH_CHECK_VALUE(false, "cotrain_loss_native: kind must be \"js\" or \"kl\"; got \"", std::string(kind), "\"");
}

EnsembleMode parse_mode(std::string_view mode, const char* op) {
  std::string expected;
  for (const auto& known : kEnsembleModes) {
    if (mode == known.name) return known.mode;
    expected += std::string(expected.empty() ? "" : ", ") + "\"" + known.name + "\"";
  }
  TORCH_CHECK_VALUE(false, op, ": mode must be one of ", expected, "; got \"", std::string(mode), "\"");
}

// Per-branch ensemble weights: float32 [S] on the logits' device, for a mode that takes them.
// Only metadata is checked (the values stay on the device: no host synchronisation). Returns
// the weights normalised to sum 1, to keep alive for the kernels (undefined: no weights).
at::Tensor check_ensemble_weights(const std::optional<at::Tensor>& weights, const at::Tensor& logits,
                                  EnsembleMode mode, const char* op) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  const at::Tensor& w = *weights;
  TORCH_CHECK_VALUE(takes_weights(mode), op,
                    ": the max ensembles take no weights; the modes that do: mean_logits, mean_probs, geo_mean, vote");
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat, op, ": weights must be float32; got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == logits.size(1), op, ": weights must have shape [S] = [",
                    logits.size(1), "] for logits of shape ", shape_string(logits), "; got ", shape_string(w));
  check_same_device(w, logits, op, "weights");
  // Normalised here, on the device (two small ATen ops, no host synchronisation): the kernels
  // then hold no per-row total, which cost the CUDA backward kernel register spills.
  const at::Tensor contiguous = w.contiguous();
  return contiguous.div(contiguous.sum());
}

}  // namespace

CotrainCall prepare_cotrain_loss(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight,
                            const std::optional<at::Tensor>& sample_weight, std::string_view kind, double temperature, bool compute_grad,
                            c10::DeviceType expected_device) {
  constexpr const char* op = "cotrain_loss_native";
  CotrainCall call{};
  CotrainArgs& a = call.args;
  a.logits = check_logits(logits, op, expected_device);
  const int64_t N = a.logits.rows, S = a.logits.branches, K = a.logits.classes;
  a.kind = parse_kind(kind);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a finite number > 0; got ", temperature);
  a.inv_temperature = static_cast<float>(1.0 / temperature);

  TORCH_CHECK_VALUE(target.defined(), op, ": target must be int64 class indices [N] or soft targets [N, K]; got an "
                    "undefined tensor");
  check_same_device(target, logits, op, "target");
  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == N, op,
                      ": int64 class indices must have shape [N] = [", N, "] for logits of shape ",
                      shape_string(logits), "; got ", shape_string(target));
    call.target = target;
    a.target_index = target.data_ptr<int64_t>();
    a.target_index_stride = target.stride(0);
  } else if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == N && target.size(1) == K, op,
                      ": soft targets must have shape [N, K] = [", N, ", ", K, "] for logits of shape ",
                      shape_string(logits), "; got ", shape_string(target));
    // The kernels read float32 soft targets (one kernel per logits dtype, not per pair of
    // dtypes): other float dtypes are converted once, strides are kept as they are.
    call.target = target.scalar_type() == at::kFloat ? target : target.to(at::kFloat);
    a.target_soft = call.target.data_ptr<float>();
    a.target_soft_stride_row = call.target.stride(0);
    a.target_soft_stride_class = call.target.stride(1);
  } else {
    TORCH_CHECK_VALUE(false, op, ": target must be int64 class indices [N] or floating soft targets [N, K]; got ",
                      target.scalar_type(), " with shape ", shape_string(target));
  }

  TORCH_CHECK_VALUE(weight.defined() && weight.dim() == 0 && weight.scalar_type() == at::kFloat, op,
                    ": weight must be a 0-dim float32 tensor; got ",
                    weight.defined() ? c10::toString(weight.scalar_type()) : "an undefined tensor",
                    weight.defined() ? " with shape " + shape_string(weight) : std::string());
  check_same_device(weight, logits, op, "weight");
  a.weight = weight.data_ptr<float>();

  // Per-sample weights: float32 [N], read by the kernels (the values are checked in Python
  // for CPU tensors; reading a CUDA tensor here would synchronise).
  if (sample_weight.has_value() && sample_weight->defined()) {
    const at::Tensor& v = *sample_weight;
    TORCH_CHECK_VALUE(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == N, op,
                      ": sample_weight must be a float32 tensor of shape [N] = [", N, "]; got ", v.scalar_type(),
                      " with shape ", shape_string(v));
    check_same_device(v, logits, op, "sample_weight");
    call.sample_weight = v;
    a.sample_weight = v.data_ptr<float>();
    a.sample_weight_stride = v.stride(0);
  }

  const auto f32 = logits.options().dtype(at::kFloat);
  call.loss = at::empty({}, f32);
  call.ce = at::empty({S}, f32);
  call.cot = at::empty({}, f32);
  call.ensemble = at::empty({N, K}, logits.options());
  call.correct = at::empty({S + 1}, logits.options().dtype(at::kLong));
  // float16 logits: a float32 gradient (stored_grad_t in dtype_dispatch.h, as the Triton operator).
  const auto grad_options = logits.scalar_type() == at::kHalf ? f32 : logits.options();
  call.grad = compute_grad ? at::empty({N, S, K}, grad_options) : at::empty({0}, grad_options);
  call.row_ce = at::empty({N, S}, f32);
  call.row_cot = at::empty({N}, f32);
  call.row_hits = at::empty({N, S + 1}, logits.options().dtype(at::kInt));

  a.row_ce = call.row_ce.data_ptr<float>();
  a.row_cot = call.row_cot.data_ptr<float>();
  a.row_hits = call.row_hits.data_ptr<int32_t>();
  a.ensemble = call.ensemble.data_ptr();
  a.grad = compute_grad ? call.grad.data_ptr() : nullptr;
  a.loss = call.loss.data_ptr<float>();
  a.ce = call.ce.data_ptr<float>();
  a.cot = call.cot.data_ptr<float>();
  a.correct = call.correct.data_ptr<int64_t>();
  return call;
}

EnsembleCall prepare_ensemble(const at::Tensor& logits, std::string_view mode,
                              const std::optional<at::Tensor>& weights, c10::DeviceType expected_device) {
  constexpr const char* op = "ensemble_native";
  EnsembleCall call{};
  call.args.logits = check_logits(logits, op, expected_device);
  call.args.mode = parse_mode(mode, op);
  call.weights = check_ensemble_weights(weights, logits, call.args.mode, op);
  call.args.weights = call.weights.defined() ? call.weights.data_ptr<float>() : nullptr;
  call.out = at::empty({logits.size(0), logits.size(2)}, logits.options());
  call.args.out = call.out.data_ptr();
  return call;
}

EnsembleBackwardCall prepare_ensemble_backward(const at::Tensor& grad_out, const at::Tensor& logits,
                                               std::string_view mode, const std::optional<at::Tensor>& weights,
                                               c10::DeviceType expected_device) {
  constexpr const char* op = "ensemble_backward_native";
  EnsembleBackwardCall call{};
  EnsembleBackwardArgs& a = call.args;
  a.logits = check_logits(logits, op, expected_device);
  a.mode = parse_mode(mode, op);
  call.weights = check_ensemble_weights(weights, logits, a.mode, op);
  a.weights = call.weights.defined() ? call.weights.data_ptr<float>() : nullptr;
  TORCH_CHECK_VALUE(grad_out.defined() && grad_out.dim() == 2 && grad_out.size(0) == logits.size(0) &&
                        grad_out.size(1) == logits.size(2),
                    op, ": grad_out must have shape [N, K] = [", logits.size(0), ", ", logits.size(2),
                    "] for logits of shape ", shape_string(logits), "; got ",
                    grad_out.defined() ? shape_string(grad_out) : std::string("an undefined tensor"));
  TORCH_CHECK_VALUE(at::isFloatingType(grad_out.scalar_type()), op, ": grad_out must be a floating tensor; got ",
                    grad_out.scalar_type());
  check_same_device(grad_out, logits, op, "grad_out");
  // The kernels read grad_out in the logits dtype (the dtype of the ensemble it is the
  // gradient of); another float dtype is converted once.
  call.grad_out = grad_out.scalar_type() == logits.scalar_type() ? grad_out : grad_out.to(logits.scalar_type());
  a.grad_out = call.grad_out.data_ptr();
  a.grad_out_stride_row = call.grad_out.stride(0);
  a.grad_out_stride_class = call.grad_out.stride(1);
  call.grad_logits = at::empty({logits.size(0), logits.size(1), logits.size(2)}, logits.options());
  a.grad_logits = call.grad_logits.data_ptr();
  return call;
}

// -- batch_norm ------------------------------------------------------------------------------

namespace {

void check_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name,
                    " must be float32 [C] = [", x.size(1), "]; got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", name, " is on ", t->device(), ", x on ", x.device());
}

at::Tensor contiguous_vector(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// `t` with exactly x's element offsets (x is contiguous in `format`).
at::Tensor like_x(const at::Tensor& t, const at::Tensor& x, at::MemoryFormat format, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), "; got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", x on ", x.device());
  at::Tensor same = t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type());
  return same.contiguous(format);
}

BatchNormLayout layout_of(const at::Tensor& x, const char* op, c10::DeviceType expected_device) {
  TORCH_CHECK_VALUE(x.device().type() == expected_device, op, ": expected a tensor on ",
                    c10::DeviceTypeName(expected_device), ", got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W]; got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                    ": x must be float32, bfloat16 or float16; got ", dtype);
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": x must not be empty; got shape ", x.sizes());
  BatchNormLayout l;
  l.batch = x.size(0);
  l.channels = x.size(1);
  l.spatial = x.size(2) * x.size(3);
  if (x.is_contiguous()) {
    l.channels_last = false;
  } else {
    TORCH_CHECK_VALUE(x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                      ": x must be contiguous or channels_last contiguous; got strides ", x.strides());
    l.channels_last = true;
  }
  l.dtype = dtype == at::kFloat ? LogitsDtype::kFloat32 : dtype == at::kBFloat16 ? LogitsDtype::kBFloat16 : LogitsDtype::kFloat16;
  return l;
}

at::MemoryFormat format_of(const BatchNormLayout& l) {
  return l.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace

BatchNormForwardCall prepare_batch_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& running_mean,
                                        const std::optional<at::Tensor>& running_var,
                                        const std::optional<at::Tensor>& residual, bool training, double eps,
                                        bool relu, c10::DeviceType expected_device) {
  const char* op = "batch_norm_native";
  BatchNormForwardCall call;
  BatchNormLayout& l = call.layout;
  l = layout_of(x, op, expected_device);
  check_vector(weight, "weight", x, op);
  check_vector(bias, "bias", x, op);
  check_vector(running_mean, "running_mean", x, op);
  check_vector(running_var, "running_var", x, op);
  TORCH_CHECK_VALUE(training || (running_mean.has_value() && running_var.has_value()), op,
                    ": eval mode needs running_mean and running_var");
  TORCH_CHECK_VALUE(!training || l.batch * l.spatial > 1, op,
                    ": training needs more than one value per channel (N·H·W > 1); got shape ", x.sizes());
  call.x = x;
  call.weight = contiguous_vector(weight);
  call.bias = contiguous_vector(bias);
  if (residual.has_value()) call.residual = like_x(*residual, x, format_of(l), "residual", op);
  call.out = at::empty_like(x);
  const auto f32 = x.options().dtype(at::kFloat);
  if (training) {
    call.mean = at::empty({l.channels}, f32);
    call.var = at::empty({l.channels}, f32);
  } else {
    call.mean = at::empty({0}, f32);
    call.var = at::empty({0}, f32);
    call.running_mean = running_mean->contiguous();
    call.running_var = running_var->contiguous();
  }
  BatchNormArgs& a = call.args;
  a.layout = l;
  a.x = x.data_ptr();
  a.residual = call.residual.defined() ? call.residual.data_ptr() : nullptr;
  a.out = call.out.data_ptr();
  a.weight = call.weight.defined() ? call.weight.data_ptr<float>() : nullptr;
  a.bias = call.bias.defined() ? call.bias.data_ptr<float>() : nullptr;
  a.mean = training ? call.mean.data_ptr<float>() : call.running_mean.data_ptr<float>();
  a.var = training ? call.var.data_ptr<float>() : call.running_var.data_ptr<float>();
  a.training = training;
  a.relu = relu;
  a.eps = static_cast<float>(eps);
  return call;
}

BatchNormBackwardCall prepare_batch_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                  const std::optional<at::Tensor>& out,
                                                  const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                                  const at::Tensor& var, bool training, double eps, bool relu,
                                                  bool residual_grad, c10::DeviceType expected_device) {
  const char* op = "batch_norm_backward_native";
  BatchNormBackwardCall call;
  BatchNormLayout& l = call.layout;
  l = layout_of(x, op, expected_device);
  check_vector(weight, "weight", x, op);
  check_vector(mean, "mean", x, op);
  check_vector(var, "var", x, op);
  TORCH_CHECK_VALUE(!relu || out.has_value(), op, ": relu=True needs the forward's output (the ReLU mask)");
  const at::MemoryFormat format = format_of(l);
  call.grad_out = like_x(grad_out, x, format, "grad_out", op);
  if (relu) call.out = like_x(*out, x, format, "out", op);
  call.weight = contiguous_vector(weight);
  call.mean = mean.contiguous();
  call.var = var.contiguous();
  call.grad_x = at::empty_like(x);
  const bool write_residual = relu && residual_grad;
  call.grad_residual = write_residual ? at::empty_like(x) : at::empty({0}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  call.grad_weight = at::empty({l.channels}, f32);
  call.grad_bias = at::empty({l.channels}, f32);
  BatchNormArgs& a = call.args;
  a.layout = l;
  a.x = x.data_ptr();
  a.grad = call.grad_out.data_ptr();
  a.saved_out = relu ? call.out.data_ptr() : nullptr;
  a.grad_x = call.grad_x.data_ptr();
  a.grad_residual = write_residual ? call.grad_residual.data_ptr() : nullptr;
  a.weight = call.weight.defined() ? call.weight.data_ptr<float>() : nullptr;
  a.mean = call.mean.data_ptr<float>();
  a.var = call.var.data_ptr<float>();
  a.grad_weight = call.grad_weight.data_ptr<float>();
  a.grad_bias = call.grad_bias.data_ptr<float>();
  a.training = training;
  a.relu = relu;
  a.eps = static_cast<float>(eps);
  return call;
}

namespace {

float* running_vector(const at::Tensor& t, const char* name, int64_t channels, c10::DeviceType device, const char* op) {
  TORCH_CHECK_VALUE(t.device().type() == device, op, ": ", name, " must be on ", c10::DeviceTypeName(device),
                    "; got one on ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == channels && t.is_contiguous(), op,
                    ": ", name, " must be contiguous float32 [", channels, "]; got ", t.scalar_type(), " ", t.sizes(),
                    t.is_contiguous() ? "" : " (not contiguous)");
  return t.data_ptr<float>();
}

}  // namespace

BatchNormUpdateArgs prepare_batch_norm_update_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                                    const at::Tensor& mean, const at::Tensor& var,
                                                    const std::optional<at::Tensor>& num_batches_tracked,
                                                    std::optional<double> momentum, int64_t count,
                                                    c10::DeviceType expected_device) {
  const char* op = "batch_norm_update_stats_native";
  TORCH_CHECK_VALUE(running_mean.dim() == 1, op, ": running_mean must be 1-D [C]; got shape ", running_mean.sizes());
  const int64_t C = running_mean.size(0);
  TORCH_CHECK_VALUE(count >= 2, op, ": count (values per channel) must be >= 2 for the unbiased variance; got ",
                    count);
  BatchNormUpdateArgs a;
  a.channels = C;
  a.running_mean = running_vector(running_mean, "running_mean", C, expected_device, op);
  a.running_var = running_vector(running_var, "running_var", C, expected_device, op);
  a.mean = running_vector(mean, "mean", C, expected_device, op);
  a.var = running_vector(var, "var", C, expected_device, op);
  a.cumulative = !momentum.has_value();
  if (a.cumulative) {
    TORCH_CHECK_VALUE(num_batches_tracked.has_value(), op,
                      ": momentum=None (the cumulative average) needs num_batches_tracked");
    const at::Tensor& n = *num_batches_tracked;
    TORCH_CHECK_VALUE(n.scalar_type() == at::kLong && n.numel() == 1, op,
                      ": num_batches_tracked must be a one-element int64 tensor; got ", n.scalar_type(), " ",
                      n.sizes());
    TORCH_CHECK_VALUE(n.device() == running_mean.device(), op, ": num_batches_tracked is on ", n.device(),
                      ", running_mean on ", running_mean.device());
    a.num_batches_tracked = n.data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(*momentum >= 0.0 && *momentum <= 1.0, op, ": momentum must be in [0, 1] or None; got ",
                      *momentum);
    a.momentum = static_cast<float>(*momentum);
  }
  a.unbias = static_cast<float>(static_cast<double>(count) / static_cast<double>(count - 1));
  return a;
}

// -- the limits of the CUDA kernels ---------------------------------------------------------

void check_cuda_extents(const LogitsView& v, const char* op) {
  TORCH_CHECK_VALUE(v.classes <= std::numeric_limits<int32_t>::max(), op,
                    ": the CUDA kernels take at most 2^31 - 1 classes; got K = ", v.classes);
  TORCH_CHECK_VALUE(v.rows <= std::numeric_limits<int32_t>::max(), op,
                    ": the CUDA kernels take at most 2^31 - 1 rows; got N = ", v.rows);
}

void check_cotrain_cuda_branches(const LogitsView& v, int max_branches) {
  TORCH_CHECK_VALUE(v.branches <= max_branches, "cotrain_loss_native: the CUDA kernel takes at most ", max_branches,
                    " branches (S); got S = ", v.branches, " (the Triton and torch backends take any S)");
}

void check_ensemble_cuda_branches(const LogitsView& v, EnsembleMode mode, int max_branches, const char* op) {
  const char* name = mode == EnsembleMode::kMeanProbs  ? "mean_probs"
                     : mode == EnsembleMode::kMaxProbs ? "max_probs"
                     : mode == EnsembleMode::kVote     ? "vote"
                                                       : nullptr;
  if (name == nullptr) return;
  TORCH_CHECK_VALUE(v.branches <= max_branches, op, ": the CUDA kernel of the ", name, " ensemble takes at most ",
                    max_branches, " branches (S); got S = ", v.branches);
}

}  // namespace ops
}  // namespace divco
