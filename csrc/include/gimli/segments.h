// SPDX-License-Identifier: Apache-2.0
// Hyperparameter lookup through segment offsets (no expanded copies): shared by CPU and CUDA code.
#pragma once

#include "optim_math.h"

namespace gimli {

/// The hyperparameter slots of one op: per slot a float64 array with one value per segment, or
/// one per element when the slot's bit is set in ``elementwise``.
struct HyperView {
  const double* p[kMaxHyper];
  int64_t elementwise;

  GIMLI_HD double at(int h, int64_t seg, int64_t i) const { return (elementwise >> h & 1) ? p[h][i] : p[h][seg]; }
};

/// Per hyperparameter slot, where a kernel writes its element-wise partial (nullptr: nowhere).
template <typename T>
struct HyperOut {
  T* p[kMaxHyper];
};

template <typename T>
GIMLI_HD SgdCoef<T> sgd_coef_at(const HyperView& hv, int64_t seg, int64_t i) {
  return sgd_coef<T>(hv.at(kSgdLr, seg, i), hv.at(kSgdMomentum, seg, i), hv.at(kSgdDampening, seg, i),
                     hv.at(kSgdWeightDecay, seg, i));
}

template <typename T>
GIMLI_HD AdamCoef<T> adam_coef_at(const HyperView& hv, int64_t seg, int64_t i, double t) {
  return adam_coef<T>(hv.at(kAdamLr, seg, i), hv.at(kAdamBeta1, seg, i), hv.at(kAdamBeta2, seg, i),
                      hv.at(kAdamEps, seg, i), hv.at(kAdamWeightDecay, seg, i), t);
}

}  // namespace gimli
