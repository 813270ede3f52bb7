// The schemas of every divco:: operator, in one place. The strings must equal the schemas the
// op modules declare (divco/ops/<op>.py, schema.declare; tests/native/test_build.py checks
// it); each kernel file registers its own implementation for its dispatch key
// (TORCH_LIBRARY_IMPL in cpu/<op>_kernel.cpp and cuda/<op>_cuda.cpp), the fakes and autograd
// are registered from Python (divco/ops/registration.py), except batch_norm_native's
// autograd, which is C++ (batch_norm_autograd.cpp).
#include <torch/library.h>

TORCH_LIBRARY(divco, m) {
  m.def(
      "cotrain_loss_native(Tensor logits, Tensor target, Tensor weight, Tensor? sample_weight, str kind, "
      "float temperature, bool compute_grad) -> (Tensor loss, Tensor ce, Tensor cot, Tensor ensemble, Tensor correct, Tensor grad)");
  m.def("ensemble_native(Tensor logits, str mode, Tensor? weights) -> Tensor");
  m.def("ensemble_backward_native(Tensor grad_out, Tensor logits, str mode, Tensor? weights) -> Tensor");
  m.def(
      "batch_norm_native(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor? residual, bool training, float eps, bool relu) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "batch_norm_backward_native(Tensor grad_out, Tensor x, Tensor? out, Tensor? weight, Tensor mean, Tensor var, "
      "bool training, float eps, bool relu, bool residual_grad) -> (Tensor grad_x, Tensor grad_residual, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_update_stats_native(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor? num_batches_tracked, float? momentum, int count) -> ()");
}
