"""Weights where alpha = +inf that are not 0: a model's load_state_dict behind the pruner's back,
and copies of the model the pruner does not hold (an EMA or SWA average).

The pruner holds pruned weights at 0 after every step, but a user's model.load_state_dict (an
early-stopping loop restoring its best epoch, from before the last pruning updates) writes values
there again: the report still counted them pruned, the next step zeroed them, and
sparsify(model, MacKayAdam) dropped them, changing the outputs with no word (a fine-tuned MLP:
131 live weights, logits moved by 0.61). The pruner watches the model's loads and says so; the
library's own loaders, which load the pruner's state with the model's, say they expect it.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref

import torch

from ._validate import user_stacklevel
from .copy_inert import CopyInert


def live_at_pruned(pruner) -> dict[str, int]:
    """{layer: nonzero weights where its alpha is +inf}, for the layers that have any."""
    counts = {}
    for name, target in pruner.targets.items():
        view = pruner._alpha_view(name)
        if view.any_pruned:
            live = int(((target.param.detach() != 0) & view.pruned.expand_as(target.param)).sum())
            if live:
                counts[name] = live
    return counts


def describe(counts: dict[str, int]) -> str:
    shown = ", ".join(f"{name}: {count}" for name, count in list(counts.items())[:6])
    return shown + (", ..." if len(counts) > 6 else "")


def watch_model_loads(pruner):
    """A load_state_dict post-hook on the pruner's model (inert in a copy of the model; holding
    the pruner weakly, so that a pruner dropped by its user is freed); returns its handle."""
    return pruner.model.register_load_state_dict_post_hook(
        CopyInert(functools.partial(_after_load, weakref.ref(pruner))))


@torch.no_grad()
def _after_load(pruner_ref, module, incompatible_keys) -> None:
    pruner = pruner_ref()
    if pruner is None or pruner.detached or getattr(pruner, "_model_load_expected", False):
        return
    replaced = [name for name, target in pruner.targets.items()
                if getattr(target.module, target.attr, None) is not target.param
                and getattr(target.module, target.attr + "_orig", None) is not target.param]   # (torch prune)
    if replaced:   # load_state_dict(assign=True): found at the next update only, after steps that missed them
        shown = ", ".join(replaced[:6]) + (", ..." if len(replaced) > 6 else "")
        warnings.warn(
            f"MacKayPruner: model.load_state_dict(assign=True) replaced the weights of {shown}: the pruner, and "
            "the optimizer, hold the tensors from before, so the new ones would train without the prior (or "
            "not at all) and the next update refuses. Load with assign=False (values copied into the same "
            "tensors), or build the optimizer and the pruner after loading",
            UserWarning, stacklevel=user_stacklevel())
        return
    counts = live_at_pruned(pruner)
    if counts:
        warnings.warn(
            f"MacKayPruner: model.load_state_dict put nonzero values at {sum(counts.values())} weights this pruner "
            f"has pruned (alpha = +inf; {describe(counts)}): the weights come from before its last updates (an "
            "early-stopping restore, say). Load the pruner's state_dict (and the optimizer's) saved with them, "
            "or call pruner.apply_masks() to prune them; as they are, the next optimizer step sets them to 0",
            UserWarning, stacklevel=user_stacklevel())


@contextlib.contextmanager
def expected_model_load(pruner):
    """The caller loads the model with the pruner's own state (or prunes right after): no warning."""
    pruner._model_load_expected = True
    try:
        yield
    finally:
        pruner._model_load_expected = False


@torch.no_grad()
def zero_pruned_weights_of(pruner, model: torch.nn.Module) -> None:
    """Zero, in `model` (a copy of the pruner's model, or an AveragedModel of it), each weight the
    pruner has pruned, found by the same module name and attribute; a clear error where `model`
    lacks one or holds it in another shape."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"MacKayPruner.apply_masks: model must be a torch.nn.Module (a copy of the pruned model), "
                        f"got {type(model).__name__}")
    if isinstance(model, torch.optim.swa_utils.AveragedModel):
        model = model.module
    for name, target in pruner.targets.items():
        try:
            param = getattr(model.get_submodule(target.module_name), target.attr)
        except AttributeError:
            raise ValueError(f"MacKayPruner.apply_masks: the model given has no {name!r} "
                             f"({target.module_name}.{target.attr}): not a copy of the pruned model") from None
        if not isinstance(param, torch.Tensor) or param.shape != target.param.shape:
            raise ValueError(f"MacKayPruner.apply_masks: {name!r} of the model given has shape "
                             f"{tuple(getattr(param, 'shape', ()))}, the pruned one {tuple(target.param.shape)}")
        view = pruner._alpha_view(name)
        if view.any_pruned:
            param.masked_fill_(view.pruned.to(param.device).expand_as(param), 0)
