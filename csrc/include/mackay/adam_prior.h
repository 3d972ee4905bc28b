#pragma once
// mackay_ext::adam_proximal_prior_: the ARD prior's proximal step after a step of a torch Adam,
// AdamW or NAdam (mackay_ext.standalone_prior), one element; shared by the CPU and CUDA kernels.
// The host side validates and builds one TensorIterator over (weight, exp_avg_sq, alpha).
#include <ATen/core/Tensor.h>

#include <cmath>
#include <limits>
#include <optional>

#include "mackay/macros.h"

namespace mackay {

// w <- w d / (d + scale alpha), d = sqrt(v inv_bc2 + tiny) + eps: the implicit step on the prior
// alpha w^2 / 2N with Adam's step lr / d per unit of gradient (scale = lr / N); 0 where alpha =
// +inf (pruned). tiny (the smallest normal float) keeps sqrt off the CPU's slow paths for 0 and
// subnormal v (a pruned or dead weight's) and changes nothing that eps does not swamp.
template <typename T>
MACKAY_HOST_DEVICE T adam_prior_element(T weight, T exp_avg_sq, T alpha, T inv_bc2, T eps, T scale) {
  if (alpha == std::numeric_limits<T>::infinity()) return T(0);
  const T d = ::sqrt(exp_avg_sq * inv_bc2 + std::numeric_limits<T>::min()) + eps;
  return weight * d / (d + scale * alpha);
}

// The scalars of one call; step and found_inf are 0-d float32 tensors (found_inf optional).
struct AdamPriorArgs {
  double beta2, eps, scale;
};

// Checks the arguments (naming each) and returns alpha expanded to the weight's shape.
at::Tensor check_adam_prior(const at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                            const at::Tensor& step, const AdamPriorArgs& args,
                            const std::optional<at::Tensor>& found_inf);

// 1 / (1 - beta2^max(t, 1)), Adam's second-moment bias correction at step count t.
MACKAY_HOST_DEVICE double adam_inv_bc2(double beta2, double step) {
  return 1.0 / (1.0 - ::pow(beta2, step < 1.0 ? 1.0 : step));
}

}  // namespace mackay
