"""batch_size is the batch of one optimizer step: what a step's gradient is the mean over.

The ef-batch curvature B g^2 needs B = micro-batch x accumulation steps x DDP ranks. Two wrong
B's have been met with no word, each pruning far more than the data warrant:
  - under DistributedDataParallel, one rank's batch (the step's gradient is the mean over every
    rank's examples): a new user's 2-rank run kept 665 weights where the right B keeps 1,042;
  - under gradient accumulation, one micro-batch (the step's gradient is the mean over its A
    micro-batches, each loss divided by A): h came out A times too small, and under A = 4 95% of
    a network was pruned.
A forward pre-hook on the model counts the examples of each training forward (with gradients:
the first dimension of its first argument), and a hook on its output notes each backward pass
that reaches it (the autograd graph task), per optimizer step, until the first update after a
step (then removed: the hooks cost every step, and a run's batch_size does not change). It warns when
batch_size equals one rank's step (under DDP) or one micro-batch of a step that took several
backward passes of equal micro-batches. A step of several forwards and one backward (two views
of each example, a siamese pair) is one batch, and is not warned about.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._validate import user_stacklevel
from .copy_inert import CopyInert
from .ddp_lockstep import world_size


class StepBatchWatch:
    """The examples and backward passes of this rank's optimizer steps (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.forwards: list[int] = []   # examples of each training forward of the step under way
        self.passes: set[int] = set()   # the backward passes (graph tasks) that reached an output
        self.last_step: int | None = None           # examples of the last step on this rank
        self.micro_batches: tuple[int, int] | None = None   # (A, b) of the last step that accumulated
        self.handles = [model.register_forward_pre_hook(CopyInert(self._count)),
                        model.register_forward_hook(CopyInert(self._watch_backward))]

    def _count(self, module, args) -> None:
        if module.training and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() > 0:
            self.forwards.append(args[0].shape[0])

    def _watch_backward(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return
        for out in tree_leaves(output):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self._note_pass)
                return

    def _note_pass(self, grad):
        self.passes.add(torch._C._current_graph_task_id())

    def close_step(self) -> None:
        if self.forwards:
            self.last_step = sum(self.forwards)
            sizes = set(self.forwards)
            if len(self.passes) > 1 and len(self.passes) == len(self.forwards) and len(sizes) == 1:
                self.micro_batches = (len(self.passes), self.forwards[0])
        self.forwards.clear()
        self.passes.clear()

    def check(self, batch_size: float | None) -> bool:
        """Warn (at an update) when batch_size is one rank's or one micro-batch's. True once a
        step has been seen: the verdict is in, and the watch can go (its hooks cost every step
        ~4% of a small MLP's, and a run's batch_size does not change)."""
        if self.last_step is None:
            return False
        if batch_size is None:
            return True
        world = world_size()
        if self.micro_batches is not None and float(batch_size) == float(self.micro_batches[1]):
            passes, micro = self.micro_batches
            ranks = f" x {world} ranks" if world > 1 else ""
            warnings.warn(
                f"MacKayPruner: batch_size={batch_size:g} is one micro-batch, but an optimizer step took {passes} "
                f"backward passes of {micro} examples each (gradient accumulation), and the step's gradient is "
                f"the mean over all of them: pass batch_size={passes * micro * world:g} (micro-batch x "
                f"accumulation steps{ranks}), or the curvature reads {passes * world} times less evidence than "
                "there is and the updates prune more", RuntimeWarning, stacklevel=user_stacklevel())
        elif world > 1 and float(batch_size) == float(self.last_step):
            warnings.warn(
                f"MacKayPruner: batch_size={batch_size:g} is this rank's batch (its last optimizer step read "
                f"{self.last_step} examples here), but under DistributedDataParallel the step's gradient is "
                f"the mean over all {world} ranks' examples: pass batch_size={self.last_step * world:g} "
                "(per-rank batch x accumulation steps x ranks), or the curvature reads "
                f"{world} times less evidence than there is and the updates prune more", RuntimeWarning,
                stacklevel=user_stacklevel())
        return True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
