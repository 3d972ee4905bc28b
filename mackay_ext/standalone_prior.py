"""The ARD prior for optimizers other than MacKayAdam (a mixin of MacKayPruner).

MacKayAdam applies the prior inside its fused step. Any other torch optimizer knows nothing of
it, so the pruner keeps alpha and an ef-batch curvature itself (a moving average
h <- rho h + (1 - rho) B g^2 and the count t of its updates, read as h / (1 - rho^t)) and applies the
prior after every optimizer step as the exact implicit (proximal) step
    w <- argmin_v |v - w|^2 / (2 s) + alpha v^2 / (2N) = w / (1 + s alpha / N),
contracting for every alpha and step size s, where the prior's gradient in plain SGD diverges
once lr alpha / N > 2. s is the step the optimizer gives the weight per unit of gradient (lr in
SGD, lr / sqrt(v_hat) per weight in Adam: mackay_ext.prior_step), so that prior and data balance
at the posterior mode. prior="penalty" keeps the older way: penalty() carries the gradient and
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
import warnings

import torch

from ._alpha import finite_alpha
from ._follow import state_dtype
from . import _extension
from .batch_curvature import StepCurvature
from .copy_inert import CopyInert
from .ops import adam_proximal_prior_
from .prior_step import KNOWN, PriorStep, knows, prior_step

# torch's optimizers whose step per unit of gradient is lr / (sqrt(v_hat) + eps) (RAdam, no
# subclass of these, is rectified: the general path)
_ADAM_STEPS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam)


@torch.no_grad()
def proximal_shrink_(param: torch.Tensor, alpha: torch.Tensor, step: PriorStep, num_data: float,
                     found_inf: torch.Tensor | None = None) -> None:
    """param <- param / (1 + s alpha / N), the prior's proximal step, in place, with `alpha` read
    with +inf as 0 (finite_alpha) and s = step.scale / step.denominator; not taken (without a
    host sync) where found_inf != 0, a step GradScaler skipped. With a per-weight denominator d
    the factor is d / (d + scale alpha / N): two passes over the weight."""
    scaled = step.scale / num_data
    if step.denominator is None:
        factor = 1.0 / (1.0 + scaled * alpha)   # alpha's shape: small where alpha is per group
    else:
        d = step.denominator
        shrunk = torch.add(d, alpha, alpha=scaled) if isinstance(scaled, float) else d + scaled * alpha
        if found_inf is None and param.dtype == d.dtype:
            param.mul_(d).div_(shrunk)
            return
        factor = d / shrunk
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
                self._hooks.append(weight.register_hook(CopyInert(self._curvature_hook(name, weight))))
            else:  # h read at the step, or an exact estimate: only pruned gradients held at 0
                self._hooks.append(weight.register_hook(CopyInert(self._pruned_gradient_hook(name))))
        if self.curvature_kind == "ef-batch" and self.ef_batch_source == "step":
            self._step_reader = StepCurvature(
                self.optimizer, self._step_entries,
                prior_gradients=self._penalty_gradients if self.prior == "penalty" else None)

    def _pruned_gradient_hook(self, name: str):
        def hook(grad):
            if self.accumulator is None or not self.accumulator.sampling:   # (fisher-mc's own backward
                self._gradient_since_update = True   # trains nothing; without an optimizer: _trained_since_update)
            view = self._alpha_view(name)
            # (a product, not masked_fill: 10x faster on a CPU, AlphaView.keep; a non-finite
            # gradient at a pruned entry would come with non-finite outputs anyway)
            return grad * view.keep if view.any_pruned else grad
        return hook

    def _step_entries(self):
        # h from (g / gradient_scale)^2: the mean loss's gradient (see MacKayPruner.gradient_scale)
        batch_size = self.batch_size / self.gradient_scale ** 2
        return [(t.param, self._own[name]["curvature"], self._own[name]["curvature_steps"],
                 batch_size, self.curvature_decay) for name, t in self.targets.items()]

    @torch.no_grad()
    def _penalty_gradients(self) -> dict[int, torch.Tensor]:
        """penalty()'s gradient alpha/N w of each weight, at the weights before the step."""
        return {id(t.param): finite_alpha(self._own[name]["alpha"], t.param) / self.num_data * t.param
                for name, t in self.targets.items()}

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        """ef_batch_source="backward": h from this backward's gradient, pruned gradients held at 0."""
        def hook(grad):
            self._gradient_since_update = True
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

    def _prior_step(self, param: torch.Tensor, groups: dict[int, dict]) -> PriorStep | None:
        """The prior's step size s for `param` after the optimizer's step: what that step gives
        the weight per unit of gradient (mackay_ext.prior_step), times gradient_scale (the
        optimizer's gradient over that of the mean loss the prior is relative to: the HF callback
        sets it where a model's loss is A times the mean under gradient accumulation). None where
        the optimizer does not step `param` or lr is 0. `groups`: _param_groups()."""
        group = groups.get(id(param))
        if group is None:
            return None
        step = prior_step(self.optimizer, group, param)
        if step is None:   # an optimizer whose per-weight step is not known here (said when built)
            step = PriorStep(float(group.get("lr", 0.0)))
        if isinstance(step.scale, float) and step.scale == 0.0:
            return None
        return step if self.gradient_scale == 1.0 else step._replace(scale=step.scale * self.gradient_scale)

    def _warn_unknown_optimizer(self) -> None:
        """Said when the pruner is built: the prior's step under an optimizer not known here."""
        if self.fused or self.optimizer is None or self.prior != "proximal" or knows(self.optimizer):
            return
        kind = type(self.optimizer).__name__
        if kind == "ZeroRedundancyOptimizer":   # (torch.distributed.optim: its state is sharded over the ranks)
            warnings.warn(
                "MacKayPruner: ZeroRedundancyOptimizer is not covered: it shards its state over the ranks, so "
                "the prior's per-weight step cannot be read for the weights other ranks hold, and the result is "
                "not what one process would find (a run kept 932 weights where one process keeps 1,042, another "
                "488 where 370). Use the optimizer itself under DistributedDataParallel, or MacKayAdam",
                RuntimeWarning, stacklevel=3)
            return
        warnings.warn(
            f"MacKayPruner: mackay_ext does not know the per-weight step of {kind} (it knows {', '.join(KNOWN)} "
            "and their subclasses); the prior's step is taken as Adam's where it keeps Adam's state (exp_avg_sq, "
            "betas), else as lr per unit of gradient, as in SGD. If it scales its steps otherwise (by the "
            "gradient's sign as Lion, factored as Adafactor, by trust ratios as LAMB), the prior pulls weaker "
            "or stronger than the data, and alpha is estimated away from the posterior mode (a sign-SGD net "
            "fell to chance at the first pruning update): use MacKayAdam or one of those, or "
            "prior='penalty' with pruner.penalty() in the loss", RuntimeWarning, stacklevel=3)

    def _param_groups(self) -> dict[int, dict]:
        """The optimizer's param group of each parameter, by id."""
        return {id(p): group for group in self.optimizer.param_groups for p in group["params"]}

    @torch.no_grad()
    def _proximal_step(self, found_inf: torch.Tensor | None = None) -> set[str]:
        """w <- argmin_v |v - w|^2 / (2 s) + alpha v^2 / (2N) = w / (1 + s alpha / N), s the prior's
        step size (per weight under an adaptive optimizer: _prior_step): the exact implicit step
        on the prior, contracting for every alpha, s >= 0. Not taken (without a host sync) where
        found_inf != 0: GradScaler skipped the step. Returns the layers whose pruned weights it
        zeroed too (the one-pass kernel's)."""
        groups = self._param_groups()
        zeroed = set()
        for name, target in self.targets.items():
            if not target.param.requires_grad or target.param.grad is None:   # the optimizer did not step it
                continue
            view = self._alpha_view(name)
            if not view.any_prior:   # before the first update, after switch_off_prior: nothing to do
                continue
            if self._adam_prior_in_one_pass(name, target.param, groups, found_inf):
                zeroed.add(name)
                continue
            step = self._prior_step(target.param, groups)
            if step is not None:
                proximal_shrink_(target.param, view.finite, step, self.num_data, found_inf)
        return zeroed

    def _adam_prior_in_one_pass(self, name: str, param: torch.Tensor, groups: dict[int, dict],
                                found_inf: torch.Tensor | None) -> bool:
        """The proximal step by the compiled kernel (ops.adam_proximal_prior_) where it applies: a
        float32 weight under torch's Adam, AdamW or NAdam (lr / (sqrt(v_hat) + eps) per unit of
        gradient) with a float lr; one pass over the weight, where the general path takes six
        and two temporaries (LeNet-300-100 under fused Adam: 1.74x -> 1.47x the plain step).
        False: not taken, the general path follows."""
        group = groups.get(id(param))
        state = self.optimizer.state.get(param, {}) if group is not None else {}
        v, step = state.get("exp_avg_sq"), state.get("step")
        if (self.backend != "ext" or not _extension.is_loaded() or group is None or v is None or step is None
                or not isinstance(self.optimizer, _ADAM_STEPS) or group.get("amsgrad") or "betas" not in group or not isinstance(group.get("lr"), float)
                or param.dtype != torch.float32 or v.dtype != torch.float32 or v.shape != param.shape):
            return False
        lr = group["lr"]
        if lr == 0.0:
            return False   # (no step, no prior: _prior_step's None; the masks as always)
        step = step if isinstance(step, torch.Tensor) else torch.tensor(float(step))
        if found_inf is not None and found_inf.device.type != "cpu":
            # GradScaler's flag of one device: a model over two GPUs has the weight on the other
            # (the op takes the flag on the weight's device or the CPU, as the general path does)
            found_inf = found_inf.to(param.device, non_blocking=True)
        adam_proximal_prior_(param, v, self._own[name]["alpha"], step, beta2=float(group["betas"][1]),
                             eps=float(group.get("eps", 1e-8)), scale=lr * self.gradient_scale / self.num_data,
                             found_inf=found_inf)
        return True

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

