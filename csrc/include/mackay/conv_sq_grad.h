#pragma once
// conv_sq_grad_accumulate_: out += scale * sum_n G_n^2, G_n the per-example weight gradient of a
// Conv2d (docs/mathematics.md section 1, ef-exact): G_n[o, (c, i, j)] = sum_p grad_output[n, o, p] *
// input[n, g(o) * C/groups + c, p * stride + (i, j) * dilation - padding]. input [N, C, H, W],
// grad_output [N, O, H', W'], out [O, C/groups * kh * kw] (the weight's shape, flattened).
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace mackay {

inline void check_conv_sq_grad_args(const at::Tensor& out, const at::Tensor& input,
                                    const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "conv_sq_grad_accumulate_: ";
  TORCH_CHECK(input.dim() == 4 && grad_output.dim() == 4, op, "input and grad_output must be 4-D "
              "(N, C, H, W), got ", input.sizes(), " and ", grad_output.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              op, "kernel_size, stride, padding and dilation must have 2 entries each, got ", kernel_size,
              ", ", stride, ", ", padding, ", ", dilation);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(kernel_size[d] >= 1 && stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, op,
                "kernel_size, stride and dilation must be >= 1 and padding >= 0, got ", kernel_size,
                ", ", stride, ", ", dilation, ", ", padding);
  }
  TORCH_CHECK(groups >= 1, op, "groups must be >= 1, got ", groups);
  TORCH_CHECK(input.size(0) == grad_output.size(0), op, "input and grad_output must have one entry "
              "per example, got ", input.size(0), " and ", grad_output.size(0));
  TORCH_CHECK(input.size(1) % groups == 0 && grad_output.size(1) % groups == 0, op, "input channels (",
              input.size(1), ") and output channels (", grad_output.size(1), ") must divide by groups (",
              groups, ")");
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = input.size(2 + d) + 2 * padding[d] - dilation[d] * (kernel_size[d] - 1) - 1;
    const int64_t expected = extent < 0 ? 0 : extent / stride[d] + 1;
    TORCH_CHECK(grad_output.size(2 + d) == expected, op, "grad_output's spatial size ",
                grad_output.sizes().slice(2), " does not fit the convolution of input ",
                input.sizes().slice(2), " (expected ", expected, " along dimension ", 2 + d, ")");
  }
  const int64_t row = input.size(1) / groups * kernel_size[0] * kernel_size[1];
  TORCH_CHECK(out.dim() == 2 && out.size(0) == grad_output.size(1) && out.size(1) == row, op,
              "out must have shape (out_channels, in_channels / groups * kh * kw) = (",
              grad_output.size(1), ", ", row, "), got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, op,
                   "out must be float32 or float64, got ", out.scalar_type());
  TORCH_CHECK_TYPE(input.scalar_type() == out.scalar_type() && grad_output.scalar_type() == out.scalar_type(),
                   op, "input and grad_output must have out's dtype ", out.scalar_type(), ", got ",
                   input.scalar_type(), " and ", grad_output.scalar_type());
  TORCH_CHECK(input.device() == out.device() && grad_output.device() == out.device(), op, "out, input "
              "and grad_output must be on one device, got ", out.device(), ", ", input.device(), ", ",
              grad_output.device());
  TORCH_CHECK(out.is_contiguous(), op, "out must be contiguous (it is accumulated in place)");
}

inline void check_conv_grad_sum(const at::Tensor& grad_sum, const at::Tensor& out) {
  constexpr const char* op = "conv_sq_grad_accumulate_: ";
  TORCH_CHECK(grad_sum.sizes() == out.sizes(), op, "grad_sum must have out's shape ", out.sizes(),
              ", got ", grad_sum.sizes());
  TORCH_CHECK_TYPE(grad_sum.scalar_type() == out.scalar_type(), op, "grad_sum must have out's dtype ",
                   out.scalar_type(), ", got ", grad_sum.scalar_type());
  TORCH_CHECK(grad_sum.device() == out.device(), op, "grad_sum must be on out's device ", out.device(),
              ", got ", grad_sum.device());
  TORCH_CHECK(grad_sum.is_contiguous(), op, "grad_sum must be contiguous (it is accumulated in place)");
  TORCH_CHECK(!grad_sum.is_same(out), op, "grad_sum and out must be different tensors");
}

}  // namespace mackay
