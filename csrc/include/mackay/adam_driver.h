#pragma once
// Host-side driver of the fused MacKay-Adam step: validates the tensor lists, works out how each
// parameter's alpha is indexed, and hands the list to a device kernel.
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "mackay/adam.h"

namespace mackay {

// One parameter and its state. The alpha of flat element i is alpha[(i / alpha_inner) %
// alpha_size]: (1, numel) per weight, (in, out) per output row, (1, in) per input column,
// (kh*kw, C) per conv input channel. `alpha` undefined: plain Adam (no ARD).
struct AdamTensor {
  at::Tensor param, grad, exp_avg, exp_avg_sq;
  at::Tensor step;       // float32 scalar: steps taken before this one (the kernel adds 1)
  at::Tensor curvature;  // undefined: no curvature tracking
  at::Tensor alpha;      // contiguous float32, or undefined
  int64_t alpha_inner = 1;
  int64_t alpha_size = 1;
};

using AdamKernel = void (*)(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf);

void run_mackay_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList curvatures, at::TensorList alphas, const AdamHyper& hyper,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, AdamKernel kernel);

// The op's registered signature, for a device's kernel: TORCH_LIBRARY_IMPL(..., DEV, m)
// { m.impl("mackay_adam_step_", &mackay_adam_step_op<&my_kernel>); }
template <AdamKernel kKernel>
void mackay_adam_step_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps,
                         at::TensorList curvatures, at::TensorList alphas, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                         double num_data, double batch_size, double curvature_decay,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                        num_data, batch_size, curvature_decay, !curvatures.empty()};
  run_mackay_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, hyper,
                       grad_scale, found_inf, kKernel);
}

}  // namespace mackay
