"""Loads the LibTorch library built by CMake (no mackay_ext package involved) and checks one
precision update against values computed by hand."""
import math
import sys

import torch

torch.ops.load_library(sys.argv[1])
weight = torch.tensor([[0.5, -0.25], [1e-8, 0.0]], dtype=torch.float64)
curvature = torch.zeros_like(weight)
alpha = torch.zeros(2, 1, dtype=torch.float64)
gamma_sum, num_pruned = torch.ops.mackay_ext.mackay_update_(weight, curvature, alpha, num_data=10.0,
                                                            rule="paper")
expected = 2 / (0.5**2 + 0.25**2 + 1e-16)
assert math.isclose(alpha[0, 0].item(), expected, rel_tol=1e-12), alpha
assert alpha[1, 0].item() == math.inf and weight[1].abs().sum().item() == 0, (alpha, weight)
assert num_pruned.item() == 1 and gamma_sum.item() == 2.0, (gamma_sum, num_pruned)
print(f"CMake library {sys.argv[1]}: ok; CUDA kernel registered:",
      torch._C._dispatch_has_kernel_for_dispatch_key("mackay_ext::mackay_update_", "CUDA"))
