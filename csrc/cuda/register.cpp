// Registers the CUDA kernels (launchers live in the .cu files, which stay free of
// torch/library.h to keep nvcc's work small).
#include <torch/library.h>

#include "launchers.h"

namespace mackay {
namespace {

std::tuple<at::Tensor, at::Tensor> mackay_update_cuda(
    at::Tensor& weight, const at::Tensor& curvature, at::Tensor& alpha, double num_data,
    c10::string_view rule, c10::string_view prune, std::optional<double> threshold, double eps,
    double alpha_min, std::optional<double> alpha_max) {
  return run_mackay_update(weight, curvature, alpha, num_data,
                           std::string_view(rule.data(), rule.size()),
                           std::string_view(prune.data(), prune.size()), threshold, eps,
                           alpha_min, alpha_max, &mackay_update_kernel_cuda);
}

void mackay_adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList steps,
                           at::TensorList curvatures, at::TensorList alphas, double lr,
                           double beta1, double beta2, double eps, double weight_decay,
                           bool decoupled_weight_decay, double num_data, double batch_size,
                           double curvature_decay, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  const AdamHyper hyper{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                        num_data, batch_size, curvature_decay, !curvatures.empty()};
  run_mackay_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, curvatures, alphas, hyper,
                       grad_scale, found_inf, &mackay_adam_kernel_cuda);
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CUDA, m) {
  m.impl("mackay_update_", &mackay::mackay_update_cuda);
  m.impl("mackay_adam_step_", &mackay::mackay_adam_step_cuda);
  m.impl("csr_matmul", &mackay::csr_matmul_cuda);
  m.impl("csr_sddmm", &mackay::csr_sddmm_cuda);
  m.impl("sq_gemm_accumulate_", &mackay::sq_gemm_accumulate_cuda);
}
