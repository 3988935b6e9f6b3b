// SPDX-License-Identifier: Apache-2.0
// The CUDA kernels of csrc/cuda/optim_kernels.cuh, run on the host: Note [Kernels on the host].
//
// The CUDA keywords are defined away and blockIdx/threadIdx/blockDim/gridDim are host variables;
// launch() runs every (block, thread) of a grid one after another. The element-wise kernels do
// not cooperate across threads, so this is exactly what the GPU computes, in another order.
// Each kernel's outputs are compared bit for bit with the per-element math of optim_math.h
// (sgd_*_elem / adam_*_elem with the coefficients of segments.h looked up per element), over
// sizes with and without a vector tail, 1-7 segments (empty ones included), aligned and
// misaligned buffers (the vectorised and the scalar path), per-segment and element-wise
// hyperparameters, every flag combination, float and double, and grids smaller and larger than
// the work (the grid-stride loop). Nothing may be written past n. segment_sum_kernel runs with
// one thread per block (it cooperates through shared memory) against a plain double sum.
//
// Build and run (tests/test_cuda_kernels_on_host.py does this):
//   g++ -std=c++17 -O1 -ffp-contract=off -I csrc/include tests/cuda_host/kernels_on_host.cpp && ./a.out
// Prints "mismatches: 0" and exits 0 when every value agrees.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct HostDim {
  int64_t x;
};
static HostDim blockIdx{0}, threadIdx{0}, blockDim{1}, gridDim{1};
inline void __syncthreads() {}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p += v;
  return old;
}

#include "../../csrc/cuda/optim_kernels.cuh"

namespace {

using namespace gimli;
using namespace gimli::cuda;

template <typename Body>
void launch(int64_t grid, int64_t block, const Body& body) {
  gridDim.x = grid;
  blockDim.x = block;
  for (int64_t b = 0; b < grid; ++b) {
    for (int64_t t = 0; t < block; ++t) {
      blockIdx.x = b;
      threadIdx.x = t;
      body();
    }
  }
}

constexpr int kPad = 8;      // elements after n that must stay untouched
constexpr double kFill = 7;  // their value

long g_mismatches = 0;
long g_checked = 0;

template <typename T>
bool same(T a, T b) {
  return a == b || (std::isnan(a) && std::isnan(b));
}

template <typename T>
void expect(T got, T want, const char* what, int64_t i) {
  ++g_checked;
  if (!same(got, want)) {
    if (g_mismatches < 20) std::printf("%s[%ld]: got %.17g want %.17g\n", what, static_cast<long>(i), double(got), double(want));
    ++g_mismatches;
  }
}

/// A buffer of n values (+ kPad guard elements) starting ``shift`` elements into its storage.
template <typename T>
struct Buf {
  std::vector<T> store;
  int shift;
  Buf(int64_t n, int shift_, std::mt19937& rng, bool positive, bool fill = false) : store(n + kPad + 2), shift(shift_) {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (auto& x : store) x = fill ? T(kFill) : T(positive ? std::abs(u(rng)) + 0.01 : u(rng));
  }
  T* p() { return store.data() + shift; }
  T operator[](int64_t i) const { return store[shift + i]; }
  void untouched(int64_t n, const char* what) {
    for (int64_t i = n; i < n + kPad; ++i) expect(store[shift + i], T(kFill), what, i);
  }
};

std::vector<int64_t> make_offsets(int64_t n, int nseg, std::mt19937& rng) {
  std::vector<int64_t> off(nseg + 1, 0);
  for (int s = 1; s < nseg; ++s) off[s] = std::min<int64_t>(n, off[s - 1] + static_cast<int64_t>(rng() % (n / nseg + 3)));
  off[nseg] = n;
  return off;
}

struct Hyper {
  std::vector<double> values[kMaxHyper];
  HyperView view{};
  Hyper(const double* base, int num, int64_t len, int64_t elementwise, std::mt19937& rng) {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (int h = 0; h < num; ++h) {
      values[h].resize(len);
      for (auto& x : values[h]) x = base[h] * (1.0 + 5e-4 * u(rng));  // betas stay below 1
      view.p[h] = values[h].data();
    }
    view.elementwise = elementwise;
  }
};

template <typename T>
void check_sgd(int64_t n, int nseg, int shift, int64_t grid, int64_t block, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<int64_t> off = make_offsets(n, nseg, rng);
  Buf<T> th(n, shift, rng, false), G(n, shift, rng, false), buf(n, shift, rng, false), tb(n, shift, rng, false),
      cb(n, shift, rng, false);
  const double base[kSgdNumHyper] = {0.05, 0.9, 0.1, 0.01};
  for (int64_t elementwise : {int64_t(0), int64_t(1) << kSgdLr | int64_t(1) << kSgdWeightDecay}) {
    const Hyper hy(base, kSgdNumHyper, elementwise ? n + 1 : nseg + 1, elementwise, rng);
    for (int bits = 0; bits < 64; ++bits) {
      const bool nesterov = bits & 1, maximize = bits & 2, mom = bits & 4, wd = bits & 8;
      const bool has_buf = mom && (bits & 16), has_buf_bar = mom && (bits & 32);
      const SgdFlags f{nesterov && mom, maximize, mom, wd, has_buf, has_buf_bar};
      const bool vec_ok = shift == 0;
      // step
      Buf<T> tn(n, shift, rng, false, true), bn(n, shift, rng, false, true);
      launch(grid, block, [&] {
        sgd_step_kernel<T>(th.p(), G.p(), buf.p(), tn.p(), bn.p(), off.data(), nseg, n, hy.view, f, vec_ok);
      });
      // VJP, every slot's partial written out
      Buf<T> o_th(n, shift, rng, false, true), o_g(n, shift, rng, false, true), o_b(n, shift, rng, false, true);
      std::vector<Buf<T>> o_h;
      HyperOut<T> ho{};
      for (int h = 0; h < kSgdNumHyper; ++h) o_h.emplace_back(n, shift, rng, false, true);
      for (int h = 0; h < kSgdNumHyper; ++h) ho.p[h] = o_h[h].p();
      launch(grid, block, [&] {
        sgd_vjp_kernel<T>(th.p(), G.p(), buf.p(), tb.p(), cb.p(), o_th.p(), o_g.p(), mom ? o_b.p() : nullptr, ho,
                          off.data(), nseg, n, hy.view, f, vec_ok);
      });
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = find_segment(off.data(), nseg, i);
        const SgdCoef<T> c = sgd_coef_at<T>(hy.view, s, i);
        T want_t, want_b;
        sgd_step_elem(c, f, th[i], G[i], has_buf ? buf[i] : T(0), want_t, want_b);
        expect(tn[i], want_t, "sgd_step theta_next", i);
        if (mom) expect(bn[i], want_b, "sgd_step buf_next", i);
        const SgdVjpElem<T> r = sgd_vjp_elem(c, f, th[i], G[i], has_buf ? buf[i] : T(0), tb[i],
                                             has_buf_bar ? cb[i] : T(0));
        expect(o_th[i], r.theta_bar, "sgd_vjp theta_bar", i);
        expect(o_g[i], r.G_bar, "sgd_vjp G_bar", i);
        if (mom) expect(o_b[i], r.buf_bar, "sgd_vjp buf_bar", i);
        for (int h = 0; h < kSgdNumHyper; ++h) expect(o_h[h][i], r.hyper_bar[h], "sgd_vjp hyper_bar", i);
      }
      tn.untouched(n, "sgd_step theta_next tail");
      bn.untouched(n, "sgd_step buf_next tail");
      o_th.untouched(n, "sgd_vjp theta_bar tail");
      o_g.untouched(n, "sgd_vjp G_bar tail");
      o_b.untouched(n, "sgd_vjp buf_bar tail");
      for (auto& x : o_h) x.untouched(n, "sgd_vjp hyper_bar tail");
    }
  }
}

template <typename T>
void check_adam(int64_t n, int nseg, int shift, int64_t grid, int64_t block, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<int64_t> off = make_offsets(n, nseg, rng);
  Buf<T> th(n, shift, rng, false), G(n, shift, rng, false), m(n, shift, rng, false), v(n, shift, rng, true),
      vmax(n, shift, rng, true), tb(n, shift, rng, false), cm(n, shift, rng, false), cv(n, shift, rng, false),
      cx(n, shift, rng, false);
  const double base[kAdamNumHyper] = {1e-3, 0.9, 0.999, 1e-8, 0.01};
  for (int64_t elementwise : {int64_t(0), int64_t(1) << kAdamLr | int64_t(1) << kAdamBeta2}) {
    const Hyper hy(base, kAdamNumHyper, elementwise ? n + 1 : nseg + 1, elementwise, rng);
    for (int bits = 0; bits < 32; ++bits) {
      const bool amsgrad = bits & 1, maximize = bits & 2, decoupled = bits & 4, wd = bits & 8, carried = bits & 16;
      const AdamFlags f{amsgrad, maximize, decoupled, wd, carried, carried, carried && amsgrad};
      volatile double t_runtime = 3.0;  // a run-time step count, as in the kernels (no constant folding of pow)
      const double t = t_runtime;
      const bool vec_ok = shift == 0;
      Buf<T> tn(n, shift, rng, false, true), mn(n, shift, rng, false, true), vn(n, shift, rng, false, true),
          xn(n, shift, rng, false, true);
      launch(grid, block, [&] {
        adam_step_kernel<T>(th.p(), G.p(), m.p(), v.p(), vmax.p(), tn.p(), mn.p(), vn.p(), xn.p(), off.data(), nseg, n,
                            hy.view, t, f, vec_ok);
      });
      Buf<T> o_th(n, shift, rng, false, true), o_g(n, shift, rng, false, true), o_m(n, shift, rng, false, true),
          o_v(n, shift, rng, false, true), o_x(n, shift, rng, false, true);
      std::vector<Buf<T>> o_h;
      HyperOut<T> ho{};
      for (int h = 0; h < kAdamNumHyper; ++h) o_h.emplace_back(n, shift, rng, false, true);
      for (int h = 0; h < kAdamNumHyper; ++h) ho.p[h] = o_h[h].p();
      launch(grid, block, [&] {
        adam_vjp_kernel<T>(th.p(), G.p(), m.p(), v.p(), vmax.p(), tb.p(), cm.p(), cv.p(), cx.p(), o_th.p(), o_g.p(),
                           o_m.p(), o_v.p(), o_x.p(), ho, off.data(), nseg, n, hy.view, t, f, vec_ok);
      });
      for (int64_t i = 0; i < n; ++i) {
        const int64_t s = find_segment(off.data(), nseg, i);
        const AdamCoef<T> c = adam_coef_at<T>(hy.view, s, i, t);
        T want_t, want_m, want_v, want_x;
        adam_step_elem(c, f, th[i], G[i], m[i], v[i], amsgrad ? vmax[i] : T(0), want_t, want_m, want_v, want_x);
        expect(tn[i], want_t, "adam_step theta_next", i);
        expect(mn[i], want_m, "adam_step m_next", i);
        expect(vn[i], want_v, "adam_step v_next", i);
        if (amsgrad) expect(xn[i], want_x, "adam_step vmax_next", i);
        const AdamVjpElem<T> r =
            adam_vjp_elem(c, f, th[i], G[i], m[i], v[i], amsgrad ? vmax[i] : T(0), tb[i], carried ? cm[i] : T(0),
                          carried ? cv[i] : T(0), carried && amsgrad ? cx[i] : T(0));
        expect(o_th[i], r.theta_bar, "adam_vjp theta_bar", i);
        expect(o_g[i], r.G_bar, "adam_vjp G_bar", i);
        expect(o_m[i], r.m_bar, "adam_vjp m_bar", i);
        expect(o_v[i], r.v_bar, "adam_vjp v_bar", i);
        if (amsgrad) expect(o_x[i], r.vmax_bar, "adam_vjp vmax_bar", i);
        for (int h = 0; h < kAdamNumHyper; ++h) expect(o_h[h][i], r.hyper_bar[h], "adam_vjp hyper_bar", i);
      }
      tn.untouched(n, "adam_step theta_next tail");
      mn.untouched(n, "adam_step m_next tail");
      vn.untouched(n, "adam_step v_next tail");
      if (!amsgrad) xn.untouched(0, "adam_step vmax_next (no amsgrad)");
      o_th.untouched(n, "adam_vjp theta_bar tail");
      o_g.untouched(n, "adam_vjp G_bar tail");
      o_m.untouched(n, "adam_vjp m_bar tail");
      o_v.untouched(n, "adam_vjp v_bar tail");
      if (!amsgrad) o_x.untouched(0, "adam_vjp vmax_bar (no amsgrad)");
      for (auto& x : o_h) x.untouched(n, "adam_vjp hyper_bar tail");
    }
  }
}

/// segment_sum_kernel, one thread per block, against a plain double sum per segment.
template <typename T>
void check_segment_sums(int64_t n, int nseg, int64_t grid, unsigned seed) {
  std::mt19937 rng(seed);
  const std::vector<int64_t> off = make_offsets(n, nseg, rng);
  const int num_slots = 3;
  const int64_t mask = 0b101;
  std::vector<T> partial(num_slots * n);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (auto& x : partial) x = T(u(rng));
  std::vector<double> sums(num_slots * nseg, 0.0);
  launch(grid, 1, [&] { segment_sum_kernel<T>(partial.data(), num_slots, mask, sums.data(), off.data(), nseg, n); });
  for (int h = 0; h < num_slots; ++h) {
    for (int s = 0; s < nseg; ++s) {
      double want = 0.0, scale = 1.0;
      if (mask >> h & 1) {
        for (int64_t i = off[s]; i < off[s + 1]; ++i) {
          want += double(partial[h * n + i]);
          scale += std::abs(double(partial[h * n + i]));
        }
      }
      ++g_checked;
      // Two orders of summing the same len doubles each err by at most (len - 1) eps Σ|terms| (Higham §4.2):
      // the bound for any order, whatever this machine's rounding showed.
      const double len = double(off[s + 1] - off[s]);
      if (std::abs(sums[h * nseg + s] - want) > 2.0 * (len + 1.0) * 2.220446049250313e-16 * scale) {
        if (g_mismatches < 20) std::printf("segment sum slot %d seg %d: got %.17g want %.17g\n", h, s, sums[h * nseg + s], want);
        ++g_mismatches;
      }
    }
  }
}

}  // namespace

int main() {
  unsigned seed = 1;
  const int64_t sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 17, 64, 1001};
  const int64_t grids[][2] = {{1, 1}, {2, 3}, {3, 256}};  // (blocks, threads): fewer and more threads than work
  for (int64_t n : sizes) {
    for (int nseg : {1, 3, 7}) {
      for (int shift : {0, 1}) {
        for (const auto& g : grids) {
          check_sgd<float>(n, nseg, shift, g[0], g[1], ++seed);
          check_sgd<double>(n, nseg, shift, g[0], g[1], ++seed);
          check_adam<float>(n, nseg, shift, g[0], g[1], ++seed);
          check_adam<double>(n, nseg, shift, g[0], g[1], ++seed);
        }
      }
    }
  }
  for (int64_t n : {int64_t(1), int64_t(100), int64_t(5000), int64_t(3 * kChunk + 17)}) {
    for (int nseg : {1, 4, 9}) {
      for (int64_t grid : {int64_t(1), int64_t(2), int64_t(7)}) {
        check_segment_sums<float>(n, nseg, grid, ++seed);
        check_segment_sums<double>(n, nseg, grid, ++seed);
      }
    }
  }
  std::printf("checked: %ld\nmismatches: %ld\n", g_checked, g_mismatches);
  return g_mismatches == 0 ? 0 : 1;
}
