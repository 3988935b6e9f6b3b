// SPDX-License-Identifier: Apache-2.0
// CPU kernels of the fused SGD and Adam/AdamW steps and VJPs: at::parallel_for over flat buffers.
//
// The loops call the per-element functions of optim_math.h (one source of truth with CUDA);
// they are plain, restrict-qualified loops over one segment at a time with the segment's
// coefficients hoisted, which GCC -O3 vectorises. Note [Deterministic segment sums]: the
// hyperparameter partials of a segment are summed in double over fixed chunks of kChunk
// elements, then chunk by chunk in order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "gimli/checks.h"
#include "gimli/optim_math.h"
#include "gimli/segments.h"

namespace gimli {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task (step)
constexpr int64_t kChunk = 4096;   // elements per reduction chunk (VJP), fixed: see the note above

template <typename T>
T* ptr_or(const at::Tensor& t, T* fallback) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : fallback;
}

HyperView hyper_view(const std::vector<at::Tensor>& hyper, int64_t elementwise) {
  HyperView hv{};
  for (size_t h = 0; h < hyper.size(); ++h) hv.p[h] = hyper[h].data_ptr<double>();
  hv.elementwise = elementwise;
  return hv;
}

/// Calls fn(seg, lo, hi) for the pieces of every segment, in parallel over element ranges.
template <typename Fn>
void parallel_segments(const int64_t* off, int64_t nseg, int64_t n, const Fn& fn) {
  if (n == 0) return;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t s = find_segment(off, nseg, begin);
    for (int64_t i = begin; i < end; ++s) {
      const int64_t hi = std::min(end, off[s + 1]);
      if (hi > i) {
        fn(s, i, hi);
        i = hi;
      }
    }
  });
}

/// The (chunk, segment) pairs of the VJP reductions: pair_start[c] is chunk c's first pair.
struct Pairs {
  int64_t nchunks = 0;
  std::vector<int64_t> first_seg, pair_start;
};

Pairs make_pairs(const int64_t* off, int64_t nseg, int64_t n) {
  Pairs p;
  p.nchunks = (n + kChunk - 1) / kChunk;
  p.first_seg.resize(p.nchunks);
  p.pair_start.resize(p.nchunks + 1, 0);
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    p.first_seg[c] = find_segment(off, nseg, lo);
    const int64_t last = find_segment(off, nseg, hi - 1);
    p.pair_start[c + 1] = p.pair_start[c] + (last - p.first_seg[c] + 1);
  }
  return p;
}

/// Runs body(seg, lo, hi, acc) over every (chunk, segment) piece in parallel; ``acc`` (num_slots
/// doubles) is the piece's partial sum; then sums pieces into ``out[slot * nseg + seg]`` in order.
template <typename Body>
std::vector<double> segment_reduce(const int64_t* off, int64_t nseg, int64_t n, int num_slots, const Body& body) {
  const Pairs p = make_pairs(off, nseg, n);
  std::vector<double> partial(static_cast<size_t>(p.pair_start[p.nchunks]) * num_slots, 0.0);
  at::parallel_for(0, p.nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      int64_t s = p.first_seg[c];
      for (int64_t i = lo; i < hi; ++s) {
        const int64_t shi = std::min(hi, off[s + 1]);
        if (shi > i) {
          body(s, i, shi, &partial[(p.pair_start[c] + s - p.first_seg[c]) * num_slots]);
          i = shi;
        }
      }
    }
  });
  std::vector<double> out(static_cast<size_t>(num_slots) * nseg, 0.0);
  for (int64_t c = 0; c < p.nchunks; ++c) {
    for (int64_t q = p.pair_start[c]; q < p.pair_start[c + 1]; ++q) {
      const int64_t s = p.first_seg[c] + (q - p.pair_start[c]);
      for (int h = 0; h < num_slots; ++h) out[h * nseg + s] += partial[q * num_slots + h];
    }
  }
  return out;
}

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
  check_theta(theta);
  check_flat(G, theta, "G");
  const bool has_buf = check_optional(buf, theta, "buf");
  const int64_t nseg = check_offsets(offsets, theta);
  const std::vector<at::Tensor> hyper = hyper_list.vec();
  check_hyper(hyper, kSgdNumHyper, elementwise, nseg, theta);
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, false};
  const HyperView hv = hyper_view(hyper, elementwise);
  at::Tensor theta_next = at::empty_like(theta);
  at::Tensor buf_next = use_momentum ? at::empty_like(theta) : at::empty({0}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ bf = has_buf ? buf->data_ptr<T>() : th;
    T* __restrict__ tn = theta_next.data_ptr<T>();
    T* __restrict__ bn = use_momentum ? buf_next.data_ptr<T>() : tn;
    parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
      if (elementwise == 0) {
        const SgdCoef<T> c = sgd_coef_at<T>(hv, s, lo);
        if (use_momentum) {
          for (int64_t i = lo; i < hi; ++i) sgd_step_elem(c, f, th[i], gr[i], bf[i], tn[i], bn[i]);
        } else {
          T dummy;
          for (int64_t i = lo; i < hi; ++i) sgd_step_elem(c, f, th[i], gr[i], bf[i], tn[i], dummy);
        }
      } else {
        for (int64_t i = lo; i < hi; ++i) {
          T dummy;
          sgd_step_elem(sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tn[i], use_momentum ? bn[i] : dummy);
        }
      }
    });
  });
  return {theta_next, buf_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> sgd_step_vjp_cpu(
    const at::Tensor& theta, const at::Tensor& G, const c10::optional<at::Tensor>& buf,
    const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& buf_next_bar, const at::Tensor& offsets,
    at::TensorList hyper_list, int64_t elementwise, int64_t learned, bool nesterov, bool maximize,
    bool use_momentum, bool has_wd) {
  check_theta(theta);
  check_flat(G, theta, "G");
  check_flat(theta_next_bar, theta, "theta_next_bar");
  const bool has_buf = check_optional(buf, theta, "buf");
  const bool has_buf_bar = check_optional(buf_next_bar, theta, "buf_next_bar");
  const int64_t nseg = check_offsets(offsets, theta);
  const std::vector<at::Tensor> hyper = hyper_list.vec();
  check_hyper(hyper, kSgdNumHyper, elementwise, nseg, theta);
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const SgdFlags f{nesterov, maximize, use_momentum, has_wd, has_buf, has_buf_bar};
  const HyperView hv = hyper_view(hyper, elementwise);
  const bool buf_bar_out = use_momentum && has_buf;
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor buf_bar = buf_bar_out ? at::empty_like(theta) : at::empty({0}, theta.options());
  std::vector<at::Tensor> elem_out;
  std::vector<at::Tensor> hyper_bar = hyper_outputs(theta, kSgdNumHyper, learned, elementwise, nseg, elem_out);
  const int64_t reduce_mask = learned & ~elementwise;
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::sgd_step_vjp", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ bf = has_buf ? buf->data_ptr<T>() : th;
    const T* __restrict__ tb = theta_next_bar.data_ptr<T>();
    const T* __restrict__ cb = has_buf_bar ? buf_next_bar->data_ptr<T>() : th;
    T* __restrict__ o_th = theta_bar.data_ptr<T>();
    T* __restrict__ o_g = G_bar.data_ptr<T>();
    T* __restrict__ o_b = buf_bar_out ? buf_bar.data_ptr<T>() : nullptr;
    T* o_h[kSgdNumHyper];
    for (int h = 0; h < kSgdNumHyper; ++h) o_h[h] = elem_out[h].defined() ? elem_out[h].data_ptr<T>() : nullptr;
    sums = segment_reduce(off, nseg, n, kSgdNumHyper, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
      const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
      for (int64_t i = lo; i < hi; ++i) {
        const SgdCoef<T> c = elementwise == 0 ? c0 : sgd_coef_at<T>(hv, s, i);
        const SgdVjpElem<T> r = sgd_vjp_elem(c, f, th[i], gr[i], bf[i], tb[i], cb[i]);
        o_th[i] = r.theta_bar;
        o_g[i] = r.G_bar;
        if (buf_bar_out) o_b[i] = r.buf_bar;
        for (int h = 0; h < kSgdNumHyper; ++h) {
          if (reduce_mask >> h & 1) acc[h] += static_cast<double>(r.hyper_bar[h]);
          else if (o_h[h] != nullptr) o_h[h][i] = r.hyper_bar[h];
        }
      }
    });
  });
  fill_sums(hyper_bar, sums, kSgdNumHyper, learned, elementwise, nseg);
  return {theta_bar, G_bar, buf_bar, hyper_bar};
}

// ----------------------------------------------------------------------------------- Adam
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adam_step_cpu(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& offsets, at::TensorList hyper_list,
    int64_t elementwise, double step, bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  check_theta(theta);
  check_flat(G, theta, "G");
  check_flat(m, theta, "m");
  check_flat(v, theta, "v");
  const bool has_vmax = check_optional(vmax, theta, "vmax");
  TORCH_CHECK(has_vmax || !amsgrad, "gimli::adam_step: amsgrad needs vmax (max_exp_avg_sq)");
  const int64_t nseg = check_offsets(offsets, theta);
  const std::vector<at::Tensor> hyper = hyper_list.vec();
  check_hyper(hyper, kAdamNumHyper, elementwise, nseg, theta);
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, false, false, false};
  const HyperView hv = hyper_view(hyper, elementwise);
  at::Tensor theta_next = at::empty_like(theta), m_next = at::empty_like(theta), v_next = at::empty_like(theta);
  at::Tensor vmax_next = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
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
    parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
      if (elementwise == 0) {
        const AdamCoef<T> c = adam_coef_at<T>(hv, s, lo, step);
        if (amsgrad) {
          for (int64_t i = lo; i < hi; ++i) adam_step_elem(c, f, th[i], gr[i], mp[i], vp[i], xp[i], tn[i], mn[i], vn[i], xn[i]);
        } else {
          T dummy;
          for (int64_t i = lo; i < hi; ++i) adam_step_elem(c, f, th[i], gr[i], mp[i], vp[i], xp[i], tn[i], mn[i], vn[i], dummy);
        }
      } else {
        for (int64_t i = lo; i < hi; ++i) {
          T dummy;
          adam_step_elem(adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i], vp[i], xp[i], tn[i], mn[i], vn[i],
                         amsgrad ? xn[i] : dummy);
        }
      }
    });
  });
  return {theta_next, m_next, v_next, vmax_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> adam_step_vjp_cpu(
    const at::Tensor& theta, const at::Tensor& G, const at::Tensor& m, const at::Tensor& v,
    const c10::optional<at::Tensor>& vmax, const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& m_next_bar,
    const c10::optional<at::Tensor>& v_next_bar, const c10::optional<at::Tensor>& vmax_next_bar,
    const at::Tensor& offsets, at::TensorList hyper_list, int64_t elementwise, int64_t learned, double step,
    bool amsgrad, bool maximize, bool decoupled, bool has_wd) {
  check_theta(theta);
  check_flat(G, theta, "G");
  check_flat(m, theta, "m");
  check_flat(v, theta, "v");
  check_flat(theta_next_bar, theta, "theta_next_bar");
  const bool has_vmax = check_optional(vmax, theta, "vmax");
  TORCH_CHECK(has_vmax || !amsgrad, "gimli::adam_step_vjp: amsgrad needs vmax (max_exp_avg_sq)");
  const bool has_m_bar = check_optional(m_next_bar, theta, "m_next_bar");
  const bool has_v_bar = check_optional(v_next_bar, theta, "v_next_bar");
  const bool has_vmax_bar = check_optional(vmax_next_bar, theta, "vmax_next_bar") && amsgrad;
  const int64_t nseg = check_offsets(offsets, theta);
  const std::vector<at::Tensor> hyper = hyper_list.vec();
  check_hyper(hyper, kAdamNumHyper, elementwise, nseg, theta);
  const int64_t n = theta.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets_values(off, nseg, n);
  const AdamFlags f{amsgrad, maximize, decoupled, has_wd, has_m_bar, has_v_bar, has_vmax_bar};
  const HyperView hv = hyper_view(hyper, elementwise);
  at::Tensor theta_bar = at::empty_like(theta), G_bar = at::empty_like(theta);
  at::Tensor m_bar = at::empty_like(theta), v_bar = at::empty_like(theta);
  at::Tensor vmax_bar = amsgrad ? at::empty_like(theta) : at::empty({0}, theta.options());
  std::vector<at::Tensor> elem_out;
  std::vector<at::Tensor> hyper_bar = hyper_outputs(theta, kAdamNumHyper, learned, elementwise, nseg, elem_out);
  const int64_t reduce_mask = learned & ~elementwise;
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "gimli::adam_step_vjp", [&] {
    using T = scalar_t;
    const T* __restrict__ th = theta.data_ptr<T>();
    const T* __restrict__ gr = G.data_ptr<T>();
    const T* __restrict__ mp = m.data_ptr<T>();
    const T* __restrict__ vp = v.data_ptr<T>();
    const T* __restrict__ xp = amsgrad ? vmax->data_ptr<T>() : th;
    const T* __restrict__ tb = theta_next_bar.data_ptr<T>();
    const T* __restrict__ cm = has_m_bar ? m_next_bar->data_ptr<T>() : th;
    const T* __restrict__ cv = has_v_bar ? v_next_bar->data_ptr<T>() : th;
    const T* __restrict__ cx = has_vmax_bar ? vmax_next_bar->data_ptr<T>() : th;
    T* __restrict__ o_th = theta_bar.data_ptr<T>();
    T* __restrict__ o_g = G_bar.data_ptr<T>();
    T* __restrict__ o_m = m_bar.data_ptr<T>();
    T* __restrict__ o_v = v_bar.data_ptr<T>();
    T* __restrict__ o_x = amsgrad ? vmax_bar.data_ptr<T>() : nullptr;
    T* o_h[kAdamNumHyper];
    for (int h = 0; h < kAdamNumHyper; ++h) o_h[h] = elem_out[h].defined() ? elem_out[h].data_ptr<T>() : nullptr;
    sums = segment_reduce(off, nseg, n, kAdamNumHyper, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
      const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
      for (int64_t i = lo; i < hi; ++i) {
        const AdamCoef<T> c = elementwise == 0 ? c0 : adam_coef_at<T>(hv, s, i, step);
        const AdamVjpElem<T> r = adam_vjp_elem(c, f, th[i], gr[i], mp[i], vp[i], xp[i], tb[i], cm[i], cv[i], cx[i]);
        o_th[i] = r.theta_bar;
        o_g[i] = r.G_bar;
        o_m[i] = r.m_bar;
        o_v[i] = r.v_bar;
        if (amsgrad) o_x[i] = r.vmax_bar;
        for (int h = 0; h < kAdamNumHyper; ++h) {
          if (reduce_mask >> h & 1) acc[h] += static_cast<double>(r.hyper_bar[h]);
          else if (o_h[h] != nullptr) o_h[h][i] = r.hyper_bar[h];
        }
      }
    });
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
