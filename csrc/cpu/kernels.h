// SPDX-License-Identifier: Apache-2.0
// Entry points of the CPU loops (raw pointers, no torch types): called by optim_cpu.cpp, one translation unit per op.
//
// As gimli/cuda_launch.h for CUDA. Pointers of absent buffers are never read through: the
// caller passes any valid pointer for an absent input (theta) and nullptr for an absent output.
// ``generic``: run the generic loop, not a static one (Note [Static flags] in loops.h).
// Instantiated for float and double.
#pragma once

#include <cstdint>

#include "gimli/optim_math.h"
#include "gimli/segments.h"

namespace gimli {
namespace cpu {

template <typename T>
void sgd_step(const T* theta, const T* G, const T* buf, T* theta_next, T* buf_next, const int64_t* offsets,
              int64_t nseg, int64_t n, const HyperView& hv, const SgdFlags& f, bool generic);

/// ``hyper_elem[h]``: where slot h's element-wise partials go (nullptr: summed per segment, if
/// learned); ``sums``: kSgdNumHyper * nseg doubles, overwritten with the segment sums.
template <typename T>
void sgd_step_vjp(const T* theta, const T* G, const T* buf, const T* theta_next_bar, const T* buf_next_bar,
                  T* theta_bar, T* G_bar, T* buf_bar, T* const* hyper_elem, double* sums, int64_t learned,
                  const int64_t* offsets, int64_t nseg, int64_t n, const HyperView& hv, const SgdFlags& f,
                  bool generic);

template <typename T>
void adam_step(const T* theta, const T* G, const T* m, const T* v, const T* vmax, T* theta_next, T* m_next,
               T* v_next, T* vmax_next, const int64_t* offsets, int64_t nseg, int64_t n, const HyperView& hv,
               double step, const AdamFlags& f, bool generic);

/// As sgd_step_vjp; ``sums``: kAdamNumHyper * nseg doubles.
template <typename T>
void adam_step_vjp(const T* theta, const T* G, const T* m, const T* v, const T* vmax, const T* theta_next_bar,
                   const T* m_next_bar, const T* v_next_bar, const T* vmax_next_bar, T* theta_bar, T* G_bar,
                   T* m_bar, T* v_bar, T* vmax_bar, T* const* hyper_elem, double* sums, int64_t learned,
                   const int64_t* offsets, int64_t nseg, int64_t n, const HyperView& hv, double step,
                   const AdamFlags& f, bool generic);

}  // namespace cpu
}  // namespace gimli
