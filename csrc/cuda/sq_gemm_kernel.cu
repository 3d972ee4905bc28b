// CUDA mackay_ext::sq_gemm_accumulate_: out += scale * (a*a)^T (b*b). As on the CPU (issue 17),
// the product goes to the GEMM torch uses (cuBLAS through at::addmm_) and this file only squares:
// kPanelRows examples at a time into scratch from the caching allocator, each panel pair added to
// out by one addmm_, so the scratch never holds more than kPanelRows examples of a^2 and b^2.
// A hand-tiled shared-memory kernel (32x32 tiles, no tensor cores) cannot reach cuBLAS on the
// large layers the op exists for. Up to kFusedMaxRows examples, though, the work is reading and
// writing out once, and two squaring launches plus cuBLAS on the squares cost more than that
// (H200: 15 us over addmm_ on squares prepared beforehand, for any layer size): there one kernel
// squares a and b on load and adds the products to out in the same pass (H200: 0.6-0.9x the
// time of addmm_ on the squares up to 16 examples, 0.6-1.05x at 32).
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mul.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "launchers.h"
#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

// Each addmm_ reads and writes out once: 2 * rows flops per 8 bytes of out (float32), so 1024 rows
// keep even a TF32 GEMM on an H100 (~400 TFLOP/s against ~3.3 TB/s) ahead of those passes, and
// each panel's two squaring launches and cuBLAS call are amortised over many examples (H200:
// 1.00-1.10x addmm_ on squares prepared beforehand, at 128 and 1024 examples).
constexpr int64_t kPanelRows = 1024;

constexpr int kFusedMaxRows = 32;
constexpr int kTileCols = 256;  // threads per block, one column of out each
constexpr int kTileRows = 32;   // rows of out per block
constexpr int kRowGroup = 4;    // rows of out each thread loads before it writes any
constexpr int64_t kMaxGridY = 65535;

// out[r, c] += scale * sum_n a[n, r]^2 b[n, c]^2 for n_rows <= kRows (the rows past n_rows count
// as zeros: kRows is a compile-time bound, so that b's squares stay in registers).
template <typename scalar_t, int kRows>
__global__ void __launch_bounds__(kTileCols)
sq_gemm_few_rows(scalar_t* __restrict__ out, const scalar_t* __restrict__ a,
                 const scalar_t* __restrict__ b, int n_rows, int64_t out_rows, int64_t out_cols,
                 int64_t a_stride0, int64_t a_stride1, int64_t b_stride0, int64_t b_stride1,
                 scalar_t scale) {
  __shared__ scalar_t a_sq[kRows][kTileRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kTileCols + threadIdx.x;
  for (int k = threadIdx.x; k < kRows * kTileRows; k += kTileCols) {
    const int n = k / kTileRows, r = k % kTileRows;
    const int64_t row = row0 + r;
    const scalar_t v = n < n_rows && row < out_rows ? a[n * a_stride0 + row * a_stride1] : scalar_t(0);
    a_sq[n][r] = v * v;
  }
  scalar_t b_sq[kRows];
#pragma unroll
  for (int n = 0; n < kRows; ++n) {
    const scalar_t v = n < n_rows && col < out_cols ? b[n * b_stride0 + col * b_stride1] : scalar_t(0);
    b_sq[n] = v * v;
  }
  __syncthreads();
  if (col >= out_cols) return;
  const int rows = static_cast<int>(out_rows - row0 < kTileRows ? out_rows - row0 : kTileRows);
  scalar_t* out_col = out + row0 * out_cols + col;
  for (int r0 = 0; r0 < rows; r0 += kRowGroup) {
    scalar_t acc[kRowGroup], old[kRowGroup];
#pragma unroll
    for (int g = 0; g < kRowGroup; ++g) old[g] = r0 + g < rows ? out_col[(r0 + g) * out_cols] : scalar_t(0);
#pragma unroll
    for (int g = 0; g < kRowGroup; ++g) {
      acc[g] = 0;
#pragma unroll
      for (int n = 0; n < kRows; ++n) acc[g] += a_sq[n][r0 + g] * b_sq[n];
    }
#pragma unroll
    for (int g = 0; g < kRowGroup; ++g)
      if (r0 + g < rows) out_col[(r0 + g) * out_cols] = old[g] + scale * acc[g];
  }
}

template <typename scalar_t, int kRows>
void launch_few_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  const int64_t out_rows = out.size(0), out_cols = out.size(1);
  const dim3 grid(static_cast<unsigned>((out_rows + kTileRows - 1) / kTileRows),
                  static_cast<unsigned>((out_cols + kTileCols - 1) / kTileCols));
  sq_gemm_few_rows<scalar_t, kRows><<<grid, kTileCols, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
      static_cast<int>(a.size(0)), out_rows, out_cols, a.stride(0), a.stride(1), b.stride(0),
      b.stride(1), static_cast<scalar_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The smallest compiled bound that holds n_rows: at most twice the arithmetic n_rows needs.
template <typename scalar_t>
void sq_gemm_few_rows_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  const int64_t n_rows = a.size(0);
  if (n_rows <= 1) return launch_few_rows<scalar_t, 1>(out, a, b, scale);
  if (n_rows <= 2) return launch_few_rows<scalar_t, 2>(out, a, b, scale);
  if (n_rows <= 4) return launch_few_rows<scalar_t, 4>(out, a, b, scale);
  if (n_rows <= 8) return launch_few_rows<scalar_t, 8>(out, a, b, scale);
  if (n_rows <= 16) return launch_few_rows<scalar_t, 16>(out, a, b, scale);
  return launch_few_rows<scalar_t, kFusedMaxRows>(out, a, b, scale);
}

}  // namespace

void sq_gemm_accumulate_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                             const std::optional<at::Tensor>& bias_out) {
  check_sq_gemm_args(out, a, b, bias_out);
  const int64_t n_rows = a.size(0), out_rows = out.size(0), out_cols = out.size(1);
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // Scratch, out and bias_out (declared mutated by the schema) only: nothing for autograd to record.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (bias_out.has_value()) {   // a reduction torch already does well; one launch for the layer's bias
    bias_out->add_(at::mul(a, a).sum(0), scale);
  }
  if (out.numel() == 0) return;
  if (n_rows <= kFusedMaxRows && (out_cols + kTileCols - 1) / kTileCols <= kMaxGridY &&
      (out_rows + kTileRows - 1) / kTileRows <= INT32_MAX) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cuda", [&] {
      sq_gemm_few_rows_cuda<scalar_t>(out, a, b, scale);
    });
    return;
  }
  const int64_t panel_rows = std::min(n_rows, kPanelRows);
  // a^2 is written as a is laid out ([rows, out]) into storage allocated as its transpose
  // [out, rows], strides (1, out): the A^T operand cuBLAS reads in place.
  const at::Tensor a_panel_t = at::empty_strided({out_rows, panel_rows}, {1, out_rows}, out.options());
  const at::Tensor b_panel = at::empty({panel_rows, out_cols}, out.options());
  for (int64_t n0 = 0; n0 < n_rows; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n_rows - n0);
    const at::Tensor a_sq_t = a_panel_t.narrow(1, 0, rows);
    at::Tensor a_sq = a_sq_t.t(), b_sq = b_panel.narrow(0, 0, rows);  // mul_out's outputs
    const at::Tensor a_rows = a.narrow(0, n0, rows), b_rows = b.narrow(0, n0, rows);
    at::mul_out(a_sq, a_rows, a_rows);  // any strides of a and b, read in place
    at::mul_out(b_sq, b_rows, b_rows);
    out.addmm_(a_sq_t, b_sq, /*beta=*/1, /*alpha=*/scale);
  }
}

}  // namespace mackay
