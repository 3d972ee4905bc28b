#pragma once
// Masked sparse matmul (docs/mathematics.md section 3): W (out x in) in CSR, y = x W^T.
// Host-side checks shared by the CPU and CUDA registrations. The checks here are O(1) per call;
// the O(nnz) index checks run once when a layer is built (mackay_ext.ops.check_csr), and the
// kernels never read outside the arrays even when given bad indices.
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

namespace mackay {

// Validates the CSR arrays against x ([..., in]) and returns x as a contiguous [rows, in] matrix.
at::Tensor check_csr_matmul_args(const char* op, const at::Tensor& x, const at::Tensor& crow,
                                 const at::Tensor& col, const at::Tensor& values, int64_t in_features);

// Validates csr_sddmm's arguments; returns (x, grad_out) as contiguous [rows, in] / [rows, out].
std::pair<at::Tensor, at::Tensor> check_csr_sddmm_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& crow, const at::Tensor& col,
                                                       int64_t in_features);

// The shape of y: x's leading dimensions, then `out_features`.
std::vector<int64_t> csr_output_shape(const at::Tensor& x, int64_t out_features);

// y2d (the [rows, out] result this call made) reshaped to `shape` without being a view: autograd
// refuses an in-place op (nn.ReLU(inplace=True) after a sparse layer) on a custom op's output that
// is a view, even of a temporary no one else holds.
at::Tensor output_of_shape(const at::Tensor& y2d, at::IntArrayRef shape);

}  // namespace mackay
