// Validation and alpha layout of mackay_ext::mackay_adam_step_ (device independent).
#include "mackay/adam_driver.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace mackay {
namespace {

constexpr const char* kOp = "mackay_adam_step_";

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The kernels walk every tensor of a parameter in one flat order: strides must agree wherever
// they matter (dimensions of size > 1 of a non-empty tensor).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_like_param(const at::Tensor& t, const at::Tensor& param, const char* name, size_t i,
                      bool float32_allowed = false) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, kOp, ": ", name, "[", i, "] must be dense (sparse "
              "gradients are not supported), got layout ", t.layout());
  TORCH_CHECK(t.device() == param.device(), kOp, ": ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", param.device());
  TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type() ||
                       (float32_allowed && t.scalar_type() == at::kFloat),
                   kOp, ": ", name, "[", i, "] must have the dtype of params[", i, "] (",
                   param.scalar_type(), float32_allowed ? ", or float32" : "", "), got ",
                   t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes() && same_layout(t, param), kOp, ": ", name, "[", i,
              "] must have the shape and strides of params[", i, "] ", param.sizes(), "/",
              param.strides(), ", got ", t.sizes(), "/", t.strides());
}

void check_scalar_tensor(const at::Tensor& t, const at::Tensor& param, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, kOp, ": ", name, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK(t.numel() == 1, kOp, ": ", name, " must hold one value, got ", t.numel());
  TORCH_CHECK(t.device() == param.device(), kOp, ": ", name, " is on ", t.device(),
              " but the params are on ", param.device());
}

void check_hyper(const AdamHyper& h, bool tracks_curvature) {
  TORCH_CHECK_VALUE(std::isfinite(h.lr) && h.lr >= 0, kOp, ": lr must be finite and >= 0, got ", h.lr);
  TORCH_CHECK_VALUE(h.beta1 >= 0 && h.beta1 < 1, kOp, ": beta1 must be in [0, 1), got ", h.beta1);
  TORCH_CHECK_VALUE(h.beta2 >= 0 && h.beta2 < 1, kOp, ": beta2 must be in [0, 1), got ", h.beta2);
  TORCH_CHECK_VALUE(std::isfinite(h.eps) && h.eps >= 0, kOp, ": eps must be finite and >= 0, got ", h.eps);
  TORCH_CHECK_VALUE(std::isfinite(h.weight_decay) && h.weight_decay >= 0, kOp,
                    ": weight_decay must be finite and >= 0, got ", h.weight_decay);
  TORCH_CHECK_VALUE(std::isfinite(h.num_data) && h.num_data > 0, kOp,
                    ": num_data must be a positive number of training examples, got ", h.num_data);
  if (tracks_curvature) {
    TORCH_CHECK_VALUE(std::isfinite(h.batch_size) && h.batch_size > 0, kOp,
                      ": batch_size must be positive to track curvature, got ", h.batch_size);
    TORCH_CHECK_VALUE(h.curvature_decay >= 0 && h.curvature_decay <= 1, kOp,
                      ": curvature_decay must be in [0, 1], got ", h.curvature_decay);
  }
}

// Fills alpha_inner / alpha_size, or materialises alpha in the parameter's layout when the
// broadcast cannot be written as one (inner, size) pair.
void layout_alpha(AdamTensor& t, size_t i) {
  const at::Tensor& param = t.param;
  const at::Tensor& alpha = t.alpha;
  TORCH_CHECK_TYPE(alpha.scalar_type() == at::kFloat, kOp, ": alphas[", i, "] must be float32, got ",
                   alpha.scalar_type());
  TORCH_CHECK(alpha.layout() == at::kStrided && alpha.device() == param.device(), kOp, ": alphas[",
              i, "] must be a dense tensor on ", param.device(), ", got ", alpha.device());
  const int64_t offset = param.dim() - alpha.dim();
  bool broadcastable = offset >= 0;
  for (int64_t d = 0; broadcastable && d < alpha.dim(); ++d) {
    broadcastable = alpha.size(d) == 1 || alpha.size(d) == param.size(d + offset);
  }
  TORCH_CHECK(broadcastable, kOp, ": alphas[", i, "] must be broadcastable to params[", i,
              "]'s shape ", param.sizes(), " (one alpha per weight or per group), got ", alpha.sizes());
  // Kept dimensions (one alpha per index) must form one run of the parameter's dimensions
  // (ignoring size-1 dimensions) for alpha to be indexed as (i / inner) % size.
  int64_t runs = 0, size = 1, inner = 1, inner_so_far = 1;
  bool in_run = false;
  for (int64_t d = param.dim() - 1; d >= 0; --d) {
    if (param.size(d) == 1) continue;
    const bool kept = d >= offset && alpha.size(d - offset) != 1;
    if (kept) {
      if (!in_run) {
        ++runs;
        inner = inner_so_far;
      }
      size *= param.size(d);
    }
    in_run = kept;
    inner_so_far *= param.size(d);
  }
  if (runs <= 1 && param.is_contiguous()) {
    t.alpha = alpha.contiguous();
    t.alpha_inner = inner;
    t.alpha_size = size;
  } else {
    t.alpha = at::empty_like(param, alpha.options()).copy_(alpha.expand(param.sizes()));
    t.alpha_inner = 1;
    t.alpha_size = param.numel();
  }
}

}  // namespace

void run_mackay_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList curvatures, at::TensorList alphas, const AdamHyper& hyper,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, AdamKernel kernel) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              kOp, ": params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per "
              "parameter; got lengths ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), ", ", steps.size());
  TORCH_CHECK(alphas.size() <= n, kOp, ": alphas (one per ARD parameter, the first ones) has ",
              alphas.size(), " entries for ", n, " params");
  TORCH_CHECK(curvatures.empty() || curvatures.size() == alphas.size(), kOp,
              ": curvatures must be empty or have one entry per alpha (", alphas.size(), "), got ",
              curvatures.size());
  check_hyper(hyper, !curvatures.empty());
  if (n == 0) return;
  const at::Tensor& first = params[0];
  if (grad_scale) check_scalar_tensor(*grad_scale, first, "grad_scale");
  if (found_inf) check_scalar_tensor(*found_inf, first, "found_inf");

  std::vector<AdamTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    AdamTensor& t = tensors[i];
    t.param = params[i];
    TORCH_CHECK(t.param.layout() == at::kStrided, kOp, ": params[", i, "] must be dense");
    TORCH_CHECK_TYPE(is_float_type(t.param.scalar_type()), kOp, ": params[", i, "] must be float32, "
                     "float64, float16 or bfloat16, got ", t.param.scalar_type());
    TORCH_CHECK(t.param.device() == first.device() && t.param.scalar_type() == first.scalar_type(),
                kOp, ": all params of one call must share device and dtype; params[", i, "] is ",
                t.param.scalar_type(), " on ", t.param.device(), ", params[0] is ",
                first.scalar_type(), " on ", first.device());
    TORCH_CHECK(t.param.is_non_overlapping_and_dense(), kOp, ": params[", i, "] must be a dense, "
                "non-overlapping tensor (e.g. not a strided view), strides ", t.param.strides());
    check_like_param(grads[i], t.param, "grads", i);
    check_like_param(exp_avgs[i], t.param, "exp_avgs", i);
    check_like_param(exp_avg_sqs[i], t.param, "exp_avg_sqs", i);
    check_scalar_tensor(steps[i], t.param, "steps[i]");
    t.grad = grads[i];
    t.exp_avg = exp_avgs[i];
    t.exp_avg_sq = exp_avg_sqs[i];
    t.step = steps[i];
    if (i < alphas.size()) {
      t.alpha = alphas[i];
      layout_alpha(t, i);
      if (!curvatures.empty()) {
        // h of a bfloat16 / float16 weight may be float32 (its 1% steps vanish in half
        // precision), the same for every entry of a call: the kernels pick its type per launch
        const bool reduced = t.param.scalar_type() == at::kBFloat16 || t.param.scalar_type() == at::kHalf;
        check_like_param(curvatures[i], t.param, "curvatures", i, reduced);
        TORCH_CHECK_TYPE(curvatures[i].scalar_type() == curvatures[0].scalar_type(), kOp,
                         ": all curvatures of one call must share a dtype; curvatures[", i, "] is ",
                         curvatures[i].scalar_type(), ", curvatures[0] is ", curvatures[0].scalar_type());
        t.curvature = curvatures[i];
      }
    }
  }
  kernel(tensors, hyper, grad_scale, found_inf);
}

}  // namespace mackay
