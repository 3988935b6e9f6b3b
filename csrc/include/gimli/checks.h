// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the CPU and CUDA bindings (one function per op, written once for
// both devices), and the hyperparameter view of checked arguments (host code; includes ATen).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <vector>

#include "segments.h"

namespace gimli {

/// A flat buffer like ``theta``: defined, 1-D, contiguous, same dtype, device and length.
inline void check_flat(const at::Tensor& t, const at::Tensor& theta, const char* name) {
  TORCH_CHECK(t.defined(), "gimli: ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1, "gimli: ", name, " must be a flat 1-D buffer, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.is_contiguous(), "gimli: ", name, " must be contiguous (flatten it with .contiguous())");
  TORCH_CHECK(t.scalar_type() == theta.scalar_type(), "gimli: ", name, " is ", t.scalar_type(), " but theta is ",
              theta.scalar_type());
  TORCH_CHECK(t.device() == theta.device(), "gimli: ", name, " is on ", t.device(), " but theta is on ",
              theta.device());
  TORCH_CHECK(t.numel() == theta.numel(), "gimli: ", name, " has ", t.numel(), " elements but theta has ",
              theta.numel());
}

inline void check_theta(const at::Tensor& theta) {
  TORCH_CHECK(theta.dim() == 1 && theta.is_contiguous(), "gimli: theta must be a flat contiguous 1-D buffer");
  TORCH_CHECK(theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble,
              "gimli: fused kernels support float32 and float64, got ", theta.scalar_type());
}

/// A present optional buffer is checked like ``theta``; returns whether it is present.
inline bool check_optional(const c10::optional<at::Tensor>& t, const at::Tensor& theta, const char* name) {
  if (!t.has_value() || !t->defined()) return false;
  check_flat(*t, theta, name);
  return true;
}

/// Offsets: int64, 1-D, contiguous, on theta's device, nseg + 1 entries. Returns nseg.
inline int64_t check_offsets(const at::Tensor& offsets, const at::Tensor& theta) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous(),
              "gimli: offsets must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(offsets.device() == theta.device(), "gimli: offsets are on ", offsets.device(), " but theta is on ",
              theta.device());
  TORCH_CHECK(offsets.numel() >= 1, "gimli: offsets need nseg + 1 >= 1 entries");
  return offsets.numel() - 1;
}

/// Host-side validation of offsets (CPU only: on CUDA it would cost a synchronisation).
inline void check_offsets_values(const int64_t* off, int64_t nseg, int64_t n) {
  TORCH_CHECK(off[0] == 0, "gimli: offsets[0] must be 0, got ", off[0]);
  TORCH_CHECK(off[nseg] == n, "gimli: offsets[-1] must be the buffer length ", n, ", got ", off[nseg]);
  for (int64_t s = 0; s < nseg; ++s) {
    TORCH_CHECK(off[s] <= off[s + 1], "gimli: offsets must be non-decreasing (segment ", s, ")");
  }
}

/// One float64 tensor per hyperparameter slot, ``(nseg,)`` or ``(N,)`` for an element-wise slot.
inline void check_hyper(const std::vector<at::Tensor>& hyper, int64_t num_slots, int64_t elementwise, int64_t nseg,
                        const at::Tensor& theta) {
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) == num_slots, "gimli: expected ", num_slots,
              " hyperparameter tensors, got ", hyper.size());
  for (int64_t h = 0; h < num_slots; ++h) {
    const at::Tensor& t = hyper[h];
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.is_contiguous(),
                "gimli: hyperparameter ", h, " must be a contiguous 1-D float64 tensor");
    TORCH_CHECK(t.device() == theta.device(), "gimli: hyperparameter ", h, " is on ", t.device(),
                " but theta is on ", theta.device());
    const int64_t want = (elementwise >> h & 1) ? theta.numel() : nseg;
    TORCH_CHECK(t.numel() == want, "gimli: hyperparameter ", h, " has ", t.numel(), " values, expected ", want,
                (elementwise >> h & 1) ? " (element-wise)" : " (one per segment)");
  }
}

/// The arguments every op shares, checked: ``theta`` and ``G`` flat and alike, the segment
/// offsets and one float64 tensor per hyperparameter slot.
struct CheckedOp {
  int64_t nseg;
  std::vector<at::Tensor> hyper;
};

inline CheckedOp check_op(const at::Tensor& theta, const at::Tensor& G, const at::Tensor& offsets,
                          at::TensorList hyper_list, int64_t num_slots, int64_t elementwise) {
  check_theta(theta);
  check_flat(G, theta, "G");
  CheckedOp op{check_offsets(offsets, theta), hyper_list.vec()};
  check_hyper(op.hyper, num_slots, elementwise, op.nseg, theta);
  return op;
}

/// Adam's state, checked: ``m`` and ``v`` like ``theta``; ``vmax`` present when ``amsgrad``.
/// Returns whether ``vmax`` is present.
inline bool check_adam_state(const at::Tensor& theta, const at::Tensor& m, const at::Tensor& v,
                             const c10::optional<at::Tensor>& vmax, bool amsgrad, const char* op) {
  check_flat(m, theta, "m");
  check_flat(v, theta, "v");
  const bool has_vmax = check_optional(vmax, theta, "vmax");
  TORCH_CHECK(has_vmax || !amsgrad, op, ": amsgrad needs vmax (max_exp_avg_sq)");
  return has_vmax;
}

/// Which carried cotangents of Adam's next state are present (each checked like ``theta``).
struct AdamCarried {
  bool m_bar, v_bar, vmax_bar;
};

inline AdamCarried check_adam_carried(const at::Tensor& theta, const c10::optional<at::Tensor>& m_next_bar,
                                      const c10::optional<at::Tensor>& v_next_bar,
                                      const c10::optional<at::Tensor>& vmax_next_bar, bool amsgrad) {
  AdamCarried c;
  c.m_bar = check_optional(m_next_bar, theta, "m_next_bar");
  c.v_bar = check_optional(v_next_bar, theta, "v_next_bar");
  c.vmax_bar = check_optional(vmax_next_bar, theta, "vmax_next_bar") && amsgrad;
  return c;
}

/// A bit mask over the op's hyperparameter slots (``elementwise``, ``learned``): no bit past the last slot.
inline void check_mask(int64_t mask, int64_t num_slots, const char* name) {
  TORCH_CHECK(mask >= 0 && (mask >> num_slots) == 0, "gimli: ", name, " = ", mask, " sets a bit past the ",
              num_slots, " hyperparameter slots of this op");
}

// ------------------------------------------------------------------------------------------
// One check per op: every binding (cpu/optim_cpu.cpp, cuda/optim_cuda_binding.cpp) calls the
// op's check first and reads what is present from its result, so the two devices accept and
// reject exactly the same arguments with the same messages. The CPU binding also validates the
// offsets' values (check_offsets_values), which on CUDA would cost a synchronisation.

struct SgdStepArgs : CheckedOp {
  bool has_buf;  // a momentum buffer was passed
};

inline SgdStepArgs check_sgd_step(const at::Tensor& theta, const at::Tensor& G, const c10::optional<at::Tensor>& buf,
                                  const at::Tensor& offsets, at::TensorList hyper, int64_t elementwise) {
  check_mask(elementwise, kSgdNumHyper, "elementwise");
  SgdStepArgs a{check_op(theta, G, offsets, hyper, kSgdNumHyper, elementwise), false};
  a.has_buf = check_optional(buf, theta, "buf");
  return a;
}

struct SgdStepVjpArgs : CheckedOp {
  bool has_buf;      // a momentum buffer was passed
  bool has_buf_bar;  // a cotangent of the next buffer was passed
};

inline SgdStepVjpArgs check_sgd_step_vjp(const at::Tensor& theta, const at::Tensor& G,
                                         const c10::optional<at::Tensor>& buf, const at::Tensor& theta_next_bar,
                                         const c10::optional<at::Tensor>& buf_next_bar, const at::Tensor& offsets,
                                         at::TensorList hyper, int64_t elementwise, int64_t learned) {
  check_mask(elementwise, kSgdNumHyper, "elementwise");
  check_mask(learned, kSgdNumHyper, "learned");
  SgdStepVjpArgs a{check_op(theta, G, offsets, hyper, kSgdNumHyper, elementwise), false, false};
  check_flat(theta_next_bar, theta, "theta_next_bar");
  a.has_buf = check_optional(buf, theta, "buf");
  a.has_buf_bar = check_optional(buf_next_bar, theta, "buf_next_bar");
  return a;
}

struct AdamStepArgs : CheckedOp {
  bool has_vmax;  // amsgrad's running maximum was passed
};

inline AdamStepArgs check_adam_step(const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m,
                                    const at::Tensor& v, const c10::optional<at::Tensor>& vmax,
                                    const at::Tensor& offsets, at::TensorList hyper, int64_t elementwise,
                                    bool amsgrad) {
  check_mask(elementwise, kAdamNumHyper, "elementwise");
  AdamStepArgs a{check_op(theta, G, offsets, hyper, kAdamNumHyper, elementwise), false};
  a.has_vmax = check_adam_state(theta, m, v, vmax, amsgrad, "gimli::adam_step");
  return a;
}

struct AdamStepVjpArgs : CheckedOp {
  bool has_vmax;
  AdamCarried carried;  // which cotangents of the next state were passed
};

inline AdamStepVjpArgs check_adam_step_vjp(const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m,
                                           const at::Tensor& v, const c10::optional<at::Tensor>& vmax,
                                           const at::Tensor& theta_next_bar,
                                           const c10::optional<at::Tensor>& m_next_bar,
                                           const c10::optional<at::Tensor>& v_next_bar,
                                           const c10::optional<at::Tensor>& vmax_next_bar, const at::Tensor& offsets,
                                           at::TensorList hyper, int64_t elementwise, int64_t learned,
                                           bool amsgrad) {
  check_mask(elementwise, kAdamNumHyper, "elementwise");
  check_mask(learned, kAdamNumHyper, "learned");
  AdamStepVjpArgs a{check_op(theta, G, offsets, hyper, kAdamNumHyper, elementwise), false, {}};
  check_flat(theta_next_bar, theta, "theta_next_bar");
  a.has_vmax = check_adam_state(theta, m, v, vmax, amsgrad, "gimli::adam_step_vjp");
  a.carried = check_adam_carried(theta, m_next_bar, v_next_bar, vmax_next_bar, amsgrad);
  return a;
}

/// The kernels' view of checked hyperparameter tensors (float64 data pointers).
inline HyperView hyper_view(const std::vector<at::Tensor>& hyper, int64_t elementwise) {
  HyperView hv{};
  for (size_t h = 0; h < hyper.size(); ++h) hv.p[h] = hyper[h].data_ptr<double>();
  hv.elementwise = elementwise;
  return hv;
}

}  // namespace gimli
