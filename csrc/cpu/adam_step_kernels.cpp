// SPDX-License-Identifier: Apache-2.0
// CPU loop of the fused Adam/AdamW step (Algorithm 1, line 6): loops.h says how it is built.
#include "kernels.h"
#include "loops.h"

namespace gimli {
namespace cpu {
namespace {

/// Adam/AdamW step of one (chunk, segment) piece [lo, hi) of segment s: Note [Restrict parameters].
template <typename T, typename F>
GIMLI_LOOP_AVX2 void adam_step_loop(const HyperView& hv, const AdamFlags& flags, double step, int64_t s, int64_t lo,
                                    int64_t hi, const T* __restrict__ th, const T* __restrict__ gr,
                                    const T* __restrict__ mp, const T* __restrict__ vp, const T* __restrict__ xp,
                                    T* __restrict__ tn, T* __restrict__ mn, T* __restrict__ vn,
                                    T* __restrict__ xn) {
  const AdamFlags f = flags_of<F>(flags);
  const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
  for (int64_t i = lo; i < hi; ++i) {
    T x_next;
    adam_step_elem(!F::kPerElement ? c0 : adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i], vp[i], xp[i], tn[i],
                   mn[i], vn[i], x_next);
    if (f.amsgrad) xn[i] = x_next;
  }
}

}  // namespace

template <typename T>
void adam_step(const T* th, const T* gr, const T* mp, const T* vp, const T* xp, T* tn, T* mn, T* vn, T* xn,
               const int64_t* off, int64_t nseg, int64_t n, const HyperView& hv, double step, const AdamFlags& f,
               bool generic) {
  dispatch_adam(f, generic, hv.elementwise != 0, [&](auto flags) {
    using F = decltype(flags);
    parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
      adam_step_loop<T, F>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tn, mn, vn, xn);
    });
  });
}

template void adam_step<float>(const float*, const float*, const float*, const float*, const float*, float*, float*,
                               float*, float*, const int64_t*, int64_t, int64_t, const HyperView&, double,
                               const AdamFlags&, bool);
template void adam_step<double>(const double*, const double*, const double*, const double*, const double*, double*,
                                double*, double*, double*, const int64_t*, int64_t, int64_t, const HyperView&,
                                double, const AdamFlags&, bool);

}  // namespace cpu
}  // namespace gimli
