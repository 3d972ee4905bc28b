"""The ef-batch curvature of a non-MacKayAdam optimizer, read from the gradient of each optimizer step.

MacKayPruner's own estimate (mackay_ext.standalone_prior) reads every backward's gradient. Inside
a training framework that gradient is not the one the optimizer uses:
- with gradient accumulation each micro-batch's backward gives a part of the step's gradient, so
  the moving average takes A updates per optimizer step (its bias (1 - rho^n) grows A times
  faster) from A partial gradients scaled by however the framework divided the loss;
- under DistributedDataParallel a backward hook sees the rank's own gradient, before the
  all-reduce, so every rank would estimate its own curvature and end with its own alpha.
Read once per optimizer step, after the step, the gradient is the averaged, accumulated,
unscaled (and clipped) one the optimizer used, the one MacKayAdam's fused step reads: with B the
effective batch (per-device batch x accumulation x world size), h <- rho h + (1 - rho) B g^2 is
the same estimate as the one of a run without accumulation on that batch, and the same on every
rank. It is read after the step: a post-step hook fires only for steps that ran (a GradScaler's
skipped step never reaches it), and Lightning runs the last micro-batch's closure inside
optimizer.step(), so a pre-step hook would come too early there; except for the optimizers
that handle GradScaler's scale in their own step (see _curvature_before_step).

The change belongs in MacKayPruner (a curvature source "step"); until it is there, the
frameworks' callbacks build this subclass.
"""
from __future__ import annotations

import math

import torch

from ..pruner import MacKayPruner


class StepCurvaturePruner(MacKayPruner):
    """MacKayPruner whose ef-batch curvature (non-MacKayAdam optimizers) comes from the gradient
    of each optimizer step instead of each backward; `batch_size` is then the effective batch
    of one optimizer step. With a MacKayAdam, or the exact curvatures, it is MacKayPruner."""

    def __init__(self, model, optimizer, **options):
        if options.get("prior") == "penalty":
            # the penalty's gradient would reach the step's gradient in a framework-dependent
            # scale (and at the weights before the step); the callbacks own the loss, not the user
            raise ValueError("the training-loop callbacks apply the prior themselves (proximal step, "
                             "or MacKayAdam): prior='penalty' is not available there")
        super().__init__(model, optimizer, **options)
        self._own_step_curvature = not self.fused and self.curvature_kind == "ef-batch"
        # granularity="channel": the 1-D members (biases, norms) that channel_ard tracks itself
        # estimate h in their own backward hooks when a batch size is known; take B and rho from
        # there and leave those hooks only their masking (they skip the estimate without a B)
        self._channel_step_curvature = None
        channel = self.channel
        if channel is not None and channel._own and channel._batch_size is not None:
            self._channel_step_curvature = (channel._batch_size, channel._decay)
            channel._batch_size = None
        self._read_before_step = False
        if optimizer is not None and (self._own_step_curvature or self._channel_step_curvature):
            self._hooks.append(optimizer.register_step_pre_hook(self._curvature_before_step))
            self._hooks.append(optimizer.register_step_post_hook(self._curvature_from_step))

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        """Backward hook: only holds the gradient of pruned weights at 0 (the curvature is read
        at the step)."""
        def hook(grad):
            return grad.masked_fill((self._own[name]["alpha"] == math.inf).expand_as(grad), 0)
        return hook

    @torch.no_grad()
    def _curvature_from_step(self, optimizer, args, kwargs) -> None:
        if self._read_before_step:   # done by the pre-step hook for this step
            self._read_before_step = False
            return
        self._estimate(None, None)

    @torch.no_grad()
    def _curvature_before_step(self, optimizer, args, kwargs) -> None:
        """An optimizer that takes GradScaler's scaling into its own step (_step_supports_amp_scaling:
        torch's fused Adam/AdamW, MacKayAdam) gets optimizer.grad_scale / found_inf: its gradients
        may still be scaled, the step runs also when they hold inf/NaN (it skips itself), and it
        may unscale them in place. GradScaler refuses closures, so the gradients are complete
        here: read them now, unscaled, and skip an overflowing step on the device (no host sync)."""
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is None:
            return
        self._estimate(getattr(optimizer, "grad_scale", None), found_inf)
        self._read_before_step = True

    def _estimate(self, grad_scale, found_inf) -> None:
        estimates = []
        if self._own_step_curvature:
            estimates += [(t.param, self._own[name]["curvature"], self.batch_size, self.curvature_decay)
                          for name, t in self.targets.items()]
        if self._channel_step_curvature:
            batch_size, rho = self._channel_step_curvature
            estimates += [(self.channel.members[name].param, state["curvature"], batch_size, rho)
                          for name, state in self.channel._own.items()]
        for param, curvature, batch_size, rho in estimates:
            grad = param.grad
            if grad is None:   # not used by this step's forward: no evidence either way
                continue
            if grad_scale is not None:
                grad = grad / grad_scale.to(grad.device)
            if found_inf is None:
                curvature.mul_(rho).addcmul_(grad, grad, value=(1 - rho) * batch_size)
            else:
                updated = torch.addcmul(curvature * rho, grad, grad, value=(1 - rho) * batch_size)
                curvature.copy_(torch.where(found_inf.to(grad.device) > 0, curvature, updated))
