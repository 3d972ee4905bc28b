"""Hooks and forwards the library installs on a user's modules, and what a copy of the model gets.

FisherAccumulator puts a forward hook on every layer it captures and, on the convolutions whose
weight gradient it serves, a forward of its own (an instance attribute); mac_price's input
covariance puts a forward pre-hook on the Linear layers it re-fits. A copy of the model
(copy.deepcopy, pickle or torch.save of the module; shrink copies the model it shrinks) would
carry them along: a hidden second accumulator capturing for the copy on every training forward,
or the copy's batches added to the original's covariance. So they copy as inert stand-ins: a
copied model is under no capture, and a pruner built on it installs its own. The same holds for
the gradient hooks a pruner puts on weights (a closure, which pickle refuses: torch.save of a
pruner under a torch optimizer raised); the copied pruner then says at its update that it is a copy.
"""
from __future__ import annotations

from torch import nn


class InertHook:
    """What a copied hook becomes: does nothing."""

    __slots__ = ()

    def __call__(self, *args) -> None:
        return None


class CopyInert:
    """A module hook (forward or forward-pre) or a tensor's gradient hook that a copy gets as an
    InertHook (for a gradient hook, None leaves the gradient as it is)."""

    __slots__ = ("hook",)

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, *args):
        return self.hook(*args)

    def __reduce__(self):
        return InertHook, ()


class PlainForward:
    """What a copied served forward becomes: the module's own forward."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __reduce__(self):
        return PlainForward, (self.module,)


class ServedForward:
    """The forward FisherAccumulator gives a served convolution (module.forward)."""

    __slots__ = ("accumulator", "module")

    def __init__(self, accumulator, module: nn.Module):
        self.accumulator, self.module = accumulator, module

    def __call__(self, x, *args, **kwargs):
        return self.accumulator._served_forward(self.module, x, *args, **kwargs)

    def __reduce__(self):
        return PlainForward, (self.module,)


def own_forward(module: nn.Module) -> bool:
    """Whether the module runs its class's forward: no instance forward, or a copied served one
    (a model copied while captured)."""
    forward = vars(module).get("forward")
    return forward is None or isinstance(forward, PlainForward)
