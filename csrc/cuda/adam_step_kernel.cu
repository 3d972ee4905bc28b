// CUDA kernel of mackay_ext::mackay_adam_step_: multi-tensor apply with our own metadata (torch's
// multi_tensor_apply stops at 5 lists; this step needs weight, grad, m, v, curvature and
// alpha). Each block takes one kChunk-element chunk of one tensor; a launch carries up to
// kMaxTensors tensors and kMaxBlocks chunks, so ~100 parameters need a handful of launches.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"
#include "mackay/adam.h"

namespace mackay {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

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
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(AdamLaunchMeta) + sizeof(AdamHyper) + 2 * sizeof(void*) <= 4096,
              "kernel arguments must fit in 4 KB");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
adam_multi_tensor(AdamLaunchMeta meta, AdamHyper hyper, const float* grad_scale,
                  const float* found_inf) {
  using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: nothing changes
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t numel = meta.numel[t];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  // steps are incremented after the whole step (increment_steps), so this one is step + 1
  const AdamConstants<opmath_t> c(hyper, static_cast<double>(*meta.step[t]) + 1.0);
  const opmath_t grad_mul = grad_scale != nullptr ? opmath_t(1) / opmath_t(*grad_scale) : opmath_t(1);
  auto* weight = static_cast<scalar_t*>(meta.weight[t]);
  const auto* grad = static_cast<const scalar_t*>(meta.grad[t]);
  auto* exp_avg = static_cast<scalar_t*>(meta.exp_avg[t]);
  auto* exp_avg_sq = static_cast<scalar_t*>(meta.exp_avg_sq[t]);
  auto* curvature = static_cast<scalar_t*>(meta.curvature[t]);
  const float* alpha = meta.alpha[t];
  const int64_t inner = meta.alpha_inner[t], size = meta.alpha_size[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    opmath_t a = 0;
    if (alpha != nullptr) {
      const int64_t k = inner == 1 ? (size == numel ? i : i % size) : (i / inner) % size;
      a = static_cast<opmath_t>(__ldg(alpha + k));
    }
    opmath_t w = weight[i], m = exp_avg[i], v = exp_avg_sq[i];
    opmath_t h = curvature != nullptr ? static_cast<opmath_t>(curvature[i]) : opmath_t(0);
    adam_element<opmath_t>(w, static_cast<opmath_t>(grad[i]) * grad_mul, m, v,
                           curvature != nullptr ? &h : nullptr, a, c);
    weight[i] = static_cast<scalar_t>(w);
    exp_avg[i] = static_cast<scalar_t>(m);
    exp_avg_sq[i] = static_cast<scalar_t>(v);
    if (curvature != nullptr) curvature[i] = static_cast<scalar_t>(h);
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
  meta.curvature[slot] = t.curvature.defined() ? t.curvature.mutable_data_ptr<scalar_t>() : nullptr;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, tensors.front().param.scalar_type(), "mackay_adam_step_cuda", [&] {
        AdamLaunchMeta meta;
        int slots = 0, blocks = 0;
        auto launch = [&] {
          adam_multi_tensor<scalar_t>
              <<<blocks, kThreads, 0, stream>>>(meta, hyper, scale_ptr, found_inf_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          blocks = 0;
        };
        for (const AdamTensor& t : tensors) {
          const int64_t numel = t.param.numel();
          if (numel == 0) continue;
          fill_slot<scalar_t>(meta, slots++, t);
          const int64_t chunks = (numel + kChunk - 1) / kChunk;
          for (int64_t chunk = 0; chunk < chunks; ++chunk) {
            meta.block_tensor[blocks] = static_cast<uint8_t>(slots - 1);
            meta.block_chunk[blocks] = static_cast<int32_t>(chunk);
            ++blocks;
            const bool last_chunk = chunk == chunks - 1;
            if (blocks == kMaxBlocks || (slots == kMaxTensors && last_chunk)) {
              launch();
              if (last_chunk) {
                slots = 0;
              } else {  // the tensor continues in the next launch, in slot 0
                fill_slot<scalar_t>(meta, 0, t);
                slots = 1;
              }
            }
          }
        }
        if (blocks > 0) launch();
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
