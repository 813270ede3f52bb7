// What the CUDA part of this build contains (divco._C.build_info()): compiled here, by
// nvcc, because only nvcc knows the architectures it compiles for.
#include <cuda_runtime_api.h>

#include "launchers.h"

namespace divco {
namespace ops {
namespace cuda {

BuildInfo build_info() {
  BuildInfo info;
#if defined(__CUDA_ARCH_LIST__)
  const int archs[] = {__CUDA_ARCH_LIST__};
  info.archs.assign(archs, archs + sizeof(archs) / sizeof(archs[0]));
#endif
  info.cuda_runtime_version = CUDART_VERSION;
  return info;
}

}  // namespace cuda
}  // namespace ops
}  // namespace divco
