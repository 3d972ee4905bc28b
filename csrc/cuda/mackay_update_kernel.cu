// CUDA kernels of mackay_ext::mackay_update_. Groups side by side in memory (one alpha per
// weight, per column) get a thread each, so neighbouring threads read neighbouring weights;
// groups along a row get a warp each. 64-bit indexing throughout.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "block_reduce.cuh"
#include "launchers.h"
#include "mackay/precision.h"

namespace mackay {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename alpha_t>
struct DeviceLayout {
  scalar_t* weight;
  const scalar_t* curvature;
  alpha_t* alpha;
  int64_t groups, group_size;
  int64_t w_group_stride, w_elem_stride, h_group_stride, h_elem_stride, a_stride;
};

template <typename scalar_t, typename alpha_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads)
update_thread_per_group(DeviceLayout<scalar_t, alpha_t> L, UpdateParams p, double* gamma_total,
                        unsigned long long* pruned_total) {
  double gamma_sum = 0;
  unsigned long long pruned_count = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < L.groups;
       g += stride) {
    opmath_t gamma;
    pruned_count += update_group<opmath_t>(L.weight + g * L.w_group_stride, L.w_elem_stride,
                                           L.curvature + g * L.h_group_stride, L.h_elem_stride,
                                           L.group_size, L.alpha + g * L.a_stride, p, gamma);
    gamma_sum += static_cast<double>(gamma);
  }
  block_add_results(gamma_sum, pruned_count, gamma_total, pruned_total);
}

template <typename scalar_t, typename alpha_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads)
update_warp_per_group(DeviceLayout<scalar_t, alpha_t> L, UpdateParams p, double* gamma_total,
                      unsigned long long* pruned_total) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * warps_per_block;
  double gamma_sum = 0;
  unsigned long long pruned_count = 0;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
       g < L.groups; g += num_warps) {
    alpha_t* alpha = L.alpha + g * L.a_stride;
    scalar_t* w = L.weight + g * L.w_group_stride;
    const scalar_t* h = L.curvature + g * L.h_group_stride;
    const opmath_t old_alpha = static_cast<opmath_t>(*alpha);
    bool pruned = old_alpha == infinity<opmath_t>();
    GroupSums<opmath_t> sums;
    if (!pruned) {
      for (int64_t j = lane; j < L.group_size; j += kWarpSize) {
        accumulate<opmath_t>(sums, static_cast<opmath_t>(w[j * L.w_elem_stride]),
                             static_cast<opmath_t>(h[j * L.h_elem_stride]), old_alpha, p);
      }
      sums.gamma = warp_sum(sums.gamma);
      sums.weight_sq = warp_sum(sums.weight_sq);
      sums.variance = warp_sum(sums.variance);
      const opmath_t new_alpha = reestimate_alpha(sums, opmath_t(L.group_size), old_alpha, p);
      opmath_t variance = 0;
      if (p.prune == Prune::SNR) {
        for (int64_t j = lane; j < L.group_size; j += kWarpSize) {
          variance += variance_at<opmath_t>(static_cast<opmath_t>(h[j * L.h_elem_stride]),
                                            new_alpha, p);
        }
        variance = warp_sum(variance);
      }
      pruned = should_prune(new_alpha, sums.weight_sq, variance, p);
      if (lane == 0) *alpha = static_cast<alpha_t>(new_alpha);
    }
    if (pruned) {
      if (lane == 0) *alpha = infinity<alpha_t>();
      for (int64_t j = lane; j < L.group_size; j += kWarpSize) w[j * L.w_elem_stride] = scalar_t(0);
    }
    if (lane == 0) {
      pruned_count += pruned;
      gamma_sum += pruned ? 0.0 : static_cast<double>(sums.gamma);
    }
  }
  block_add_results(gamma_sum, pruned_count, gamma_total, pruned_total);
}

int max_resident_blocks() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms * (2048 / kThreads);
}

}  // namespace

void mackay_update_kernel_cuda(const GroupProblem& problem, const UpdateParams& params,
                               at::Tensor& gamma_sum, at::Tensor& num_pruned) {
  const c10::cuda::CUDAGuard guard(problem.weight2d.device());
  const int64_t groups = problem.weight2d.size(0);
  const int64_t group_size = problem.weight2d.size(1);
  const bool groups_side_by_side =
      problem.weight2d.stride(0) == 1 && problem.curvature2d.stride(0) == 1;
  const bool thread_per_group = group_size == 1 || (groups_side_by_side && group_size < 4096);
  const int64_t groups_per_block = thread_per_group ? kThreads : kThreads / kWarpSize;
  const int64_t blocks = std::min<int64_t>((groups + groups_per_block - 1) / groups_per_block,
                                           max_resident_blocks());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* gamma_total = gamma_sum.mutable_data_ptr<double>();
  // int64 and unsigned long long share a representation; counts are never negative.
  auto* pruned_total = reinterpret_cast<unsigned long long*>(num_pruned.mutable_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, problem.weight2d.scalar_type(), "mackay_update_cuda", [&] {
        using weight_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(problem.alpha1d.scalar_type(), "mackay_update_cuda_alpha", [&] {
          using opmath_t = std::conditional_t<std::is_same_v<weight_t, double> ||
                                                  std::is_same_v<scalar_t, double>, double, float>;
          const DeviceLayout<weight_t, scalar_t> layout{
              problem.weight2d.mutable_data_ptr<weight_t>(),
              problem.curvature2d.const_data_ptr<weight_t>(),
              problem.alpha1d.mutable_data_ptr<scalar_t>(),
              groups, group_size,
              problem.weight2d.stride(0), problem.weight2d.stride(1),
              problem.curvature2d.stride(0), problem.curvature2d.stride(1),
              problem.alpha1d.stride(0)};
          if (thread_per_group) {
            update_thread_per_group<weight_t, scalar_t, opmath_t>
                <<<blocks, kThreads, 0, stream>>>(layout, params, gamma_total, pruned_total);
          } else {
            update_warp_per_group<weight_t, scalar_t, opmath_t>
                <<<blocks, kThreads, 0, stream>>>(layout, params, gamma_total, pruned_total);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

}  // namespace mackay
