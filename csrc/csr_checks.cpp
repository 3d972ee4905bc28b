// Argument checks of the CSR ops (device independent).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "mackay/csr.h"

namespace mackay {

at::Tensor check_csr_matmul_args(const char* op, const at::Tensor& x, const at::Tensor& crow,
                                 const at::Tensor& col, const at::Tensor& values, int64_t in_features) {
  TORCH_CHECK(x.layout() == at::kStrided && values.layout() == at::kStrided, op,
              ": x and values must be dense tensors");
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op,
                   ": values must be float32 or float64, got ", values.scalar_type());
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
  return x.reshape({-1, in_features}).contiguous();
}

std::vector<int64_t> csr_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out_features);
  return shape;
}

}  // namespace mackay
