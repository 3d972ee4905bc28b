// Validation of mackay_ext::adam_proximal_prior_ (device independent).
#include "mackay/adam_prior.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace mackay {

at::Tensor check_adam_prior(const at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                            const at::Tensor& step, const AdamPriorArgs& args,
                            const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "adam_proximal_prior_";
  TORCH_CHECK(weight.layout() == at::kStrided && exp_avg_sq.layout() == at::kStrided &&
                  alpha.layout() == at::kStrided,
              kOp, ": weight, exp_avg_sq and alpha must be dense (strided) tensors");
  // float32 only: the pruner takes this path for float32 weights and keeps the Python one for
  // the rest (alpha is float32, and mixed dtypes would cost the vectorised loop)
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat && exp_avg_sq.scalar_type() == at::kFloat &&
                       alpha.scalar_type() == at::kFloat,
                   kOp, ": weight, exp_avg_sq and alpha must be float32, got ", weight.scalar_type(), ", ",
                   exp_avg_sq.scalar_type(), " and ", alpha.scalar_type());
  TORCH_CHECK(exp_avg_sq.device() == weight.device() && alpha.device() == weight.device(), kOp,
              ": weight, exp_avg_sq and alpha must be on one device, got ", weight.device(), ", ",
              exp_avg_sq.device(), " and ", alpha.device());
  TORCH_CHECK(exp_avg_sq.sizes() == weight.sizes(), kOp, ": exp_avg_sq must have the weight's shape ",
              weight.sizes(), ", got ", exp_avg_sq.sizes());
  const int64_t offset = weight.dim() - alpha.dim();
  bool broadcastable = offset >= 0;
  for (int64_t d = 0; broadcastable && d < alpha.dim(); ++d) {
    broadcastable = alpha.size(d) == 1 || alpha.size(d) == weight.size(d + offset);
  }
  TORCH_CHECK(broadcastable, kOp, ": alpha must be broadcastable to the weight's shape ", weight.sizes(),
              ", got ", alpha.sizes());
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, kOp,
              ": weight has overlapping memory (an expanded view?); pass a tensor that owns each element");
  TORCH_CHECK(step.numel() == 1 && (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
              kOp, ": step must be one float32 or float64 value (Adam's state['step']), got ", step.numel(),
              " values of ", step.scalar_type());
  TORCH_CHECK(step.is_cpu() || step.device() == weight.device(), kOp, ": step must be on the CPU or on the "
              "weight's device ", weight.device(), ", got ", step.device());
  if (found_inf) {
    TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat &&
                    (found_inf->is_cpu() || found_inf->device() == weight.device()),
                kOp, ": found_inf must be one float32 value on the CPU or the weight's device");
  }
  TORCH_CHECK_VALUE(args.beta2 >= 0.0 && args.beta2 < 1.0, kOp, ": beta2 must be in [0, 1), got ", args.beta2);
  TORCH_CHECK_VALUE(std::isfinite(args.eps) && args.eps >= 0.0, kOp, ": eps must be finite and >= 0, got ",
                    args.eps);
  TORCH_CHECK_VALUE(std::isfinite(args.scale) && args.scale >= 0.0, kOp,
                    ": scale (lr / N) must be finite and >= 0, got ", args.scale);
  return alpha.expand_as(weight);
}

}  // namespace mackay
