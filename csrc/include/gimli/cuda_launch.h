// SPDX-License-Identifier: Apache-2.0
// Host entry points of the CUDA kernels (raw pointers, no torch types): implemented in csrc/cuda/optim_cuda.cu.
#pragma once

#include <cstdint>

#include "segments.h"

namespace gimli {
namespace cuda {

/// ``stream`` is a ``cudaStream_t`` (torch's current stream), passed as void* to keep this header plain C++.
template <typename T>
void sgd_step(const T* theta, const T* G, const T* buf, T* theta_next, T* buf_next, const int64_t* offsets,
              int64_t nseg, int64_t n, HyperView hv, SgdFlags f, void* stream);

/// ``partial``: scratch of ``num_slots * n`` elements for the hyperparameter slots in
/// ``reduce_mask``; ``sums``: ``num_slots * nseg`` doubles (zeroed here), the segment sums.
template <typename T>
void sgd_step_vjp(const T* theta, const T* G, const T* buf, const T* tb, const T* carried_buf_bar, T* theta_bar,
                  T* G_bar, T* buf_bar, T* const* hyper_elem, T* partial, double* sums, int64_t reduce_mask,
                  const int64_t* offsets, int64_t nseg, int64_t n, HyperView hv, SgdFlags f, void* stream);

template <typename T>
void adam_step(const T* theta, const T* G, const T* m, const T* v, const T* vmax, T* theta_next, T* m_next,
               T* v_next, T* vmax_next, const int64_t* offsets, int64_t nseg, int64_t n, HyperView hv, double t,
               AdamFlags f, void* stream);

template <typename T>
void adam_step_vjp(const T* theta, const T* G, const T* m, const T* v, const T* vmax, const T* tb, const T* cm,
                   const T* cv, const T* cvmax, T* theta_bar, T* G_bar, T* m_bar, T* v_bar, T* vmax_bar,
                   T* const* hyper_elem, T* partial, double* sums, int64_t reduce_mask, const int64_t* offsets,
                   int64_t nseg, int64_t n, HyperView hv, double t, AdamFlags f, void* stream);

/// The last CUDA error as text, or nullptr (checked by the binding after each launch).
const char* last_error();

}  // namespace cuda
}  // namespace gimli
