#pragma once
// sq_gemm_accumulate_: out += scale * (a * a)^T (b * b), the exact diagonal empirical Fisher of a
// Linear layer (docs/mathematics.md section 1, ef-exact): a = per-example output gradients [N, out],
// b = inputs [N, in], out = [out, in].
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace mackay {

// The operands both ops share: out [out, in] (float32/64, contiguous: accumulated in place),
// a [N, out] and b [N, in] of out's dtype and device.
inline void check_squared_operands(const char* op, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2, op, ": out, a and b must be 2-D, got ",
              out.sizes(), ", ", a.sizes(), ", ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0), op, ": a and b must have one row per example, got ", a.size(0), " and ",
              b.size(0));
  TORCH_CHECK(out.size(0) == a.size(1) && out.size(1) == b.size(1), op, ": out must have shape (a.size(1), "
              "b.size(1)) = (", a.size(1), ", ", b.size(1), "), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
                   ": out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_TYPE(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(), op,
                   ": a and b must have out's dtype ", out.scalar_type(), ", got ", a.scalar_type(), " and ",
                   b.scalar_type());
  TORCH_CHECK(a.device() == out.device() && b.device() == out.device(), op, ": out, a and b must be on one "
              "device, got ", out.device(), ", ", a.device(), ", ", b.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous (it is accumulated in place)");
}

// bias_out, when given, gets the bias's share of the same sum, bias_out[o] += scale * sum_n a[n, o]^2.
inline void check_bias_out(const char* op, const at::Tensor& out, const std::optional<at::Tensor>& bias_out) {
  if (!bias_out.has_value()) return;
  const at::Tensor& bias = *bias_out;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out.size(0) && bias.is_contiguous(), op, ": bias_out must be a "
              "contiguous 1-D tensor of out.size(0) = ", out.size(0), " entries, got shape ", bias.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == out.scalar_type(), op, ": bias_out must have out's dtype ",
                   out.scalar_type(), ", got ", bias.scalar_type());
  TORCH_CHECK(bias.device() == out.device(), op, ": bias_out must be on out's device ", out.device(), ", got ",
              bias.device());
}

inline void check_sq_gemm_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                               const std::optional<at::Tensor>& bias_out) {
  check_squared_operands("sq_gemm_accumulate_", out, a, b);
  check_bias_out("sq_gemm_accumulate_", out, bias_out);
}

// sq_sddmm_accumulate_: the same sum at the nonzeros of a pattern over out only, in column blocks
// (col_splits [B + 1], block_crow [B * out + 1], col_indices [nnz]: see ops.cpp); out's other
// entries are left as they are.
inline void check_sq_sddmm_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& splits, const at::Tensor& crow, const at::Tensor& col,
                                const std::optional<at::Tensor>& bias_out) {
  check_squared_operands("sq_sddmm_accumulate_", out, a, b);
  TORCH_CHECK(splits.defined() && crow.defined() && col.defined(), "sq_sddmm_accumulate_: col_splits, "
              "block_crow and col_indices must be tensors");
  TORCH_CHECK_TYPE(splits.scalar_type() == crow.scalar_type() && crow.scalar_type() == col.scalar_type() &&
                       (crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong),
                   "sq_sddmm_accumulate_: col_splits, block_crow and col_indices must all be int32 or all "
                   "int64, got ", splits.scalar_type(), ", ", crow.scalar_type(), " and ", col.scalar_type());
  TORCH_CHECK(splits.device() == out.device() && crow.device() == out.device() && col.device() == out.device(),
              "sq_sddmm_accumulate_: col_splits, block_crow and col_indices must be on out's device ", out.device(),
              ", got ", splits.device(), ", ", crow.device(), " and ", col.device());
  TORCH_CHECK(splits.dim() == 1 && splits.size(0) >= 2, "sq_sddmm_accumulate_: col_splits must be 1-D with "
              "at least 2 entries (the bounds of B >= 1 column blocks), got shape ", splits.sizes());
  const int64_t blocks = splits.size(0) - 1;
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) == blocks * out.size(0) + 1, "sq_sddmm_accumulate_: block_crow "
              "must be 1-D with B * out.size(0) + 1 = ", blocks * out.size(0) + 1, " entries (B = ", blocks,
              " column blocks), got shape ", crow.sizes());
  TORCH_CHECK(col.dim() == 1, "sq_sddmm_accumulate_: col_indices must be 1-D, got shape ", col.sizes());
  check_bias_out("sq_sddmm_accumulate_", out, bias_out);
}

}  // namespace mackay
