// Argument checks of the CSR ops (device independent).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unsafe_view.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "mackay/csr.h"

namespace mackay {

// Rows of the [rows, features] view: the product of the leading dimensions (a -1 in reshape is
// ambiguous when the last dimension is 0).
static int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

at::Tensor check_csr_matmul_args(const char* op, const at::Tensor& x, const at::Tensor& crow,
                                 const at::Tensor& col, const at::Tensor& values, int64_t in_features) {
  TORCH_CHECK(x.layout() == at::kStrided && values.layout() == at::kStrided, op,
              ": x and values must be dense tensors");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble ||
                       values.scalar_type() == at::kHalf || values.scalar_type() == at::kBFloat16,
                   op, ": values must be float32, float64, float16 or bfloat16, got ",
                   values.scalar_type());
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), op, ": x must have the dtype of values (",
                   values.scalar_type(), "), got ", x.scalar_type());
  TORCH_CHECK_TYPE(crow.scalar_type() == col.scalar_type() &&
                       (crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong),
                   op, ": crow_indices and col_indices must both be int32 or both int64, got ",
                   crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(x.device() == values.device() && crow.device() == values.device() &&
                  col.device() == values.device(),
              op, ": x, crow_indices, col_indices and values must be on one device, got ", x.device(),
              ", ", crow.device(), ", ", col.device(), ", ", values.device());
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) >= 1, op, ": crow_indices must be 1-D with out_features "
              "+ 1 entries, got shape ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && values.dim() == 1 && col.size(0) == values.size(0), op,
              ": col_indices and values must be 1-D of one length (the number of nonzeros), got ",
              col.sizes(), " and ", values.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op, ": x's last dimension must be "
              "in_features = ", in_features, ", got x of shape ", x.sizes());
  return x.reshape({leading_rows(x), in_features}).contiguous();
}

std::pair<at::Tensor, at::Tensor> check_csr_sddmm_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& crow, const at::Tensor& col,
                                                       int64_t in_features) {
  const int64_t out = crow.dim() == 1 ? crow.size(0) - 1 : -1;
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == out, "csr_sddmm: grad_out's last dimension "
              "must be out_features = ", out, ", got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "csr_sddmm: grad_out must have x's "
                   "dtype ", x.scalar_type(), ", got ", grad_out.scalar_type());
  const at::Tensor x2d = check_csr_matmul_args("csr_sddmm", x, crow, col,
                                               at::empty({col.size(0)}, x.options()), in_features);
  const at::Tensor g2d = grad_out.reshape({leading_rows(grad_out), out}).contiguous();
  TORCH_CHECK(g2d.size(0) == x2d.size(0), "csr_sddmm: grad_out and x must have the same leading "
              "dimensions, got ", grad_out.sizes(), " and ", x.sizes());
  return {x2d, g2d};
}

std::vector<int64_t> csr_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out_features);
  return shape;
}

at::Tensor output_of_shape(const at::Tensor& y2d, at::IntArrayRef shape) {
  return at::_unsafe_view(y2d.contiguous(), shape);
}

}  // namespace mackay
