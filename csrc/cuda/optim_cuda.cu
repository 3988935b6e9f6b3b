// SPDX-License-Identifier: Apache-2.0
// CUDA kernels of the fused SGD and Adam/AdamW steps and VJPs: grid-stride loops over flat buffers.
//
// Includes only CUDA headers and the shared math (optim_math.h), so ``nvcc -c`` compiles it
// without a CUDA build of torch. Compile with --fmad=false (Note [One source of truth]).
// Loads and stores go VEC elements at a time (16 bytes) where every buffer is 16-byte aligned.
// Note [Segment sums on CUDA]: the VJP writes each element-wise hyperparameter partial to a
// scratch buffer; a second kernel sums each (chunk, segment) piece with a block reduction in
// double and adds it into the segment's sum with one atomicAdd (so the order of the final
// additions, unlike on the CPU, is not fixed).
#include <cuda_runtime.h>

#include <cstdint>

#include "gimli/cuda_launch.h"
#include "gimli/optim_math.h"
#include "gimli/segments.h"

namespace gimli {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per reduction block

template <typename T>
struct Vec {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int blocks_for(int64_t work) {
  int64_t b = (work + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > 65535) b = 65535;  // grid-stride covers the rest
  return static_cast<int>(b);
}

/// Loads VEC consecutive elements from p + i (vectorised when allowed).
template <typename T, int N>
__device__ __forceinline__ void load(const T* p, int64_t i, bool vec, int64_t n, T (&out)[N]) {
  if (vec) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p + i);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = pk.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = (i + j < n) ? p[i + j] : T(0);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, int64_t i, bool vec, int64_t n, const T (&in)[N]) {
  if (vec) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = in[j];
    *reinterpret_cast<Pack<T, N>*>(p + i) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (i + j < n) p[i + j] = in[j];
  }
}

// ------------------------------------------------------------------------------------ SGD
template <typename T>
__global__ void sgd_step_kernel(const T* theta, const T* G, const T* buf, T* theta_next, T* buf_next,
                                const int64_t* off, int64_t nseg, int64_t n, HyperView hv, SgdFlags f, bool vec_ok) {
  constexpr int N = Vec<T>::N;
  const int64_t groups = (n + N - 1) / N;
  for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = gi * N;
    const bool vec = vec_ok && i0 + N <= n;
    T th[N], gr[N], bf[N], tn[N], bn[N];
    load<T, N>(theta, i0, vec, n, th);
    load<T, N>(G, i0, vec, n, gr);
    if (f.has_buf) load<T, N>(buf, i0, vec, n, bf);
    else for (int j = 0; j < N; ++j) bf[j] = T(0);
    int64_t s = find_segment(off, nseg, i0 < n ? i0 : n - 1);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      if (i >= n) { tn[j] = bn[j] = T(0); continue; }
      while (off[s + 1] <= i) ++s;
      sgd_step_elem(sgd_coef_at<T>(hv, s, i), f, th[j], gr[j], bf[j], tn[j], bn[j]);
    }
    store<T, N>(theta_next, i0, vec, n, tn);
    if (f.use_momentum) store<T, N>(buf_next, i0, vec, n, bn);
  }
}

template <typename T>
__global__ void sgd_vjp_kernel(const T* theta, const T* G, const T* buf, const T* tb, const T* cb, T* theta_bar,
                               T* G_bar, T* buf_bar, HyperOut<T> ho, const int64_t* off, int64_t nseg, int64_t n,
                               HyperView hv, SgdFlags f) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = find_segment(off, nseg, i);
    const SgdVjpElem<T> r = sgd_vjp_elem(sgd_coef_at<T>(hv, s, i), f, theta[i], G[i], f.has_buf ? buf[i] : T(0),
                                         tb[i], f.has_buf_bar ? cb[i] : T(0));
    theta_bar[i] = r.theta_bar;
    G_bar[i] = r.G_bar;
    if (buf_bar != nullptr) buf_bar[i] = r.buf_bar;
    for (int h = 0; h < kSgdNumHyper; ++h)
      if (ho.p[h] != nullptr) ho.p[h][i] = r.hyper_bar[h];
  }
}

// ----------------------------------------------------------------------------------- Adam
template <typename T>
__global__ void adam_step_kernel(const T* theta, const T* G, const T* m, const T* v, const T* vmax, T* theta_next,
                                 T* m_next, T* v_next, T* vmax_next, const int64_t* off, int64_t nseg, int64_t n,
                                 HyperView hv, double t, AdamFlags f, bool vec_ok) {
  constexpr int N = Vec<T>::N;
  const int64_t groups = (n + N - 1) / N;
  for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = gi * N;
    const bool vec = vec_ok && i0 + N <= n;
    T th[N], gr[N], mp[N], vp[N], xp[N], tn[N], mn[N], vn[N], xn[N];
    load<T, N>(theta, i0, vec, n, th);
    load<T, N>(G, i0, vec, n, gr);
    load<T, N>(m, i0, vec, n, mp);
    load<T, N>(v, i0, vec, n, vp);
    if (f.amsgrad) load<T, N>(vmax, i0, vec, n, xp);
    else for (int j = 0; j < N; ++j) xp[j] = T(0);
    int64_t s = find_segment(off, nseg, i0 < n ? i0 : n - 1);
    int64_t s_coef = -1;
    AdamCoef<T> c{};
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      xn[j] = T(0);
      if (i >= n) { tn[j] = mn[j] = vn[j] = T(0); continue; }
      while (off[s + 1] <= i) ++s;
      if (hv.elementwise != 0 || s != s_coef) { c = adam_coef_at<T>(hv, s, i, t); s_coef = s; }
      adam_step_elem(c, f, th[j], gr[j], mp[j], vp[j], xp[j], tn[j], mn[j], vn[j], xn[j]);
    }
    store<T, N>(theta_next, i0, vec, n, tn);
    store<T, N>(m_next, i0, vec, n, mn);
    store<T, N>(v_next, i0, vec, n, vn);
    if (f.amsgrad) store<T, N>(vmax_next, i0, vec, n, xn);
  }
}

template <typename T>
__global__ void adam_vjp_kernel(const T* theta, const T* G, const T* m, const T* v, const T* vmax, const T* tb,
                                const T* cm, const T* cv, const T* cx, T* theta_bar, T* G_bar, T* m_bar, T* v_bar,
                                T* vmax_bar, HyperOut<T> ho, const int64_t* off, int64_t nseg, int64_t n,
                                HyperView hv, double t, AdamFlags f) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = find_segment(off, nseg, i);
    const AdamVjpElem<T> r = adam_vjp_elem(adam_coef_at<T>(hv, s, i, t), f, theta[i], G[i], m[i], v[i],
                                           f.amsgrad ? vmax[i] : T(0), tb[i], f.has_m_bar ? cm[i] : T(0),
                                           f.has_v_bar ? cv[i] : T(0), f.has_vmax_bar ? cx[i] : T(0));
    theta_bar[i] = r.theta_bar;
    G_bar[i] = r.G_bar;
    m_bar[i] = r.m_bar;
    v_bar[i] = r.v_bar;
    if (f.amsgrad) vmax_bar[i] = r.vmax_bar;
    for (int h = 0; h < kAdamNumHyper; ++h)
      if (ho.p[h] != nullptr) ho.p[h][i] = r.hyper_bar[h];
  }
}

// ------------------------------------------------------------------------- segment sums
/// Note [Segment sums on CUDA]: block b sums chunk b (grid-stride over chunks) of every slot.
template <typename T>
__global__ void segment_sum_kernel(const T* partial, int num_slots, int64_t reduce_mask, double* sums,
                                   const int64_t* off, int64_t nseg, int64_t n) {
  __shared__ double red[kThreads];
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t lo = c * kChunk, hi = (lo + kChunk < n) ? lo + kChunk : n;
    for (int64_t s = find_segment(off, nseg, lo); s < nseg && off[s] < hi; ++s) {
      const int64_t a = off[s] > lo ? off[s] : lo, b = off[s + 1] < hi ? off[s + 1] : hi;
      if (b <= a) continue;
      for (int h = 0; h < num_slots; ++h) {
        if (!(reduce_mask >> h & 1)) continue;
        double acc = 0.0;
        for (int64_t i = a + threadIdx.x; i < b; i += blockDim.x) acc += static_cast<double>(partial[h * n + i]);
        red[threadIdx.x] = acc;
        __syncthreads();
        for (int w = blockDim.x / 2; w > 0; w >>= 1) {
          if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
          __syncthreads();
        }
        if (threadIdx.x == 0) atomicAdd(&sums[h * nseg + s], red[0]);
        __syncthreads();
      }
    }
  }
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
  for (int h = 0; h < kSgdNumHyper; ++h) ho.p[h] = (reduce_mask >> h & 1) ? partial + h * n : hyper_elem[h];
  if (n > 0) {
    sgd_vjp_kernel<T><<<blocks_for(n), kThreads, 0, st>>>(theta, G, buf, tb, carried_buf_bar, theta_bar, G_bar,
                                                          buf_bar, ho, offsets, nseg, n, hv, f);
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
  for (int h = 0; h < kAdamNumHyper; ++h) ho.p[h] = (reduce_mask >> h & 1) ? partial + h * n : hyper_elem[h];
  if (n > 0) {
    adam_vjp_kernel<T><<<blocks_for(n), kThreads, 0, st>>>(theta, G, m, v, vmax, tb, cm, cv, cvmax, theta_bar, G_bar,
                                                           m_bar, v_bar, vmax_bar, ho, offsets, nseg, n, hv, t, f);
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
