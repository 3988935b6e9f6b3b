// SPDX-License-Identifier: Apache-2.0
// CUDA bindings: the shared checks (gimli/checks.h), output allocation and launch on torch's current stream
// (TORCH_LIBRARY_IMPL CUDA).
//
// Host code compiled by the C++ compiler against a CUDA build of torch; the kernels themselves
// are in optim_cuda.cu, reached through the raw-pointer launchers of gimli/cuda_launch.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "gimli/checks.h"
#include "gimli/cuda_launch.h"

namespace gimli {
namespace {

void check_launch() {
  const char* err = cuda::last_error();
  TORCH_CHECK(err == nullptr, "gimli: CUDA kernel launch failed: ", err);
}

void* current_stream(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

/// Outputs of the hyperparameter partials: (nseg,) float64 sums (written from ``sums``),
/// (N,) element-wise, or empty; ``partial`` is the scratch of the summed slots.
struct HyperBars {
  std::vector<at::Tensor> out;
  at::Tensor sums, partial;
  int64_t reduce_mask;
};

HyperBars hyper_bars(const at::Tensor& theta, int num_slots, int64_t learned, int64_t elementwise, int64_t nseg) {
  HyperBars hb;
  hb.reduce_mask = learned & ~elementwise;
  hb.sums = at::empty({num_slots, nseg}, theta.options().dtype(at::kDouble));
  hb.partial = hb.reduce_mask ? at::empty({num_slots * theta.numel()}, theta.options()) : at::empty({0}, theta.options());
  for (int h = 0; h < num_slots; ++h) {
    if (!(learned >> h & 1)) hb.out.push_back(at::empty({0}, theta.options().dtype(at::kDouble)));
    else if (elementwise >> h & 1) hb.out.push_back(at::empty_like(theta));
    else hb.out.push_back(hb.sums[h]);
  }
  return hb;
}

template <typename T>
std::vector<T*> elem_ptrs(const HyperBars& hb, int num_slots, int64_t elementwise) {
  std::vector<T*> p(num_slots, nullptr);
  for (int h = 0; h < num_slots; ++h)
    if ((elementwise >> h & 1) && hb.out[h].numel() > 0) p[h] = hb.out[h].data_ptr<T>();
  return p;
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t, bool present) {
  return present ? t->data_ptr<T>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> sgd_step_cuda(const at::Tensor& theta, const at::Tensor& G,
                                                 const c10::optional<at::Tensor>& buf, const at::Tensor& offsets,
                                                 at::TensorList hyper_list, int64_t elementwise, bool nesterov,
                                                 bool maximize, bool use_momentum, bool has_wd) {
  const SgdStepArgs a = check_sgd_step(theta, G, buf, offsets, hyper_list, elementwise);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const bool has_buf = a.has_buf;
  const c10::cuda::CUDAGuard guard(theta.device());
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, false};
  at::Tensor theta_next = at::empty_like(theta);
  at::Tensor buf_next = use_momentum ? at::empty_like(theta) : at::empty({0}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step_cuda", [&] {
    cuda::sgd_step<scalar_t>(theta.data_ptr<scalar_t>(), G.data_ptr<scalar_t>(), opt_ptr<scalar_t>(buf, has_buf),
                             theta_next.data_ptr<scalar_t>(), use_momentum ? buf_next.data_ptr<scalar_t>() : nullptr,
                             offsets.data_ptr<int64_t>(), nseg, theta.numel(), hyper_view(hyper, elementwise), f,
                             current_stream(theta));
  });
  check_launch();
  return {theta_next, buf_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> sgd_step_vjp_cuda(
    const at::Tensor& theta, const at::Tensor& G, const c10::optional<at::Tensor>& buf,
    const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& buf_next_bar, const at::Tensor& offsets,
    at::TensorList hyper_list, int64_t elementwise, int64_t learned, bool nesterov, bool maximize,
    bool use_momentum, bool has_wd) {
  const SgdStepVjpArgs a =
      check_sgd_step_vjp(theta, G, buf, theta_next_bar, buf_next_bar, offsets, hyper_list, elementwise, learned);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const bool has_buf = a.has_buf, has_buf_bar = a.has_buf_bar;
  const c10::cuda::CUDAGuard guard(theta.device());
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, has_buf_bar};
  const bool buf_bar_out = use_momentum && has_buf;
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor buf_bar = buf_bar_out ? at::empty_like(theta) : at::empty({0}, theta.options());
  HyperBars hb = hyper_bars(theta, kSgdNumHyper, learned, elementwise, nseg);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step_vjp_cuda", [&] {
    using T = scalar_t;
    const std::vector<T*> he = elem_ptrs<T>(hb, kSgdNumHyper, elementwise);
    cuda::sgd_step_vjp<T>(theta.data_ptr<T>(), G.data_ptr<T>(), opt_ptr<T>(buf, has_buf), theta_next_bar.data_ptr<T>(),
                          opt_ptr<T>(buf_next_bar, has_buf_bar), theta_bar.data_ptr<T>(), G_bar.data_ptr<T>(),
                          buf_bar_out ? buf_bar.data_ptr<T>() : nullptr, he.data(),
                          hb.reduce_mask ? hb.partial.data_ptr<T>() : nullptr, hb.sums.data_ptr<double>(),
                          hb.reduce_mask, offsets.data_ptr<int64_t>(), nseg, theta.numel(),
                          hyper_view(hyper, elementwise), f, current_stream(theta));
  });
  check_launch();
  return {theta_bar, G_bar, buf_bar, hb.out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cuda(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& offsets, at::TensorList hyper_list,
    int64_t elementwise, double step, bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  const AdamStepArgs a = check_adam_step(theta, G, m, v, vmax, offsets, hyper_list, elementwise, amsgrad);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const c10::cuda::CUDAGuard guard(theta.device());
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, false, false, false};
  at::Tensor theta_next = at::empty_like(theta), m_next = at::empty_like(theta), v_next = at::empty_like(theta);
  at::Tensor vmax_next = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::adam_step_cuda", [&] {
    using T = scalar_t;
    cuda::adam_step<T>(theta.data_ptr<T>(), G.data_ptr<T>(), m.data_ptr<T>(), v.data_ptr<T>(),
                       opt_ptr<T>(vmax, amsgrad), theta_next.data_ptr<T>(), m_next.data_ptr<T>(), v_next.data_ptr<T>(),
                       amsgrad ? vmax_next.data_ptr<T>() : nullptr, offsets.data_ptr<int64_t>(), nseg, theta.numel(),
                       hyper_view(hyper, elementwise), step, f, current_stream(theta));
  });
  check_launch();
  return {theta_next, m_next, v_next, vmax_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> adam_step_vjp_cuda(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& m_next_bar,
    const c10::optional<at::Tensor>& v_next_bar, const c10::optional<at::Tensor>& vmax_next_bar,
    const at::Tensor& offsets, at::TensorList hyper_list, int64_t elementwise, int64_t learned, double step,
    bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  const AdamStepVjpArgs a = check_adam_step_vjp(theta, G, m, v, vmax, theta_next_bar, m_next_bar, v_next_bar,
                                                vmax_next_bar, offsets, hyper_list, elementwise, learned, amsgrad);
  const int64_t nseg = a.nseg;
  const std::vector<at::Tensor>& hyper = a.hyper;
  const bool has_m_bar = a.carried.m_bar, has_v_bar = a.carried.v_bar, has_vmax_bar = a.carried.vmax_bar;
  const c10::cuda::CUDAGuard guard(theta.device());
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, has_m_bar, has_v_bar, has_vmax_bar};
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor m_bar = at::empty_like(theta), v_bar = at::empty_like(theta);
  at::Tensor vmax_bar = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
  HyperBars hb = hyper_bars(theta, kAdamNumHyper, learned, elementwise, nseg);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::adam_step_vjp_cuda", [&] {
    using T = scalar_t;
    const std::vector<T*> he = elem_ptrs<T>(hb, kAdamNumHyper, elementwise);
    cuda::adam_step_vjp<T>(theta.data_ptr<T>(), G.data_ptr<T>(), m.data_ptr<T>(), v.data_ptr<T>(),
                           opt_ptr<T>(vmax, amsgrad), theta_next_bar.data_ptr<T>(), opt_ptr<T>(m_next_bar, has_m_bar),
                           opt_ptr<T>(v_next_bar, has_v_bar), opt_ptr<T>(vmax_next_bar, has_vmax_bar),
                           theta_bar.data_ptr<T>(), G_bar.data_ptr<T>(), m_bar.data_ptr<T>(), v_bar.data_ptr<T>(),
                           amsgrad ? vmax_bar.data_ptr<T>() : nullptr, he.data(),
                           hb.reduce_mask ? hb.partial.data_ptr<T>() : nullptr, hb.sums.data_ptr<double>(),
                           hb.reduce_mask, offsets.data_ptr<int64_t>(), nseg, theta.numel(),
                           hyper_view(hyper, elementwise), step, f, current_stream(theta));
  });
  check_launch();
  return {theta_bar, G_bar, m_bar, v_bar, vmax_bar, hb.out};
}

}  // namespace

TORCH_LIBRARY_IMPL(gimli, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("sgd_step_vjp", &sgd_step_vjp_cuda);
  m.impl("adam_step", &adam_step_cuda);
  m.impl("adam_step_vjp", &adam_step_vjp_cuda);
}

}  // namespace gimli
