#pragma once
// The fused MacKay-Adam step, one element (docs/mathematics.md section 2). Shared by the CPU and CUDA
// kernels; the CPU fast path mirrors it with at::vec lanes (csrc/cpu/adam_vec.h).
#include <cmath>
#include <cstdint>

#include "mackay/macros.h"
#include "mackay/precision.h"

namespace mackay {

// Scalars of one step, as passed by the optimizer (same for every tensor of a launch).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;
  double num_data;          // N: the ARD term's gradient is (alpha / N) * w
  double batch_size;        // B: ef-batch curvature h <- rho h + (1 - rho) B g^2
  double curvature_decay;   // rho
  bool track_curvature;
};

// Per-tensor constants in opmath, bias corrections folded in once per tensor.
template <typename T>
struct AdamConstants {
  T beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  T step_size;         // lr / (1 - beta1^t)
  T inv_bc2_sqrt;      // 1 / sqrt(1 - beta2^t)
  T weight_decay;      // L2 coefficient (coupled), 0 when decoupled
  T decay_factor;      // 1 - lr * weight_decay (decoupled), else 1
  T inv_num_data;
  T curvature_decay, curvature_gain;  // rho, (1 - rho) * B

  // `step`: the step being taken (1 for the first).
  MACKAY_HOST_DEVICE AdamConstants(const AdamHyper& hp, double step) {
    const double bc1 = 1.0 - ::pow(hp.beta1, step);
    const double bc2 = 1.0 - ::pow(hp.beta2, step);
    beta1 = T(hp.beta1);
    beta2 = T(hp.beta2);
    one_minus_beta1 = T(1.0 - hp.beta1);
    one_minus_beta2 = T(1.0 - hp.beta2);
    eps = T(hp.eps);
    step_size = T(hp.lr / bc1);
    inv_bc2_sqrt = T(1.0 / ::sqrt(bc2));
    weight_decay = hp.decoupled_weight_decay ? T(0) : T(hp.weight_decay);
    decay_factor = hp.decoupled_weight_decay ? T(1.0 - hp.lr * hp.weight_decay) : T(1);
    inv_num_data = T(1.0 / hp.num_data);
    curvature_decay = T(hp.curvature_decay);
    curvature_gain = T((1.0 - hp.curvature_decay) * hp.batch_size);
  }
};

// A moving average whose input stays 0 (a dead unit's weights: no gradient, no prior once alpha
// is 0 there) decays geometrically into subnormal numbers, which x86 CPUs compute on about 100x
// slower: a third of a 300x784 layer's m, v and h subnormal made the CPU step 3.1x slower (0.81
// -> 2.54 ms). Such a value is 0 to the step (eps = 1e-8 follows it in the denominator), so the
// averages are flushed to 0 once they fall below the smallest normal number, on every device,
// and decay at full speed from there (0 * beta = 0).
template <typename T>
MACKAY_HOST_DEVICE T flush_subnormal(T value) {
  return (value < smallest_normal<T>() && value > -smallest_normal<T>()) ? T(0) : value;
}

// One element. `grad` is already unscaled. For a parameter without ARD state pass alpha = 0 and
// curvature = nullptr. A pruned element (alpha = +inf) is held at exactly 0 with zero moments,
// and alpha * w is never formed for it (inf * 0 would be NaN).
template <typename T>
MACKAY_HOST_DEVICE void adam_element(T& weight, T grad, T& exp_avg, T& exp_avg_sq, T* curvature,
                                     T alpha, const AdamConstants<T>& c) {
  if (alpha == infinity<T>()) {
    weight = T(0);
    exp_avg = T(0);
    exp_avg_sq = T(0);
    return;
  }
  if (curvature != nullptr) {
    *curvature = flush_subnormal(c.curvature_decay * *curvature + c.curvature_gain * grad * grad);
  }
  const T direction = grad + (alpha * c.inv_num_data + c.weight_decay) * weight;
  weight *= c.decay_factor;
  exp_avg = flush_subnormal(c.beta1 * exp_avg + c.one_minus_beta1 * direction);
  exp_avg_sq = flush_subnormal(c.beta2 * exp_avg_sq + c.one_minus_beta2 * direction * direction);
  const T denom = ::sqrt(exp_avg_sq) * c.inv_bc2_sqrt + c.eps;
  weight -= c.step_size * exp_avg / denom;
}

}  // namespace mackay
