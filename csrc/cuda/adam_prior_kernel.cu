// CUDA kernel of mackay_ext::adam_proximal_prior_: one elementwise pass over the weight through
// TensorIterator (any strides, alpha broadcast per group); step and found_inf are read on the
// device where they live there, so the step needs no host sync.
#include <ATen/TensorIterator.h>
#include <ATen/native/cuda/Loops.cuh>
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"
#include "mackay/adam_prior.h"

namespace mackay {
namespace {

struct AdamPriorOp {
  const float* step;        // on the device, or nullptr: inv_bc2 holds the correction
  const float* found_inf;   // on the device, or nullptr
  double beta2;
  float inv_bc2, eps, scale;

  __device__ float operator()(float weight, float exp_avg_sq, float alpha) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return weight;   // a step GradScaler skipped
    const float inv = step != nullptr ? static_cast<float>(adam_inv_bc2(beta2, *step)) : inv_bc2;
    return adam_prior_element(weight, exp_avg_sq, alpha, inv, eps, scale);
  }
};

}  // namespace

void adam_proximal_prior_cuda(at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                              const at::Tensor& step, double beta2, double eps, double scale,
                              const std::optional<at::Tensor>& found_inf) {
  const AdamPriorArgs args{beta2, eps, scale};
  const at::Tensor alpha_full = check_adam_prior(weight, exp_avg_sq, alpha, step, args, found_inf);
  if (found_inf && found_inf->is_cpu() && found_inf->item<float>() != 0.0f) return;
  if (weight.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  AdamPriorOp op{nullptr, nullptr, beta2, 1.0f, static_cast<float>(eps), static_cast<float>(scale)};
  at::Tensor device_step;
  if (step.is_cpu()) {
    op.inv_bc2 = static_cast<float>(adam_inv_bc2(beta2, step.item<double>()));
  } else {
    device_step = step.scalar_type() == at::kFloat ? step : step.to(at::kFloat);
    op.step = device_step.const_data_ptr<float>();
  }
  if (found_inf && !found_inf->is_cpu()) op.found_inf = found_inf->const_data_ptr<float>();
  auto iter = at::TensorIteratorConfig()
                  .add_output(weight)
                  .add_const_input(weight)
                  .add_const_input(exp_avg_sq)
                  .add_const_input(alpha_full)
                  .set_check_mem_overlap(false)   // (in place by design: the output is input 0)
                  .build();
  at::native::gpu_kernel(iter, op);
}

}  // namespace mackay
