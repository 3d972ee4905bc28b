"""batch_size is the batch of one optimizer step: what a step's gradient is the mean over.

The ef-batch curvature B g^2 needs B = micro-batch x accumulation steps x DDP ranks. Two wrong
B's have been met with no word, each pruning far more than the data warrant:
  - under DistributedDataParallel, one rank's batch (the step's gradient is the mean over every
    rank's examples): a new user's 2-rank run kept 665 weights where the right B keeps 1,042;
  - under gradient accumulation, one micro-batch (the step's gradient is the mean over its A
    micro-batches, each loss divided by A): h came out A times too small, and under A = 4 95% of
    a network was pruned.
A forward pre-hook on the model counts the examples of each training forward (with gradients:
the first dimension of its first argument, or of its first tensor keyword where it has none),
and a hook on its output notes each backward pass
that reaches it (the autograd graph task), per optimizer step, until the first update after a
step (then removed: the hooks cost every step, and a run's batch_size does not change). It warns when
batch_size equals one rank's step (under DDP) or one micro-batch of a step that took several
backward passes of equal micro-batches. A step of several forwards and one backward (two views
of each example, a siamese pair) is one batch, and is not warned about; a forward of the model with
every parameter frozen is not counted.
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ._validate import user_stacklevel
from .copy_inert import CopyInert
from .grad_writes import gradient_node, writes_grad
from .loss_units import averages_over_tokens
from .ddp_lockstep import world_size


class StepBatchWatch:
    """The examples and backward passes of this rank's optimizer steps (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.forwards: list[int] = []   # examples of each training forward of the step under way
        self.inputs: list[weakref.ref] = []   # their inputs: the same tensor run twice is one batch
        self.passes: set[int] = set()   # the backward passes (graph tasks) that reached an output
        self.last_step = 0                  # examples of the last step on this rank
        self.steps = 0                      # steps seen
        self.accumulated: Counter = Counter()   # (A, b) -> steps of A backward passes of b examples each
        self.rows = None   # MacKayPruner.examples_of_rows's RowExamples: a graph batch's examples
        # the model's own loss averages over label tokens (a Hugging Face LM's): B in sequences is
        # then tokens-per-sequence times too small (a callback checks its units itself: off there)
        self.token_loss = averages_over_tokens(model)
        self.model_name = type(getattr(model, "module", model)).__name__
        self.handles = [model.register_forward_pre_hook(CopyInert(self._count), with_kwargs=True),
                        model.register_forward_hook(CopyInert(self._watch_backward))]

    def _count(self, module, args, kwargs) -> None:
        # the first argument, or the first keyword's tensor where there is none (a Hugging Face
        # model is called with input_ids=...: the check never ran for one)
        first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling() \
                or not isinstance(first, torch.Tensor) or first.dim() == 0 or _frozen(module):
            return
        # SAM's second forward of the same batch is no new example; the tensor itself, not its
        # address (a loader's next batch often takes the memory of the one freed before it)
        if not any(ref() is first for ref in self.inputs):
            self.inputs.append(weakref.ref(first))
            rows = first.shape[0]   # (a graph batch's nodes are its graphs' rows: examples_of_rows)
            if self.rows is not None and rows in self.rows.layouts:
                rows = self.rows.examples
            self.forwards.append(rows)

    def _watch_backward(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling() or _frozen(module):
            return
        for out in tree_leaves(output):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda grad, model=module: self._note_pass(model))
                return

    def _note_pass(self, model: nn.Module) -> None:
        # a pass that writes no parameter's .grad is no training pass: a gradient to the inputs
        # alone (an adversarial example's FGSM step), any torch.autograd.grad (a probe of the
        # gradient; torch answers the question for no leaf there)
        if writes_grad(gradient_node(param) for param in model.parameters() if param.requires_grad):
            self.passes.add(torch._C._current_graph_task_id())

    def close_step(self) -> None:
        if self.forwards:
            self.steps += 1
            self.last_step = sum(self.forwards)
            if len(self.passes) > 1 and len(self.passes) == len(self.forwards) and len(set(self.forwards)) == 1:
                self.accumulated[(len(self.passes), self.forwards[0])] += 1
        self.forwards.clear()
        self.inputs.clear()
        self.passes.clear()
        self.rows = None   # (the step's graph-batch index, spent: each batch gives its own)

    def check(self, batch_size: float | None) -> bool:
        """Warn (at an update) when batch_size is one rank's or one micro-batch's. True once a
        step has been seen: the verdict is in, and the watch can go (its hooks cost every step
        ~4% of a small MLP's, and a run's batch_size does not change). Accumulation is read off
        most of the steps, not one (a step GradScaler skipped merges its pass with the next's)."""
        if not self.steps:
            return False
        if batch_size is None:
            return True
        world = world_size()
        (passes, micro), count = self.accumulated.most_common(1)[0] if self.accumulated else ((1, 0), 0)
        if 2 * count > self.steps and float(batch_size) == float(micro):
            ranks = f" x {world} ranks" if world > 1 else ""
            _warn(batch_size, f"one micro-batch, but an optimizer step took {passes} backward passes of {micro} "
                  "examples each (gradient accumulation), and the step's gradient is the mean over all of them",
                  passes * micro * world, f"micro-batch x accumulation steps{ranks}", passes * world)
        elif self.token_loss and float(batch_size) == float(self.last_step * world):
            warnings.warn(f"MacKayPruner: batch_size={batch_size:g} is the {self.last_step * world} rows (sequences) "
                          f"of an optimizer step, but {self.model_name} averages its loss over label tokens (it divides by "
                          "num_items_in_batch, as a causal or masked LM does): num_data and batch_size count what the "
                          "loss averages over. Pass num_data=<label tokens in the training set> and batch_size="
                          "<label tokens of one optimizer step>, or the curvature reads tokens-per-sequence times "
                          "less evidence than there is and the updates prune far more (a GPT-2 lost 99.95% of its "
                          "weights at the first). If the loss you backpropagate is a mean over sequences, this does "
                          "not apply", RuntimeWarning, stacklevel=user_stacklevel())
        elif world > 1 and float(batch_size) == float(self.last_step):
            _warn(batch_size, f"this rank's batch (its last optimizer step read {self.last_step} examples here), "
                  f"but under DistributedDataParallel the step's gradient is the mean over all {world} ranks' "
                  "examples", self.last_step * world, "per-rank batch x accumulation steps x ranks", world)
        return True

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _frozen(model: nn.Module) -> bool:
    """Every parameter frozen: a forward and backward that train none of it (a DDPG/SAC actor's loss
    through its critic, frozen for it as usual, after the critic's step: counted, it read as a
    second micro-batch of the critic's next step)."""
    return not any(param.requires_grad for param in model.parameters())


def _warn(given: float, what: str, needed: float, made_of: str, times: int) -> None:
    warnings.warn(f"MacKayPruner: batch_size={given:g} is {what}: pass batch_size={needed:g} ({made_of}), or "
                  f"the curvature reads {times} times less evidence than there is and the updates prune more",
                  RuntimeWarning, stacklevel=user_stacklevel())
