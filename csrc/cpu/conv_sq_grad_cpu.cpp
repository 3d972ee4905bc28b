// CPU kernel of mackay_ext::conv_sq_grad_accumulate_: the exact empirical Fisher of a Conv2d,
// out += scale * sum_n G_n^2 with G_n = grad_output_n unfold(input_n)^T per group (issue 17).
// The route it replaces formed every example's G_n at once (a [N, O, C k] tensor: 13 MB for
// LeNet-5's conv2 at batch 128, 69 MB for all of ResNet-20's convs at 64), wrote it to fresh
// memory, then read it back to square and sum: in a training step that traffic and its page
// faults cost twice the products themselves. Here each thread takes a share of the examples and
// keeps one example's columns and product in buffers that stay in its cache, squaring each
// product into its own running sum as soon as it is made; the products are the GEMM torch uses.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "mackay/conv_sq_grad.h"

namespace mackay {
namespace {

struct Geometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Where a (c, i, j) row's input column ow + shift lies inside [0, width): ow in [first, last).
struct ValidColumns {
  int64_t first, last;
};

ValidColumns valid_columns(int64_t j, int64_t width, int64_t out_w, const Geometry& g) {
  const int64_t shift = j * g.dw - g.pw;
  const int64_t first = shift >= 0 ? 0 : (-shift + g.sw - 1) / g.sw;
  const int64_t last = width - 1 - shift < 0 ? 0 : std::min(out_w, (width - 1 - shift) / g.sw + 1);
  return {first, std::max(first, last)};
}

// Stride 1 and an output as wide as the input (a "same" convolution: ResNet's 3x3 convs, any 1x1,
// a Linear over positions seen as a kernel-1 conv): a row's valid part is one span of the channel,
// shifted, so it is one copy, and only the columns the shift wrapped around are zeroed after. Row
// by row this took up to 4,608 copies of 8 floats an example (64 channels at 8x8): the unfold cost
// 36% of the kernel's GEMMs there.
template <typename scalar_t>
void unfold_same_width_row(const scalar_t* channel, int64_t height, int64_t width, int64_t out_h, int64_t i,
                           const ValidColumns& cols_ok, int64_t shift, const Geometry& g, scalar_t* row) {
  const int64_t shift_h = i * g.dh - g.ph;   // the output row oh reads input row oh + shift_h
  const int64_t oh_first = std::clamp<int64_t>(-shift_h, 0, out_h);
  const int64_t oh_last = std::clamp<int64_t>(height - shift_h, oh_first, out_h);
  if (oh_first == oh_last || cols_ok.first == cols_ok.last) {
    std::fill(row, row + out_h * width, scalar_t(0));
    return;
  }
  std::fill(row, row + oh_first * width, scalar_t(0));
  // from (oh_first, first) to (oh_last - 1, last - 1): its source starts and ends inside the channel
  const int64_t begin = oh_first * width + cols_ok.first, end = (oh_last - 1) * width + cols_ok.last;
  std::memcpy(row + begin, channel + begin + shift_h * width + shift, (end - begin) * sizeof(scalar_t));
  for (int64_t oh = oh_first; oh < oh_last; ++oh) {
    scalar_t* dst = row + oh * width;
    for (int64_t ow = 0; ow < cols_ok.first; ++ow) dst[ow] = scalar_t(0);
    for (int64_t ow = cols_ok.last; ow < width; ++ow) dst[ow] = scalar_t(0);
  }
  std::fill(row + oh_last * width, row + out_h * width, scalar_t(0));
}

// cols[(c, i, j), p] = input[c, oh * sh + i * dh - ph, ow * sw + j * dw - pw] (0 outside), one
// example's channels of one group: plane [channels, height, width] -> cols [channels kh kw, OH OW].
template <typename scalar_t>
void unfold_example(const scalar_t* plane, int64_t channels, int64_t height, int64_t width,
                    int64_t out_h, int64_t out_w, const Geometry& g, scalar_t* cols) {
  const bool same_width = g.sh == 1 && g.sw == 1 && out_w == width;
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* channel = plane + c * height * width;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        scalar_t* row = cols + ((c * g.kh + i) * g.kw + j) * out_h * out_w;
        const ValidColumns cols_ok = valid_columns(j, width, out_w, g);
        const int64_t shift = j * g.dw - g.pw, first = cols_ok.first, last = cols_ok.last;
        if (same_width) {
          unfold_same_width_row(channel, height, width, out_h, i, cols_ok, shift, g, row);
          continue;
        }
        for (int64_t oh = 0; oh < out_h; ++oh) {
          scalar_t* dst = row + oh * out_w;
          const int64_t ih = oh * g.sh + i * g.dh - g.ph;
          if (ih < 0 || ih >= height || first >= last) {
            std::fill(dst, dst + out_w, scalar_t(0));
            continue;
          }
          const scalar_t* src = channel + ih * width + shift;
          std::fill(dst, dst + first, scalar_t(0));
          if (g.sw == 1) {
            std::memcpy(dst + first, src + first, (last - first) * sizeof(scalar_t));
          } else {
            for (int64_t ow = first; ow < last; ++ow) dst[ow] = src[ow * g.sw];
          }
          std::fill(dst + last, dst + out_w, scalar_t(0));
        }
      }
    }
  }
}

// sum[k] += product[k]^2 for k < n; and plain[k] += product[k] with kPlain (the batch's weight
// gradient; a template flag, so the loop without it carries no test)
template <bool kPlain, typename scalar_t>
void add_squares(scalar_t* sum, scalar_t* plain, const scalar_t* product, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  int64_t k = 0;
  for (; k + Vec::size() <= n; k += Vec::size()) {
    const Vec p = Vec::loadu(product + k);
    at::vec::fmadd(p, p, Vec::loadu(sum + k)).store(sum + k);
    if constexpr (kPlain) (Vec::loadu(plain + k) + p).store(plain + k);
  }
  for (; k < n; ++k) {
    sum[k] += product[k] * product[k];
    if constexpr (kPlain) plain[k] += product[k];
  }
}

template <typename scalar_t>
void accumulate(at::Tensor& out, const at::Tensor& input, const at::Tensor& grad_output,
                const Geometry& g, int64_t groups, double scale, at::Tensor* grad_sum) {
  const int64_t examples = input.size(0), channels = input.size(1), height = input.size(2),
                width = input.size(3);
  const int64_t out_channels = grad_output.size(1), out_h = grad_output.size(2), out_w = grad_output.size(3);
  const int64_t positions = out_h * out_w, group_in = channels / groups, group_out = out_channels / groups;
  const int64_t row = group_in * g.kh * g.kw;
  // One running sum per share of the examples, fixed in number and split (not per thread as
  // scheduled), so the result does not depend on which thread ran which share.
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), examples);
  const at::Tensor sums = at::zeros({shares, out_channels, row}, out.options());
  const at::Tensor grad_sums = grad_sum != nullptr ? at::zeros_like(sums) : at::Tensor();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  at::parallel_for(0, shares, 1, [&](int64_t share_lo, int64_t share_hi) {
    // dispatch guards are per thread: the workers' views and GEMMs skip autograd too
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor cols = at::empty({row, positions}, out.options());
    at::Tensor product = at::empty({group_out, row}, out.options());
    for (int64_t share = share_lo; share < share_hi; ++share) {
      scalar_t* sum = sums[share].mutable_data_ptr<scalar_t>();
      scalar_t* plain = grad_sum != nullptr ? grad_sums[share].mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t n = examples * share / shares; n < examples * (share + 1) / shares; ++n) {
        for (int64_t group = 0; group < groups; ++group) {
          unfold_example<scalar_t>(x + (n * channels + group * group_in) * height * width, group_in,
                                   height, width, out_h, out_w, g, cols.mutable_data_ptr<scalar_t>());
          // Inside a parallel region the GEMM runs on this thread alone.
          const at::Tensor delta_n = grad_output[n].view({out_channels, positions}).narrow(0, group * group_out, group_out);
          at::mm_out(product, delta_n, cols.t());
          const int64_t offset = group * group_out * row;
          if (plain != nullptr) {
            add_squares<true>(sum + offset, plain + offset, product.const_data_ptr<scalar_t>(), group_out * row);
          } else {
            add_squares<false>(sum + offset, plain, product.const_data_ptr<scalar_t>(), group_out * row);
          }
        }
      }
    }
  });
  out.add_(sums.sum(0), scale);
  if (grad_sum != nullptr) grad_sum->add_(grad_sums.sum(0));
}

void conv_sq_grad_accumulate_cpu(at::Tensor& out, const at::Tensor& input, const at::Tensor& grad_output,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, double scale,
                                 const std::optional<at::Tensor>& grad_sum) {
  check_conv_sq_grad_args(out, input, grad_output, kernel_size, stride, padding, dilation, groups);
  if (grad_sum.has_value()) check_conv_grad_sum(*grad_sum, out);
  if (input.size(0) == 0 || out.numel() == 0 || grad_output.numel() == 0) return;
  // scratch and out only, which the schema already declares mutated: nothing for autograd
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Geometry g{kernel_size[0], kernel_size[1], stride[0], stride[1],
                   padding[0], padding[1], dilation[0], dilation[1]};
  const at::Tensor x = input.contiguous(), delta = grad_output.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "conv_sq_grad_accumulate_cpu", [&] {
    at::Tensor sum_of_grads = grad_sum.has_value() ? *grad_sum : at::Tensor();
    accumulate<scalar_t>(out, x, delta, g, groups, scale, grad_sum.has_value() ? &sum_of_grads : nullptr);
  });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("conv_sq_grad_accumulate_", &mackay::conv_sq_grad_accumulate_cpu);
}
