// CPU kernel of mackay_ext::sq_gemm_accumulate_: out[o, i] += scale * sum_n a[n, o]^2 b[n, i]^2,
// the exact empirical Fisher of a Linear layer from its inputs b = x and output gradients a =
// delta. The register-blocked loop that was all of this kernel lost to MKL's GEMM by up to 7x on
// large layers (issue 17), so from a few examples on the product is left to the GEMM torch uses
// (at::addmm_) and this file only squares: kPanelRows examples at a time into scratch panels,
// each panel pair added to out by one addmm_. The scratch holds at most kPanelRows examples of a^2
// and b^2 (per thread: all of a's columns, the thread's share of b's), never whole squared copies
// of a larger batch. Batches of a few examples, where MKL is slow, keep the blocked loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "mackay/sq_gemm.h"
#include "sq_gemm_register_blocked.h"

namespace mackay {
namespace {

// Examples per panel. Each addmm_ reads and writes its block of out once, so a panel must be deep
// enough for that pass to be small next to the panel's 2 * out.numel() * rows flops. A sweep of
// 64-512 rows at batch 1024 (2-core EPYC, busy machine): 128-512 within noise of each other on
// 300x784, 1024x1024 and 4096x4096, 1 thread and 2; 64 lost with 2 threads (300x784: 0.99x the
// fallback's time against 0.55x). 256 rather than 128 halves the passes over an out that does
// not fit a cache (4096x11008: 180 MB), for twice the scratch (there 15 MB instead of 8).
constexpr int64_t kPanelRows = 256;
// Threads get whole blocks of this many of out's columns (a cache line of float32).
constexpr int64_t kColumnBlock = 16;
// Less work than this (multiply-adds) per thread and the call stays on one thread: a fork costs
// microseconds, more than a small layer's whole product.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 20;

// Batches of at most this many examples may take the register-blocked pass
// (sq_gemm_register_blocked.h), on an out of more than kSmallBatchGemmMaxBytes: there MKL's GEMM
// with k = 2..8 was 1.3x-4x slower than the blocked pass (1024x1024 to 4096x11008, 1 thread),
// with k = 16 1.1x-1.5x faster. While out fits a core's L2 cache MKL wins from k = 2 on
// (300x784, 8 examples: the blocked pass took 1.18x its time).
constexpr int64_t kRegisterBlockedMaxRows = 8;
constexpr int64_t kSmallBatchGemmMaxBytes = int64_t(1) << 20;
// A single example is a rank-one update, which MKL does well while out is in cache (the blocked
// pass took 1.5x its time at 1024x1024 and 2048x2048) and badly once out is not (0.57x-0.69x at
// 4096x4096 and 4096x11008): the blocked pass takes it above this size of out, the last-level
// cache of the machine measured.
constexpr int64_t kRankOneGemmMaxBytes = int64_t(32) << 20;

bool use_register_blocked(int64_t n_rows, const at::Tensor& out) {
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  return n_rows <= kRegisterBlockedMaxRows &&
         bytes > (n_rows == 1 ? kRankOneGemmMaxBytes : kSmallBatchGemmMaxBytes);
}

// panel[r, c] = src[r, c0 + c]^2 for r < rows, c < cols; panel is contiguous [rows, cols], src any
// strides (a transposed or sliced a or b is read in place, never copied whole).
template <typename scalar_t>
void square_panel(const at::Tensor& src, int64_t n0, int64_t rows, int64_t c0, int64_t cols,
                  scalar_t* panel) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t row_stride = src.stride(0), col_stride = src.stride(1);
  const scalar_t* base = src.const_data_ptr<scalar_t>() + n0 * row_stride + c0 * col_stride;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = base + r * row_stride;
    scalar_t* dst = panel + r * cols;
    if (col_stride == 1) {
      at::vec::map([](Vec v) { return v * v; }, dst, in, cols);
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        const scalar_t v = in[c * col_stride];
        dst[c] = v * v;
      }
    }
  }
}

// out[:, c0:c1] += scale * (a*a)^T (b[:, c0:c1]*b[:, c0:c1]), one thread, kPanelRows examples a
// time. out is a view the GEMM writes in place (row-major, or transposed: see below).
template <typename scalar_t>
void accumulate_columns(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t c0,
                        int64_t c1, double scale) {
  const int64_t n_rows = a.size(0), out_rows = out.size(0), width = c1 - c0;
  const int64_t panel_rows = std::min(n_rows, kPanelRows);
  // a^2 is written row by row ([rows, out], as a is laid out) but allocated as its transpose
  // [out, rows] with strides (1, out): the A^T operand the GEMM reads in place, no t() needed.
  const at::Tensor a_panel_t = at::empty_strided({out_rows, panel_rows}, {1, out_rows}, out.options());
  const at::Tensor b_panel = at::empty({panel_rows, width}, out.options());
  const at::Tensor out_block = out.narrow(1, c0, width);
  for (int64_t n0 = 0; n0 < n_rows; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, n_rows - n0);
    square_panel<scalar_t>(a, n0, rows, 0, out_rows, a_panel_t.mutable_data_ptr<scalar_t>());
    square_panel<scalar_t>(b, n0, rows, c0, width, b_panel.mutable_data_ptr<scalar_t>());
    // The call torch's fallback makes, on one panel of the batch and this thread's columns.
    if (rows == panel_rows) {
      out_block.addmm_(a_panel_t, b_panel, /*beta=*/1, /*alpha=*/scale);
    } else {
      out_block.addmm_(a_panel_t.narrow(1, 0, rows), b_panel.narrow(0, 0, rows), /*beta=*/1, /*alpha=*/scale);
    }
  }
}

// bias[o] += scale * sum_n a[n, o]^2: the bias's share, one more pass over a (a layer's output
// gradients: the three small torch ops this replaces cost about 20 us a layer, the pass far
// less). Summed kPanelRows examples at a time, then the panels' sums, so that rounding grows with
// the number of panels, not of examples.
template <typename scalar_t>
void add_column_squares(scalar_t* bias, const at::Tensor& a, double scale) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const int64_t n_rows = a.size(0), cols = a.size(1), row_stride = a.stride(0), col_stride = a.stride(1);
  const scalar_t* a_p = a.const_data_ptr<scalar_t>();
  std::vector<scalar_t> sums(cols, scalar_t(0)), panel(cols);
  for (int64_t n0 = 0; n0 < n_rows; n0 += kPanelRows) {
    std::fill(panel.begin(), panel.end(), scalar_t(0));
    for (int64_t n = n0; n < std::min(n_rows, n0 + kPanelRows); ++n) {
      const scalar_t* row = a_p + n * row_stride;
      if (col_stride == 1) {
        at::vec::map2([](Vec acc, Vec v) { return acc + v * v; }, panel.data(), panel.data(), row, cols);
      } else {
        for (int64_t c = 0; c < cols; ++c) panel[c] += row[c * col_stride] * row[c * col_stride];
      }
    }
    for (int64_t c = 0; c < cols; ++c) sums[c] += panel[c];
  }
  const auto s = static_cast<scalar_t>(scale);
  for (int64_t c = 0; c < cols; ++c) bias[c] += s * sums[c];
}

void sq_gemm_accumulate_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale,
                            const std::optional<at::Tensor>& bias_out) {
  check_sq_gemm_args(out, a, b, bias_out);
  if (a.size(0) == 0) return;
  if (bias_out.has_value()) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cpu_bias", [&] {
      add_column_squares<scalar_t>(bias_out->mutable_data_ptr<scalar_t>(), a, scale);
    });
  }
  if (out.numel() == 0) return;
  // The ops below work on scratch and on out, which the schema already declares mutated: nothing
  // for autograd to record, and skipping its keys saves microseconds on small layers.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (use_register_blocked(a.size(0), out)) {
    const at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cpu", [&] {
      register_blocked::sq_gemm<scalar_t>(out.mutable_data_ptr<scalar_t>(), a_c.const_data_ptr<scalar_t>(),
                                          b_c.const_data_ptr<scalar_t>(), a.size(0), out.size(0),
                                          out.size(1), static_cast<scalar_t>(scale));
    });
    return;
  }
  // Threads split out's longer side, each squaring its own slice of that operand and all of the
  // other (the shorter side, so the duplicated squaring is the cheaper one). One parallel region
  // per call: a region per panel (squares, then a threaded GEMM) made 2 threads up to 4x slower
  // than 1 on a loaded 2-core machine, each barrier waiting for a descheduled thread. out^T =
  // (b*b)^T (a*a) puts the longer side in the columns; out.t() is a view the GEMM writes in place.
  const bool transpose = out.size(0) > out.size(1);
  const at::Tensor out_view = transpose ? out.t() : out;
  const at::Tensor& lhs = transpose ? b : a;
  const at::Tensor& rhs = transpose ? a : b;
  const int64_t cols = out_view.size(1);
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  const int64_t macs_per_block = lhs.size(0) * out_view.size(0) * kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / macs_per_block);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cpu", [&] {
    at::parallel_for(0, blocks, grain, [&](int64_t lo, int64_t hi) {
      accumulate_columns<scalar_t>(out_view, lhs, rhs, lo * kColumnBlock,
                                   std::min(hi * kColumnBlock, cols), scale);
    });
  });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("sq_gemm_accumulate_", &mackay::sq_gemm_accumulate_cpu);
}
