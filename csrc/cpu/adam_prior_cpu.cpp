// CPU kernel of mackay_ext::adam_proximal_prior_: one vectorised, parallel pass over the weight
// (TensorIterator: any strides, alpha broadcast per group), where the Python form took six passes
// and two temporaries a layer at every step of a foreign optimizer.
#include <ATen/TensorIterator.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/Loops.h>
#include <torch/library.h>

#include "mackay/adam_prior.h"

namespace mackay {
namespace {

void adam_proximal_prior_cpu(at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                             const at::Tensor& step, double beta2, double eps, double scale,
                             const std::optional<at::Tensor>& found_inf) {
  const AdamPriorArgs args{beta2, eps, scale};
  const at::Tensor alpha_full = check_adam_prior(weight, exp_avg_sq, alpha, step, args, found_inf);
  // on the CPU reading these is free (no device to synchronise with)
  if (found_inf && found_inf->item<float>() != 0.0f) return;
  if (weight.numel() == 0) return;
  const float inv_bc2 = static_cast<float>(adam_inv_bc2(beta2, step.item<double>()));
  const float eps_f = static_cast<float>(eps), scale_f = static_cast<float>(scale);
  auto iter = at::TensorIteratorConfig()
                  .add_output(weight)
                  .add_const_input(weight)
                  .add_const_input(exp_avg_sq)
                  .add_const_input(alpha_full)
                  .set_check_mem_overlap(false)   // (in place by design: the output is input 0)
                  .build();
  using V = at::vec::Vectorized<float>;
  at::native::cpu_kernel_vec(
      iter,
      [=](float w, float v, float a) -> float { return adam_prior_element(w, v, a, inv_bc2, eps_f, scale_f); },
      [=](V w, V v, V a) -> V {
        const V pruned = a == V(std::numeric_limits<float>::infinity());
        const V d = at::vec::fmadd(v, V(inv_bc2), V(std::numeric_limits<float>::min())).sqrt() + V(eps_f);
        const V shrunk = w * d / at::vec::fmadd(V(scale_f), a, d);
        return V::blendv(shrunk, V(0.0f), pruned);
      });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("adam_proximal_prior_", &mackay::adam_proximal_prior_cpu);
}
