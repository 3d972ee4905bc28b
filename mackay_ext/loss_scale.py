"""The loss scale of the backward pass running now, where a torch.amp.GradScaler scaled its loss.

ef-exact squares the per-example gradients its hooks see during the training backward. Under
GradScaler that backward starts from scale * loss, so every square was scale^2 too large (a new
user's fp32 + GradScaler run, scale 2^12: the curvature 2^24 times too large, half as many
weights pruned, silently), and a step the scaler skips for its inf gradients put inf into the
sums (the next update raised "training has diverged"). ef-batch reads the gradient after the step,
unscaled, and fisher-mc differentiates an unscaled loss of its own, so only ef-exact needs this.

torch offers no hook on GradScaler, so `install()` wraps GradScaler.scale (once per process,
behaviour unchanged): each tensor it returns gets a pre-hook on the node that made it, which
runs first in any backward through it and records the scale with that backward's graph task.
FisherAccumulator reads `current()` when a backward's first layer gradient arrives.
"""
from __future__ import annotations

import functools

import torch

_installed = False
_current: tuple[int, torch.Tensor] | None = None   # (graph task id, the scale it started from)


def install() -> None:
    """Wrap torch.amp.GradScaler.scale (idempotent)."""
    global _installed
    if _installed:
        return
    original = torch.amp.GradScaler.scale

    @functools.wraps(original)
    def scale(self, outputs):
        scaled = original(self, outputs)
        if getattr(self, "_enabled", False) and isinstance(getattr(self, "_scale", None), torch.Tensor):
            _mark(scaled, self._scale.detach().clone())   # (update() rewrites _scale in place later)
        return scaled

    torch.amp.GradScaler.scale = scale
    _installed = True


def _mark(outputs, value: torch.Tensor) -> None:
    if isinstance(outputs, torch.Tensor):
        if outputs.grad_fn is not None:
            outputs.grad_fn.register_prehook(lambda grads: _started(value))
    elif isinstance(outputs, (list, tuple)):
        for item in outputs:
            _mark(item, value)


def _started(value: torch.Tensor) -> None:
    global _current
    _current = (torch._C._current_graph_task_id(), value)


def current() -> float | None:
    """The loss scale of the backward pass running now, or None (its loss was not scaled)."""
    if _current is None or _current[0] != torch._C._current_graph_task_id():
        return None
    return float(_current[1])
