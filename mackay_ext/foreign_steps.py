"""Pruned weights stay at 0 whichever optimizer steps them.

A pruner holds its pruned weights at 0 through the optimizer it was built with (MacKayAdam's
fused step, or its step hooks on a torch optimizer). A common recipe then fine-tunes with a new
optimizer (SGD after ARD, or a MacKayAdam rebuilt for another schedule), which knows nothing of
the pruning: with MacKayAdam the pruned weights grew back (692 -> 2,268 non-zero in a new user's
run) while report() still counted 692. torch's global optimizer step hook sees every step: after
a step of another optimizer that holds one of a watched pruner's weights, the pruned entries are
zeroed again, and the step is counted so that update() can say its curvature was not read there.

One hook serves every pruner, registered with the first and never removed: the pruners sit in a
WeakSet (a pruner dropped without detach() leaves it by itself). A hook per pruner, removed when
its pruner was collected, could be removed while torch iterated the hooks ("OrderedDict mutated
during iteration" in a step that happened to collect one).
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

from torch.optim.optimizer import register_optimizer_step_post_hook

from ._validate import user_stacklevel

_watched: weakref.WeakSet = weakref.WeakSet()
# optimizer -> {pruner: (parameters it held when looked at, whether one is the pruner's)}
_holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_registered = False


def watch_foreign_steps(pruner: Any) -> None:
    """Zero `pruner`'s pruned weights after any other optimizer's step that holds them, until
    unwatch(pruner) (its detach())."""
    global _registered
    _watched.add(pruner)
    if not _registered:
        register_optimizer_step_post_hook(_after_any_step)
        _registered = True


def unwatch(pruner: Any) -> None:
    _watched.discard(pruner)


def _after_any_step(optimizer, args, kwargs) -> None:
    for pruner in list(_watched):
        if pruner.detached or optimizer is pruner.optimizer or not _holds_weights_of(optimizer, pruner):
            continue
        pruner.apply_masks()
        if getattr(pruner, "_stepping", False):   # inside its own optimizer's step (a Lookahead's inner one)
            continue
        name = type(optimizer).__name__
        first = not pruner.foreign_steps   # of this update window
        pruner.foreign_steps[name] = pruner.foreign_steps.get(name, 0) + 1
        if first and not getattr(pruner, "_said_prior_not_applied", False) and _prior_on(pruner):
            pruner._said_prior_not_applied = True
            _say_prior_not_applied(pruner, name)


def _prior_on(pruner) -> bool:
    """Some kept weight has a prior (a finite alpha above 0): not the fine-tune after
    switch_off_prior(), whose foreign optimizer is the recipe."""
    return any(bool(((alpha > 0) & (alpha != math.inf)).any())
               for alpha in (pruner.alpha(name) for name in pruner.targets))


def _say_prior_not_applied(pruner, name: str) -> None:
    """Said once, at the first such step (a notebook user who rebuilt the optimizer to change its
    lr trained three epochs without the prior, and was told at the next update)."""
    own = type(pruner.optimizer).__name__
    curvature = ", and the ef-batch curvature is not read there" if pruner.curvature_kind == "ef-batch" else ""
    warnings.warn(
        f"MacKayPruner: {name}.step() moved weights whose prior this pruner applies through the optimizer it was "
        f"built with ({own}): such steps train them without the prior (pruned weights are still held at "
        f"0){curvature}. To change the learning rate, set it in the {own}'s "
        "param_groups; to go on with another optimizer, detach() this pruner and build one on it, loading "
        "this one's state_dict(); to fine-tune without the prior, call switch_off_prior() first",
        RuntimeWarning, stacklevel=user_stacklevel())


def _holds_weights_of(optimizer, pruner) -> bool:
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    known = _holds.setdefault(optimizer, weakref.WeakKeyDictionary()).get(pruner)
    if known is None or known[0] != count:   # param groups added since: look again
        ours = {id(target.param) for target in pruner.targets.values()}
        known = (count, any(id(p) in ours for group in optimizer.param_groups for p in group["params"]))
        _holds[optimizer][pruner] = known
    return known[1]
