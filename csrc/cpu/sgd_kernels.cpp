// SPDX-License-Identifier: Apache-2.0
// CPU loops of the fused SGD step and VJP (Algorithm 1, line 6 and its VJP): loops.h says how they are built.
#include "kernels.h"
#include "loops.h"

namespace gimli {
namespace cpu {
namespace {

// The loops of one (chunk, segment) piece [lo, hi) of segment s: Note [Restrict parameters].
// At baseline only: memory-bound already (Note [AVX2 clones]).

/// SGD step.
template <typename T, typename F>
GIMLI_LOOP void sgd_step_loop(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                              const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf,
                              T* __restrict__ tn, T* __restrict__ bn) {
  const SgdFlags f = flags_of<F>(flags);
  const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
  for (int64_t i = lo; i < hi; ++i) {
    T b_next;
    sgd_step_elem(!F::kPerElement ? c0 : sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tn[i], b_next);
    if (f.use_momentum) bn[i] = b_next;
  }
}

/// SGD VJP, the element-wise cotangents of θ, G and the momentum buffer.
template <typename T, typename F>
GIMLI_LOOP void sgd_vjp_outputs(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                                const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf,
                                const T* __restrict__ tb, const T* __restrict__ cb, T* __restrict__ o_th,
                                T* __restrict__ o_g, T* __restrict__ o_b) {
  const SgdFlags f = flags_of<F>(flags);
  const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
  for (int64_t i = lo; i < hi; ++i) {
    const SgdVjpElem<T> r =
        sgd_vjp_elem(!F::kPerElement ? c0 : sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tb[i], cb[i]);
    o_th[i] = r.theta_bar;
    o_g[i] = r.G_bar;
    if (f.use_momentum && f.has_buf) o_b[i] = r.buf_bar;
  }
}

/// SGD VJP, the partials of hyperparameter slot H (recomputed: only that slot's arithmetic remains).
template <typename T, typename F, int H>
GIMLI_LOOP void sgd_vjp_partial(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                                const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf,
                                const T* __restrict__ tb, const T* __restrict__ cb, T* __restrict__ out,
                                double* acc) {
  const SgdFlags f = flags_of<F>(flags);
  const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
  write_or_sum(lo, hi, out, acc, [&](int64_t i) {
    return sgd_vjp_elem(!F::kPerElement ? c0 : sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tb[i], cb[i])
        .hyper_bar[H];
  });
}

}  // namespace

template <typename T>
void sgd_step(const T* th, const T* gr, const T* bf, T* tn, T* bn, const int64_t* off, int64_t nseg, int64_t n,
              const HyperView& hv, const SgdFlags& f, bool generic) {
  dispatch_sgd(f, generic, hv.elementwise != 0, [&](auto flags) {
    using F = decltype(flags);
    parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
      sgd_step_loop<T, F>(hv, f, s, lo, hi, th, gr, bf, tn, bn);
    });
  });
}

template <typename T>
void sgd_step_vjp(const T* th, const T* gr, const T* bf, const T* tb, const T* cb, T* o_th, T* o_g, T* o_b,
                  T* const* o_h, double* sums, int64_t learned, const int64_t* off, int64_t nseg, int64_t n,
                  const HyperView& hv, const SgdFlags& f, bool generic) {
  dispatch_sgd(f, generic, hv.elementwise != 0, [&](auto flags) {
    using F = decltype(flags);
    segment_reduce(off, nseg, n, kSgdNumHyper, sums, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
      sgd_vjp_outputs<T, F>(hv, f, s, lo, hi, th, gr, bf, tb, cb, o_th, o_g, o_b);
      for_each_slot<kSgdNumHyper>([&](auto h) {
        if (learned >> h & 1) sgd_vjp_partial<T, F, h>(hv, f, s, lo, hi, th, gr, bf, tb, cb, o_h[h], &acc[h]);
      });
    });
  });
}

#define GIMLI_INSTANTIATE(T)                                                                                      \
  template void sgd_step<T>(const T*, const T*, const T*, T*, T*, const int64_t*, int64_t, int64_t,             \
                            const HyperView&, const SgdFlags&, bool);                                           \
  template void sgd_step_vjp<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T* const*,        \
                                double*, int64_t, const int64_t*, int64_t, int64_t, const HyperView&,           \
                                const SgdFlags&, bool);
GIMLI_INSTANTIATE(float)
GIMLI_INSTANTIATE(double)
#undef GIMLI_INSTANTIATE

}  // namespace cpu
}  // namespace gimli
