// Operator schemas of mackay_ext (defined once; each device file registers its kernels).
#include <torch/library.h>

TORCH_LIBRARY(mackay_ext, m) {
  m.def(
      "mackay_update_(Tensor(a!) weight, Tensor curvature, Tensor(b!) alpha, *, float num_data, "
      "str rule='mackay', str prune='alpha', float? threshold=None, float eps=1e-16, "
      "float alpha_min=0., float? alpha_max=None) -> (Tensor gamma_sum, Tensor num_pruned)");
  // One fused MacKay-Adam step over a list of parameters of one device and dtype. The first
  // len(alphas) params carry ARD state (alpha, and curvature when `curvatures` is non-empty);
  // the rest take plain Adam in the same pass. Steps (float32 scalars on the params' device)
  // are incremented by the op, unless found_inf is set: then nothing changes at all.
  m.def(
      "mackay_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor(e!)[] curvatures, Tensor[] alphas, *, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, float num_data, float batch_size, float curvature_decay, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}
