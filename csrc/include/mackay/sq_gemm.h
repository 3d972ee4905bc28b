#pragma once
// sq_gemm_accumulate_: out += scale * (a * a)^T (b * b), the exact diagonal empirical Fisher of a
// Linear layer (DESIGN.md section 1, ef-exact): a = per-example output gradients [N, out],
// b = inputs [N, in], out = [out, in].
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mackay {

inline void check_sq_gemm_args(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2, "sq_gemm_accumulate_: out, a and b "
              "must be 2-D, got ", out.sizes(), ", ", a.sizes(), ", ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0), "sq_gemm_accumulate_: a and b must have one row per example, "
              "got ", a.size(0), " and ", b.size(0));
  TORCH_CHECK(out.size(0) == a.size(1) && out.size(1) == b.size(1), "sq_gemm_accumulate_: out must "
              "have shape (a.size(1), b.size(1)) = (", a.size(1), ", ", b.size(1), "), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
                   "sq_gemm_accumulate_: out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_TYPE(a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type(),
                   "sq_gemm_accumulate_: a and b must have out's dtype ", out.scalar_type(), ", got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == out.device() && b.device() == out.device(), "sq_gemm_accumulate_: out, a "
              "and b must be on one device, got ", out.device(), ", ", a.device(), ", ", b.device());
  TORCH_CHECK(out.is_contiguous(), "sq_gemm_accumulate_: out must be contiguous (it is accumulated in place)");
}

}  // namespace mackay
