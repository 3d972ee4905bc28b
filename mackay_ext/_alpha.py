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


def finite_alpha(alpha: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """alpha with its +inf (pruned) entries as 0; with `like` (the weight), in the wider of the
    two dtypes: alpha is stored in float32, and a float64 weight's prior term alpha / N w is
    then formed in float64 (the penalty's gradient, which ef-batch subtracts, is often many
    times the data's: float32 there cost 1e-4 of h)."""
    if like is not None:
        alpha = alpha.to(torch.promote_types(alpha.dtype, like.dtype))
    return torch.where(alpha == math.inf, torch.zeros_like(alpha), alpha)


def update_rule(rule: str, warmup: bool) -> str:
    """The rule an update applies: "em" from alpha = 0 (the warm-up) is degenerate where an
    entry has h = 0 (an always-zero input, a dead unit): its Sigma_ii = 1 / (N h + alpha) is
    infinite, so the group's alpha would stay 0 for ever (or snr prune it). MacKay's estimate
    starts it instead; the warm-up prunes nothing."""
    return "mackay" if warmup and rule == "em" else rule
