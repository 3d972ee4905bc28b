"""max_prune_fraction: how many of a layer's live groups one update may prune.

Why: the diagonal evidence judges every group alone. Where a layer's groups are redundant given
each other (the deep, narrow-map convs of a VGG on an easy dataset: each filter's curvature is
tiny because the others can stand in for it), every group fails the criterion at once, though not
all of them can go together, and a layer pruned to one group does not recover (VGG-D6 on
mnist32: 30% test error). Pruning at most a fraction of the live groups per update lets the
others re-fit before the evidence is asked again, and a layer thins over several updates. It
slows such a collapse, it does not stop it: VGG-D6 on mnist32 with f = 0.5 kept 8-16 filters
in those convs after 4 pruning updates (0.60% error, dense 0.61%), and 7-3-1 after 9 (11%).

Which groups stay when an update would prune more: those the criterion was least sure of, the
largest snr = |w_g|^2 / sum_{i in g} Sigma_ii (prune="snr") or the smallest alpha_g
(prune="alpha"), Sigma_ii = 1 / (N h_i + alpha_g) with the update's new alpha.
"""
from __future__ import annotations

import math

import torch

from ._alpha import group_dims


def allowed_prunes(live: int, fraction: float) -> int:
    """How many of `live` groups one update may prune: floor(fraction * live), so that a fraction
    below 1 never empties a layer in one update."""
    return math.floor(fraction * live + 1e-9)


def groups_to_restore(newly: torch.Tensor, score: torch.Tensor, allowed: int) -> torch.Tensor:
    """Mask of the groups in `newly` (bool, pruned by this update) that must stay: all but the
    `allowed` of lowest score."""
    restore = torch.zeros_like(newly)
    excess = int(newly.sum()) - allowed
    if excess <= 0:
        return restore
    candidates = newly.flatten().nonzero().flatten()
    order = score.flatten()[candidates].nan_to_num(nan=-math.inf).argsort(descending=True, stable=True)
    restore.view(-1)[candidates[order[:excess]]] = True
    return restore


def target_scores(weight: torch.Tensor, curvature: torch.Tensor, old_alpha: torch.Tensor,
                  new_alpha: torch.Tensor, *, num_data: float, rule: str, prune: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of one ARD target (alpha's shape): the score that ranks how far a group is from
    being pruned (higher: further), and its gamma_g (what a restored group adds to the report's
    gamma), from the weights and alphas before the update and the update's unpruned new alpha."""
    dims, padded = group_dims(weight, old_alpha)

    def group_sum(x):
        return x.sum(dim=dims, keepdim=True) if dims else x

    w = weight.detach().double()
    h = curvature.double()
    n_h = torch.where(h > 0, h * num_data, torch.zeros_like(h))
    old = old_alpha.double().reshape(padded)
    new = new_alpha.double().reshape(padded)
    if rule == "paper":
        count = math.prod(weight.shape[d] for d in dims)
        gamma = torch.full_like(old, float(count))
    else:
        gamma = group_sum(torch.where(old == 0, torch.ones_like(n_h), n_h / (n_h + old)))
    if prune == "alpha":
        score = -new
    else:
        score = group_sum(w * w) / group_sum(1.0 / (n_h + new))
    return score.reshape(old_alpha.shape), gamma.reshape(old_alpha.shape)
