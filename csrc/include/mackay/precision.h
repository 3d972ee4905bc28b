#pragma once
// MacKay precision update, element and group math (docs/mathematics.md section 1).
// Shared by the CPU and CUDA kernels so both compute exactly the same thing.
#include <cstdint>
#include <limits>

#include "mackay/macros.h"

namespace mackay {

enum class Rule : int32_t { MacKay = 0, EM = 1, Paper = 2 };
enum class Prune : int32_t { Alpha = 0, SNR = 1 };

// Scalars of one update call, already validated on the host.
struct UpdateParams {
  double num_data;
  double threshold;
  double eps;
  double alpha_min;
  double alpha_max;
  Rule rule;
  Prune prune;
};

template <typename T>
MACKAY_HOST_DEVICE T infinity() {
  return std::numeric_limits<T>::infinity();
}

template <typename T>
MACKAY_HOST_DEVICE T smallest_normal() {
  return std::numeric_limits<T>::min();
}

// N*h with negative curvature (and -0) read as +0: h estimates a PSD diagonal, and a signed
// zero would turn Sigma into -inf. NaN stays NaN so that a corrupt estimate cannot
// masquerade as "no curvature" and prune the weight.
template <typename T>
MACKAY_HOST_DEVICE T data_precision(T curvature, T num_data) {
  return curvature <= T(0) ? T(0) : num_data * curvature;
}

// gamma_i = N h / (N h + alpha) = 1 - alpha * Sigma_ii. alpha = 0 means "no prior": the
// weight is fully determined by the data (gamma = 1), also where h = 0.
template <typename T>
MACKAY_HOST_DEVICE T gamma_of(T n_h, T alpha) {
  return alpha == T(0) ? T(1) : n_h / (n_h + alpha);
}

// Posterior variance Sigma_ii = 1 / (N h + alpha); +inf when both are 0 (nothing known).
template <typename T>
MACKAY_HOST_DEVICE T posterior_variance(T n_h, T alpha) {
  return T(1) / (n_h + alpha);
}

// Sums over the elements of one group, gathered with the group's current alpha.
template <typename T>
struct GroupSums {
  T gamma = T(0);           // sum of gamma_i (rule "paper": the group size)
  T weight_sq = T(0);       // sum of w_i^2
  T variance = T(0);        // sum of Sigma_ii at the old alpha (rule "em")
};

template <typename T>
MACKAY_HOST_DEVICE void accumulate(GroupSums<T>& sums, T weight, T curvature, T alpha,
                                   const UpdateParams& p) {
  const T n_h = data_precision(curvature, T(p.num_data));
  sums.weight_sq += weight * weight;
  if (p.rule == Rule::Paper) {
    sums.gamma += T(1);
  } else {
    sums.gamma += gamma_of(n_h, alpha);
    if (p.rule == Rule::EM) sums.variance += posterior_variance(n_h, alpha);
  }
}

// The re-estimated alpha of a group of `count` weights, clamped to [alpha_min, alpha_max].
// A NaN estimate (NaN weight or curvature) keeps the old alpha: a NaN never enters alpha.
template <typename T>
MACKAY_HOST_DEVICE T reestimate_alpha(const GroupSums<T>& sums, T count, T old_alpha,
                                      const UpdateParams& p) {
  T alpha;
  if (p.rule == Rule::MacKay) {
    alpha = sums.gamma / (sums.weight_sq + T(p.eps));
  } else if (p.rule == Rule::EM) {
    alpha = count / (sums.weight_sq + sums.variance);
  } else {
    alpha = count / (sums.weight_sq + T(p.eps));
  }
  if (alpha != alpha) return old_alpha;
  if (alpha < T(p.alpha_min)) alpha = T(p.alpha_min);
  if (alpha > T(p.alpha_max)) alpha = T(p.alpha_max);
  return alpha;
}

// Sum of Sigma_ii at the new alpha, for the "snr" criterion.
template <typename T>
MACKAY_HOST_DEVICE T variance_at(T curvature, T alpha, const UpdateParams& p) {
  return posterior_variance(data_precision(curvature, T(p.num_data)), alpha);
}

// Pruning decision. "alpha": alpha >= threshold. "snr": sum w^2 / sum Sigma_ii < threshold,
// written without a division so Sigma = +inf (no information at all) reads as SNR 0.
// An infinite alpha is pruned under either criterion.
template <typename T>
MACKAY_HOST_DEVICE bool should_prune(T alpha, T weight_sq, T variance_sum, const UpdateParams& p) {
  if (alpha == infinity<T>()) return true;
  if (p.prune == Prune::Alpha) return alpha >= T(p.threshold);
  return weight_sq < T(p.threshold) * variance_sum;
}

// One whole group, element by element: the CPU scalar path and the CUDA thread-per-group
// kernel both run this. Returns true when the group is pruned (then alpha = +inf, weights = 0);
// `gamma` receives the group's sum of gamma (0 when pruned).
template <typename opmath_t, typename scalar_t, typename alpha_t>
MACKAY_HOST_DEVICE bool update_group(scalar_t* weight, int64_t weight_stride,
                                     const scalar_t* curvature, int64_t curvature_stride,
                                     int64_t count, alpha_t* alpha, const UpdateParams& p,
                                     opmath_t& gamma) {
  const opmath_t old_alpha = static_cast<opmath_t>(*alpha);
  bool pruned = old_alpha == infinity<opmath_t>();
  GroupSums<opmath_t> sums;
  if (!pruned) {
    for (int64_t j = 0; j < count; ++j) {
      accumulate<opmath_t>(sums, static_cast<opmath_t>(weight[j * weight_stride]),
                           static_cast<opmath_t>(curvature[j * curvature_stride]), old_alpha, p);
    }
    const opmath_t new_alpha = reestimate_alpha(sums, opmath_t(count), old_alpha, p);
    opmath_t variance = 0;
    if (p.prune == Prune::SNR) {
      for (int64_t j = 0; j < count; ++j) {
        variance += variance_at<opmath_t>(static_cast<opmath_t>(curvature[j * curvature_stride]),
                                          new_alpha, p);
      }
    }
    pruned = should_prune(new_alpha, sums.weight_sq, variance, p);
    *alpha = static_cast<alpha_t>(new_alpha);
  }
  if (pruned) {
    *alpha = infinity<alpha_t>();
    for (int64_t j = 0; j < count; ++j) weight[j * weight_stride] = scalar_t(0);
  }
  gamma = pruned ? opmath_t(0) : sums.gamma;
  return pruned;
}

}  // namespace mackay
