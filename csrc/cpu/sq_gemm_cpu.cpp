// CPU kernel of mackay_ext::sq_gemm_accumulate_: out[o, i] += scale * sum_n a[n, o]^2 b[n, i]^2,
// the exact empirical Fisher of a Linear layer from its inputs b = x and output gradients a =
// delta. Squares are formed on load: b's per register block, a's while packing a row block's
// panel (n x 6 values); nothing the size of a or b is materialised. Register blocks of kRows x (kVecs vectors) of `out`, row blocks in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

constexpr int64_t kRows = 6;   // 6 x 2 vector accumulators: 12 of AVX2's 16 registers
constexpr int64_t kVecs = 2;

// One kRows x (kVecs vectors) block of out, all bounds compile-time so the accumulators live in
// registers. kFull: the block's columns are all inside out (else `width` says how many are).
// a_sq: this row block's squared a, packed [n][kR] (asq below reads it with one broadcast).
template <typename scalar_t, int64_t kR, bool kFull>
void sq_gemm_block(const scalar_t* a_sq, const scalar_t* b, scalar_t* out, int64_t n_rows,
                   int64_t out_cols, int64_t o0, int64_t i0, int64_t width, scalar_t scale) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[kR][kVecs];
#pragma GCC unroll 8
  for (int64_t r = 0; r < kR; ++r)
#pragma GCC unroll 4
    for (int64_t u = 0; u < kVecs; ++u) acc[r][u] = Vec(scalar_t(0));
  const scalar_t* brow = b + i0;
  const scalar_t* arow = a_sq;
  for (int64_t n = 0; n < n_rows; ++n, brow += out_cols, arow += kR) {
    Vec bsq[kVecs];
#pragma GCC unroll 4
    for (int64_t u = 0; u < kVecs; ++u) {
      const Vec bv = kFull ? Vec::loadu(brow + u * V)
                           : Vec::loadu(brow + u * V, std::clamp<int64_t>(width - u * V, 0, V));
      bsq[u] = bv * bv;
    }
#pragma GCC unroll 8
    for (int64_t r = 0; r < kR; ++r) {
      const Vec asq(arow[r]);
#pragma GCC unroll 4
      for (int64_t u = 0; u < kVecs; ++u) acc[r][u] = at::vec::fmadd(asq, bsq[u], acc[r][u]);
    }
  }
  const Vec vscale(scale);
  for (int64_t r = 0; r < kR; ++r) {
    scalar_t* orow = out + (o0 + r) * out_cols + i0;
    for (int64_t u = 0; u < kVecs; ++u) {
      if (kFull) {
        at::vec::fmadd(vscale, acc[r][u], Vec::loadu(orow + u * V)).store(orow + u * V);
      } else {
        const int64_t count = std::clamp<int64_t>(width - u * V, 0, V);
        if (count == 0) break;
        at::vec::fmadd(vscale, acc[r][u], Vec::loadu(orow + u * V, count)).store(orow + u * V, count);
      }
    }
  }
}

template <typename scalar_t, int64_t kR>
void sq_gemm_row_block(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n_rows,
                       int64_t out_rows, int64_t out_cols, int64_t o0, scalar_t scale) {
  constexpr int64_t kCols = kVecs * at::vec::Vectorized<scalar_t>::size();
  // Pack this row block's a^2 once (n_rows x kR, a few KB), reused by every column block:
  // the GEMM's usual panel packing, squaring on the way.
  std::vector<scalar_t> a_sq(n_rows * kR);
  for (int64_t n = 0; n < n_rows; ++n) {
    for (int64_t r = 0; r < kR; ++r) {
      const scalar_t v = a[n * out_rows + o0 + r];
      a_sq[n * kR + r] = v * v;
    }
  }
  int64_t i0 = 0;
  for (; i0 + kCols <= out_cols; i0 += kCols) {
    sq_gemm_block<scalar_t, kR, true>(a_sq.data(), b, out, n_rows, out_cols, o0, i0, kCols, scale);
  }
  if (i0 < out_cols) {
    sq_gemm_block<scalar_t, kR, false>(a_sq.data(), b, out, n_rows, out_cols, o0, i0, out_cols - i0, scale);
  }
}

// Tail row blocks (fewer than kRows rows) with the row count as a template argument.
template <typename scalar_t, int64_t kR = kRows>
void sq_gemm_rows(int64_t rows, const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n_rows,
                  int64_t out_rows, int64_t out_cols, int64_t o0, scalar_t scale) {
  if constexpr (kR > 0) {
    if (rows == kR) {
      sq_gemm_row_block<scalar_t, kR>(a, b, out, n_rows, out_rows, out_cols, o0, scale);
    } else {
      sq_gemm_rows<scalar_t, kR - 1>(rows, a, b, out, n_rows, out_rows, out_cols, o0, scale);
    }
  }
}

void sq_gemm_accumulate_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  check_sq_gemm_args(out, a, b);
  if (a.size(0) == 0 || out.numel() == 0) return;
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  const int64_t n_rows = a.size(0), out_rows = out.size(0), out_cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cpu", [&] {
    const int64_t row_blocks = (out_rows + kRows - 1) / kRows;
    scalar_t* out_p = out.mutable_data_ptr<scalar_t>();
    const scalar_t* a_p = a_c.const_data_ptr<scalar_t>();
    const scalar_t* b_p = b_c.const_data_ptr<scalar_t>();
    at::parallel_for(0, row_blocks, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t block = lo; block < hi; ++block) {
        const int64_t o0 = block * kRows;
        sq_gemm_rows<scalar_t>(std::min(kRows, out_rows - o0), a_p, b_p, out_p, n_rows, out_rows,
                               out_cols, o0, static_cast<scalar_t>(scale));
      }
    });
  });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("sq_gemm_accumulate_", &mackay::sq_gemm_accumulate_cpu);
}
