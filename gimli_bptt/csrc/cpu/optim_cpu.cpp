// SPDX-License-Identifier: Apache-2.0
// CPU kernels of the fused SGD and Adam/AdamW steps and VJPs: at::parallel_for over flat buffers.
//
// The loops call the per-element functions of optim_math.h (one source of truth with CUDA);
// they are plain, restrict-qualified loops over one segment at a time with the segment's
// coefficients hoisted.
//
// Note [Static flags]: in the common case (hyperparameters per segment, the momentum buffer
// and every carried cotangent present) an op's boolean options are compile-time constants
// (dispatch_sgd / dispatch_adam over static_bools), so each combination has its own loop with
// no branch on a flag inside, which GCC -O3 vectorises. The last step of the sweep carries no
// cotangent of the optimizer state; it runs the static loop on a zero buffer instead (adding
// zero changes no value). The rare cases (element-wise hyperparameters, SGD's first step
// without a momentum buffer) run one generic loop that reads the flags at run time: the same
// per-element functions, so the same values, just not vectorised. It reads the coefficients
// per element only when a hyperparameter is element-wise; otherwise it hoists the segment's,
// as the static loops do (per element, Adam's bias corrections made that loop 35x slower than
// the static one: the last sweep step dominated a meta step at 1M parameters).
//
// Note [Deterministic segment sums]: a VJP's hyperparameter partials of a segment are summed
// in double over fixed chunks of kChunk elements; inside a chunk in blocks of kBlock elements,
// each block as kLanes interleaved sums added in a fixed order; then chunk by chunk in order.
// The result does not depend on the thread count. Each learned slot's partials are computed in
// a pass of their own (*_vjp_partial), which keeps the main pass free of reductions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "gimli/checks.h"
#include "gimli/optim_math.h"
#include "gimli/segments.h"

namespace gimli {
namespace {

// Note [Restrict parameters]; on x86-64 Linux with GCC, each loop function is also compiled
// for AVX2 beside the baseline (SSE2) and the CPU picks at load time (target_clones, an ifunc):
// the same IEEE + - * / sqrt on 8 lanes instead of 4, without FMA (no "fma" target, and
// -ffp-contract=off), so the same values on every CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GIMLI_NOINLINE __attribute__((noinline, target_clones("avx2", "default")))
#else
#define GIMLI_NOINLINE __attribute__((noinline))
#endif

constexpr int64_t kGrain = 16384;  // elements per parallel task (step)
constexpr int64_t kChunk = 4096;   // elements per reduction chunk (VJP), fixed: see the note above
constexpr int64_t kBlock = 256;    // elements per block of a reduction inside a chunk
constexpr int kLanes = 8;          // interleaved partial sums of a block

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

/// Calls ``fn(std::true_type{} or std::false_type{}, ...)``, one argument per flag: Note [Static
/// flags]. Each combination of flags is compiled into its own loop, with no branch on a flag
/// inside it, which GCC can vectorise.
template <typename Fn>
void static_bools(const Fn& fn) {
  fn();
}

template <typename Fn, typename... Rest>
void static_bools(const Fn& fn, bool flag, Rest... rest) {
  if (flag) {
    static_bools([&](auto... xs) { fn(std::true_type{}, xs...); }, rest...);
  } else {
    static_bools([&](auto... xs) { fn(std::false_type{}, xs...); }, rest...);
  }
}

/// Calls ``fn(std::integral_constant<int, h>{})`` for h = 0 ... N-1.
template <int N, typename Fn, int... H>
void for_each_slot(const Fn& fn, std::integer_sequence<int, H...>) {
  (fn(std::integral_constant<int, H>{}), ...);
}

template <int N, typename Fn>
void for_each_slot(const Fn& fn) {
  for_each_slot<N>(fn, std::make_integer_sequence<int, N>{});
}

/// The sum in double of ``x[0 .. n)`` as kLanes interleaved partial sums added in a fixed order
/// (independent lanes: the loop vectorises without reassociating any sum).
template <typename T>
__attribute__((always_inline)) inline double lane_sum(const T* __restrict__ x, int64_t n) {
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane[l] += static_cast<double>(x[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) lane[l] += static_cast<double>(x[i]);
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lane[l];
  return total;
}

/// Writes ``partial(i)`` for i in ``[lo, hi)`` to ``out`` (an element-wise slot), or, with
/// ``out == nullptr``, adds their sum to ``*acc`` block by block (kBlock elements, lane_sum).
/// Always inlined into the *_vjp_partial loop functions, where ``partial`` reads their
/// restrict parameters and constant flags (Note [Restrict parameters]); called out of line,
/// the lambda reads the flags through a pointer and the loop stays scalar.
template <typename T, typename Partial>
__attribute__((always_inline)) inline void write_or_sum(int64_t lo, int64_t hi, T* __restrict__ out, double* acc,
                                                        const Partial& partial) {
  if (out != nullptr) {
    for (int64_t i = lo; i < hi; ++i) out[i] = partial(i);
    return;
  }
  T block[kBlock];
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t e = std::min(hi, b + kBlock);
    for (int64_t i = b; i < e; ++i) block[i - b] = partial(i);
    *acc += lane_sum(block, e - b);
  }
}

/// The flags of a loop read at run time: the generic loop (Note [Static flags]). Its
/// coefficients are read per element only when a hyperparameter is element-wise
/// (``PerElement``); otherwise they are the segment's, hoisted out of the loop as in the
/// static loops (Adam's bias corrections cost two ``pow`` per evaluation).
template <bool PerElement>
struct RuntimeFlags {
  static constexpr bool kStatic = false;
  static constexpr bool kPerElement = PerElement;
};

/// SGD flags known at compile time; the momentum buffer and its carried cotangent exist.
template <bool Nesterov, bool Maximize, bool Momentum, bool Wd>
struct SgdStatic {
  static constexpr bool kStatic = true;
  static constexpr bool kPerElement = false;
  static constexpr SgdFlags value{Nesterov, Maximize, Momentum, Wd, Momentum, Momentum};
};

/// Adam flags known at compile time; the carried cotangents of m, v (and vmax) exist.
template <bool Amsgrad, bool Maximize, bool Decoupled, bool Wd>
struct AdamStatic {
  static constexpr bool kStatic = true;
  static constexpr bool kPerElement = false;
  static constexpr AdamFlags value{Amsgrad, Maximize, Decoupled, Wd, true, true, Amsgrad};
};

/// ``F::value`` for static flags, else the run-time ``flags``.
template <typename F, typename Flags>
inline Flags flags_of(const Flags& flags) {
  if constexpr (F::kStatic) {
    return F::value;
  } else {
    return flags;
  }
}

/// Runs the generic loop, ``body(RuntimeFlags<per_element>{})``.
template <typename Body>
void dispatch_runtime(bool per_element, const Body& body) {
  if (per_element) return body(RuntimeFlags<true>{});
  body(RuntimeFlags<false>{});
}

/// Runs ``body(SgdStatic<...>{})``, or the generic loop when ``generic``: the caller's rare
/// cases (element-wise hyperparameters, the first step without a momentum buffer);
/// ``per_element``: a hyperparameter is element-wise.
template <typename Body>
void dispatch_sgd(const SgdFlags& f, bool generic, bool per_element, const Body& body) {
  if (generic) return dispatch_runtime(per_element, body);
  static_bools([&](auto mom, auto nesterov, auto maximize, auto wd) {
    constexpr bool m = decltype(mom)::value;
    body(SgdStatic<m && decltype(nesterov)::value, decltype(maximize)::value, m, decltype(wd)::value>{});
  }, f.use_momentum, f.nesterov, f.maximize, f.has_wd);
}

/// As dispatch_sgd for Adam.
template <typename Body>
void dispatch_adam(const AdamFlags& f, bool generic, bool per_element, const Body& body) {
  if (generic) return dispatch_runtime(per_element, body);
  static_bools([&](auto amsgrad, auto maximize, auto decoupled, auto wd) {
    constexpr bool w = decltype(wd)::value;
    body(AdamStatic<decltype(amsgrad)::value, decltype(maximize)::value, w && decltype(decoupled)::value, w>{});
  }, f.amsgrad, f.maximize, f.decoupled, f.has_wd);
}

// The loops of one (chunk, segment) piece [lo, hi) of segment s. Note [Restrict parameters]:
// every buffer is a __restrict__ parameter of the function that holds the loop and the
// coefficients are its locals, so GCC knows that no store touches them and vectorises; the
// same loop over pointers captured by a lambda reloads every coefficient per element. These
// functions are GIMLI_NOINLINE: inlined into the caller's lambda, GCC lost what __restrict__
// promised (the Adam step reloaded each m' it had just stored and stayed scalar, 4x slower at
// 1e5 elements, though -fopt-info reported other copies of the loop vectorised). One call per
// segment piece costs nothing. The generic loop (RuntimeFlags) also reads the coefficients per
// element (element-wise ones).

/// SGD step (Algorithm 1, line 6).
template <typename T, typename F>
GIMLI_NOINLINE void sgd_step_loop(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                   const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf, T* __restrict__ tn,
                   T* __restrict__ bn) {
  const SgdFlags f = flags_of<F>(flags);
  const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
  for (int64_t i = lo; i < hi; ++i) {
    T b_next;
    sgd_step_elem(!F::kPerElement ? c0 : sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tn[i], b_next);
    if (f.use_momentum) bn[i] = b_next;
  }
}

/// Adam/AdamW step (Algorithm 1, line 6).
template <typename T, typename F>
GIMLI_NOINLINE void adam_step_loop(const HyperView& hv, const AdamFlags& flags, double step, int64_t s, int64_t lo, int64_t hi,
                    const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ mp,
                    const T* __restrict__ vp, const T* __restrict__ xp, T* __restrict__ tn, T* __restrict__ mn,
                    T* __restrict__ vn, T* __restrict__ xn) {
  const AdamFlags f = flags_of<F>(flags);
  const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
  for (int64_t i = lo; i < hi; ++i) {
    T x_next;
    adam_step_elem(!F::kPerElement ? c0 : adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i], vp[i], xp[i], tn[i],
                   mn[i], vn[i], x_next);
    if (f.amsgrad) xn[i] = x_next;
  }
}

/// SGD VJP, the element-wise cotangents of θ, G and the momentum buffer.
template <typename T, typename F>
GIMLI_NOINLINE void sgd_vjp_outputs(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                     const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf,
                     const T* __restrict__ tb, const T* __restrict__ cb, T* __restrict__ o_th, T* __restrict__ o_g,
                     T* __restrict__ o_b) {
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
GIMLI_NOINLINE void sgd_vjp_partial(const HyperView& hv, const SgdFlags& flags, int64_t s, int64_t lo, int64_t hi,
                     const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ bf,
                     const T* __restrict__ tb, const T* __restrict__ cb, T* __restrict__ out, double* acc) {
  const SgdFlags f = flags_of<F>(flags);
  const SgdCoef<T> c0 = sgd_coef_at<T>(hv, s, lo);
  write_or_sum(lo, hi, out, acc, [&](int64_t i) {
    return sgd_vjp_elem(!F::kPerElement ? c0 : sgd_coef_at<T>(hv, s, i), f, th[i], gr[i], bf[i], tb[i], cb[i]).hyper_bar[H];
  });
}

/// Adam VJP, the element-wise cotangents of θ, G, m, v and vmax.
template <typename T, typename F>
GIMLI_NOINLINE void adam_vjp_outputs(const HyperView& hv, const AdamFlags& flags, double step, int64_t s, int64_t lo, int64_t hi,
                      const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ mp,
                      const T* __restrict__ vp, const T* __restrict__ xp, const T* __restrict__ tb,
                      const T* __restrict__ cm, const T* __restrict__ cv, const T* __restrict__ cx,
                      T* __restrict__ o_th, T* __restrict__ o_g, T* __restrict__ o_m, T* __restrict__ o_v,
                      T* __restrict__ o_x) {
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

/// Adam VJP, the partials of hyperparameter slot H.
template <typename T, typename F, int H>
GIMLI_NOINLINE void adam_vjp_partial(const HyperView& hv, const AdamFlags& flags, double step, int64_t s, int64_t lo, int64_t hi,
                      const T* __restrict__ th, const T* __restrict__ gr, const T* __restrict__ mp,
                      const T* __restrict__ vp, const T* __restrict__ xp, const T* __restrict__ tb,
                      const T* __restrict__ cm, const T* __restrict__ cv, const T* __restrict__ cx,
                      T* __restrict__ out, double* acc) {
  const AdamFlags f = flags_of<F>(flags);
  const AdamCoef<T> c0 = adam_coef_at<T>(hv, s, lo, step);
  write_or_sum(lo, hi, out, acc, [&](int64_t i) {
    return adam_vjp_elem(!F::kPerElement ? c0 : adam_coef_at<T>(hv, s, i, step), f, th[i], gr[i], mp[i], vp[i], xp[i],
                         tb[i], cm[i], cv[i], cx[i]).hyper_bar[H];
  });
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
  const CheckedOp op = check_op(theta, G, offsets, hyper_list, kSgdNumHyper, elementwise);
  const int64_t nseg = op.nseg;
  const std::vector<at::Tensor>& hyper = op.hyper;
  const bool has_buf = check_optional(buf, theta, "buf");
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
    dispatch_sgd(f, generic, elementwise != 0, [&](auto flags) {
      using F = decltype(flags);
      parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
        sgd_step_loop<T, F>(hv, f, s, lo, hi, th, gr, bf, tn, bn);
      });
    });
  });
  return {theta_next, buf_next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> sgd_step_vjp_cpu(
    const at::Tensor& theta, const at::Tensor& G, const c10::optional<at::Tensor>& buf,
    const at::Tensor& theta_next_bar, const c10::optional<at::Tensor>& buf_next_bar, const at::Tensor& offsets,
    at::TensorList hyper_list, int64_t elementwise, int64_t learned, bool nesterov, bool maximize,
    bool use_momentum, bool has_wd) {
  const CheckedOp op = check_op(theta, G, offsets, hyper_list, kSgdNumHyper, elementwise);
  const int64_t nseg = op.nseg;
  const std::vector<at::Tensor>& hyper = op.hyper;
  check_flat(theta_next_bar, theta, "theta_next_bar");
  const bool has_buf = check_optional(buf, theta, "buf");
  // The last sweep step carries no cotangent of the buffer: as in adam_step_vjp_cpu, the static
  // loop on zeros instead of the generic loop (the same values).
  const bool carried = check_optional(buf_next_bar, theta, "buf_next_bar");
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
  std::vector<double> sums;
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
    dispatch_sgd(f, generic, elementwise != 0, [&](auto flags) {
      using F = decltype(flags);
      sums = segment_reduce(off, nseg, n, kSgdNumHyper, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
        sgd_vjp_outputs<T, F>(hv, f, s, lo, hi, th, gr, bf, tb, cb, o_th, o_g, o_b);
        for_each_slot<kSgdNumHyper>([&](auto h) {
          if (learned >> h & 1) sgd_vjp_partial<T, F, h>(hv, f, s, lo, hi, th, gr, bf, tb, cb, o_h[h], &acc[h]);
        });
      });
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
  const CheckedOp op = check_op(theta, G, offsets, hyper_list, kAdamNumHyper, elementwise);
  const int64_t nseg = op.nseg;
  const std::vector<at::Tensor>& hyper = op.hyper;
  check_adam_state(theta, m, v, vmax, amsgrad, "gimli::adam_step");
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
    dispatch_adam(f, elementwise != 0, elementwise != 0, [&](auto flags) {
      using F = decltype(flags);
      parallel_segments(off, nseg, n, [&](int64_t s, int64_t lo, int64_t hi) {
        adam_step_loop<T, F>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tn, mn, vn, xn);
      });
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
  const CheckedOp op = check_op(theta, G, offsets, hyper_list, kAdamNumHyper, elementwise);
  const int64_t nseg = op.nseg;
  const std::vector<at::Tensor>& hyper = op.hyper;
  check_flat(theta_next_bar, theta, "theta_next_bar");
  check_adam_state(theta, m, v, vmax, amsgrad, "gimli::adam_step_vjp");
  const AdamCarried carried = check_adam_carried(theta, m_next_bar, v_next_bar, vmax_next_bar, amsgrad);
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
  std::vector<double> sums;
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
    dispatch_adam(f, generic, elementwise != 0, [&](auto flags) {
      using F = decltype(flags);
      sums = segment_reduce(off, nseg, n, kAdamNumHyper, [&](int64_t s, int64_t lo, int64_t hi, double* acc) {
        adam_vjp_outputs<T, F>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tb, cm, cv, cx, o_th, o_g, o_m, o_v, o_x);
        for_each_slot<kAdamNumHyper>([&](auto h) {
          if (learned >> h & 1) {
            adam_vjp_partial<T, F, h>(hv, f, step, s, lo, hi, th, gr, mp, vp, xp, tb, cm, cv, cx, o_h[h], &acc[h]);
          }
        });
      });
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
