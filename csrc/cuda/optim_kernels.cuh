// SPDX-License-Identifier: Apache-2.0
// The CUDA kernels of the fused SGD and Adam/AdamW steps and VJPs (launched by optim_cuda.cu).
//
// Note [Kernels on the host]: this header needs only the shared math (optim_math.h,
// segments.h) and the CUDA keywords, so tests/cuda_host/ compiles it with g++ (the keywords
// defined away, blockIdx/threadIdx as host variables) and runs every thread of a small grid
// one after another: the indexing, the vectorised loads and stores, the segment walk and the
// tails are checked against the per-element math in CI, where no GPU runs the real thing.
// The kernels use nothing else: no intrinsics, no warp functions; inter-thread cooperation
// only in segment_sum_kernel (shared memory and __syncthreads), which the host harness runs
// with one thread per block.
#pragma once

#include <cstdint>

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

/// Loads VEC elements of an optional buffer: zeros where it is absent.
template <typename T, int N>
__device__ __forceinline__ void load_or_zero(const T* p, bool present, int64_t i, bool vec, int64_t n, T (&out)[N]) {
  if (present) {
    load<T, N>(p, i, vec, n, out);
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = T(0);
}

/// The segment of each element of a thread's group, walked forward from the group's first
/// element, with that segment's coefficients: recomputed only when the segment changes, or per
/// element when a hyperparameter is element-wise.
template <typename Coef>
struct SegmentCursor {
  const int64_t* off;
  int64_t s, s_coef = -1;
  Coef c{};

  __device__ SegmentCursor(const int64_t* off_, int64_t nseg, int64_t i0, int64_t n)
      : off(off_), s(find_segment(off_, nseg, i0 < n ? i0 : n - 1)) {}

  /// ``coef_at(s, i)`` gives the coefficients of element i of segment s.
  template <typename CoefAt>
  __device__ __forceinline__ const Coef& at(int64_t i, bool elementwise, const CoefAt& coef_at) {
    while (off[s + 1] <= i) ++s;
    if (elementwise || s != s_coef) {
      c = coef_at(s, i);
      s_coef = s;
    }
    return c;
  }
};

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
    load_or_zero<T, N>(buf, f.has_buf, i0, vec, n, bf);
    SegmentCursor<SgdCoef<T>> seg(off, nseg, i0, n);
    const auto coef_at = [&](int64_t s, int64_t i) { return sgd_coef_at<T>(hv, s, i); };
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      if (i >= n) { tn[j] = bn[j] = T(0); continue; }
      sgd_step_elem(seg.at(i, hv.elementwise != 0, coef_at), f, th[j], gr[j], bf[j], tn[j], bn[j]);
    }
    store<T, N>(theta_next, i0, vec, n, tn);
    if (f.use_momentum) store<T, N>(buf_next, i0, vec, n, bn);
  }
}

template <typename T>
__global__ void sgd_vjp_kernel(const T* theta, const T* G, const T* buf, const T* tb, const T* cb, T* theta_bar,
                               T* G_bar, T* buf_bar, HyperOut<T> ho, const int64_t* off, int64_t nseg, int64_t n,
                               HyperView hv, SgdFlags f, bool vec_ok) {
  constexpr int N = Vec<T>::N;
  const int64_t groups = (n + N - 1) / N;
  for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = gi * N;
    const bool vec = vec_ok && i0 + N <= n;
    T th[N], gr[N], bf[N], tbv[N], cbv[N], o_th[N], o_g[N], o_b[N], o_h[kSgdNumHyper][N];
    load<T, N>(theta, i0, vec, n, th);
    load<T, N>(G, i0, vec, n, gr);
    load<T, N>(tb, i0, vec, n, tbv);
    load_or_zero<T, N>(buf, f.has_buf, i0, vec, n, bf);
    load_or_zero<T, N>(cb, f.has_buf_bar, i0, vec, n, cbv);
    SegmentCursor<SgdCoef<T>> seg(off, nseg, i0, n);
    const auto coef_at = [&](int64_t s, int64_t i) { return sgd_coef_at<T>(hv, s, i); };
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      if (i >= n) {
        o_th[j] = o_g[j] = o_b[j] = T(0);
        for (int h = 0; h < kSgdNumHyper; ++h) o_h[h][j] = T(0);
        continue;
      }
      const SgdVjpElem<T> r =
          sgd_vjp_elem(seg.at(i, hv.elementwise != 0, coef_at), f, th[j], gr[j], bf[j], tbv[j], cbv[j]);
      o_th[j] = r.theta_bar;
      o_g[j] = r.G_bar;
      o_b[j] = r.buf_bar;
      for (int h = 0; h < kSgdNumHyper; ++h) o_h[h][j] = r.hyper_bar[h];
    }
    store<T, N>(theta_bar, i0, vec, n, o_th);
    store<T, N>(G_bar, i0, vec, n, o_g);
    if (buf_bar != nullptr) store<T, N>(buf_bar, i0, vec, n, o_b);
    for (int h = 0; h < kSgdNumHyper; ++h)
      if (ho.p[h] != nullptr) store<T, N>(ho.p[h], i0, vec, n, o_h[h]);
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
    load_or_zero<T, N>(vmax, f.amsgrad, i0, vec, n, xp);
    SegmentCursor<AdamCoef<T>> seg(off, nseg, i0, n);
    const auto coef_at = [&](int64_t s, int64_t i) { return adam_coef_at<T>(hv, s, i, t); };
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      xn[j] = T(0);
      if (i >= n) { tn[j] = mn[j] = vn[j] = T(0); continue; }
      adam_step_elem(seg.at(i, hv.elementwise != 0, coef_at), f, th[j], gr[j], mp[j], vp[j], xp[j], tn[j], mn[j],
                     vn[j], xn[j]);
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
                                HyperView hv, double t, AdamFlags f, bool vec_ok) {
  constexpr int N = Vec<T>::N;
  const int64_t groups = (n + N - 1) / N;
  for (int64_t gi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; gi < groups; gi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i0 = gi * N;
    const bool vec = vec_ok && i0 + N <= n;
    T th[N], gr[N], mp[N], vp[N], xp[N], tbv[N], cmv[N], cvv[N], cxv[N];
    T o_th[N], o_g[N], o_m[N], o_v[N], o_x[N], o_h[kAdamNumHyper][N];
    load<T, N>(theta, i0, vec, n, th);
    load<T, N>(G, i0, vec, n, gr);
    load<T, N>(m, i0, vec, n, mp);
    load<T, N>(v, i0, vec, n, vp);
    load<T, N>(tb, i0, vec, n, tbv);
    load_or_zero<T, N>(vmax, f.amsgrad, i0, vec, n, xp);
    load_or_zero<T, N>(cm, f.has_m_bar, i0, vec, n, cmv);
    load_or_zero<T, N>(cv, f.has_v_bar, i0, vec, n, cvv);
    load_or_zero<T, N>(cx, f.has_vmax_bar, i0, vec, n, cxv);
    SegmentCursor<AdamCoef<T>> seg(off, nseg, i0, n);
    const auto coef_at = [&](int64_t s, int64_t i) { return adam_coef_at<T>(hv, s, i, t); };
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      if (i >= n) {
        o_th[j] = o_g[j] = o_m[j] = o_v[j] = o_x[j] = T(0);
        for (int h = 0; h < kAdamNumHyper; ++h) o_h[h][j] = T(0);
        continue;
      }
      const AdamVjpElem<T> r = adam_vjp_elem(seg.at(i, hv.elementwise != 0, coef_at), f, th[j], gr[j], mp[j], vp[j],
                                             xp[j], tbv[j], cmv[j], cvv[j], cxv[j]);
      o_th[j] = r.theta_bar;
      o_g[j] = r.G_bar;
      o_m[j] = r.m_bar;
      o_v[j] = r.v_bar;
      o_x[j] = r.vmax_bar;
      for (int h = 0; h < kAdamNumHyper; ++h) o_h[h][j] = r.hyper_bar[h];
    }
    store<T, N>(theta_bar, i0, vec, n, o_th);
    store<T, N>(G_bar, i0, vec, n, o_g);
    store<T, N>(m_bar, i0, vec, n, o_m);
    store<T, N>(v_bar, i0, vec, n, o_v);
    if (f.amsgrad) store<T, N>(vmax_bar, i0, vec, n, o_x);
    for (int h = 0; h < kAdamNumHyper; ++h)
      if (ho.p[h] != nullptr) store<T, N>(ho.p[h], i0, vec, n, o_h[h]);
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

}  // namespace
}  // namespace cuda
}  // namespace gimli
