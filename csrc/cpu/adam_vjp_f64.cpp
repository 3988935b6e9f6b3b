// SPDX-License-Identifier: Apache-2.0
// The Adam/AdamW VJP loops for double (adam_vjp_kernels.h): one translation unit per dtype.
#include "adam_vjp_kernels.h"

namespace gimli {
namespace cpu {
GIMLI_INSTANTIATE_ADAM_STEP_VJP(double)
}  // namespace cpu
}  // namespace gimli
