// The autograd of divco::batch_norm_native, registered for the Autograd key: the BatchNorm runs
// per layer, so its autograd node is C++ to keep Python out of every forward and backward (the
// formula is the Python one's, divco/ops/batch_norm.py; the schema is in registration.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace divco {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

using BatchNormForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
    const OptionalTensor&, bool, double, bool);
using BatchNormBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&,
    const at::Tensor&, bool, double, bool, bool);

bool requires_grad(const OptionalTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }
at::Tensor or_undefined(const OptionalTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptionalTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// Saves x, the output (only with ReLU: the mask), weight and the statistics backward reads
// (batch statistics in training, running ones in eval); mean and var are not differentiable
// and their gradients are never materialised; backward makes one reduction pass and one
// elementwise pass (batch_norm_backward_native).
class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, const OptionalTensor& residual, bool training,
                               double eps, bool relu) {
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("divco::batch_norm_native", "")
                                .typed<BatchNormForwardSignature>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, var] = op.call(x, weight, bias, running_mean, running_var, residual, training, eps, relu);
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, relu ? out : at::Tensor(), or_undefined(weight), training ? mean : or_undefined(running_mean),
                            training ? var : or_undefined(running_var)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["need_x"] = x.requires_grad();
    ctx->saved_data["need_weight"] = requires_grad(weight);
    ctx->saved_data["need_bias"] = requires_grad(bias);
    ctx->saved_data["need_residual"] = requires_grad(residual);
    // gradient slots: one per forward argument that is a tensor (absent optionals take none)
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_running"] = running_mean.has_value();
    ctx->saved_data["has_running_var"] = running_var.has_value();
    ctx->saved_data["has_residual"] = residual.has_value();
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(9);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return result;  // the output was not used: every gradient is zero (None)
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    TORCH_CHECK(!at::GradMode::is_enabled(), "divco.ops.batch_norm with backend='",
                c10::DeviceTypeName(x.device().type(), /*lower_case=*/true),
                "' does not support higher-order gradients (backward with create_graph=True); use backend='torch' "
                "for those");
    static const auto op = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("divco::batch_norm_backward_native", "")
                                .typed<BatchNormBackwardSignature>();
    const bool training = ctx->saved_data["training"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    const bool need_residual = ctx->saved_data["need_residual"].toBool();
    auto [grad_x, grad_residual, grad_weight, grad_bias] =
        op.call(grad_out, x, defined_or_none(saved[1]), defined_or_none(saved[2]), saved[3], saved[4], training,
                ctx->saved_data["eps"].toDouble(), relu, relu && need_residual);
    if (need_residual && !relu) grad_residual = grad_out;
    if (ctx->saved_data["need_x"].toBool()) result[0] = grad_x;
    if (ctx->saved_data["need_weight"].toBool()) result[1] = grad_weight;
    if (ctx->saved_data["need_bias"].toBool()) result[2] = grad_bias;
    if (need_residual) result[5] = grad_residual;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& residual, bool training, double eps, bool relu) {
  variable_list out =
      BatchNormFunction::apply(x, weight, bias, running_mean, running_var, residual, training, eps, relu);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace ops
}  // namespace divco

TORCH_LIBRARY_IMPL(divco, Autograd, m) {
  m.impl("batch_norm_native", &divco::ops::batch_norm_autograd);
}
