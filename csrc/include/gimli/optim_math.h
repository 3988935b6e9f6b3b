// SPDX-License-Identifier: Apache-2.0
// Per-element math of the fused SGD and Adam/AdamW steps and their VJPs: one source for CPU and CUDA.
//
// Note [One source of truth]: every operation below mirrors, in order and in precision, the
// pure-PyTorch twin in gimli_bptt/kernels/_reference.py, which in turn mirrors the per-tensor
// functions gimli_bptt/optim/{sgd,adam}.py::*_step / *_step_vjp. Scalar coefficients (1 - b1,
// lr / (1 - b1^t), ...) are computed once in double from the hyperparameter values and then
// rounded to the element type, exactly as a Python-float hyperparameter enters a torch op.
// Element operations are plain IEEE +, -, *, /, sqrt in the element type, with no FMA
// contraction (-ffp-contract=off on the host, --fmad=false under nvcc), so the compiled kernels
// and the twin agree bit for bit element by element; only segment reductions (hyperparameter
// partials) sum in a different order. The host build also passes -fno-trapping-math, which
// changes no value (it only lets GCC evaluate both sides of a select such as
// ``positive ? d / s : 0``, so the loops vectorise); nothing here reads floating-point flags.
//
// This header includes nothing from torch: nvcc compiles it without a CUDA build of torch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define GIMLI_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined into the CPU loops, also into their AVX2 clones (csrc/cpu/optim_cpu.cpp), where
// GCC's heuristics otherwise leave the larger VJPs as a scalar call per element.
#define GIMLI_HD inline __attribute__((always_inline))
#else
#define GIMLI_HD inline
#endif

namespace gimli {

// Hyperparameter slots, in the order of the ``hyper`` list of every op (see gimli.cpp).
enum SgdHyper : int { kSgdLr = 0, kSgdMomentum = 1, kSgdDampening = 2, kSgdWeightDecay = 3, kSgdNumHyper = 4 };
enum AdamHyper : int { kAdamLr = 0, kAdamBeta1 = 1, kAdamBeta2 = 2, kAdamEps = 3, kAdamWeightDecay = 4, kAdamNumHyper = 5 };
constexpr int kMaxHyper = 5;

struct SgdFlags {
  bool nesterov;
  bool maximize;
  bool use_momentum;  // Note [Learned momentum] in optim/sgd.py
  bool has_wd;
  bool has_buf;       // false on the first step: the buffer starts as g
  bool has_buf_bar;   // a carried cotangent of the next buffer exists
};

struct AdamFlags {
  bool amsgrad;
  bool maximize;
  bool decoupled;  // AdamW
  bool has_wd;
  bool has_m_bar, has_v_bar, has_vmax_bar;  // carried cotangents of the next state exist
};

/// Correctly rounded square root in the element type (an unqualified ``sqrt(float)`` may resolve
/// to ``sqrt(double)`` and keep the rest of the expression in double).
GIMLI_HD float sqrt_t(float x) { return ::sqrtf(x); }
GIMLI_HD double sqrt_t(double x) { return ::sqrt(x); }

// ------------------------------------------------------------------------------------ SGD
template <typename T>
struct SgdCoef {
  T lr, neg_lr, wd, mom, omd;  // lr, -lr, weight decay, momentum, 1 - dampening
};

template <typename T>
GIMLI_HD SgdCoef<T> sgd_coef(double lr, double mom, double damp, double wd) {
  SgdCoef<T> c;
  c.lr = static_cast<T>(lr);
  c.neg_lr = static_cast<T>(-lr);
  c.wd = static_cast<T>(wd);
  c.mom = static_cast<T>(mom);
  c.omd = static_cast<T>(1.0 - damp);
  return c;
}

template <typename T>
GIMLI_HD T sgd_grad(const SgdCoef<T>& c, const SgdFlags& f, T theta, T G) {
  T g = f.maximize ? -G : G;
  if (f.has_wd) g = g + c.wd * theta;
  return g;
}

/// Algorithm 1, line 6 for SGD: theta' = theta - lr * u (see optim/sgd.py::sgd_step).
template <typename T>
GIMLI_HD void sgd_step_elem(const SgdCoef<T>& c, const SgdFlags& f, T theta, T G, T buf, T& theta_next,
                            T& buf_next) {
  const T g = sgd_grad(c, f, theta, G);
  T update = g;
  if (f.use_momentum) {
    buf_next = f.has_buf ? c.mom * buf + c.omd * g : g;
    update = f.nesterov ? g + c.mom * buf_next : buf_next;
  }
  theta_next = theta - c.lr * update;
}

template <typename T>
struct SgdVjpElem {
  T theta_bar, G_bar, buf_bar;
  T hyper_bar[kSgdNumHyper];  // element-wise partials, before any segment reduction
};

/// Algorithm 1, lines 11-12 for SGD (see optim/sgd.py::sgd_step_vjp).
template <typename T>
GIMLI_HD SgdVjpElem<T> sgd_vjp_elem(const SgdCoef<T>& c, const SgdFlags& f, T theta, T G, T buf, T tb,
                                    T carried_buf_bar) {
  SgdVjpElem<T> r;
  for (int h = 0; h < kSgdNumHyper; ++h) r.hyper_bar[h] = T(0);
  r.buf_bar = T(0);
  const T g = sgd_grad(c, f, theta, G);
  const T u_bar = c.neg_lr * tb;
  T g_bar;
  if (f.use_momentum) {
    const T buf_next = f.has_buf ? c.mom * buf + c.omd * g : g;
    T buf_bar;
    if (f.nesterov) {
      const T update = g + c.mom * buf_next;
      r.hyper_bar[kSgdLr] = (-update) * tb;
      r.hyper_bar[kSgdMomentum] = buf_next * u_bar;
      buf_bar = c.mom * u_bar;
    } else {
      r.hyper_bar[kSgdLr] = (-buf_next) * tb;
      buf_bar = u_bar;
    }
    if (f.has_buf_bar) buf_bar = buf_bar + carried_buf_bar;
    T g_from_buf;
    if (!f.has_buf) {
      g_from_buf = buf_bar;
    } else {
      r.hyper_bar[kSgdMomentum] = f.nesterov ? r.hyper_bar[kSgdMomentum] + buf * buf_bar : buf * buf_bar;
      r.hyper_bar[kSgdDampening] = (-g) * buf_bar;
      r.buf_bar = c.mom * buf_bar;
      g_from_buf = c.omd * buf_bar;
    }
    g_bar = f.nesterov ? u_bar + g_from_buf : g_from_buf;
  } else {
    r.hyper_bar[kSgdLr] = (-g) * tb;
    g_bar = u_bar;
  }
  r.theta_bar = tb;
  if (f.has_wd) {
    r.theta_bar = tb + c.wd * g_bar;
    r.hyper_bar[kSgdWeightDecay] = theta * g_bar;
  }
  r.G_bar = f.maximize ? -g_bar : g_bar;
  return r;
}

// ----------------------------------------------------------------------------------- Adam
template <typename T>
struct AdamCoef {
  T w, omw;            // lerp weight 1 - b1 and 1 - w (as ATen's lerp forms it)
  T b1, b2, omb2, two_omb2;
  T eps, wd, neg_wd, lr, neg_lr, dec;  // dec = 1 - lr * wd (AdamW)
  T ss, neg_ss;        // step size lr / (1 - b1^t)
  T bc1, bc1_sq, bc2s, bc2s_sq;
  T t, b1pow, b2pow;   // t, b1^(t-1), b2^(t-1)
};

template <typename T>
GIMLI_HD AdamCoef<T> adam_coef(double lr, double b1, double b2, double eps, double wd, double t) {
  AdamCoef<T> c;
  const double bc1 = 1.0 - pow(b1, t);
  const double bc2s = sqrt(1.0 - pow(b2, t));  // (1 - b2^t) ** 0.5, correctly rounded either way
  const double ss = lr / bc1;
  c.w = static_cast<T>(1.0 - b1);
  c.omw = T(1) - c.w;
  c.b1 = static_cast<T>(b1);
  c.b2 = static_cast<T>(b2);
  c.omb2 = static_cast<T>(1.0 - b2);
  c.two_omb2 = static_cast<T>(2.0 * (1.0 - b2));
  c.eps = static_cast<T>(eps);
  c.wd = static_cast<T>(wd);
  c.neg_wd = static_cast<T>(-wd);
  c.lr = static_cast<T>(lr);
  c.neg_lr = static_cast<T>(-lr);
  c.dec = static_cast<T>(1.0 - lr * wd);
  c.ss = static_cast<T>(ss);
  c.neg_ss = static_cast<T>(-ss);
  c.bc1 = static_cast<T>(bc1);
  c.bc1_sq = static_cast<T>(bc1 * bc1);
  c.bc2s = static_cast<T>(bc2s);
  c.bc2s_sq = static_cast<T>(bc2s * bc2s);
  c.t = static_cast<T>(t);
  c.b1pow = static_cast<T>(pow(b1, t - 1.0));
  c.b2pow = static_cast<T>(pow(b2, t - 1.0));
  return c;
}

template <typename T>
GIMLI_HD T adam_grad(const AdamCoef<T>& c, const AdamFlags& f, T theta, T G) {
  T g = f.maximize ? -G : G;
  if (f.has_wd && !f.decoupled) g = g + c.wd * theta;
  return g;
}

/// ATen's scalar lerp: m + w (g - m) for |w| < 0.5, else g - (g - m)(1 - w).
template <typename T>
GIMLI_HD T adam_lerp(const AdamCoef<T>& c, T m, T g) {
  const T w_abs = c.w < T(0) ? -c.w : c.w;
  return w_abs < T(0.5) ? m + c.w * (g - m) : g - (g - m) * c.omw;
}

/// Algorithm 1, line 6 for Adam/AdamW (see optim/adam.py::adam_step).
template <typename T>
GIMLI_HD void adam_step_elem(const AdamCoef<T>& c, const AdamFlags& f, T theta, T G, T m, T v, T vmax,
                             T& theta_next, T& m_next, T& v_next, T& vmax_next) {
  const T g = adam_grad(c, f, theta, G);
  const T theta1 = (f.has_wd && f.decoupled) ? theta * c.dec : theta;
  m_next = adam_lerp(c, m, g);
  v_next = v * c.b2 + c.omb2 * (g * g);
  T v_hat = v_next;
  if (f.amsgrad) {
    // torch.maximum: NaN-propagating
    v_hat = (v_next != v_next) ? v_next : (v_next >= vmax ? v_next : vmax);
    vmax_next = v_hat;
  }
  const T denom = sqrt_t(v_hat) / c.bc2s + c.eps;
  theta_next = theta1 - c.ss * (m_next / denom);
}

template <typename T>
struct AdamVjpElem {
  T theta_bar, G_bar, m_bar, v_bar, vmax_bar;
  T hyper_bar[kAdamNumHyper];
};

/// Algorithm 1, lines 11-12 for Adam/AdamW (see optim/adam.py::adam_step_vjp): Note [Adam at a
/// zero second moment] (the finite limit 0 where v_hat = 0) and Note [amsgrad] (the maximum
/// routes its cotangent to v' where v' >= vmax) are kept.
template <typename T>
GIMLI_HD AdamVjpElem<T> adam_vjp_elem(const AdamCoef<T>& c, const AdamFlags& f, T theta, T G, T m, T v, T vmax,
                                      T tb, T cm, T cv, T cvmax) {
  AdamVjpElem<T> r;
  for (int h = 0; h < kAdamNumHyper; ++h) r.hyper_bar[h] = T(0);
  r.vmax_bar = T(0);
  const T g = adam_grad(c, f, theta, G);
  const T m_next = adam_lerp(c, m, g);
  const T v_next = v * c.b2 + c.omb2 * (g * g);
  bool to_new = true;
  T v_hat = v_next;
  if (f.amsgrad) {
    to_new = v_next >= vmax;
    v_hat = to_new ? v_next : vmax;
  }
  const T s = sqrt_t(v_hat);
  const T denom = s / c.bc2s + c.eps;
  const T step_size_bar = (-(m_next / denom)) * tb;
  T m_bar = c.neg_ss * tb / denom;
  const T d_bar = c.ss * tb * m_next / (denom * denom);
  r.hyper_bar[kAdamEps] = d_bar;
  const bool positive = s > T(0);
  const T s_safe = positive ? s : T(1);
  const T v_hat_bar = positive ? d_bar / (T(2) * s_safe * c.bc2s) : T(0);
  T v_bar;
  if (f.amsgrad) {
    T max_bar = v_hat_bar;
    if (f.has_vmax_bar) max_bar = max_bar + cvmax;
    v_bar = to_new ? max_bar : T(0);
    r.vmax_bar = to_new ? T(0) : max_bar;
  } else {
    v_bar = v_hat_bar;
  }
  if (f.has_v_bar) v_bar = v_bar + cv;
  if (f.has_m_bar) m_bar = m_bar + cm;
  // bias corrections
  const T c2_bar = (-d_bar) * s / c.bc2s_sq;
  const T bc2_bar = c2_bar * T(0.5) / c.bc2s;
  r.hyper_bar[kAdamBeta2] = (-bc2_bar) * c.t * c.b2pow + (v - g * g) * v_bar;
  r.hyper_bar[kAdamLr] = step_size_bar / c.bc1;
  const T bc1_bar = (-step_size_bar) * c.lr / c.bc1_sq;
  r.hyper_bar[kAdamBeta1] = (-bc1_bar) * c.t * c.b1pow + (m - g) * m_bar;
  // m' = b1 m + (1 - b1) g ; v' = b2 v + (1 - b2) g^2
  r.m_bar = c.b1 * m_bar;
  r.v_bar = c.b2 * v_bar;
  const T g_bar = c.w * m_bar + c.two_omb2 * g * v_bar;
  r.theta_bar = tb;
  if (f.has_wd) {
    if (f.decoupled) {
      r.theta_bar = tb * c.dec;
      r.hyper_bar[kAdamLr] = r.hyper_bar[kAdamLr] + c.neg_wd * theta * tb;
      r.hyper_bar[kAdamWeightDecay] = c.neg_lr * theta * tb;
    } else {
      r.theta_bar = tb + c.wd * g_bar;
      r.hyper_bar[kAdamWeightDecay] = theta * g_bar;
    }
  }
  r.G_bar = f.maximize ? -g_bar : g_bar;
  return r;
}

// ------------------------------------------------------------------------- segment lookup
/// The segment s with offsets[s] <= i < offsets[s + 1] (offsets non-decreasing, offsets[0] = 0).
GIMLI_HD int64_t find_segment(const int64_t* offsets, int64_t nseg, int64_t i) {
  int64_t lo = 0, hi = nseg;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace gimli
