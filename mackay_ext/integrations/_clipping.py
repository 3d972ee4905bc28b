"""Gradient clipping by the trainer, as the callbacks see it.

The callbacks' ef-batch curvature (and a MacKayAdam's) is read from the gradient the optimizer
steps with, and the prior is applied relative to it. Norm clipping scales that gradient by
c = min(1, max_norm / (norm + 1e-6)): read as it is, h = B g^2 shrinks by c^2 and the prior pulls
1 / c times harder than the data, so the precision updates prune weights the data determine (a
tiny BERT under the Hugging Face Trainer's default max_grad_norm=1 kept 17 of its 21,760 weights,
at chance; 664 at 0.878 test accuracy unclipped). Where the norm before clipping is known, the
callbacks set the pruner's gradient_scale to c for that step (as one step on c times the whole
objective: see MacKayPruner.gradient_scale): Lightning calls on_before_optimizer_step before it
clips; under the Hugging Face Trainer, which clips before any callback, a hook on each
parameter's accumulated gradient measures it (NormBeforeClipping; on one process: under DDP those
hooks see each rank's gradient before the all-reduce). Where it is not known (clipping by value,
the Hugging Face Trainer on several processes), the callbacks count the steps clipping changed
and say so, once, at the first precision update after one.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from .._validate import user_stacklevel


def gradients(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


@torch.no_grad()
def total_norm(grads: list[torch.Tensor]) -> float:
    """The 2-norm of all the gradients together, as clip_grad_norm_ measures it."""
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


@torch.no_grad()
def largest_entry(grads: list[torch.Tensor]) -> float:
    """The largest |g| of any gradient entry, as clip_grad_value_ compares it."""
    return max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)


def clip_coefficient(norm: float, limit: float) -> float:
    """The factor clip_grad_norm_(max_norm=limit) scales a gradient of this norm by; 1 for a
    non-finite norm (a step GradScaler skips: nothing to correct)."""
    if not math.isfinite(norm):
        return 1.0
    return min(1.0, limit / (norm + 1e-6))


class NormBeforeClipping:
    """The 2-norm of the gradient an optimizer step will use, measured before a trainer that
    clips it between the backward and any callback (the Hugging Face Trainer): a hook on each
    trainable parameter records the norm of its gradient after every accumulation into it, so the
    last record of each is that of the complete gradient (one process only: under DDP the hooks
    fire before the all-reduce). reset() at the first micro-batch of each step."""

    def __init__(self, model: torch.nn.Module):
        self._norms: dict[int, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._record)
                         for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def _record(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            grad = grad.coalesce().values()
        self._norms[id(param)] = torch.linalg.vector_norm(grad, dtype=torch.float32)   # (no host sync)

    def reset(self) -> None:
        self._norms.clear()

    def norm(self, loss_scale: float = 1.0) -> float:
        """The norm of all the recorded gradients together, divided by GradScaler's loss scale
        (the trainer unscales the gradient before it clips)."""
        if not self._norms:
            return 0.0
        norms = list(self._norms.values())
        device = norms[0].device   # (a model split over devices: one stack on the first)
        return float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))) / loss_scale

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._norms.clear()


class ClippingWatch:
    """Counts the optimizer steps whose gradient the trainer's clipping changed; warns once
    where it could not correct for them."""

    def __init__(self, who: str, turn_off: str):
        self.who, self.turn_off = who, turn_off   # turn_off: how to switch this trainer's clipping off
        self.steps = self.clipped = 0
        self.corrected = 0   # clipped steps whose factor the pruner's gradient_scale took out
        self.largest = 0.0   # the largest measure seen before clipping (where it is measured before)
        self.warned = False

    def before_clipping(self, measure: float, limit: float, corrected: bool = False) -> None:
        """One step, measured before the trainer clips it: clipped where the measure exceeds the
        limit; `corrected`: the callback scaled the prior and the curvature by the clipping factor."""
        self.steps += 1
        self.largest = max(self.largest, measure)
        clipped = measure > limit
        self.clipped += clipped
        self.corrected += clipped and corrected

    def after_clipping(self, norm: float, limit: float) -> None:
        """One step, its norm measured after norm clipping: a clipped gradient's norm is the limit
        (times total / (total + 1e-6)), an unclipped one's is below it."""
        self.steps += 1
        self.clipped += norm >= limit * (1 - 1e-3)

    def warn_if_clipped(self, setting: Callable[[], str]) -> None:
        """Once, where a step was clipped and not corrected; `setting()` names the trainer's
        clipping setting."""
        uncorrected = self.clipped - self.corrected
        if self.warned or not uncorrected:
            return
        self.warned = True
        seen = f"; the largest seen before clipping is {self.largest:.3g}" if self.largest else ""
        warnings.warn(
            f"{self.who}: the trainer clipped the gradient at {uncorrected} of the {self.steps} optimizer "
            f"steps so far ({setting()}), by a factor not known here (clipping by value, or the "
            "Hugging Face Trainer on several processes). The curvature is read from the clipped gradient, so where clipping "
            "acts it is too small (by the square of the clipping factor) and the precision updates prune "
            f"weights the data determine. Turn clipping off ({self.turn_off}) or raise the limit above the "
            f"gradients this run sees{seen}.", RuntimeWarning, stacklevel=user_stacklevel())
