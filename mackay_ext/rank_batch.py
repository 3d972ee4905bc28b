"""Under DistributedDataParallel, batch_size is the batch of one optimizer step over all ranks.

The step's gradient is the mean over every rank's examples (DDP averages the ranks' gradients),
so the ef-batch curvature B g^2 needs B = per-rank batch x accumulation steps x ranks. A new
user's 2-rank run given the per-rank batch kept 665 weights where the right B keeps 1,042, with no
word. When the process group has several ranks at the pruner's build, a forward pre-hook on its
model counts the examples of each optimizer step on this rank (training forwards with gradients:
the micro-batches' first dimensions), and the update warns once when batch_size equals that count,
one rank's batch, instead of the whole step's.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ._validate import user_stacklevel
from .copy_inert import CopyInert
from .ddp_lockstep import world_size


class RankBatchWatch:
    """The examples of this rank's last optimizer step (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.examples = 0            # of the step under way
        self.last_step: int | None = None
        self.warned = False
        self.handle = model.register_forward_pre_hook(CopyInert(self._count))

    def _count(self, module, args) -> None:
        if module.training and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() > 0:
            self.examples += args[0].shape[0]

    def after_step(self) -> None:
        if self.examples:
            self.last_step = self.examples
        self.examples = 0

    def check(self, batch_size: float | None) -> None:
        world = world_size()
        if self.warned or world < 2 or batch_size is None or self.last_step is None:
            return
        if float(batch_size) == float(self.last_step):
            self.warned = True
            warnings.warn(
                f"MacKayPruner: batch_size={batch_size:g} is this rank's batch (its last optimizer step read "
                f"{self.last_step} examples here), but under DistributedDataParallel the step's gradient is "
                f"the mean over all {world} ranks' examples: pass batch_size={self.last_step * world:g} "
                "(per-rank batch x accumulation steps x ranks), or the curvature reads "
                f"{world} times less evidence than there is and the updates prune more", RuntimeWarning,
                stacklevel=user_stacklevel())
