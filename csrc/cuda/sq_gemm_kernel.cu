// CUDA mackay_ext::sq_gemm_accumulate_: out += scale * (a*a)^T (b*b). As on the CPU (issue 17),
// the product goes to the GEMM torch uses (cuBLAS through at::addmm_) and this file only squares:
// kPanelRows examples at a time into scratch from the caching allocator, each panel pair added to
// out by one addmm_, so the scratch never holds more than kPanelRows examples of a^2 and b^2.
// A hand-tiled shared-memory kernel (32x32 tiles, no tensor cores) cannot reach cuBLAS on the
// large layers the op exists for.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/mul.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "launchers.h"
#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

// Each addmm_ reads and writes out once: 2 * rows flops per 8 bytes of out (float32), so 1024 rows
// keep even a TF32 GEMM on an H100 (~400 TFLOP/s against ~3.3 TB/s) ahead of those passes, and
// each panel's two squaring launches and cuBLAS call are amortised over many examples. Not yet
// measured on a GPU (none was available when this was written).
constexpr int64_t kPanelRows = 1024;

}  // namespace

void sq_gemm_accumulate_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  check_sq_gemm_args(out, a, b);
  const int64_t n_rows = a.size(0), out_rows = out.size(0), out_cols = out.size(1);
  if (n_rows == 0 || out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  // Scratch and out (declared mutated by the schema) only: nothing for autograd to record.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
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
