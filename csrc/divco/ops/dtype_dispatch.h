// The one switch from the runtime logits dtype to the C++ element type, used by every CPU
// and CUDA launcher: `fn` is called with a value of the element type (float, c10::BFloat16
// or c10::Half), e.g. dispatch_logits_dtype(dtype, [&](auto tag) { run<decltype(tag)>(); }).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_args.h"

namespace divco {
namespace ops {

// The element type the co-training loss stores its gradient in for logits of type scalar_t:
// float32 for float16 logits (entries of size 1/N underflow float16 before a GradScaler
// multiplies them; the Triton operator stores the same), the logits type otherwise.
template <typename scalar_t>
struct StoredGrad {
  using type = scalar_t;
};
template <>
struct StoredGrad<c10::Half> {
  using type = float;
};
template <typename scalar_t>
using stored_grad_t = typename StoredGrad<scalar_t>::type;

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
