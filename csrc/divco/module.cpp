// The Python module divco._C. Loading it registers the divco:: operators (registration.cpp,
// static initialisers); the functions here only describe the build and expose the shared
// scalar math to the tests. No torch header: this file compiles in seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cotrain_math.h"
#include "ops/cpu/row_loops.h"
#include "ops/kernel_args.h"
#if defined(DIVCO_WITH_CUDA)
#include "ops/cuda/launchers.h"
#endif

namespace py = pybind11;

namespace {

const std::vector<std::string> kOperators = {"cotrain_loss_native", "ensemble_native", "ensemble_backward_native",
                                             "batch_norm_native", "batch_norm_backward_native",
                                             "batch_norm_update_stats_native"};

// setup.py / CMake pass the torch version (and torch's CUDA version) as bare tokens, e.g.
// -DDIVCO_TORCH_VERSION=2.14.1+cu130; stringified here.
#define DIVCO_STRINGIFY_TOKENS(x) #x
#define DIVCO_STRINGIFY(x) DIVCO_STRINGIFY_TOKENS(x)

py::dict build_info() {
  py::dict info;
#if defined(DIVCO_TORCH_VERSION)
  info["torch_version"] = DIVCO_STRINGIFY(DIVCO_TORCH_VERSION);  // the torch compiled against
#else
  info["torch_version"] = py::none();
#endif
#if defined(DIVCO_TORCH_CUDA_VERSION)
  info["torch_cuda_version"] = DIVCO_STRINGIFY(DIVCO_TORCH_CUDA_VERSION);  // that torch's CUDA
#else
  info["torch_cuda_version"] = py::none();  // a CPU-only torch
#endif
  info["cpu_kernels"] = kOperators;
  std::vector<std::string> modes;
  for (const auto& mode : divco::ops::kEnsembleModes) modes.emplace_back(mode.name);
  info["ensemble_modes"] = modes;  // every kernel (CPU and CUDA) supports each of them
  info["semantics_version"] = divco::ops::kSemanticsVersion;
  info["cpu_avx2_clone"] = divco::ops::cpu::kHasAvx2Clone;
#if defined(_OPENMP)
  info["cpu_openmp"] = true;  // at::parallel_for spreads rows over torch's intra-op threads
#else
  info["cpu_openmp"] = false;
#endif
#if defined(DIVCO_WITH_CUDA)
  const auto cuda = divco::ops::cuda::build_info();
  info["cuda_kernels"] = kOperators;
  info["cuda_archs"] = cuda.archs;
  info["cuda_runtime_version"] = cuda.cuda_runtime_version;
  info["cuda_max_branches"] = divco::ops::cuda::kMaxBranches;
  info["cuda_max_ensemble_branches"] = divco::ops::cuda::kMaxEnsembleBranches;
#else
  info["cuda_kernels"] = std::vector<std::string>();
  info["cuda_archs"] = std::vector<int>();
  info["cuda_runtime_version"] = py::none();
  info["cuda_max_branches"] = py::none();
  info["cuda_max_ensemble_branches"] = py::none();
#endif
  return info;
}

// The online softmax as the CUDA kernels run it (divco::math), over tiles of `tile` values
// merged in order: returns log sum_k exp(scale * x_k).
float online_logsumexp(const std::vector<float>& values, float scale, int tile) {
  namespace m = divco::math;
  if (tile < 1) throw py::value_error("tile must be >= 1; got " + std::to_string(tile));
  m::SoftmaxStats total = m::softmax_stats_empty();
  for (size_t begin = 0; begin < values.size(); begin += static_cast<size_t>(tile)) {
    m::SoftmaxStats part = m::softmax_stats_empty();
    for (size_t k = begin; k < values.size() && k < begin + static_cast<size_t>(tile); ++k) {
      part = m::softmax_stats_add(part, values[k], scale);
    }
    total = m::softmax_stats_merge(total, part, scale);
  }
  return m::softmax_log_normalizer(total.max, total.sum, scale);
}

std::vector<float> map_values(const std::vector<float>& values, float (*f)(float)) {
  std::vector<float> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = f(values[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "divco native extension: importing it registers the divco:: operators (torch.ops.divco).";
  m.def("build_info", &build_info,
        "What this build contains: operators with CPU / CUDA kernels, CUDA architectures, CPU clones.");
  py::module_ testing = m.def_submodule("_testing", "The scalar math shared by the CPU and CUDA kernels, for tests.");
  testing.def(
      "exp_f32", [](const std::vector<float>& v) { return map_values(v, [](float x) { return divco::math::exp_f32(x); }); },
      "exp of float32 values with the CPU kernels' implementation");
  testing.def(
      "log_f32", [](const std::vector<float>& v) { return map_values(v, [](float x) { return divco::math::log_f32(x); }); },
      "log of float32 values with the CPU kernels' implementation");
  testing.def("online_logsumexp", &online_logsumexp, py::arg("values"), py::arg("scale"), py::arg("tile"),
              "log sum exp(scale * x) by the online softmax the CUDA kernels use, over tiles merged in order");
}
