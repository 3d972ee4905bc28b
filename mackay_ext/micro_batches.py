"""ef-exact under gradient accumulation: the micro-batches of one optimizer step.

The exact curvature reads each example's gradient from the backward of its micro-batch's loss,
rescaled by the micro-batch's size b (a mean loss). Under torch's accumulation recipe each of
the A micro-batch losses of a step is also divided by A, so the backward holds 1/A of every
example's gradient of the step's mean loss, and its square 1/A^2: a new user's 64-64-10 MLP on
sklearn digits kept 790 weights at 0.957 test accuracy without accumulation, 226 at 0.892 under
A = 2 and 57 at 0.108 (chance) under A = 4, each with the same effective batch. The pruner counts
the backward passes of each optimizer step (those the hooks captured) and multiplies the
estimate by A^2 at the update: exact when every step of the window has the same A; otherwise by
the examples' mean of A^2 (a short last step of an epoch: a small error, one step in many).

The rule reads every backward of a step as one micro-batch of the step's mean loss. A loss that
is c times that mean, with gradient_scale = c > 1 as the README asks (the sum of A micro-batch
means left undivided, c = A; a sum over the batch, reduction="sum", c = B) holds c times every
example's gradient: its squares are divided by c^2 (a new user's sum loss with gradient_scale = B
read a curvature B^2 = 1,024 times too large, and kept 1,401 weights where the mean keeps 970).
gradient_scale below 1 is clipping's, which scales the gradient after the backward, where the
hooks do not look, and changes nothing here. A caller that knows the micro-batch losses
are undivided says so (`divided = False`: the Hugging Face callback, for transformers' heads that
compute their own mean loss, which the Trainer does not divide, and whose gradient_scale also
holds each step's clipping factor, which the hooks do not see): each backward is then read as it
is, its examples' whole gradients. (A user's gradient_scale above 1 is read as the loss's factor
alone; one that looks like that factor times clipping's, which the hooks cannot tell apart, is
warned about.)
"""
from __future__ import annotations

import warnings
from typing import Any


class MicroBatchScale:
    """The examples' mean of A^2 over the optimizer steps since the last update."""

    def __init__(self) -> None:
        self.weighted_squares = 0.0   # sum over steps of examples x A^2
        self.examples = 0.0           # sum over steps of examples
        self.largest = 0              # examples of the largest step counted
        self.seen = 0                 # the accumulator's example count at the last step's end
        self.divided = True   # each micro-batch's loss divided by their number (torch's recipe)
        self.warned = False

    def after_step(self, passes: int, seen: int, gradient_scale: float) -> None:
        """A step that captured `passes` backward passes; `seen`: the accumulator's example count
        now (this step's examples are those since the last step)."""
        examples, self.seen = seen - self.seen, seen
        if passes < 1 or examples < 1:   # (a step curvature_every left out)
            return
        share = passes / max(gradient_scale, 1.0) if self.divided else 1
        if self.divided and gradient_scale > 1.0 and not self.warned and (
                gradient_scale != round(gradient_scale) or (passes > 1 and gradient_scale != passes)):
            self.warned = True
            warnings.warn(
                f"MacKayPruner: curvature='ef-exact' reads gradient_scale above 1 as the loss's factor over the "
                f"step's mean (A undivided micro-batch means, or B under a sum), whose squares it divides out; "
                f"gradient_scale={gradient_scale:g} over {passes} backward pass(es) looks like that factor times "
                "clipping's, which scales the gradient after the backward and which the exact curvature cannot "
                "tell apart from it. Divide each micro-batch's loss by the accumulation steps (torch's recipe) "
                "and use a mean loss, and leave gradient_scale for clipping", RuntimeWarning, stacklevel=4)
        self.weighted_squares += examples * share * share
        self.examples += examples
        self.largest = max(self.largest, examples)

    def factor(self) -> float:
        return self.weighted_squares / self.examples if self.examples > 0 else 1.0

    def largest_step(self) -> int:
        """The examples (rows of the batches) of the largest step on this process since the
        reset, 0 if none: a full step's (an epoch's short last batch is no step's size)."""
        return self.largest

    def reset(self) -> None:
        self.weighted_squares = self.examples = 0.0
        self.largest = 0
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"weighted_squares": self.weighted_squares, "examples": self.examples, "largest": self.largest}

    def load_state_dict(self, state: dict[str, Any], seen: int) -> None:
        """`seen`: the example count of the accumulator loaded beside it."""
        self.weighted_squares = float(state.get("weighted_squares", 0.0))
        self.examples = float(state.get("examples", 0.0))
        self.largest = int(state.get("largest", 0))   # (absent before it was saved: from the steps to come)
        self.seen = seen
