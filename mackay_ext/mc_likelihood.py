"""fisher-mc's likelihood is categorical: said when the training loss is not one of softmax(logits).

fisher-mc draws labels from softmax(logits) and squares the gradients of -log p(label): the
Fisher of a classifier. A regression head of two or more outputs passes the shape checks, and a
new user's (mean, log-variance) head read an output-layer curvature about 3,000 times smaller than
ef-exact's, kept 169 of 4,864 weights at its first pruning update and went from a test MSE of
0.030 to 0.785, told only that the update pruned much. Any loss of softmax(logits) (cross-entropy,
label smoothing, distillation's KL) is unchanged when a constant is added to a row of logits, so
its gradient's rows sum to 0; a regression's or a multi-label sigmoid's do not. The first few
training backward passes through the logits are looked at, and such a loss is said once.
"""
from __future__ import annotations

import math
import warnings

import torch

from ._validate import user_stacklevel

LOOKS = 3                 # training backward passes looked at
ROW_SUM_SHARE = 0.02      # of the gradient's size: float32 rounding is ~1e-7 of it, bfloat16's ~4e-3
ROWS = 1024               # rows looked at, at most


class SoftmaxLossCheck:
    def __init__(self) -> None:
        self.looked = 0
        self.said = False

    def watch(self, logits: torch.Tensor) -> None:
        """Look at the gradient the training loss sends back through `logits` (N, classes); where
        they are a view the loss does not use (a pixel decoder's (N, 1, H, W) logits passed as
        logits.flatten(1), the loss on the 4-D tensor: no gradient comes through the view, and
        the check never looked), at the gradient of the tensor they view, laid out as they are."""
        if self.said or self.looked >= LOOKS or not logits.requires_grad:
            return
        base = logits._base
        if base is None or not base.requires_grad:
            logits.register_hook(self._look)
            return
        through_view = []   # the view's gradient comes before its base's, in the backward that uses it
        logits.register_hook(lambda grad: through_view.append(True) or self._look(grad))
        size, stride, offset = logits.size(), logits.stride(), logits.storage_offset()
        # a dense prediction's [N, C, H, W] logits passed as logits.flatten(1), one row an example
        # (one position, [N, C, 1, 1] from a global pool, is one softmax either way)
        flattened = base.dim() >= 3 and logits.dim() == 2 and base.shape[1] > 1 and \
            math.prod(base.shape[2:]) > 1 and tuple(logits.shape) == (base.shape[0], math.prod(base.shape[1:]))

        def look_at_base(grad: torch.Tensor) -> None:
            if through_view or self.said or self.looked >= LOOKS:
                return
            if flattened and self._per_position(grad):
                return
            if grad.stride() != base.stride():   # (laid out as the base, to read the view's layout in it;
                # a language model's logits' gradient comes as its base's, and is read in place)
                grad = torch.empty_strided(base.size(), base.stride(), dtype=grad.dtype,
                                           device=grad.device).copy_(grad)
            self._look(grad.as_strided(size, stride, grad.storage_offset() + offset - base.storage_offset()))

        base.register_hook(look_at_base)

    def _per_position(self, grad: torch.Tensor) -> bool:
        """Said (True) where the loss is a softmax over dim 1 at each position of [N, C, H, W]
        logits (a segmentation's per-pixel cross-entropy: its gradient sums to 0 over C at every
        pixel) while fisher-mc was given them flattened to [N, C*H*W]: it drew one label over all
        C*H*W entries, the Fisher of another model (a new user's head bias read 1/(H*W) of the
        per-pixel Fisher, no word)."""
        part = grad.detach()[:ROWS]
        size = float(part.abs().sum(dtype=torch.float32))
        if size == 0.0 or float(part.sum(1, dtype=torch.float32).abs().sum()) / size > ROW_SUM_SHARE:
            return False
        self.said = True
        positions = part[0, 0].numel()
        warnings.warn(
            f"FisherAccumulator (fisher-mc): the logits given are [N, C, ...] flattened to [N, C*{positions}], "
            f"and the training loss is a softmax over C at each of the {positions} positions (its gradient sums "
            "to 0 over C at every position): fisher-mc drew one label over all of them, the Fisher of a single "
            f"categorical (a head bias read 1/{positions} of the per-position Fisher). Pass the positions as "
            "rows, logits.movedim(1, -1).reshape(-1, C), with num_data and batch_size counting positions, or "
            "use curvature='ef-exact' or 'ef-batch'", RuntimeWarning, stacklevel=user_stacklevel())
        return True

    def _look(self, grad: torch.Tensor) -> None:
        if self.said or self.looked >= LOOKS:
            return
        self.looked += 1
        rows = grad.detach()[:ROWS]   # (a view: a language model's logits' gradient can be gigabytes)
        size = float(rows.abs().sum(dtype=torch.float32))
        if size == 0.0:
            return
        share = float(rows.sum(1, dtype=torch.float32).abs().sum()) / size
        if share > ROW_SUM_SHARE:
            self.said = True
            warnings.warn(
                "FisherAccumulator (fisher-mc): the training loss is not a function of softmax(logits) (the rows "
                f"of its gradient at the logits sum to {share:.0%} of the gradient's size, where a softmax loss's "
                "sum to 0): fisher-mc samples labels from softmax(logits), the Fisher of a classifier, and read a "
                "regression head's curvature thousands of times too small. For a regression, a multi-label "
                "sigmoid or another likelihood, use curvature='ef-exact' or 'ef-batch'", RuntimeWarning,
                stacklevel=user_stacklevel())
