#pragma once
// Host launchers defined in the .cu files; registered with the dispatcher from register.cpp
// so that nvcc never has to parse torch/library.h.
#include "mackay/adam_driver.h"
#include "mackay/update_driver.h"

namespace mackay {

void mackay_update_kernel_cuda(const GroupProblem& problem, const UpdateParams& params,
                               at::Tensor& gamma_sum, at::Tensor& num_pruned);

void mackay_adam_kernel_cuda(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf);

at::Tensor csr_matmul_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features);

at::Tensor csr_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, int64_t in_features);

void adam_proximal_prior_cuda(at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                              const at::Tensor& step, double beta2, double eps, double scale,
                              const std::optional<at::Tensor>& found_inf);

void sq_gemm_accumulate_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                             const std::optional<at::Tensor>& bias_out);

}  // namespace mackay
