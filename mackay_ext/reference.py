"""Pure-PyTorch fallback: the same mathematics as the compiled kernels, no extension needed.

Written from DESIGN.md section 1 with whole-tensor PyTorch ops; it is the `backend="torch"`
path and the baseline the benchmarks compare against.
"""
from __future__ import annotations

import math

import torch

from ._validate import check_update_args


def _group_dims(weight: torch.Tensor, alpha: torch.Tensor) -> tuple[list[int], tuple[int, ...]]:
    """Dimensions a group of weights reduces over, and alpha's shape padded to weight.dim()."""
    padded = (1,) * (weight.dim() - alpha.dim()) + tuple(alpha.shape)
    dims = [d for d, (a, w) in enumerate(zip(padded, weight.shape)) if a == 1 and w != 1]
    return dims, padded


def mackay_update_(weight, curvature, alpha, *, num_data, rule="mackay", prune="alpha",
                   threshold=None, eps=1e-16, alpha_min=0.0, alpha_max=None):
    """Reference of mackay_ext.ops.mackay_update_ (same signature and semantics)."""
    from .ops import UpdateStats  # the result type lives with the ops

    threshold = check_update_args(weight, curvature, alpha, num_data=num_data, rule=rule,
                                  prune=prune, threshold=threshold, eps=eps, alpha_min=alpha_min,
                                  alpha_max=alpha_max)
    gamma_sum = torch.zeros((), dtype=torch.float64, device=weight.device)
    num_pruned = torch.zeros((), dtype=torch.int64, device=weight.device)
    if weight.numel() == 0:
        return UpdateStats(gamma_sum, num_pruned)
    with torch.no_grad():
        wide = torch.float64 in (weight.dtype, alpha.dtype)
        math_dtype = torch.float64 if wide else torch.float32
        dims, padded = _group_dims(weight, alpha)
        count = math.prod(weight.shape[d] for d in dims)

        def group_sum(x):
            return x.sum(dim=dims, keepdim=True) if dims else x

        w = weight.to(math_dtype)
        h = curvature.to(math_dtype)
        old = alpha.to(math_dtype).reshape(padded)
        n_h = torch.where(h <= 0, torch.zeros_like(h), h * num_data)  # -0 too: Sigma stays > 0
        already_pruned = old == math.inf

        weight_sq = group_sum(w * w)
        if rule == "paper":
            gamma = torch.full_like(old, float(count))
        else:
            gamma = group_sum(torch.where(old == 0, torch.ones_like(n_h), n_h / (n_h + old)))
        if rule == "mackay":
            new = gamma / (weight_sq + eps)
        elif rule == "em":
            new = count / (weight_sq + group_sum(1.0 / (n_h + old)))
        else:
            new = count / (weight_sq + eps)
        new = torch.where(torch.isnan(new), old,
                          new.clamp(min=alpha_min, max=alpha_max if alpha_max is not None else math.inf))

        if prune == "alpha":
            criterion = new >= threshold
        else:
            criterion = weight_sq < threshold * group_sum(1.0 / (n_h + new))
        pruned = already_pruned | (new == math.inf) | criterion
        new = torch.where(pruned, torch.full_like(new, math.inf), new)

        alpha.copy_(new.reshape(alpha.shape))
        weight.masked_fill_(pruned.expand(weight.shape), 0)
        gamma_sum.copy_(torch.where(pruned, torch.zeros_like(gamma), gamma).sum(dtype=torch.float64))
        num_pruned.copy_(pruned.sum())
    return UpdateStats(gamma_sum, num_pruned)
