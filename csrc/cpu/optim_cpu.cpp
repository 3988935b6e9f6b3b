// SPDX-License-Identifier: Apache-2.0
// CPU bindings of the fused SGD and Adam/AdamW steps and VJPs: the shared checks (gimli/checks.h), outputs,
// the loops of kernels.h (TORCH_LIBRARY_IMPL CPU).
//
// The loops themselves are in sgd_kernels.cpp, adam_step_kernels.cpp and adam_vjp_f32/_f64.cpp
// (adam_vjp_kernels.h), translation units of their own that compile in parallel; loops.h has
// their notes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "gimli/checks.h"
#include "gimli/optim_math.h"
#include "gimli/segments.h"
#include "kernels.h"

namespace gimli {
namespace {

/// The hyper_bar outputs: (nseg,) float64 sums, (N,) element-wise partials, or empty.
std::vector<at::Tensor> hyper_outputs(const at::Tensor& theta, int num_slots, int64_t learned, int64_t elementwise,
                                      int64_t nseg, std::vector<at::Tensor>& elem_out) {
  std::vector<at::Tensor> out;
  elem_out.assign(num_slots, at::Tensor());
  for (int h = 0; h < num_slots; ++h) {
    if (!(learned >> h & 1)) {
      out.push_back(at::empty({0}, theta.options().dtype(at::kDouble)));
    } else if (elementwise >> h & 1) {
      elem_out[h] = at::empty_like(theta);
      out.push_back(elem_out[h]);
    } else {
      out.push_back(at::empty({nseg}, theta.options().dtype(at::kDouble)));
    }
  }
  return out;
}

void fill_sums(std::vector<at::Tensor>& out, const std::vector<double>& sums, int num_slots, int64_t learned,
               int64_t elementwise, int64_t nseg) {
  for (int h = 0; h < num_slots; ++h) {
    if ((learned >> h & 1) && !(elementwise >> h & 1)) {
      std::copy(sums.begin() + h * nseg, sums.begin() + (h + 1) * nseg, out[h].data_ptr<double>());
    }
  }
}

// ------------------------------------------------------------------------------------ SGD
std::tuple<at::Tensor, at::Tensor> sgd_step_cpu(const at::Tensor& theta, const at::Tensor& G,
                                                const c10::optional<at::Tensor>& buf, const at::Tensor& offsets,
                                                at::TensorList hyper_list, int64_t elementwise, bool nesterov,
                                                bool maximize, bool use_momentum, bool has_wd) {
  const SgdStepArgs a = check_sgd_step(theta, G, buf, offsets, hyper_list, elementwise);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const bool has_buf = a.has_buf;
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const HyperView hv = hyper_view(hyper, elementwise);
  at::Tensor theta_next = at::empty_like(theta);
  at::Tensor buf_next = use_momentum ? at::empty_like(theta) : at::empty({0}, theta.options());
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, false};
  const bool generic = elementwise != 0 || (use_momentum && !has_buf);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ bf = has_buf ? buf->data_ptr<T>() : th;
    T* __restrict__ tn = theta_next.data_ptr<T>();
    T* __restrict__ bn = use_momentum ? buf_next.data_ptr<T>() : nullptr;
    cpu::sgd_step<T>(th, gr, bf, tn, bn, off, nseg, n, hv, f, generic);
  });
  return {theta_next, buf_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> sgd_step_vjp_cpu(
    const at::Tensor& theta, const at::Tensor& G, const c10::optional<at::Tensor>& buf,
    const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& buf_next_bar, const at::Tensor& offsets,
    at::TensorList hyper_list, int64_t elementwise, int64_t learned, bool nesterov, bool maximize,
    bool use_momentum, bool has_wd) {
  const SgdStepVjpArgs a =
      check_sgd_step_vjp(theta, G, buf, theta_next_bar, buf_next_bar, offsets, hyper_list, elementwise, learned);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const bool has_buf = a.has_buf;
  // The last sweep step carries no cotangent of the buffer: as in adam_step_vjp_cpu, the static
  // loop on zeros instead of the generic loop (the same values).
  const bool carried = a.has_buf_bar;
  const bool zero_carried = elementwise == 0 && use_momentum && has_buf && !carried;
  const at::Tensor zeros = zero_carried ? at::zeros_like(theta) : at::Tensor();
  const at::Tensor& cb_t = zero_carried ? zeros : (carried ? *buf_next_bar : theta);
  const bool has_buf_bar = carried || zero_carried;
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const HyperView hv = hyper_view(hyper, elementwise);
  const bool buf_bar_out = use_momentum && has_buf;
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor buf_bar = buf_bar_out ? at::empty_like(theta) : at::empty({0}, theta.options());
  std::vector<at::Tensor> elem_out;
  std::vector<at::Tensor> hyper_bar = hyper_outputs(theta, kSgdNumHyper, learned, elementwise, nseg, elem_out);
  std::vector<double> sums(static_cast<size_t>(kSgdNumHyper) * nseg);
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, has_buf_bar};
  const bool generic = elementwise != 0 || (use_momentum && !(has_buf && has_buf_bar));
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step_vjp", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ bf = has_buf ? buf->data_ptr<T>() : th;
    const T* __restrict__ tb = theta_next_bar.data_ptr<T>();
    const T* __restrict__ cb = cb_t.data_ptr<T>();
    T* __restrict__ o_th = theta_bar.data_ptr<T>();
    T* __restrict__ o_g = G_bar.data_ptr<T>();
    T* __restrict__ o_b = buf_bar_out ? buf_bar.data_ptr<T>() : nullptr;
    T* o_h[kSgdNumHyper];
    for (int h = 0; h < kSgdNumHyper; ++h) o_h[h] = elem_out[h].defined() ? elem_out[h].data_ptr<T>() : nullptr;
    cpu::sgd_step_vjp<T>(th, gr, bf, tb, cb, o_th, o_g, o_b, o_h, sums.data(), learned, off, nseg, n, hv, f,
                         generic);
  });
  fill_sums(hyper_bar, sums, kSgdNumHyper, learned, elementwise, nseg);
  return {theta_bar, G_bar, buf_bar, hyper_bar};
}

// ----------------------------------------------------------------------------------- Adam
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cpu(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& offsets, at::TensorList hyper_list,
    int64_t elementwise, double step, bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  const AdamStepArgs a = check_adam_step(theta, G, m, v, vmax, offsets, hyper_list, elementwise, amsgrad);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const HyperView hv = hyper_view(hyper, elementwise);
  at::Tensor theta_next = at::empty_like(theta), m_next = at::empty_like(theta), v_next = at::empty_like(theta);
  at::Tensor vmax_next = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, false, false, false};
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::adam_step", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ mp = m.data_ptr<T>();
    const T* __restrict__ vp = v.data_ptr<T>();
    const T* __restrict__ xp = amsgrad ? vmax->data_ptr<T>() : th;
    T* __restrict__ tn = theta_next.data_ptr<T>();
    T* __restrict__ mn = m_next.data_ptr<T>();
    T* __restrict__ vn = v_next.data_ptr<T>();
    T* __restrict__ xn = amsgrad ? vmax_next.data_ptr<T>() : nullptr;
    cpu::adam_step<T>(th, gr, mp, vp, xp, tn, mn, vn, xn, off, nseg, n, hv, step, f, elementwise != 0);
  });
  return {theta_next, m_next, v_next, vmax_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> adam_step_vjp_cpu(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& m_next_bar,
    const c10::optional<at::Tensor>& v_next_bar, const c10::optional<at::Tensor>& vmax_next_bar,
    const at::Tensor& offsets, at::TensorList hyper_list, int64_t elementwise, int64_t learned, double step,
    bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  const AdamStepVjpArgs a = check_adam_step_vjp(theta, G, m, v, vmax, theta_next_bar, m_next_bar, v_next_bar,
                                                vmax_next_bar, offsets, hyper_list, elementwise, learned, amsgrad);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const AdamCarried carried = a.carried;
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const HyperView hv = hyper_view(hyper, elementwise);
  // The last sweep step carries no cotangent of m, v (and vmax): with per-segment
  // hyperparameters it runs the static loop on zeros instead of the generic loop, which does not
  // vectorise (3-4x slower at 1M elements). Adding a zero cotangent gives the same values (a -0
  // may become +0).
  const bool zero_carried = elementwise == 0 && !carried.m_bar && !carried.v_bar && !carried.vmax_bar;
  const at::Tensor zeros = zero_carried ? at::zeros_like(theta) : at::Tensor();
  const at::Tensor& cm_t = zero_carried ? zeros : (carried.m_bar ? *m_next_bar : theta);
  const at::Tensor& cv_t = zero_carried ? zeros : (carried.v_bar ? *v_next_bar : theta);
  const at::Tensor& cx_t = zero_carried ? zeros : (carried.vmax_bar ? *vmax_next_bar : theta);
  const bool has_m_bar = carried.m_bar || zero_carried, has_v_bar = carried.v_bar || zero_carried;
  const bool has_vmax_bar = carried.vmax_bar || (zero_carried && amsgrad);
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor m_bar = at::empty_like(theta), v_bar = at::empty_like(theta);
  at::Tensor vmax_bar = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
  std::vector<at::Tensor> elem_out;
  std::vector<at::Tensor> hyper_bar = hyper_outputs(theta, kAdamNumHyper, learned, elementwise, nseg, elem_out);
  std::vector<double> sums(static_cast<size_t>(kAdamNumHyper) * nseg);
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, has_m_bar, has_v_bar, has_vmax_bar};
  const bool generic = elementwise != 0 || !(has_m_bar && has_v_bar && (has_vmax_bar || !amsgrad));
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::adam_step_vjp", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ mp = m.data_ptr<T>();
    const T* __restrict__ vp = v.data_ptr<T>();
    const T* __restrict__ xp = amsgrad ? vmax->data_ptr<T>() : th;
    const T* __restrict__ tb = theta_next_bar.data_ptr<T>();
    const T* __restrict__ cm = cm_t.data_ptr<T>();
    const T* __restrict__ cv = cv_t.data_ptr<T>();
    const T* __restrict__ cx = cx_t.data_ptr<T>();
    T* __restrict__ o_th = theta_bar.data_ptr<T>();
    T* __restrict__ o_g = G_bar.data_ptr<T>();
    T* __restrict__ o_m = m_bar.data_ptr<T>();
    T* __restrict__ o_v = v_bar.data_ptr<T>();
    T* __restrict__ o_x = amsgrad ? vmax_bar.data_ptr<T>() : nullptr;
    T* o_h[kAdamNumHyper];
    for (int h = 0; h < kAdamNumHyper; ++h) o_h[h] = elem_out[h].defined() ? elem_out[h].data_ptr<T>() : nullptr;
    cpu::adam_step_vjp<T>(th, gr, mp, vp, xp, tb, cm, cv, cx, o_th, o_g, o_m, o_v, o_x, o_h, sums.data(), learned,
                          off, nseg, n, hv, step, f, generic);
  });
  fill_sums(hyper_bar, sums, kAdamNumHyper, learned, elementwise, nseg);
  return {theta_bar, G_bar, m_bar, v_bar, vmax_bar, hyper_bar};
}

}  // namespace

TORCH_LIBRARY_IMPL(gimli, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("sgd_step_vjp", &sgd_step_vjp_cpu);
  m.impl("adam_step", &adam_step_cpu);
  m.impl("adam_step_vjp", &adam_step_vjp_cpu);
}

}  // namespace gimli
