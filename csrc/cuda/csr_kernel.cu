// CUDA kernels of the CSR ops. Small batches: a warp per row of W gathers x directly. Larger
// batches work on x^T ([in, B]): a warp takes one row of W and 32 batch columns, so its loads
// of x^T are coalesced; the row's (value, column) pairs are read 32 at a time and shared by
// shuffles. SDDMM: a warp per row, lanes over the batch. Malformed indices are skipped (the
// Python layer validates them once per layer), never read out of bounds. float16/bfloat16
// tensors are read and written as stored; products and sums run in opmath (float).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "block_reduce.cuh"
#include "launchers.h"
#include "mackay/csr.h"

namespace mackay {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int64_t kSmallBatch = 8;

template <typename index_t>
__device__ __forceinline__ bool row_range(const index_t* crow, int64_t row, int64_t nnz,
                                          int64_t& begin, int64_t& end) {
  begin = crow[row];
  end = crow[row + 1];
  return begin >= 0 && begin <= end && end <= nnz;
}

// y[b, o] for small B: warp per row o, lanes over the row's nonzeros.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
spmm_gather_kernel(const scalar_t* __restrict__ x, const index_t* __restrict__ crow,
                   const index_t* __restrict__ col, const scalar_t* __restrict__ values,
                   scalar_t* __restrict__ y, int64_t batch, int64_t in, int64_t out, int64_t nnz) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= out) return;
  int64_t begin, end;
  const bool ok = row_range(crow, row, nnz, begin, end);
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t b = 0; b < batch; ++b) {
    acc_t acc = 0;
    if (ok) {
      for (int64_t k = begin + lane; k < end; k += kWarpSize) {
        const int64_t c = col[k];
        if (c >= 0 && c < in) {
          acc += static_cast<acc_t>(values[k]) * static_cast<acc_t>(x[b * in + c]);
        }
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[b * out + row] = static_cast<scalar_t>(acc);
  }
}

// yT[o, b0 + lane] = sum_k values[k] xT[col[k], b0 + lane].
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
spmm_transposed_kernel(const scalar_t* __restrict__ xT, const index_t* __restrict__ crow,
                       const index_t* __restrict__ col, const scalar_t* __restrict__ values,
                       scalar_t* __restrict__ yT, int64_t batch, int64_t in, int64_t out,
                       int64_t nnz, int64_t tiles) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (warp >= out * tiles) return;
  const int64_t row = warp / tiles;
  const int64_t b = (warp % tiles) * kWarpSize + lane;
  int64_t begin, end;
  using acc_t = at::opmath_type<scalar_t>;
  acc_t acc = 0;
  if (row_range(crow, row, nnz, begin, end)) {
    for (int64_t k0 = begin; k0 < end; k0 += kWarpSize) {
      const int64_t mine = k0 + lane;
      const acc_t v = mine < end ? static_cast<acc_t>(values[mine]) : acc_t(0);
      const int64_t c = mine < end ? static_cast<int64_t>(col[mine]) : -1;
      const int count = end - k0 < kWarpSize ? static_cast<int>(end - k0) : kWarpSize;
      for (int j = 0; j < count; ++j) {
        const acc_t vj = __shfl_sync(0xffffffffu, v, j);
        const int64_t cj = __shfl_sync(0xffffffffu, c, j);
        if (b < batch && cj >= 0 && cj < in) acc += vj * static_cast<acc_t>(xT[cj * batch + b]);
      }
    }
  }
  if (b < batch) yT[row * batch + b] = static_cast<scalar_t>(acc);
}

// grad_values[k] = sum_b gT[row(k), b] xT[col(k), b]: warp per row, lanes over the batch.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
sddmm_kernel(const scalar_t* __restrict__ gT, const scalar_t* __restrict__ xT,
             const index_t* __restrict__ crow, const index_t* __restrict__ col,
             scalar_t* __restrict__ grad_values, int64_t batch, int64_t in, int64_t out, int64_t nnz) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row >= out) return;
  int64_t begin, end;
  if (!row_range(crow, row, nnz, begin, end)) return;
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = gT + row * batch;
  for (int64_t k = begin; k < end; ++k) {
    const int64_t c = col[k];
    if (c < 0 || c >= in) continue;
    const scalar_t* xr = xT + c * batch;
    acc_t acc = 0;
    for (int64_t b = lane; b < batch; b += kWarpSize) {
      acc += static_cast<acc_t>(g[b]) * static_cast<acc_t>(xr[b]);
    }
    acc = warp_sum(acc);
    if (lane == 0) grad_values[k] = static_cast<scalar_t>(acc);
  }
}

int64_t blocks_for(int64_t warps) { return (warps + kWarpsPerBlock - 1) / kWarpsPerBlock; }

}  // namespace

at::Tensor csr_matmul_cuda(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& values, int64_t in_features) {
  const at::Tensor x2d = check_csr_matmul_args("csr_matmul", x, crow, col, values, in_features);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x2d.size(0), out = crow.size(0) - 1, nnz = values.size(0);
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), values_c = values.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor y2d;
  const auto dtype = values.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "csr_matmul_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "csr_matmul_cuda_index", [&] {
      if (batch < kSmallBatch) {
        y2d = at::empty({batch, out}, x2d.options());
        if (out > 0 && batch > 0) {
          spmm_gather_kernel<<<blocks_for(out), kThreads, 0, stream>>>(
              x2d.const_data_ptr<scalar_t>(), crow_c.const_data_ptr<index_t>(),
              col_c.const_data_ptr<index_t>(), values_c.const_data_ptr<scalar_t>(),
              y2d.mutable_data_ptr<scalar_t>(), batch, in_features, out, nnz);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else {
        const at::Tensor xT = x2d.t().contiguous();
        at::Tensor yT = at::empty({out, batch}, x2d.options());
        const int64_t tiles = (batch + kWarpSize - 1) / kWarpSize;
        if (out > 0) {
          spmm_transposed_kernel<<<blocks_for(out * tiles), kThreads, 0, stream>>>(
              xT.const_data_ptr<scalar_t>(), crow_c.const_data_ptr<index_t>(),
              col_c.const_data_ptr<index_t>(), values_c.const_data_ptr<scalar_t>(),
              yT.mutable_data_ptr<scalar_t>(), batch, in_features, out, nnz, tiles);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        y2d = yT.t().contiguous();
      }
    });
  });
  return output_of_shape(y2d, csr_output_shape(x, out));
}

at::Tensor csr_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow,
                          const at::Tensor& col, int64_t in_features) {
  const auto [x2d, g2d] = check_csr_sddmm_args(grad_out, x, crow, col, in_features);
  const int64_t out = crow.size(0) - 1;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x2d.size(0), nnz = col.size(0);
  at::Tensor grad_values = at::zeros({nnz}, x.options());
  if (out == 0 || nnz == 0) return grad_values;
  const at::Tensor crow_c = crow.contiguous(), col_c = col.contiguous();
  const at::Tensor gT = g2d.t().contiguous(), xT = x2d.t().contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_sddmm_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(crow.scalar_type(), "csr_sddmm_cuda_index", [&] {
      sddmm_kernel<<<blocks_for(out), kThreads, 0, stream>>>(
          gT.const_data_ptr<scalar_t>(), xT.const_data_ptr<scalar_t>(),
          crow_c.const_data_ptr<index_t>(), col_c.const_data_ptr<index_t>(),
          grad_values.mutable_data_ptr<scalar_t>(), batch, in_features, out, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_values;
}

}  // namespace mackay
