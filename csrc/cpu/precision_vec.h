#pragma once
// at::vec mirror of mackay/precision.h for the CPU fast paths: the same formulas, written for
// Vectorized lanes with blends instead of branches. Tests hold both to the Python reference.
#include <ATen/cpu/vec/vec.h>

#include "mackay/precision.h"

namespace mackay {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
struct VecGroupSums {
  Vec<T> gamma = Vec<T>(T(0));
  Vec<T> weight_sq = Vec<T>(T(0));
  Vec<T> variance = Vec<T>(T(0));
};

template <typename T>
inline Vec<T> data_precision(const Vec<T>& curvature, T num_data) {
  // blendv(a, b, mask) takes b where mask is set; NaN curvature compares false and stays NaN.
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(Vec<T>(num_data) * curvature, zero, curvature <= zero);
}

template <typename T>
inline Vec<T> gamma_of(const Vec<T>& n_h, const Vec<T>& alpha) {
  return Vec<T>::blendv(n_h / (n_h + alpha), Vec<T>(T(1)), alpha == Vec<T>(T(0)));
}

template <typename T>
inline void accumulate(VecGroupSums<T>& sums, const Vec<T>& weight, const Vec<T>& curvature,
                       const Vec<T>& alpha, const UpdateParams& p) {
  const Vec<T> n_h = data_precision(curvature, T(p.num_data));
  sums.weight_sq = at::vec::fmadd(weight, weight, sums.weight_sq);
  if (p.rule == Rule::Paper) {
    sums.gamma = sums.gamma + Vec<T>(T(1));
  } else {
    sums.gamma = sums.gamma + gamma_of(n_h, alpha);
    if (p.rule == Rule::EM) sums.variance = sums.variance + Vec<T>(T(1)) / (n_h + alpha);
  }
}

template <typename T>
inline Vec<T> reestimate_alpha(const VecGroupSums<T>& sums, T count, const Vec<T>& old_alpha,
                               const UpdateParams& p) {
  Vec<T> alpha;
  if (p.rule == Rule::MacKay) {
    alpha = sums.gamma / (sums.weight_sq + Vec<T>(T(p.eps)));
  } else if (p.rule == Rule::EM) {
    alpha = Vec<T>(count) / (sums.weight_sq + sums.variance);
  } else {
    alpha = Vec<T>(count) / (sums.weight_sq + Vec<T>(T(p.eps)));
  }
  const Vec<T> is_nan = alpha != alpha;
  alpha = Vec<T>::blendv(alpha, Vec<T>(T(p.alpha_min)), alpha < Vec<T>(T(p.alpha_min)));
  alpha = Vec<T>::blendv(alpha, Vec<T>(T(p.alpha_max)), alpha > Vec<T>(T(p.alpha_max)));
  return Vec<T>::blendv(alpha, old_alpha, is_nan);
}

template <typename T>
inline Vec<T> variance_at(const Vec<T>& curvature, const Vec<T>& alpha, const UpdateParams& p) {
  return Vec<T>(T(1)) / (data_precision(curvature, T(p.num_data)) + alpha);
}

// Lane mask of groups to prune (see should_prune in precision.h).
template <typename T>
inline Vec<T> should_prune(const Vec<T>& alpha, const Vec<T>& weight_sq,
                           const Vec<T>& variance_sum, const UpdateParams& p) {
  const Vec<T> infinite = alpha == Vec<T>(infinity<T>());
  const Vec<T> criterion = p.prune == Prune::Alpha
                               ? alpha >= Vec<T>(T(p.threshold))
                               : weight_sq < Vec<T>(T(p.threshold)) * variance_sum;
  return infinite | criterion;
}

}  // namespace mackay
