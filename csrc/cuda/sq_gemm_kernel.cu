// CUDA kernel of mackay_ext::sq_gemm_accumulate_: out += scale * (a*a)^T (b*b). Tiled through
// shared memory: a block computes a 32x32 tile of out, staging 32 examples of a and b at a
// time, squared as they are loaded; each thread owns 4 outputs of one column.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#include "mackay/sq_gemm.h"

namespace mackay {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerThread = 4;
constexpr int kThreadRows = kTile / kRowsPerThread;  // blockDim = (32, 8)

template <typename T>
__global__ void __launch_bounds__(kTile * kThreadRows)
sq_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n_rows,
               int64_t out_rows, int64_t out_cols, T scale) {
  __shared__ T a_sq[kTile][kTile + 1];
  __shared__ T b_sq[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  T acc[kRowsPerThread] = {};
  for (int64_t n0 = 0; n0 < n_rows; n0 += kTile) {
    for (int r = ty; r < kTile; r += kThreadRows) {
      const int64_t n = n0 + r;
      const T av = (n < n_rows && o0 + tx < out_rows) ? a[n * out_rows + o0 + tx] : T(0);
      const T bv = (n < n_rows && i0 + tx < out_cols) ? b[n * out_cols + i0 + tx] : T(0);
      a_sq[r][tx] = av * av;
      b_sq[r][tx] = bv * bv;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kTile; ++k) {
      const T bk = b_sq[k][tx];
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) acc[j] += a_sq[k][ty + kThreadRows * j] * bk;
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int64_t o = o0 + ty + kThreadRows * j, i = i0 + tx;
    if (o < out_rows && i < out_cols) out[o * out_cols + i] += scale * acc[j];
  }
}

}  // namespace

void sq_gemm_accumulate_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double scale) {
  check_sq_gemm_args(out, a, b);
  if (a.size(0) == 0 || out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  const dim3 block(kTile, kThreadRows);
  const dim3 grid((out.size(1) + kTile - 1) / kTile, (out.size(0) + kTile - 1) / kTile);
  TORCH_CHECK(grid.y <= 65535, "sq_gemm_accumulate_: out has too many rows for one launch (",
              out.size(0), ")");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sq_gemm_accumulate_cuda", [&] {
    sq_gemm_kernel<scalar_t><<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a_c.const_data_ptr<scalar_t>(), b_c.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), a.size(0), out.size(0), out.size(1),
        static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mackay
