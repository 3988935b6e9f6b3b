// SPDX-License-Identifier: Apache-2.0
// Launchers of the CUDA kernels of the fused SGD and Adam/AdamW steps and VJPs (optim_kernels.cuh),
// on the stream torch passes in.
//
// Includes only CUDA headers and the shared math (optim_math.h), so ``nvcc -c`` compiles it
// without a CUDA build of torch. Compile with --fmad=false (Note [One source of truth]).
// Loads and stores go VEC elements at a time (16 bytes) where every buffer is 16-byte aligned;
// each thread walks the segments of its VEC elements and recomputes a segment's coefficients
// only when the segment changes (or per element for element-wise hyperparameters).
// Note [Segment sums on CUDA]: the VJP writes each element-wise hyperparameter partial to a
// scratch buffer; a second kernel sums each (chunk, segment) piece with a block reduction in
// double and adds it into the segment's sum with one atomicAdd (so the order of the final
// additions, unlike on the CPU, is not fixed).
#include <cuda_runtime.h>

#include <cstdint>

#include "gimli/cuda_launch.h"
#include "optim_kernels.cuh"

namespace gimli {
namespace cuda {
namespace {

int blocks_for(int64_t work) {
  int64_t b = (work + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > 65535) b = 65535;  // grid-stride covers the rest
  return static_cast<int>(b);
}

template <typename T>
void launch_segment_sums(const T* partial, int num_slots, int64_t reduce_mask, double* sums, const int64_t* off,
                         int64_t nseg, int64_t n, cudaStream_t st) {
  cudaMemsetAsync(sums, 0, sizeof(double) * num_slots * nseg, st);
  if (reduce_mask == 0 || n == 0) return;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int blocks = static_cast<int>(nchunks < 65535 ? nchunks : 65535);
  segment_sum_kernel<T><<<blocks, kThreads, 0, st>>>(partial, num_slots, reduce_mask, sums, off, nseg, n);
}

}  // namespace

// ----------------------------------------------------------------------------- launchers
template <typename T>
void sgd_step(const T* theta, const T* G, const T* buf, T* theta_next, T* buf_next, const int64_t* offsets,
              int64_t nseg, int64_t n, HyperView hv, SgdFlags f, void* stream) {
  if (n == 0) return;
  const bool vec_ok = aligned16(theta) && aligned16(G) && aligned16(theta_next) &&
                      (!f.has_buf || aligned16(buf)) && (!f.use_momentum || aligned16(buf_next));
  const int64_t groups = (n + Vec<T>::N - 1) / Vec<T>::N;
  sgd_step_kernel<T><<<blocks_for(groups), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      theta, G, buf, theta_next, buf_next, offsets, nseg, n, hv, f, vec_ok);
}

template <typename T>
void sgd_step_vjp(const T* theta, const T* G, const T* buf, const T* tb, const T* carried_buf_bar, T* theta_bar,
                  T* G_bar, T* buf_bar, T* const* hyper_elem, T* partial, double* sums, int64_t reduce_mask,
                  const int64_t* offsets, int64_t nseg, int64_t n, HyperView hv, SgdFlags f, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  HyperOut<T> ho{};
  bool vec_ok = aligned16(theta) && aligned16(G) && aligned16(tb) && aligned16(theta_bar) && aligned16(G_bar) &&
                (!f.has_buf || aligned16(buf)) && (!f.has_buf_bar || aligned16(carried_buf_bar)) &&
                (buf_bar == nullptr || aligned16(buf_bar));
  for (int h = 0; h < kSgdNumHyper; ++h) {
    ho.p[h] = (reduce_mask >> h & 1) ? partial + h * n : hyper_elem[h];
    vec_ok = vec_ok && (ho.p[h] == nullptr || aligned16(ho.p[h]));
  }
  if (n > 0) {
    const int64_t groups = (n + Vec<T>::N - 1) / Vec<T>::N;
    sgd_vjp_kernel<T><<<blocks_for(groups), kThreads, 0, st>>>(theta, G, buf, tb, carried_buf_bar, theta_bar, G_bar,
                                                               buf_bar, ho, offsets, nseg, n, hv, f, vec_ok);
  }
  launch_segment_sums<T>(partial, kSgdNumHyper, reduce_mask, sums, offsets, nseg, n, st);
}

template <typename T>
void adam_step(const T* theta, const T* G, const T* m, const T* v, const T* vmax, T* theta_next, T* m_next,
               T* v_next, T* vmax_next, const int64_t* offsets, int64_t nseg, int64_t n, HyperView hv, double t,
               AdamFlags f, void* stream) {
  if (n == 0) return;
  const bool vec_ok = aligned16(theta) && aligned16(G) && aligned16(m) && aligned16(v) && aligned16(theta_next) &&
                      aligned16(m_next) && aligned16(v_next) && (!f.amsgrad || (aligned16(vmax) && aligned16(vmax_next)));
  const int64_t groups = (n + Vec<T>::N - 1) / Vec<T>::N;
  adam_step_kernel<T><<<blocks_for(groups), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      theta, G, m, v, vmax, theta_next, m_next, v_next, vmax_next, offsets, nseg, n, hv, t, f, vec_ok);
}

template <typename T>
void adam_step_vjp(const T* theta, const T* G, const T* m, const T* v, const T* vmax, const T* tb, const T* cm,
                   const T* cv, const T* cvmax, T* theta_bar, T* G_bar, T* m_bar, T* v_bar, T* vmax_bar,
                   T* const* hyper_elem, T* partial, double* sums, int64_t reduce_mask, const int64_t* offsets,
                   int64_t nseg, int64_t n, HyperView hv, double t, AdamFlags f, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  HyperOut<T> ho{};
  bool vec_ok = aligned16(theta) && aligned16(G) && aligned16(m) && aligned16(v) && aligned16(tb) &&
                aligned16(theta_bar) && aligned16(G_bar) && aligned16(m_bar) && aligned16(v_bar) &&
                (!f.amsgrad || (aligned16(vmax) && aligned16(vmax_bar))) && (!f.has_m_bar || aligned16(cm)) &&
                (!f.has_v_bar || aligned16(cv)) && (!f.has_vmax_bar || aligned16(cvmax));
  for (int h = 0; h < kAdamNumHyper; ++h) {
    ho.p[h] = (reduce_mask >> h & 1) ? partial + h * n : hyper_elem[h];
    vec_ok = vec_ok && (ho.p[h] == nullptr || aligned16(ho.p[h]));
  }
  if (n > 0) {
    const int64_t groups = (n + Vec<T>::N - 1) / Vec<T>::N;
    adam_vjp_kernel<T><<<blocks_for(groups), kThreads, 0, st>>>(theta, G, m, v, vmax, tb, cm, cv, cvmax, theta_bar,
                                                                G_bar, m_bar, v_bar, vmax_bar, ho, offsets, nseg, n,
                                                                hv, t, f, vec_ok);
  }
  launch_segment_sums<T>(partial, kAdamNumHyper, reduce_mask, sums, offsets, nseg, n, st);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define GIMLI_INSTANTIATE(T)                                                                                         \
  template void sgd_step<T>(const T*, const T*, const T*, T*, T*, const int64_t*, int64_t, int64_t, HyperView,      \
                            SgdFlags, void*);                                                                        \
  template void sgd_step_vjp<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T* const*, T*,         \
                                double*, int64_t, const int64_t*, int64_t, int64_t, HyperView, SgdFlags, void*);     \
  template void adam_step<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, T*, const int64_t*,      \
                             int64_t, int64_t, HyperView, double, AdamFlags, void*);                                 \
  template void adam_step_vjp<T>(const T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*,    \
                                 const T*, T*, T*, T*, T*, T*, T* const*, T*, double*, int64_t, const int64_t*,      \
                                 int64_t, int64_t, HyperView, double, AdamFlags, void*);

GIMLI_INSTANTIATE(float)
GIMLI_INSTANTIATE(double)
#undef GIMLI_INSTANTIATE

}  // namespace cuda
}  // namespace gimli
