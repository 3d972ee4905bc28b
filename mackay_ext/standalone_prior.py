"""The ARD prior for optimizers other than MacKayAdam (a mixin of MacKayPruner).

MacKayAdam applies the prior inside its fused step. Any other torch optimizer knows nothing of
it, so the pruner keeps alpha and an ef-batch curvature itself (a moving average
h <- rho h + (1 - rho) B g^2 and the count t of its updates, read as h / (1 - rho^t)) and applies the
prior after every optimizer step as the exact implicit (proximal) step
    w <- argmin_v |v - w|^2 / (2 s) + alpha v^2 / (2N) = w / (1 + s alpha / N),
contracting for every alpha and step size s, where the prior's gradient in plain SGD diverges
once lr alpha / N > 2. prior="penalty" keeps the older way: penalty() carries the gradient and
the user adds it to the loss.

Where g comes from (MacKayPruner.ef_batch_source):
- "step" (whenever the pruner has the optimizer): the gradient of each optimizer step
  (batch_curvature.StepCurvature), as MacKayAdam's fused step reads it: complete after gradient
  accumulation, averaged over DistributedDataParallel's ranks, unscaled by GradScaler, a skipped
  step skipped; B is the effective batch of one step (per-device batch x accumulation x world
  size), and every rank holds the same h, hence the same alpha. A gradient hook per weight only
  holds pruned entries' gradient at 0.
- "backward" (prior="penalty" without an optimizer: nothing marks a step): each backward's
  gradient, in the hook; B is the batch of one backward. Right for one backward per step on one
  process; under accumulation h takes A updates from partial gradients, under DDP each rank's
  own gradient (its own h, its own alpha).
With prior="penalty" the gradient read holds penalty()'s alpha/N w too; it is taken off (at the
backward, or at the weights before the step).
"""
from __future__ import annotations

import math

import torch

from ._alpha import finite_alpha
from ._follow import state_dtype
from .batch_curvature import StepCurvature


@torch.no_grad()
def proximal_shrink_(param: torch.Tensor, alpha: torch.Tensor, step: float, num_data: float,
                     found_inf: torch.Tensor | None = None) -> None:
    """param <- param / (1 + step alpha / N), the prior's proximal step, in place; not taken
    (without a host sync) where found_inf != 0, a step GradScaler skipped."""
    factor = 1.0 / (1.0 + (step / num_data) * finite_alpha(alpha, param))
    if found_inf is not None:
        factor = torch.where(found_inf.to(factor.device) == 0, factor, torch.ones_like(factor))
    param.mul_(factor.to(param.dtype))


class StandalonePrior:
    """Hooks, proximal step and penalty of MacKayPruner when the optimizer is not a MacKayAdam;
    uses the pruner's targets, _own state, num_data, prior, batch_size and curvature_decay."""

    def _attach_hooks(self) -> None:
        per_backward = self.curvature_kind == "ef-batch" and self.ef_batch_source == "backward"
        for name, target in self.targets.items():
            weight = target.param
            self._own.track(name, weight, {
                "alpha": torch.zeros(self._alpha_shape(target, self.granularity[name]),
                                     dtype=torch.float32, device=weight.device),
                "curvature": torch.zeros_like(weight, dtype=state_dtype("curvature", weight.dtype)),
                # updates the moving average has taken: the update reads h / (1 - rho^t)
                "curvature_steps": torch.zeros((), dtype=torch.float32, device=weight.device)})
            if per_backward:
                self._hooks.append(weight.register_hook(self._curvature_hook(name, weight)))
            else:  # h read at the step, or an exact estimate: only pruned gradients held at 0
                self._hooks.append(weight.register_hook(
                    lambda grad, name=name: grad.masked_fill((self._own[name]["alpha"] == math.inf).expand_as(grad), 0)))
        if self.curvature_kind == "ef-batch" and self.ef_batch_source == "step":
            self._step_reader = StepCurvature(
                self.optimizer, self._step_entries,
                prior_gradients=self._penalty_gradients if self.prior == "penalty" else None)

    def _step_entries(self):
        return [(t.param, self._own[name]["curvature"], self._own[name]["curvature_steps"],
                 self.batch_size, self.curvature_decay) for name, t in self.targets.items()]

    @torch.no_grad()
    def _penalty_gradients(self) -> dict[int, torch.Tensor]:
        """penalty()'s gradient alpha/N w of each weight, at the weights before the step."""
        return {id(t.param): finite_alpha(self._own[name]["alpha"], t.param) / self.num_data * t.param
                for name, t in self.targets.items()}

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        """ef_batch_source="backward": h from this backward's gradient, pruned gradients held at 0."""
        def hook(grad):
            state = self._own[name]
            alpha = state["alpha"]
            pruned = alpha == math.inf
            data_grad = grad
            if self.prior == "penalty":  # the hook sees penalty()'s gradient alpha/N w too
                data_grad = grad - finite_alpha(alpha, grad) / self.num_data * weight.detach()
            rho = self.curvature_decay
            state["curvature"].mul_(rho).addcmul_(data_grad, data_grad, value=(1 - rho) * self.batch_size)
            state["curvature_steps"].add_(1)
            return grad.masked_fill(pruned.expand_as(grad), 0)  # no host sync to test for any
        return hook

    @staticmethod
    def _prior_step_size(group) -> float:
        """The step a constant force gets per optimizer step: lr, or lr (1 - dampening) /
        (1 - momentum) for heavy-ball SGD, whose velocity builds a steady force up to that
        (so the prior pulls as hard as it would inside the momentum, without its instability)."""
        lr = float(group.get("lr", 0.0))
        momentum = float(group.get("momentum", 0.0) or 0.0)
        if 0.0 < momentum < 1.0:  # Nesterov too: its steady step is the same
            lr *= (1.0 - float(group.get("dampening", 0.0) or 0.0)) / (1.0 - momentum)
        return lr

    @torch.no_grad()
    def _proximal_step(self, found_inf: torch.Tensor | None = None) -> None:
        """w <- argmin_v |v - w|^2 / (2 s) + alpha v^2 / (2N) = w / (1 + s alpha / N), s the prior's
        step size: the exact implicit step on the prior, contracting for every alpha, s >= 0.
        Not taken (without a host sync) where found_inf != 0: GradScaler skipped the step."""
        steps = {id(p): self._prior_step_size(g) for g in self.optimizer.param_groups for p in g["params"]}
        for name, target in self.targets.items():
            step = steps.get(id(target.param))
            if step:
                proximal_shrink_(target.param, self._own[name]["alpha"], step, self.num_data, found_inf)

    def penalty(self) -> torch.Tensor:
        """The ARD term (1 / 2N) sum alpha w^2. With prior="penalty", add it to a mean loss; with
        the proximal prior the step applies it, and this is its value, without gradient."""
        if self.fused:
            raise RuntimeError("MacKayPruner.penalty: MacKayAdam already applies the ARD prior in "
                               "its step; do not add it to the loss")
        with torch.set_grad_enabled(self.prior == "penalty" and torch.is_grad_enabled()):
            total = None
            for name, target in self.targets.items():
                alpha = finite_alpha(self._own[name]["alpha"], target.param)
                term = (alpha * target.param.square()).sum() * (0.5 / self.num_data)
                total = term if total is None else total + term
            if self.channel is not None and self.channel.penalty() is not None:
                total = total + self.channel.penalty()
        return total

