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
#include <optional>
#include <vector>

#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

// Transposes run over blocks of kBlock x kBlock, which keep both sides in cache.
constexpr int64_t kBlock = 16;
// Below this many multiply-adds a stage stays on the calling thread: waking the pool costs more
// than the work (the CSR kernels draw the same line, csr_cpu.cpp).
constexpr int64_t kSerialWork = 32768;

// dst[c - c0, r] = src[r, c]^2 for c in [c0, c1), every row r: dst is [c1 - c0, rows] row-major,
// src [rows, cols] with any strides.
template <typename scalar_t>
void square_transpose_columns(const scalar_t* src, int64_t rows, int64_t s0, int64_t s1, int64_t c0, int64_t c1,
                              scalar_t* dst) {
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
        std::vector<scalar_t> b_sq_t((c1 - c0) * examples);
        square_transpose_columns(b_p, examples, b.stride(0), b.stride(1), c0, c1, b_sq_t.data());
        for (int64_t o = 0; o < rows; ++o) {
          const scalar_t* a_row = a_sq_p + o * examples;
          scalar_t* out_row = op + o * in;
          for (int64_t k = crow_p[j * rows + o]; k < crow_p[j * rows + o + 1]; ++k) {
            const int64_t c = col_p[k];
            out_row[c] += s * at::vec::map2_reduce_all<scalar_t>(
                [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; },
                a_row, b_sq_t.data() + (c - c0) * examples, examples);
          }
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
