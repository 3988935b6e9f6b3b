// SPDX-License-Identifier: Apache-2.0
// CPU loops of the fused Adam/AdamW VJP: loops.h says how they are built; compiled once per dtype (adam_vjp_f32/_f64.cpp).
//
// The Adam VJP has the most loops of all (12 flag combinations and the generic loop, each
// with the cotangent pass and five partial passes, each with an AVX2 clone): one translation
// unit per dtype halves the longest compile of a parallel build.
#pragma once

#include "kernels.h"
#include "loops.h"

namespace gimli {
namespace cpu {
namespace {

// The loops of one (chunk, segment) piece [lo, hi) of segment s: Note [Restrict parameters].

/// Adam VJP, the element-wise cotangents of θ, G, m, v and vmax.
template <typename T, typename F>
GIMLI_LOOP_AVX2 void adam_vjp_outputs(const HyperView& hv, const AdamFlags& flags, double step, int64_t s,
                                      int64_t lo, int64_t hi, const T* __restrict__ th, const T* __restrict__ gr,
                                      const T* __restrict__ mp, const T* __restrict__ vp, const T* __restrict__ xp,
                                      const T* __restrict__ tb, const T* __restrict__ cm, const T* __restrict__ cv,
                                      const T* __restrict__ cx, T* __restrict__ o_th, T* __restrict__ o_g,
                                      T* __restrict__ o_m, T* __restrict__ o_v, T* __restrict__ o_x) {
  const AdamFlags f = flags_of<F>(flags);
  const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
  for (int64_t i = lo; i < hi; ++i) {
    const AdamVjpElem<T> r = adam_vjp_elem(!F::kPerElement ? c0 : adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i],
                                           vp[i], xp[i], tb[i], cm[i], cv[i], cx[i]);
    o_th[i] = r.theta_bar;
    o_g[i] = r.G_bar;
    o_m[i] = r.m_bar;
    o_v[i] = r.v_bar;
    if (f.amsgrad) o_x[i] = r.vmax_bar;
  }
}

/// Adam VJP, the partials of hyperparameter slot H (recomputed: only that slot's arithmetic remains).
template <typename T, typename F, int H>
GIMLI_LOOP_AVX2 void adam_vjp_partial(const HyperView& hv, const AdamFlags& flags, double step, int64_t s,
                                      int64_t lo, int64_t hi, const T* __restrict__ th, const T* __restrict__ gr,
                                      const T* __restrict__ mp, const T* __restrict__ vp, const T* __restrict__ xp,
                                      const T* __restrict__ tb, const T* __restrict__ cm, const T* __restrict__ cv,
                                      const T* __restrict__ cx, T* __restrict__ out, double* acc) {
  const AdamFlags f = flags_of<F>(flags);
  const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
  write_or_sum(lo, hi, out, acc, [&](int64_t i) {
    return adam_vjp_elem(!F::kPerElement ? c0 : adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i], vp[i], xp[i],
                         tb[i], cm[i], cv[i], cx[i]).hyper_bar[H];
  });
}

}  // namespace

template <typename T>
void adam_step_vjp(const T* th, const T* gr, const T* mp, const T* vp, const T* xp, const T* tb, const T* cm,
                   const T* cv, const T* cx, T* o_th, T* o_g, T* o_m, T* o_v, T* o_x, T* const* o_h, double* sums,
                   int64_t learned, const int64_t* off, int64_t nseg, int64_t n, const HyperView& hv, double step,
                   const AdamFlags& f, bool generic) {
  dispatch_adam(f, generic, hv.elementwise != 0, [&](auto flags) {
    using F = decltype(flags);
    segment_reduce(off, nseg, n, kAdamNumHyper, sums, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
      adam_vjp_outputs<T, F>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tb, cm, cv, cx, o_th, o_g, o_m, o_v, o_x);
      for_each_slot<kAdamNumHyper>([&](auto h) {
        if (learned >> h & 1) {
          adam_vjp_partial<T, F, h>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tb, cm, cv, cx, o_h[h], &acc[h]);
        }
      });
    });
  });
}

/// Instantiates adam_step_vjp<T> (once per dtype, each in its own translation unit).
#define GIMLI_INSTANTIATE_ADAM_STEP_VJP(T)                                                                       \
  template void adam_step_vjp<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*,          \
                                 const T*, const T*, T*, T*, T*, T*, T*, T* const*, double*, int64_t,           \
                                 const int64_t*, int64_t, int64_t, const HyperView&, double, const AdamFlags&,  \
                                 bool);

}  // namespace cpu
}  // namespace gimli
