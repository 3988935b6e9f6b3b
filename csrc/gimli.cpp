// SPDX-License-Identifier: Apache-2.0
// Op schemas of the fused optimizer kernels: declared once here, bound per device in cpu/ and cuda/.
//
// Every op takes flat buffers (1-D, contiguous, one dtype and device), the segment offsets of
// the parameter tensors laid end to end, and one float64 tensor per hyperparameter slot (see
// gimli_bptt/kernels/_reference.py, the pure-PyTorch twin and the spec of every op).
#include <torch/library.h>

TORCH_LIBRARY(gimli, m) {
  // The fake (meta) kernels, for torch.compile and FakeTensor, are registered from Python by this
  // module (torch.library.register_fake; torch requires the C++ side to name the module).
  m.set_python_module("gimli_bptt.kernels._fake");
  m.def(
      "sgd_step(Tensor theta, Tensor G, Tensor? buf, Tensor offsets, Tensor[] hyper, int elementwise, "
      "bool nesterov, bool maximize, bool use_momentum, bool has_wd) -> (Tensor, Tensor)");
  m.def(
      "sgd_step_vjp(Tensor theta, Tensor G, Tensor? buf, Tensor theta_next_bar, Tensor? buf_next_bar, "
      "Tensor offsets, Tensor[] hyper, int elementwise, int learned, bool nesterov, bool maximize, "
      "bool use_momentum, bool has_wd) -> (Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "adam_step(Tensor theta, Tensor G, Tensor m, Tensor v, Tensor? vmax, Tensor offsets, Tensor[] hyper, "
      "int elementwise, float step, bool amsgrad, bool maximize, bool decoupled, bool has_wd) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "adam_step_vjp(Tensor theta, Tensor G, Tensor m, Tensor v, Tensor? vmax, Tensor theta_next_bar, "
      "Tensor? m_next_bar, Tensor? v_next_bar, Tensor? vmax_next_bar, Tensor offsets, Tensor[] hyper, "
      "int elementwise, int learned, float step, bool amsgrad, bool maximize, bool decoupled, bool has_wd) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor[])");
}
