// CPU kernel of mackay_ext::sq_sddmm_accumulate_: out[o, c] += scale * sum_n a[n, o]^2 b[n, c]^2
// at the nonzeros (o, c) of a pattern only. It is the exact empirical Fisher of a Linear layer
// restricted to the weights a pruner still keeps: a pruned weight's curvature is never read again,
// and once most weights are pruned the dense product (sq_gemm_cpu.cpp) spends most of its work on
// them. Both operands are squared and transposed ([out, N] and [in, N], N = examples), so each
// nonzero is one contiguous, vectorised dot product over the examples.
// The pattern comes in column blocks (a CSR per block, see ops.cpp), and a task takes whole
// blocks: it squares its own columns of b into a scratch of its own, then walks its nonzeros row
// by row. Split by rows over one CSR, every task read columns of b that another thread had just
// written, from that thread's cache (2 threads took longer than 1); split by columns and walked
// column by column, the writes to out went down its rows, a cache line each (on a 1024x1024 layer
// at 20% kept, twice the dense product's time).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <type_traits>

#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

// Strided transposes run over blocks of kBlock x kBlock, which keep both sides in cache.
constexpr int64_t kBlock = 16;
// Contiguous rows are transposed in kTile x kTile tiles in registers (at::vec::transpose_mxn:
// AVX2 shuffles for float32, element by element otherwise).
constexpr int kTile = 8;
// Below this many multiply-adds a stage stays on the calling thread: waking the pool costs more
// than the work (the CSR kernels draw the same line, csr_cpu.cpp).
constexpr int64_t kSerialWork = 32768;

// dst[c - c0, r] = src[r, c]^2 for c in [c0, c1), every row r, src's rows contiguous. Column
// strips of two tiles (a 64-byte cache line of float32) down all the rows: each row's line of src
// is read whole once, and each line of dst is written whole while it is still in L1 (rows first
// and strips inside, every store went to a line already evicted: 2x slower). Squared per strip,
// while it is in L1.
template <typename scalar_t>
void square_transpose_contiguous_rows(const scalar_t* src, int64_t rows, int64_t s0, int64_t c0, int64_t c1,
                                      scalar_t* dst) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kStrip = 2 * kTile;
  for (int64_t c = c0; c < c1; c += kStrip) {
    const int64_t width = std::min(kStrip, c1 - c);
    scalar_t* strip = dst + (c - c0) * rows;
    int64_t r0 = 0;
    for (; r0 + kTile <= rows; r0 += kTile) {
      int64_t t = 0;
      for (; t + kTile <= width; t += kTile) {
        at::vec::transpose_mxn<scalar_t, kTile, kTile>(src + r0 * s0 + c + t, s0, strip + t * rows + r0, rows);
      }
      for (; t < width; ++t) {
        for (int64_t r = r0; r < r0 + kTile; ++r) strip[t * rows + r] = src[r * s0 + c + t];
      }
    }
    for (int64_t t = 0; t < width; ++t) {
      for (int64_t r = r0; r < rows; ++r) strip[t * rows + r] = src[r * s0 + c + t];
    }
    at::vec::map([](Vec x) { return x * x; }, strip, strip, width * rows);
  }
}

// dst[c - c0, r] = src[r, c]^2 for c in [c0, c1), every row r: dst is [c1 - c0, rows] row-major,
// src [rows, cols] with any strides. Contiguous rows (what a Linear layer hands over) take the
// tiles: element by element, the two transposes were most of the kernel's time once few weights
// are kept (300x784 at batch 128 and 2% kept: 60 of 90 us on one thread; its fixed cost went from
// 69 to 37 us, with the uninitialised scratch below). Other strides go element by element.
template <typename scalar_t>
void square_transpose_columns(const scalar_t* src, int64_t rows, int64_t s0, int64_t s1, int64_t c0, int64_t c1,
                              scalar_t* dst) {
  if (s1 == 1) {
    square_transpose_contiguous_rows(src, rows, s0, c0, c1, dst);
    return;
  }
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t b1 = std::min(c1, b0 + kBlock);
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock);
      for (int64_t c = b0; c < b1; ++c) {
        scalar_t* dst_row = dst + (c - c0) * rows;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t v = src[r * s0 + c * s1];
          dst_row[r] = v * v;
        }
      }
    }
  }
}

// sums[k] = dot(a_row, cols[k]) over n entries for kCols columns at once. a_row's vector is
// loaded once for all of them and each column keeps a chain of fused multiply-adds of its own,
// where one dot product at a time (map2_reduce_all) waits on a single chain of separate
// multiplies and adds. A small gain: the columns come from L2, and on a CPU whose GEMM runs
// AVX-512 the sparse product still takes about the dense one's time at 10% kept (LeNet-300-100's
// 300x784 layer, batch 128, 2 threads: 0.247 -> 0.210 ms, the dense product 0.215 ms).
template <typename scalar_t, int kCols>
inline void dot_columns(const scalar_t* a_row, const scalar_t* const* cols, int64_t n, scalar_t* sums) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc[kCols];
  for (int k = 0; k < kCols; ++k) acc[k] = Vec(scalar_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec a = Vec::loadu(a_row + i);
    for (int k = 0; k < kCols; ++k) acc[k] = at::vec::fmadd(a, Vec::loadu(cols[k] + i), acc[k]);
  }
  for (int k = 0; k < kCols; ++k) {
    scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](Vec x, Vec y) { return x + y; }, acc[k]);
    for (int64_t t = i; t < n; ++t) sum += a_row[t] * cols[k][t];
    sums[k] = sum;
  }
}

// out_row[c] += s * dot(a_row, column c of b_sq_t) for the columns col[k0..k1) of one virtual
// row: eight at a time, then four, then one by one.
template <typename scalar_t, typename index_t>
inline void add_row_dots(const scalar_t* a_row, const scalar_t* b_sq_t, int64_t c0, int64_t n, const index_t* col,
                         int64_t k0, int64_t k1, scalar_t s, scalar_t* out_row) {
  const scalar_t* cols[8];
  scalar_t sums[8];
  int64_t k = k0;
  const auto group = [&](auto width) {
    constexpr int kWidth = decltype(width)::value;
    for (; k + kWidth <= k1; k += kWidth) {
      for (int j = 0; j < kWidth; ++j) cols[j] = b_sq_t + (col[k + j] - c0) * n;
      dot_columns<scalar_t, kWidth>(a_row, cols, n, sums);
      for (int j = 0; j < kWidth; ++j) out_row[col[k + j]] += s * sums[j];
    }
  };
  group(std::integral_constant<int, 8>{});
  group(std::integral_constant<int, 4>{});
  group(std::integral_constant<int, 1>{});
}

// Why a pattern cannot be used, or nullptr. splits must run from 0 to in without decreasing;
// block_crow from 0 to nnz without decreasing; every column index must lie in its block.
template <typename index_t>
const char* malformed(const index_t* splits, int64_t blocks, const index_t* crow, const index_t* col, int64_t rows,
                      int64_t in, int64_t nnz) {
  if (splits[0] != 0 || splits[blocks] != in) return "col_splits must start at 0 and end at out.size(1)";
  for (int64_t j = 0; j < blocks; ++j) {
    if (splits[j] > splits[j + 1]) return "col_splits must be non-decreasing";
  }
  if (crow[0] != 0 || crow[blocks * rows] != nnz) return "block_crow must start at 0 and end at nnz";
  for (int64_t v = 0; v < blocks * rows; ++v) {   // all of it before any col_indices are read
    if (crow[v] > crow[v + 1]) return "block_crow must be non-decreasing";
  }
  for (int64_t j = 0; j < blocks; ++j) {
    for (int64_t o = 0; o < rows; ++o) {
      const int64_t v = j * rows + o;
      for (int64_t k = crow[v]; k < crow[v + 1]; ++k) {
        if (col[k] < splits[j] || col[k] >= splits[j + 1]) return "a col_index lies outside its column block";
      }
    }
  }
  return nullptr;
}

void sq_sddmm_accumulate_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& splits,
                             const at::Tensor& crow, const at::Tensor& col, double scale,
                             const std::optional<at::Tensor>& bias_out) {
  check_sq_sddmm_args(out, a, b, splits, crow, col, bias_out);
  const int64_t examples = a.size(0), rows = out.size(0), in = out.size(1), nnz = col.size(0);
  const int64_t blocks = splits.size(0) - 1;
  const at::Tensor splits_c = splits.contiguous(), crow_c = crow.contiguous(), col_c = col.contiguous();
  // checked before anything is added, so a malformed pattern leaves out as it was
  AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "sq_sddmm_accumulate_cpu_check", [&] {
    const char* problem = malformed(splits_c.const_data_ptr<index_t>(), blocks, crow_c.const_data_ptr<index_t>(),
                                    col_c.const_data_ptr<index_t>(), rows, in, nnz);
    TORCH_CHECK(problem == nullptr, "sq_sddmm_accumulate_: malformed pattern: ", problem, " (out is unchanged)");
  });
  const bool bias = bias_out.has_value();
  if (examples == 0 || (nnz == 0 && !bias)) return;
  // scratch and out only (out is declared mutated by the schema): nothing for autograd to record
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_sddmm_accumulate_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const auto s = static_cast<scalar_t>(scale);
    // a^2 transposed, [out, N]: every task reads all of it
    at::Tensor a_sq_t = at::empty({rows, examples}, out.options());
    const scalar_t* a_p = a.const_data_ptr<scalar_t>();
    scalar_t* a_sq_p = a_sq_t.mutable_data_ptr<scalar_t>();
    const int64_t a_blocks = (rows + kBlock - 1) / kBlock;
    at::parallel_for(0, a_blocks, std::max<int64_t>(1, kSerialWork / (examples * kBlock)), [&](int64_t lo, int64_t hi) {
      square_transpose_columns(a_p, examples, a.stride(0), a.stride(1), lo * kBlock, std::min(rows, hi * kBlock),
                               a_sq_p + lo * kBlock * examples);
    });
    if (bias) {   // a's squares are at hand: the bias's sums cost one pass over them
      scalar_t* bias_p = bias_out->mutable_data_ptr<scalar_t>();
      for (int64_t o = 0; o < rows; ++o) {
        bias_p[o] += s * at::vec::reduce_all<scalar_t>([](Vec x, Vec y) { return x + y; }, a_sq_p + o * examples,
                                                       examples);
      }
    }
    if (nnz == 0) return;
    const scalar_t* b_p = b.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "sq_sddmm_accumulate_cpu_index", [&] {
      const index_t* splits_p = splits_c.const_data_ptr<index_t>();
      const index_t* crow_p = crow_c.const_data_ptr<index_t>();
      const index_t* col_p = col_c.const_data_ptr<index_t>();
      const auto block = [&](int64_t j) {
        const int64_t c0 = splits_p[j], c1 = splits_p[j + 1];
        if (crow_p[j * rows] == crow_p[(j + 1) * rows]) return;   // no nonzero in the block
        // uninitialised: every entry is written before it is read (a std::vector's zeros cost a
        // third of the transpose's time)
        const std::unique_ptr<scalar_t[]> b_sq_t(new scalar_t[(c1 - c0) * examples]);
        square_transpose_columns(b_p, examples, b.stride(0), b.stride(1), c0, c1, b_sq_t.get());
        for (int64_t o = 0; o < rows; ++o) {
          add_row_dots(a_sq_p + o * examples, b_sq_t.get(), c0, examples, col_p, crow_p[j * rows + o],
                       crow_p[j * rows + o + 1], s, op + o * in);
        }
      };
      if (nnz * examples < kSerialWork || blocks == 1) {
        for (int64_t j = 0; j < blocks; ++j) block(j);
      } else {
        at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
          for (int64_t j = lo; j < hi; ++j) block(j);
        });
      }
    });
  });
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("sq_sddmm_accumulate_", &mackay::sq_sddmm_accumulate_cpu);
}
