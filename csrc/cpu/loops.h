// SPDX-License-Identifier: Apache-2.0
// What the CPU loop files share: the parallel segment walk, the deterministic segment sums and the static-flag dispatch.
//
// The loops call the per-element functions of optim_math.h (one source of truth with CUDA);
// they are plain, restrict-qualified loops over one segment at a time with the segment's
// coefficients hoisted. Each op's loops live in a translation unit of their own (sgd_kernels.cpp,
// adam_step_kernels.cpp, and adam_vjp_kernels.h once per dtype in adam_vjp_f32.cpp and
// adam_vjp_f64.cpp), reached through the raw-pointer entry points of kernels.h, so that ninja
// compiles them in parallel; only optim_cpu.cpp sees tensors.
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
//
// Note [Restrict parameters]: every buffer is a __restrict__ parameter of the function that
// holds the loop and the coefficients are its locals, so GCC knows that no store touches them
// and vectorises; the same loop over pointers captured by a lambda reloads every coefficient
// per element. These functions are noinline (GIMLI_LOOP): inlined into the caller's lambda,
// GCC lost what __restrict__ promised (the Adam step reloaded each m' it had just stored and
// stayed scalar, 4x slower at 1e5 elements, though -fopt-info reported other copies of the loop
// vectorised). One call per segment piece costs nothing. The generic loop (RuntimeFlags) also
// reads the coefficients per element (element-wise ones).
//
// Note [AVX2 clones]: on x86-64 Linux with GCC, a loop marked GIMLI_LOOP_AVX2 is also compiled
// for AVX2 beside the baseline (SSE2) and the CPU picks at load time (target_clones, an ifunc):
// the same IEEE + - * / sqrt on 8 lanes instead of 4, without FMA (no "fma" target, and
// -ffp-contract=off), so the same values on every CPU. A clone doubles the code generated for
// its loop, and so the compile time of its file; only the Adam loops keep one, where the op
// benchmark shows it pays (docs/KERNELS.md, "AVX2 clones"): the SGD loops are memory-bound at
// SSE2 already. -DGIMLI_NO_AVX2_CLONES builds every loop at the baseline only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "gimli/optim_math.h"
#include "gimli/segments.h"

#define GIMLI_LOOP __attribute__((noinline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(GIMLI_NO_AVX2_CLONES)
#define GIMLI_LOOP_AVX2 __attribute__((noinline, target_clones("avx2", "default")))
#else
#define GIMLI_LOOP_AVX2 GIMLI_LOOP
#endif

namespace gimli {
namespace cpu {

constexpr int64_t kGrain = 16384;  // elements per parallel task (step)
constexpr int64_t kChunk = 4096;   // elements per reduction chunk (VJP), fixed: Note [Deterministic segment sums]
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

inline Pairs make_pairs(const int64_t* off, int64_t nseg, int64_t n) {
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
/// doubles) is the piece's partial sum; then sums pieces into ``out[slot * nseg + seg]`` in order
/// (``out``: num_slots * nseg doubles, overwritten).
template <typename Body>
void segment_reduce(const int64_t* off, int64_t nseg, int64_t n, int num_slots, double* out, const Body& body) {
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
  std::fill(out, out + static_cast<size_t>(num_slots) * nseg, 0.0);
  for (int64_t c = 0; c < p.nchunks; ++c) {
    for (int64_t q = p.pair_start[c]; q < p.pair_start[c + 1]; ++q) {
      const int64_t s = p.first_seg[c] + (q - p.pair_start[c]);
      for (int h = 0; h < num_slots; ++h) out[h * nseg + s] += partial[q * num_slots + h];
    }
  }
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

}  // namespace cpu
}  // namespace gimli
