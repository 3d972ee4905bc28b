#pragma once
// Warp and block reductions that end in one atomicAdd per block.
#include <cuda_runtime.h>

namespace mackay {

constexpr int kWarpSize = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// Sums (gamma, pruned) over the block and adds them to the global totals with one atomic each.
// Every thread of the block must call it.
__device__ __forceinline__ void block_add_results(double gamma, unsigned long long pruned,
                                                  double* gamma_total,
                                                  unsigned long long* pruned_total) {
  __shared__ double gamma_warps[32];
  __shared__ unsigned long long pruned_warps[32];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  gamma = warp_sum(gamma);
  pruned = warp_sum(pruned);
  if (lane == 0) {
    gamma_warps[warp] = gamma;
    pruned_warps[warp] = pruned;
  }
  __syncthreads();
  if (warp == 0) {
    gamma = lane < num_warps ? gamma_warps[lane] : 0.0;
    pruned = lane < num_warps ? pruned_warps[lane] : 0ull;
    gamma = warp_sum(gamma);
    pruned = warp_sum(pruned);
    if (lane == 0) {
      if (gamma != 0.0) atomicAdd(gamma_total, gamma);
      if (pruned != 0ull) atomicAdd(pruned_total, pruned);
    }
  }
}

}  // namespace mackay
