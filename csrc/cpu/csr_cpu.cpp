// CPU kernels of the CSR ops. Rows of W are split into tasks of about equal nonzero count.
// Small batches gather x directly; larger ones work on batch tiles of x laid out [in, tile], so
// the inner loop runs over a contiguous stretch of the batch and vectorises (at::vec).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "mackay/csr.h"

namespace mackay {
namespace {

constexpr int64_t kSmallBatch = 8;  // below this, gather from x as it is

template <typename index_t>
std::vector<int64_t> balanced_row_splits(const index_t* crow, int64_t rows, int64_t nnz) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  std::vector<int64_t> splits{0};
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = nnz * p / parts;
    // crow may be malformed here (the kernels skip such rows); lower_bound just needs an order.
    int64_t row = std::lower_bound(crow, crow + rows + 1, static_cast<index_t>(target)) - crow;
    splits.push_back(std::clamp<int64_t>(std::max(row, splits.back()), 0, rows));
  }
  splits.push_back(rows);
  return splits;
}

// The nonzeros [begin, end) of a row, or an empty range when crow is malformed there.
template <typename index_t>
inline bool row_range(const index_t* crow, int64_t row, int64_t nnz, int64_t& begin, int64_t& end) {
  begin = crow[row];
  end = crow[row + 1];
  return begin >= 0 && begin <= end && end <= nnz;
}

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more
// than the work (a 1% 784x300 layer at batch 1 is ~2,400), the OpenMP wait worse when the
// machine is busy. ATen's GEMMs draw the same line (at::internal::GRAIN_SIZE).
constexpr int64_t kSerialWork = 32768;

template <typename Body>
void for_each_task(const std::vector<int64_t>& splits, int64_t work, const Body& body) {
  if (work < kSerialWork) {
    body(splits.front(), splits.back());
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(splits.size()) - 1, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) body(splits[t], splits[t + 1]);
  });
}

// A column index that is out of range is skipped (-1) and flags the call.
template <typename index_t>
inline int64_t safe_column(const index_t* col, int64_t k, int64_t in, std::atomic<bool>& bad) {
  const int64_t c = col[k];
  if (c >= 0 && c < in) return c;
  bad = true;
  return -1;
}

// y[b, o] = sum_k values[k] x[b, col[k]], x: [B, in] (B small).
template <typename scalar_t, typename index_t>
void spmm_gather(const scalar_t* x, const index_t* crow, const index_t* col, const scalar_t* values,
                 scalar_t* y, int64_t batch, int64_t in, int64_t out, int64_t nnz, std::atomic<bool>& bad) {
  for_each_task(balanced_row_splits(crow, out, nnz), nnz * batch, [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      int64_t begin, end;
      if (!row_range(crow, o, nnz, begin, end)) {
        bad = true;
        for (int64_t b = 0; b < batch; ++b) y[b * out + o] = 0;
        continue;
      }
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* xb = x + b * in;
        // four independent sums keep several gathers in flight
        scalar_t acc[4] = {0, 0, 0, 0};
        int64_t k = begin;
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<index_t, int32_t>) {
          // hardware gathers, 8 nonzeros a step; out-of-range columns read x[0] with weight 0
          using FVec = at::vec::Vectorized<float>;
          using IVec = at::vec::Vectorized<int32_t>;
          FVec vacc(0.0f);
          const IVec zero(0), limit(static_cast<int32_t>(in));
          for (; k + 8 <= end; k += 8) {
            const IVec c = IVec::loadu(col + k);
            const IVec ok = (c >= zero) & (c < limit);
            if (_mm256_movemask_ps(_mm256_castsi256_ps(ok)) != 0xff) bad = true;  // a lane out of range
            const IVec safe = IVec::blendv(zero, c, ok);
            const FVec v = FVec::blendv(FVec(0.0f), FVec::loadu(values + k),
                                        _mm256_castsi256_ps(ok));
            vacc = at::vec::fmadd(v, at::vec::gather<4>(xb, safe), vacc);
          }
          acc[0] = at::vec::vec_reduce_all([](FVec& p, FVec& q) { return p + q; }, vacc);
        }
#endif
        for (; k + 3 < end; k += 4) {
          for (int64_t u = 0; u < 4; ++u) {
            const int64_t c = safe_column(col, k + u, in, bad);
            acc[u] += c < 0 ? scalar_t(0) : values[k + u] * xb[c];
          }
        }
        for (; k < end; ++k) {
          const int64_t c = safe_column(col, k, in, bad);
          acc[0] += c < 0 ? scalar_t(0) : values[k] * xb[c];
        }
        y[b * out + o] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      }
    }
  });
}

// Batch tiles of kTileVecs vectors: the x tile of every input row ([in, tile], 512 KB for
// in = 4096 in float32) stays in a core's L2 while all rows of W stream past it.
constexpr int64_t kTileVecs = 4;

// yTiles[t, o, :] = sum_k values[k] xTiles[t, col[k], :] for every batch tile t.
// xTiles: [T, in, tile], yTiles: [T, out, tile], tile = kTileVecs * Vec::size().
template <typename scalar_t, typename index_t>
void spmm_tiled(const scalar_t* xTiles, const index_t* crow, const index_t* col,
                const scalar_t* values, scalar_t* yTiles, int64_t tiles, int64_t in, int64_t out,
                int64_t nnz, std::atomic<bool>& bad) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kTile = kTileVecs * V;
  const int64_t work = nnz * tiles * kTile;
  for_each_task(balanced_row_splits(crow, out, nnz), work, [&](int64_t r0, int64_t r1) {
    for (int64_t t = 0; t < tiles; ++t) {
      const scalar_t* xt = xTiles + t * in * kTile;
      scalar_t* yt = yTiles + t * out * kTile;
      for (int64_t o = r0; o < r1; ++o) {
        scalar_t* yr = yt + o * kTile;
        int64_t begin, end;
        if (!row_range(crow, o, nnz, begin, end)) {
          bad = true;
          std::fill(yr, yr + kTile, scalar_t(0));
          continue;
        }
        // two interleaved nonzeros: 2 x kTileVecs independent FMA chains hide the FMA latency
        Vec a[kTileVecs], b[kTileVecs];
        for (int64_t u = 0; u < kTileVecs; ++u) a[u] = b[u] = Vec(scalar_t(0));
        int64_t k = begin;
        for (; k + 1 < end; k += 2) {
          const int64_t c0 = safe_column(col, k, in, bad), c1 = safe_column(col, k + 1, in, bad);
          const Vec v0(c0 < 0 ? scalar_t(0) : values[k]), v1(c1 < 0 ? scalar_t(0) : values[k + 1]);
          const scalar_t* p0 = xt + std::max<int64_t>(c0, 0) * kTile;
          const scalar_t* p1 = xt + std::max<int64_t>(c1, 0) * kTile;
          for (int64_t u = 0; u < kTileVecs; ++u) {
            a[u] = at::vec::fmadd(v0, Vec::loadu(p0 + u * V), a[u]);
            b[u] = at::vec::fmadd(v1, Vec::loadu(p1 + u * V), b[u]);
          }
        }
        if (k < end) {
          const int64_t c = safe_column(col, k, in, bad);
          const Vec v(c < 0 ? scalar_t(0) : values[k]);
          const scalar_t* p = xt + std::max<int64_t>(c, 0) * kTile;
          for (int64_t u = 0; u < kTileVecs; ++u) a[u] = at::vec::fmadd(v, Vec::loadu(p + u * V), a[u]);
        }
        for (int64_t u = 0; u < kTileVecs; ++u) (a[u] + b[u]).store(yr + u * V);
      }
    }
  });
}

at::Tensor csr_matmul_cpu(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                          const at::Tensor& values, int64_t in_features) {
  const at::Tensor x2d = check_csr_matmul_args("csr_matmul", x, crow, col, values, in_features);
  if (at::isReducedFloatingType(values.scalar_type())) {
    // float16/bfloat16 storage, float products and sums (opmath, as ATen's CPU kernels do): the
    // tiled path copies x anyway, and the gather path's x is a few rows.
    return output_of_shape(
        csr_matmul_cpu(x2d.to(at::kFloat), crow, col, values.to(at::kFloat), in_features).to(values.scalar_type()),
        csr_output_shape(x, crow.size(0) - 1));
  }
  const int64_t batch = x2d.size(0), out = crow.size(0) - 1, nnz = values.size(0);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), values_c = values.contiguous();
  std::atomic<bool> bad{false};
  at::Tensor y2d;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_matmul_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "csr_matmul_cpu_index", [&] {
      if (batch < kSmallBatch) {
        y2d = at::empty({batch, out}, x2d.options());
        spmm_gather(x2d.const_data_ptr<scalar_t>(), crow_c.const_data_ptr<index_t>(),
                    col_c.const_data_ptr<index_t>(), values_c.const_data_ptr<scalar_t>(),
                    y2d.mutable_data_ptr<scalar_t>(), batch, in_features, out, nnz, bad);
      } else {
        // batch tiles: x as [T, in, tile] (zero-padded to whole tiles), y as [T, out, tile]
        constexpr int64_t kTile = kTileVecs * at::vec::Vectorized<scalar_t>::size();
        const int64_t tiles = (batch + kTile - 1) / kTile;
        at::Tensor padded = x2d;
        if (tiles * kTile != batch) {
          padded = at::zeros({tiles * kTile, in_features}, x2d.options());
          padded.narrow(0, 0, batch).copy_(x2d);
        }
        const at::Tensor xTiles = padded.view({tiles, kTile, in_features}).permute({0, 2, 1}).contiguous();
        at::Tensor yTiles = at::empty({tiles, out, kTile}, x2d.options());
        spmm_tiled(xTiles.const_data_ptr<scalar_t>(), crow_c.const_data_ptr<index_t>(),
                   col_c.const_data_ptr<index_t>(), values_c.const_data_ptr<scalar_t>(),
                   yTiles.mutable_data_ptr<scalar_t>(), tiles, in_features, out, nnz, bad);
        y2d = yTiles.permute({0, 2, 1}).reshape({tiles * kTile, out}).narrow(0, 0, batch).contiguous();
      }
    });
  });
  TORCH_CHECK(!bad, "csr_matmul: malformed CSR arrays (crow_indices not non-decreasing within "
              "[0, nnz], or a col_index outside [0, ", in_features, ")); the affected rows were "
              "not read");
  return output_of_shape(y2d, csr_output_shape(x, out));
}

// grad_values[k] = sum_b grad_out[b, row(k)] x[b, col[k]]: the gradient of W's stored values
// (SDDMM: grad_out^T x sampled at the nonzeros).
at::Tensor csr_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                         const at::Tensor& col, int64_t in_features) {
  const auto [x2d, g2d] = check_csr_sddmm_args(grad_out, x, crow, col, in_features);
  if (at::isReducedFloatingType(x.scalar_type())) {
    // opmath float sums over the batch (the transposes below copy both operands anyway)
    return csr_sddmm_cpu(g2d.to(at::kFloat), x2d.to(at::kFloat), crow, col, in_features)
        .to(x.scalar_type());
  }
  const int64_t out = crow.size(0) - 1;
  const int64_t batch = x2d.size(0), nnz = col.size(0);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  at::Tensor grad_values = at::zeros({nnz}, x.options());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_sddmm_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "csr_sddmm_cpu_index", [&] {
      using Vec = at::vec::Vectorized<scalar_t>;
      const index_t* crow_p = crow_c.const_data_ptr<index_t>();
      const index_t* col_p = col_c.const_data_ptr<index_t>();
      scalar_t* gv = grad_values.mutable_data_ptr<scalar_t>();
      const at::Tensor gT = g2d.t().contiguous(), xT = x2d.t().contiguous();
      const scalar_t* gT_p = gT.const_data_ptr<scalar_t>();
      const scalar_t* xT_p = xT.const_data_ptr<scalar_t>();
      for_each_task(balanced_row_splits(crow_p, out, nnz), nnz * batch, [&](int64_t r0, int64_t r1) {
        for (int64_t o = r0; o < r1; ++o) {
          int64_t begin, end;
          if (!row_range(crow_p, o, nnz, begin, end)) { bad = true; continue; }
          const scalar_t* gr = gT_p + o * batch;
          for (int64_t k = begin; k < end; ++k) {
            const int64_t c = col_p[k];
            if (c < 0 || c >= in_features) { bad = true; continue; }
            gv[k] = at::vec::map2_reduce_all<scalar_t>(
                [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; },
                gr, xT_p + c * batch, batch);
          }
        }
      });
    });
  });
  TORCH_CHECK(!bad, "csr_sddmm: malformed CSR arrays; the affected nonzeros were not read");
  return grad_values;
}

}  // namespace
}  // namespace mackay

TORCH_LIBRARY_IMPL(mackay_ext, CPU, m) {
  m.impl("csr_matmul", &mackay::csr_matmul_cpu);
  m.impl("csr_sddmm", &mackay::csr_sddmm_cpu);
}
