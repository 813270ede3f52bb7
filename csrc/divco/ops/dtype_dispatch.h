// The one switch from the runtime logits dtype to the C++ element type, used by every CPU
// and CUDA launcher: `fn` is called with a value of the element type (float, c10::BFloat16
// or c10::Half), e.g. dispatch_logits_dtype(dtype, [&](auto tag) { run<decltype(tag)>(); }).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_args.h"

namespace divco {
namespace ops {

template <typename Fn>
void dispatch_logits_dtype(LogitsDtype dtype, Fn&& fn) {
  switch (dtype) {
    case LogitsDtype::kFloat32:
      fn(float{});
      return;
    case LogitsDtype::kBFloat16:
      fn(c10::BFloat16{});
      return;
    case LogitsDtype::kFloat16:
      fn(c10::Half{});
      return;
  }
}

}  // namespace ops
}  // namespace divco
