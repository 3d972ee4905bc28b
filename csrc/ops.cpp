// Operator schemas of mackay_ext (defined once; each device file registers its kernels).
#include <torch/library.h>

TORCH_LIBRARY(mackay_ext, m) {
  m.def(
      "mackay_update_(Tensor(a!) weight, Tensor curvature, Tensor(b!) alpha, *, float num_data, "
      "str rule='mackay', str prune='alpha', float? threshold=None, float eps=1e-16, "
      "float alpha_min=0., float? alpha_max=None) -> (Tensor gamma_sum, Tensor num_pruned)");
}
