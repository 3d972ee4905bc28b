#pragma once
// Register-blocked out += scale * (a*a)^T (b*b) for contiguous a [n, out] and b [n, in]: the op's
// whole CPU kernel before issue 17, kept for batches of a few examples (sq_gemm_cpu.cpp says which),
// where its one pass over out, six rows at a time, beat MKL's GEMM with a small k by up to 4x;
// from 16 examples on, MKL wins. Squares are formed on load: b's per register block, a's while
// packing a row block's panel (n x 6 values).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

namespace mackay::register_blocked {

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


template <typename scalar_t>
void sq_gemm(scalar_t* out, const scalar_t* a, const scalar_t* b, int64_t n_rows, int64_t out_rows,
             int64_t out_cols, scalar_t scale) {
  const int64_t row_blocks = (out_rows + kRows - 1) / kRows;
  at::parallel_for(0, row_blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t block = lo; block < hi; ++block) {
      const int64_t o0 = block * kRows;
      sq_gemm_rows<scalar_t>(std::min(kRows, out_rows - o0), a, b, out, n_rows, out_rows, out_cols, o0, scale);
    }
  });
}

}  // namespace mackay::register_blocked
