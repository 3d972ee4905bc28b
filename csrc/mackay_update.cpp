// Validation and group layout of mackay_ext::mackay_update_ (device independent).
#include "mackay/update_driver.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace mackay {
namespace {

constexpr double kDefaultAlphaThreshold = 1e13;  // the source paper's pruning level
constexpr double kDefaultSnrThreshold = 0.05;

Rule parse_rule(std::string_view rule) {
  if (rule == "mackay") return Rule::MacKay;
  if (rule == "em") return Rule::EM;
  if (rule == "paper") return Rule::Paper;
  TORCH_CHECK_VALUE(false, "mackay_update_: rule must be one of 'mackay', 'em', 'paper', got '",
                    std::string(rule), "'");
}

Prune parse_prune(std::string_view prune) {
  if (prune == "alpha") return Prune::Alpha;
  if (prune == "snr") return Prune::SNR;
  TORCH_CHECK_VALUE(false, "mackay_update_: prune must be 'alpha' or 'snr', got '",
                    std::string(prune), "'");
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_tensors(const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& alpha) {
  TORCH_CHECK(weight.layout() == at::kStrided, "mackay_update_: weight must be a dense (strided) "
              "tensor, got layout ", weight.layout());
  TORCH_CHECK(curvature.layout() == at::kStrided && alpha.layout() == at::kStrided,
              "mackay_update_: curvature and alpha must be dense (strided) tensors");
  TORCH_CHECK_TYPE(is_float_type(weight.scalar_type()), "mackay_update_: weight must be float32, "
                   "float64, float16 or bfloat16, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(curvature.scalar_type() == weight.scalar_type(), "mackay_update_: curvature "
                   "must have the weight's dtype ", weight.scalar_type(), ", got ",
                   curvature.scalar_type());
  TORCH_CHECK_TYPE(alpha.scalar_type() == at::kFloat || alpha.scalar_type() == at::kDouble,
                   "mackay_update_: alpha must be float32 or float64, got ", alpha.scalar_type());
  TORCH_CHECK(curvature.device() == weight.device() && alpha.device() == weight.device(),
              "mackay_update_: weight, curvature and alpha must be on one device, got weight on ",
              weight.device(), ", curvature on ", curvature.device(), ", alpha on ", alpha.device());
  TORCH_CHECK(curvature.sizes() == weight.sizes(), "mackay_update_: curvature must have the "
              "weight's shape ", weight.sizes(), ", got ", curvature.sizes());
  const int64_t offset = weight.dim() - alpha.dim();
  bool broadcastable = offset >= 0;
  for (int64_t d = 0; broadcastable && d < alpha.dim(); ++d) {
    broadcastable = alpha.size(d) == 1 || alpha.size(d) == weight.size(d + offset);
  }
  TORCH_CHECK(broadcastable, "mackay_update_: alpha must be broadcastable to the weight's shape ",
              weight.sizes(), " (one alpha per weight or per group), got ", alpha.sizes());
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes,
              "mackay_update_: weight has overlapping memory (e.g. an expanded tensor); "
              "it is written in place");
  TORCH_CHECK(at::has_internal_overlap(alpha) != at::MemOverlap::Yes,
              "mackay_update_: alpha has overlapping memory (e.g. an expanded tensor); "
              "pass one entry per group");
  TORCH_CHECK(at::get_overlap_status(weight, alpha) == at::MemOverlapStatus::No,
              "mackay_update_: weight and alpha must not share memory");
}

void check_scalars(double num_data, double threshold, double eps, double alpha_min,
                   double alpha_max) {
  TORCH_CHECK_VALUE(std::isfinite(num_data) && num_data > 0, "mackay_update_: num_data must be "
                    "a positive number of training examples, got ", num_data);
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0, "mackay_update_: threshold must be "
                    "finite and >= 0, got ", threshold);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "mackay_update_: eps must be finite and >= 0, "
                    "got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(alpha_min) && alpha_min >= 0, "mackay_update_: alpha_min must be "
                    "finite and >= 0, got ", alpha_min);
  TORCH_CHECK_VALUE(alpha_max >= alpha_min, "mackay_update_: alpha_max must be >= alpha_min (",
                    alpha_min, "), got ", alpha_max);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> run_mackay_update(
    const at::Tensor& weight, const at::Tensor& curvature, const at::Tensor& alpha,
    double num_data, std::string_view rule, std::string_view prune,
    std::optional<double> threshold, double eps, double alpha_min,
    std::optional<double> alpha_max, GroupKernel kernel) {
  check_tensors(weight, curvature, alpha);
  UpdateParams params;
  params.rule = parse_rule(rule);
  params.prune = parse_prune(prune);
  params.num_data = num_data;
  params.threshold = threshold.value_or(
      params.prune == Prune::Alpha ? kDefaultAlphaThreshold : kDefaultSnrThreshold);
  params.eps = eps;
  params.alpha_min = alpha_min;
  params.alpha_max = alpha_max.value_or(std::numeric_limits<double>::infinity());
  check_scalars(num_data, params.threshold, eps, params.alpha_min, params.alpha_max);

  // Dimensions where alpha has one entry per weight index ("kept") come first, the dimensions
  // a group reduces over follow; row-major alpha then enumerates the groups in order.
  const int64_t offset = weight.dim() - alpha.dim();
  std::vector<int64_t> kept, reduced;
  int64_t groups = 1, group_size = 1;
  for (int64_t d = 0; d < weight.dim(); ++d) {
    const int64_t alpha_size = d < offset ? 1 : alpha.size(d - offset);
    if (alpha_size == 1 && weight.size(d) != 1) {
      reduced.push_back(d);
      group_size *= weight.size(d);
    } else {
      kept.push_back(d);
      groups *= weight.size(d);
    }
  }
  std::vector<int64_t> perm(kept);
  perm.insert(perm.end(), reduced.begin(), reduced.end());

  const at::Tensor weight_perm = weight.permute(perm);
  GroupProblem problem;
  problem.weight2d = weight_perm.reshape({groups, group_size});
  problem.curvature2d = curvature.permute(perm).reshape({groups, group_size});
  problem.alpha1d = alpha.reshape({groups});

  auto gamma_sum = at::zeros({}, weight.options().dtype(at::kDouble));
  auto num_pruned = at::zeros({}, weight.options().dtype(at::kLong));
  if (weight.numel() > 0) {
    kernel(problem, params, gamma_sum, num_pruned);
    // reshape copies when the strides cannot be folded into [G, n]; write the copies back.
    if (!problem.weight2d.is_alias_of(weight)) {
      weight_perm.copy_(problem.weight2d.view(weight_perm.sizes()));
    }
    if (!problem.alpha1d.is_alias_of(alpha)) {
      alpha.copy_(problem.alpha1d.view(alpha.sizes()));
    }
  }
  return {gamma_sum, num_pruned};
}

}  // namespace mackay
