"""The loss scale of a backward pass whose loss a torch.amp.GradScaler scaled, and the scaler's
verdict on the step it belongs to.

ef-exact squares the per-example gradients its hooks see during the training backward. Under
GradScaler that backward starts from scale * loss, so every square was scale^2 too large (a new
user's fp32 + GradScaler run, scale 2^12: the curvature 2^24 times too large, half as many
weights pruned, silently), and a step the scaler skips for its inf gradients put inf into the
sums (the next update raised "training has diverged"). ef-batch reads the gradient after the step,
unscaled, and fisher-mc differentiates an unscaled loss of its own, so only ef-exact needs this.

torch offers no hook on GradScaler, so `install()` wraps GradScaler.scale and .update (and the
overrides of subclasses, e.g. FSDP's ShardedGradScaler; behaviour unchanged):
- each tensor scale() returns gets a pre-hook on the node that made it, which runs first in any
  backward through it and records the scale under that backward's graph task (`of_task`); the
  record goes when the task ends. FisherAccumulator divides it out, and holds a scaled step's
  squares apart until the step is known to have run;
- update() (once per step, after it) tells every watching accumulator whether the scaler skipped
  the step (`settle_step`): its held squares are then dropped, else kept.
"""
from __future__ import annotations

import functools
import weakref

import torch

_scales: dict[int, torch.Tensor] = {}   # graph task id -> the scale its loss was multiplied by
_watchers: "weakref.WeakSet" = weakref.WeakSet()   # accumulators told of each update()
_wrapped: set[type] = set()


def install() -> None:
    """Wrap scale and update of torch.amp.GradScaler and of every subclass that overrides them
    (idempotent; called again as accumulators are built, for subclasses defined since)."""
    pending = [torch.amp.GradScaler]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls in _wrapped:
            continue
        _wrapped.add(cls)
        if "scale" in vars(cls):
            cls.scale = _wrap_scale(vars(cls)["scale"])
        if "update" in vars(cls):
            cls.update = _wrap_update(vars(cls)["update"])


def watch(accumulator) -> None:
    _watchers.add(accumulator)


def of_task(task: int) -> float | None:
    """The loss scale of backward graph task `task`, or None (its loss was not scaled)."""
    value = _scales.get(task)
    return None if value is None else float(value)


def _wrap_scale(original):
    if getattr(original, "_mackay_wrapped", False):
        return original

    @functools.wraps(original)
    def scale(self, outputs):
        scaled = original(self, outputs)
        value = getattr(self, "_scale", None)
        if getattr(self, "_enabled", False) and isinstance(value, torch.Tensor):
            _mark(scaled, value.detach().clone())   # (update() rewrites _scale in place later)
        return scaled

    scale._mackay_wrapped = True
    return scale


def _wrap_update(original):
    if getattr(original, "_mackay_wrapped", False):
        return original

    @functools.wraps(original)
    def update(self, *args, **kwargs):
        waiting = [a for a in list(_watchers) if a.holds_a_scaled_step()]
        skipped = bool(waiting) and _skipped(self)   # (read before update() resets the record)
        result = original(self, *args, **kwargs)
        for accumulator in waiting:
            accumulator.settle_step(ran=not skipped)
        return result

    update._mackay_wrapped = True
    return update


def _skipped(scaler) -> bool:
    """Whether the scaler found inf or NaN gradients in this step (so its optimizers skipped it)."""
    states = getattr(scaler, "_per_optimizer_states", {})
    return any(float(found) > 0 for state in states.values()
               for found in state.get("found_inf_per_device", {}).values())


def _mark(outputs, value: torch.Tensor) -> None:
    if isinstance(outputs, torch.Tensor):
        if outputs.grad_fn is not None:
            outputs.grad_fn.register_prehook(lambda grads: _started(value))
    elif isinstance(outputs, (list, tuple)):
        for item in outputs:
            _mark(item, value)


def _started(value: torch.Tensor) -> None:
    task = torch._C._current_graph_task_id()
    if task not in _scales:
        _scales[task] = value
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _scales.pop(task, None))
