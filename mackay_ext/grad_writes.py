"""Whether the backward under way writes a parameter's .grad, which the optimizer steps on.

Not so for backward(inputs=...) naming other tensors, nor for any torch.autograd.grad: to the
inputs (an adversarial example's FGSM or PGD step, a saliency map) or to the parameters (a probe of
the gradient, such as VQGAN's adaptive loss weight or a gradient-norm log). Counted, an FGSM step
read as a second micro-batch of every step. The engine answers for a parameter's gradient
accumulator (its AccumulateGrad node); under torch.autograd.grad it answers for no leaf.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.autograd.graph import get_gradient_edge

# a leaf's gradient accumulator; get_gradient_edge finds the same through two views, not one
gradient_node = getattr(torch.autograd.graph, "_get_grad_fn_or_grad_acc", None) or \
    (lambda param: get_gradient_edge(param).node)


def writes_grad(nodes: Iterable) -> bool:
    """Whether the engine runs any of these gradient accumulators in the backward under way
    (False under torch.autograd.grad, which writes no .grad)."""
    try:
        return any(torch._C._will_engine_execute_node(node) for node in nodes)
    except RuntimeError:   # torch.autograd.grad, which answers for no leaf
        return False
