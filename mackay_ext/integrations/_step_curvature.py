"""The ef-batch curvature of a non-MacKayAdam optimizer, read from the gradient of each optimizer step.

MacKayPruner's own estimate (mackay_ext.standalone_prior) reads every backward's gradient. Inside
a training framework that gradient is not the one the optimizer uses:
- with gradient accumulation each micro-batch's backward gives a part of the step's gradient, so
  the moving average takes A updates per optimizer step from A partial gradients scaled by
  however the framework divided the loss;
- under DistributedDataParallel a backward hook sees the rank's own gradient, before the
  all-reduce, so every rank would estimate its own curvature and end with its own alpha.
Read once per optimizer step (mackay_ext.curvature.StepCurvature), the gradient is the averaged,
accumulated, unscaled (and clipped) one the optimizer used, the one MacKayAdam's fused step reads:
with B the effective batch (per-device batch x accumulation x world size), h <- rho h + (1 - rho)
B g^2 is the same estimate as the one of a run without accumulation on that batch, and the same
on every rank. The 1-D channel members that channel_ard tracks itself (granularity="channel")
follow the pruner's ef_batch_source and are read at the step too.

The change belongs in MacKayPruner (a curvature source "step"); until it is there, the
frameworks' callbacks build this subclass.
"""
from __future__ import annotations

import math

import torch

from ..curvature import StepCurvature
from ..pruner import MacKayPruner


class StepCurvaturePruner(MacKayPruner):
    """MacKayPruner whose ef-batch curvature (non-MacKayAdam optimizers) comes from the gradient
    of each optimizer step instead of each backward; `batch_size` is then the effective batch
    of one optimizer step. With a MacKayAdam, or the exact curvatures, it is MacKayPruner."""

    ef_batch_source = "step"

    def __init__(self, model, optimizer, **options):
        if options.get("prior") == "penalty":
            # the penalty's gradient would reach the step's gradient in a framework-dependent
            # scale (and at the weights before the step); the callbacks own the loss, not the user
            raise ValueError("the training-loop callbacks apply the prior themselves (proximal step, "
                             "or MacKayAdam): prior='penalty' is not available there")
        super().__init__(model, optimizer, **options)
        self._step_reader = None
        if optimizer is not None and not self.fused and self.curvature_kind == "ef-batch":
            self._step_reader = StepCurvature(optimizer, self._step_entries)

    def _step_entries(self):
        return [(t.param, self._own[name]["curvature"], self._own[name]["curvature_steps"],
                 self.batch_size, self.curvature_decay) for name, t in self.targets.items()]

    def _curvature_hook(self, name: str, weight: torch.Tensor):
        """Backward hook: only holds the gradient of pruned weights at 0 (the curvature is read
        at the step)."""
        def hook(grad):
            return grad.masked_fill((self._own[name]["alpha"] == math.inf).expand_as(grad), 0)
        return hook

    def detach(self) -> None:
        super().detach()
        if self._step_reader is not None:
            self._step_reader.remove()
