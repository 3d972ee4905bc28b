// mackay_ext::csr_linear = csr_matmul + bias, for every device (CompositeExplicitAutograd);
// its backward is registered from Python (torch.library.register_autograd).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "mackay/csr.h"

namespace mackay {
namespace {

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& values, const std::optional<at::Tensor>& bias,
                      const at::Tensor& crow_t, const at::Tensor& row_t, const at::Tensor& perm_t) {
  TORCH_CHECK(crow_t.dim() == 1 && crow_t.size(0) >= 1, "csr_linear: crow_t (the transposed index) "
              "must be 1-D with in_features + 1 entries, got ", crow_t.sizes());
  TORCH_CHECK(row_t.sizes() == col.sizes() && perm_t.sizes() == col.sizes(), "csr_linear: row_t and "
              "perm_t must have one entry per nonzero (", col.size(0), "), got ", row_t.sizes(),
              " and ", perm_t.sizes());
  const int64_t in_features = crow_t.size(0) - 1;
  const int64_t out_features = crow.size(0) - 1;
  static auto matmul = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mackay_ext::csr_matmul", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t)>();
  at::Tensor y = matmul.call(x, crow, col, values, in_features);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "csr_linear: bias must have "
                "shape (out_features,) = (", out_features, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == values.scalar_type() && bias->device() == values.device(),
                "csr_linear: bias must have the dtype and device of values");
    y.add_(*bias);
  }
  return y;
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CompositeExplicitAutograd, m) {
  m.impl("csr_linear", &mackay::csr_linear);
}
