// CUDA kernel of mackay_ext::adam_proximal_prior_: one elementwise pass over the weight, any
// strides (dimensions coalesced on the host where all three tensors allow), alpha broadcast per
// group through stride 0; step and found_inf are read on the device where they live there, so
// the step needs no host sync. (torch's TensorIterator loops for CUDA pull in headers of
// libraries the toolkit may lack, cuSPARSE's among them: the indexing is written out here.)
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "launchers.h"
#include "mackay/adam_prior.h"

namespace mackay {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDims = 8;

// Sizes and the element strides of weight, exp_avg_sq and (expanded) alpha, outermost first.
struct Layout {
  int dims = 0;
  int64_t sizes[kMaxDims];
  int64_t strides[3][kMaxDims];
};

struct AdamPriorOp {
  const float* step;        // on the device, or nullptr: inv_bc2 holds the correction
  const float* found_inf;   // on the device, or nullptr
  double beta2;
  float inv_bc2, eps, scale;
};

__global__ void __launch_bounds__(kThreads)
adam_prior_kernel(float* weight, const float* exp_avg_sq, const float* alpha, int64_t numel, Layout L,
                  AdamPriorOp op) {
  if (op.found_inf != nullptr && *op.found_inf != 0.0f) return;   // a step GradScaler skipped
  const float inv_bc2 = op.step != nullptr ? static_cast<float>(adam_inv_bc2(op.beta2, *op.step)) : op.inv_bc2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    int64_t rest = i, w = 0, v = 0, a = 0;
    for (int d = L.dims - 1; d >= 0; --d) {
      const int64_t index = rest % L.sizes[d];
      rest /= L.sizes[d];
      w += index * L.strides[0][d];
      v += index * L.strides[1][d];
      a += index * L.strides[2][d];
    }
    weight[w] = adam_prior_element(weight[w], exp_avg_sq[v], alpha[a], inv_bc2, op.eps, op.scale);
  }
}

// The tensors' common shape with adjacent dimensions merged where every tensor walks them as one
// (a contiguous weight with one alpha per weight: a single dimension).
Layout coalesced(const at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha_full) {
  const at::Tensor* tensors[3] = {&weight, &exp_avg_sq, &alpha_full};
  Layout L;
  for (int64_t d = 0; d < weight.dim(); ++d) {
    const int64_t size = weight.size(d);
    if (size == 1) continue;
    bool merges = L.dims > 0;
    for (int k = 0; merges && k < 3; ++k) {
      merges = L.strides[k][L.dims - 1] == tensors[k]->stride(d) * size;
    }
    if (merges) {
      L.sizes[L.dims - 1] *= size;
      for (int k = 0; k < 3; ++k) L.strides[k][L.dims - 1] = tensors[k]->stride(d);
      continue;
    }
    TORCH_CHECK(L.dims < kMaxDims, "adam_proximal_prior_: the CUDA kernel takes at most ", kMaxDims,
                " dimensions it cannot merge, got a weight of shape ", weight.sizes());
    L.sizes[L.dims] = size;
    for (int k = 0; k < 3; ++k) L.strides[k][L.dims] = tensors[k]->stride(d);
    ++L.dims;
  }
  return L;
}

}  // namespace

void adam_proximal_prior_cuda(at::Tensor& weight, const at::Tensor& exp_avg_sq, const at::Tensor& alpha,
                              const at::Tensor& step, double beta2, double eps, double scale,
                              const std::optional<at::Tensor>& found_inf) {
  const AdamPriorArgs args{beta2, eps, scale};
  const at::Tensor alpha_full = check_adam_prior(weight, exp_avg_sq, alpha, step, args, found_inf);
  if (found_inf && found_inf->is_cpu() && found_inf->item<float>() != 0.0f) return;
  const int64_t numel = weight.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  AdamPriorOp op{nullptr, nullptr, beta2, 1.0f, static_cast<float>(eps), static_cast<float>(scale)};
  at::Tensor device_step;
  if (step.is_cpu()) {
    op.inv_bc2 = static_cast<float>(adam_inv_bc2(beta2, step.item<double>()));
  } else {
    device_step = step.scalar_type() == at::kFloat ? step : step.to(at::kFloat);
    op.step = device_step.const_data_ptr<float>();
  }
  if (found_inf && !found_inf->is_cpu()) op.found_inf = found_inf->const_data_ptr<float>();
  const Layout layout = coalesced(weight, exp_avg_sq, alpha_full);
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535);
  adam_prior_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      weight.mutable_data_ptr<float>(), exp_avg_sq.const_data_ptr<float>(), alpha_full.const_data_ptr<float>(),
      numel, layout, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mackay
