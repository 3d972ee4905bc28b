// CUDA kernel of mackay_ext::mackay_adam_step_: multi-tensor apply with our own metadata (torch's
// multi_tensor_apply stops at 5 lists; this step needs weight, grad, m, v, curvature and
// alpha). A launch carries up to kMaxTensors tensors, cut into kChunk-element chunks; block b
// takes chunks b, b + gridDim.x, ... and finds each chunk's tensor in a prefix sum of chunk
// counts, so one launch covers its tensors whole, however large. The first H200 run, with
// 64K-element chunks listed one per block (at most 320), put 72 blocks of 512 threads on 132
// SMs for 100 tensors of 160K elements: 31% of copy bandwidth at 16M parameters; this layout,
// 4K-element chunks and 4 loads in flight per thread, reached 42% (and 60% at 64M).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "mackay/adam.h"

namespace mackay {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // elements each thread loads before it computes: loads in flight
constexpr int64_t kChunk = kThreads * kUnroll * 4;
constexpr int kMaxGrid = 8192;

// Kernel-argument metadata (kept under the 4 KB parameter limit).
struct AdamLaunchMeta {
  void* weight[kMaxTensors];
  const void* grad[kMaxTensors];
  void* exp_avg[kMaxTensors];
  void* exp_avg_sq[kMaxTensors];
  void* curvature[kMaxTensors];  // nullptr: not tracked
  const float* alpha[kMaxTensors];  // nullptr: plain Adam
  const float* step[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t alpha_inner[kMaxTensors];
  int64_t alpha_size[kMaxTensors];
  int32_t chunk_end[kMaxTensors];  // chunks of tensors 0..t together
  int32_t tensors;
};
static_assert(sizeof(AdamLaunchMeta) + sizeof(AdamHyper) + 2 * sizeof(void*) + sizeof(bool) <= 4096,
              "kernel arguments must fit in 4 KB");

// curvature_float: h is float32 whatever scalar_t is (h of a bfloat16 / float16 weight, whose
// 1% steps would vanish in half precision); one type for a whole launch
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 4)  // <= 64 registers: 4 blocks of 256 per SM
adam_multi_tensor(AdamLaunchMeta meta, AdamHyper hyper, const float* grad_scale,
                  const float* found_inf, bool curvature_float) {
  using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: nothing changes
  const int32_t total_chunks = meta.chunk_end[meta.tensors - 1];
  const opmath_t grad_mul = grad_scale != nullptr ? opmath_t(1) / opmath_t(*grad_scale) : opmath_t(1);
  int t = 0;
  for (int32_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    while (chunk >= meta.chunk_end[t]) ++t;  // chunks only grow: the search moves forward
    const int64_t numel = meta.numel[t];
    const int64_t begin = static_cast<int64_t>(chunk - (t > 0 ? meta.chunk_end[t - 1] : 0)) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    // steps are incremented after the whole step (increment_steps), so this one is step + 1
    const AdamConstants<opmath_t> c(hyper, static_cast<double>(*meta.step[t]) + 1.0);
    auto* weight = static_cast<scalar_t*>(meta.weight[t]);
    const auto* grad = static_cast<const scalar_t*>(meta.grad[t]);
    auto* exp_avg = static_cast<scalar_t*>(meta.exp_avg[t]);
    auto* exp_avg_sq = static_cast<scalar_t*>(meta.exp_avg_sq[t]);
    void* curvature = meta.curvature[t];
    const float* alpha = meta.alpha[t];
    const int64_t inner = meta.alpha_inner[t], size = meta.alpha_size[t];
    for (int64_t base = begin + threadIdx.x; base < end; base += kThreads * kUnroll) {
      // all loads first, then the arithmetic, then the stores: the compiler cannot reorder
      // loads past stores through pointers that may alias
      opmath_t w[kUnroll], g[kUnroll], m[kUnroll], v[kUnroll], h[kUnroll], a[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        a[u] = h[u] = w[u] = g[u] = m[u] = v[u] = 0;
        if (i < end) {
          if (alpha != nullptr) {
            const int64_t k = inner == 1 ? (size == numel ? i : i % size) : (i / inner) % size;
            a[u] = static_cast<opmath_t>(__ldg(alpha + k));
          }
          w[u] = weight[i];
          g[u] = static_cast<opmath_t>(grad[i]) * grad_mul;
          m[u] = exp_avg[i];
          v[u] = exp_avg_sq[i];
          if (curvature != nullptr) {
            h[u] = curvature_float ? static_cast<opmath_t>(static_cast<const float*>(curvature)[i])
                                   : static_cast<opmath_t>(static_cast<const scalar_t*>(curvature)[i]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        opmath_t h_u = h[u];  // a scalar whose address is taken stays in a register; an array slot does not
        adam_element<opmath_t>(w[u], g[u], m[u], v[u], curvature != nullptr ? &h_u : nullptr, a[u], c);
        h[u] = h_u;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kThreads;
        if (i < end) {
          weight[i] = static_cast<scalar_t>(w[u]);
          exp_avg[i] = static_cast<scalar_t>(m[u]);
          exp_avg_sq[i] = static_cast<scalar_t>(v[u]);
          if (curvature != nullptr && curvature_float) {
            static_cast<float*>(curvature)[i] = static_cast<float>(h[u]);
          } else if (curvature != nullptr) {
            static_cast<scalar_t*>(curvature)[i] = static_cast<scalar_t>(h[u]);
          }
        }
      }
    }
  }
}

constexpr int kMaxStepsPerLaunch = 256;

struct StepList {
  float* step[kMaxStepsPerLaunch];
  int count;
};

// Runs after every chunk of the step has read its step count.
__global__ void increment_steps(StepList steps, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = threadIdx.x;
  if (i < steps.count) *steps.step[i] += 1.0f;
}

template <typename scalar_t>
void fill_slot(AdamLaunchMeta& meta, int slot, const AdamTensor& t) {
  meta.weight[slot] = t.param.mutable_data_ptr<scalar_t>();
  meta.grad[slot] = t.grad.const_data_ptr<scalar_t>();
  meta.exp_avg[slot] = t.exp_avg.mutable_data_ptr<scalar_t>();
  meta.exp_avg_sq[slot] = t.exp_avg_sq.mutable_data_ptr<scalar_t>();
  meta.curvature[slot] = t.curvature.defined() ? t.curvature.mutable_data_ptr() : nullptr;
  meta.alpha[slot] = t.alpha.defined() ? t.alpha.const_data_ptr<float>() : nullptr;
  meta.step[slot] = t.step.const_data_ptr<float>();
  meta.numel[slot] = t.param.numel();
  meta.alpha_inner[slot] = t.alpha_inner;
  meta.alpha_size[slot] = t.alpha_size;
}

}  // namespace

void mackay_adam_kernel_cuda(const std::vector<AdamTensor>& tensors, const AdamHyper& hyper,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf) {
  const c10::cuda::CUDAGuard guard(tensors.front().param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* scale_ptr = grad_scale ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* found_inf_ptr = found_inf ? found_inf->const_data_ptr<float>() : nullptr;
  // run_mackay_adam_step checked that every curvature of the call has one dtype
  const at::Tensor& any_curvature = tensors.front().curvature;
  const bool curvature_float = any_curvature.defined() && any_curvature.scalar_type() == at::kFloat &&
                               tensors.front().param.scalar_type() != at::kFloat;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensors.front().param.scalar_type(), "mackay_adam_step_cuda", [&] {
        AdamLaunchMeta meta;
        meta.tensors = 0;
        int32_t chunks = 0;
        auto launch = [&] {
          const int grid = static_cast<int>(std::min<int64_t>(chunks, kMaxGrid));
          adam_multi_tensor<scalar_t>
              <<<grid, kThreads, 0, stream>>>(meta, hyper, scale_ptr, found_inf_ptr, curvature_float);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          meta.tensors = 0;
          chunks = 0;
        };
        for (const AdamTensor& t : tensors) {
          const int64_t numel = t.param.numel();
          if (numel == 0) continue;
          const int64_t tensor_chunks = (numel + kChunk - 1) / kChunk;
          // chunk indices are int32: a launch closes before they would overflow
          if (meta.tensors == kMaxTensors || (meta.tensors > 0 && chunks + tensor_chunks > INT32_MAX))
            launch();
          fill_slot<scalar_t>(meta, meta.tensors, t);
          chunks += static_cast<int32_t>(tensor_chunks);
          meta.chunk_end[meta.tensors++] = chunks;
        }
        if (meta.tensors > 0) launch();
      });
  StepList list;
  list.count = 0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    list.step[list.count++] = tensors[k].step.mutable_data_ptr<float>();
    if (list.count == kMaxStepsPerLaunch || k + 1 == tensors.size()) {
      increment_steps<<<1, kMaxStepsPerLaunch, 0, stream>>>(list, found_inf_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      list.count = 0;
    }
  }
}

}  // namespace mackay
