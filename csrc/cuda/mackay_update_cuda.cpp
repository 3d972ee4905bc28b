// Registers the CUDA kernels of mackay_update_ (launcher in mackay_update_kernel.cu).
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

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CUDA, m) {
  m.impl("mackay_update_", &mackay::mackay_update_cuda);
}
