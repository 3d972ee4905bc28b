// CPU kernel of mackay_ext::sq_gemm_accumulate_: out[o, i] += scale * sum_n a[n, o]^2 b[n, i]^2,
// the exact empirical Fisher of a Linear layer from its inputs b = x and output gradients a =
// delta. Squares are formed on load, per register block; nothing the size of a or b is
// materialised. Register blocks of kRows x (kVecs vectors) of `out`, row blocks in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

constexpr int64_t kRows = 4;
constexpr int64_t kVecs = 2;

template <typename scalar_t>
void sq_gemm_block(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n_rows,
                   int64_t out_rows, int64_t out_cols, int64_t o0, int64_t rows, int64_t i0,
                   int64_t width, scalar_t scale) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[kRows][kVecs];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t u = 0; u < kVecs; ++u) acc[r][u] = Vec(scalar_t(0));
  for (int64_t n = 0; n < n_rows; ++n) {
    const scalar_t* brow = b + n * out_cols + i0;
    Vec bsq[kVecs];
    for (int64_t u = 0; u < kVecs; ++u) {
      const int64_t count = std::min<int64_t>(V, width - u * V);
      const Vec bv = count > 0 ? Vec::loadu(brow + u * V, count) : Vec(scalar_t(0));
      bsq[u] = bv * bv;
    }
    const scalar_t* arow = a + n * out_rows + o0;
    for (int64_t r = 0; r < rows; ++r) {
      const Vec asq(arow[r] * arow[r]);
      for (int64_t u = 0; u < kVecs; ++u) acc[r][u] = at::vec::fmadd(asq, bsq[u], acc[r][u]);
    }
  }
  const Vec vscale(scale);
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* orow = out + (o0 + r) * out_cols + i0;
    for (int64_t u = 0; u < kVecs; ++u) {
      const int64_t count = std::min<int64_t>(V, width - u * V);
      if (count <= 0) break;
      const Vec current = Vec::loadu(orow + u * V, count);
      at::vec::fmadd(vscale, acc[r][u], current).store(orow + u * V, count);
    }
  }
}

void sq_gemm_accumulate_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  check_sq_gemm_args(out, a, b);
  if (a.size(0) == 0 || out.numel() == 0) return;
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  const int64_t n_rows = a.size(0), out_rows = out.size(0), out_cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cpu", [&] {
    constexpr int64_t kCols = kVecs * at::vec::Vectorized<scalar_t>::size();
    const int64_t row_blocks = (out_rows + kRows - 1) / kRows;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, row_blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t block = lo; block < hi; ++block) {
        const int64_t o0 = block * kRows, rows = std::min(kRows, out_rows - o0);
        for (int64_t i0 = 0; i0 < out_cols; i0 += kCols) {
          sq_gemm_block<scalar_t>(a_c.const_data_ptr<scalar_t>(), b_c.const_data_ptr<scalar_t>(),
                                  out_p, n_rows, out_rows, out_cols, o0, rows, i0,
                                  std::min(kCols, out_cols - i0), static_cast<scalar_t>(scale));
        }
      }
    });
  });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("sq_gemm_accumulate_", &mackay::sq_gemm_accumulate_cpu);
}
