"""Two facts about prior precisions every layer of the package uses: which weight dimensions one
alpha entry spans (alpha broadcasts along them), and alpha with +inf (pruned) read as 0, so that
alpha * w never computes inf * 0."""
from __future__ import annotations

import math

import torch


def group_dims(weight: torch.Tensor, alpha: torch.Tensor) -> tuple[list[int], tuple[int, ...]]:
    """Dimensions a group of weights reduces over, and alpha's shape padded to weight.dim()."""
    padded = (1,) * (weight.dim() - alpha.dim()) + tuple(alpha.shape)
    dims = [d for d, (a, w) in enumerate(zip(padded, weight.shape)) if a == 1 and w != 1]
    return dims, padded


def finite_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """alpha with its +inf (pruned) entries as 0."""
    return torch.where(alpha == math.inf, torch.zeros_like(alpha), alpha)
