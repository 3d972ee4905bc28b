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
rank. A post-step hook fires only for steps that ran (a GradScaler's skipped step never
reaches it), and Lightning runs the last micro-batch's closure inside optimizer.step(), so a
pre-step hook would come too early there.

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
        self._reads_step_gradient = (not self.fused and self.curvature_kind == "ef-batch"
                                     and optimizer is not None)
        if self._reads_step_gradient:
            self._hooks.append(optimizer.register_step_post_hook(self._curvature_from_step))

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        """Backward hook: only holds the gradient of pruned weights at 0 (the curvature is read
        at the step)."""
        def hook(grad):
            return grad.masked_fill((self._own[name]["alpha"] == math.inf).expand_as(grad), 0)
        return hook

    @torch.no_grad()
    def _curvature_from_step(self, optimizer, args, kwargs) -> None:
        rho = self.curvature_decay
        for name, target in self.targets.items():
            grad = target.param.grad
            if grad is None:   # not used by this step's forward: no evidence either way
                continue
            self._own[name]["curvature"].mul_(rho).addcmul_(grad, grad, value=(1 - rho) * self.batch_size)
