"""MacKay's pruning as torch.nn.utils.prune masks, and such masks as alpha = +inf.

torch.nn.utils.prune reparametrises a module's tensor X as X_orig (the Parameter) times
X_mask (a buffer), recomputed by a forward pre-hook; many tools read or write those masks.
MacKayPruner marks a pruned weight by alpha = +inf instead (docs/mathematics.md section 1). The two
functions here translate, matching parameters by identity: the pruner's target *is* X_orig
when the model was reparametrised before the pruner was built, and becomes X_orig when
`to_torch_prune` reparametrises it afterwards, so optimizer and pruner keep working either way.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .._alpha import group_dims
from ..pruner import MacKayPruner

__all__ = ["from_torch_prune", "to_torch_prune", "torch_prune_masks"]


def _check_pruner(pruner, where: str) -> None:
    if not isinstance(pruner, MacKayPruner):
        raise TypeError(f"{where}: pruner must be a mackay_ext.MacKayPruner, got {type(pruner).__name__}")


def _holders(model: nn.Module, param: torch.Tensor) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, tensor name) of every module attribute holding `param`, with
    a reparametrised X_orig reported as X (the name torch.nn.utils.prune acts on)."""
    found = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, value in module._parameters.items():
            if value is param:
                if attr.endswith("_orig") and attr[:-5] + "_mask" in module._buffers:
                    attr = attr[:-5]
                found.append((module_name, module, attr))
    return found


@torch.no_grad()
def to_torch_prune(pruner: MacKayPruner) -> list[str]:
    """Write the pruner's masks (alpha == +inf -> 0, else 1) as prune.custom_from_mask on every
    module attribute holding an ARD weight (each owner of a tied weight). A tensor already
    pruned by torch.nn.utils.prune gets the product of both masks (a PruningContainer).
    Afterwards module.X is X_orig * X_mask; X_orig is the very Parameter the optimizer and the
    pruner hold, so training goes on unchanged. Returns the names written ("fc1.weight").
    Call it again after later updates: the masks are a snapshot."""
    _check_pruner(pruner, "to_torch_prune")
    written = []
    for name, target in pruner.targets.items():
        keep = (pruner.alpha(name) != math.inf).expand_as(target.param)
        holders = _holders(pruner.model, target.param)
        if not holders:
            raise RuntimeError(f"to_torch_prune: the ARD weight {name} is no longer an attribute of "
                               "any module of the pruner's model")
        for module_name, module, attr in holders:
            torch_prune.custom_from_mask(module, attr, keep.to(target.param.dtype))
            written.append(f"{module_name}.{attr}" if module_name else attr)
    return written


def torch_prune_masks(model: nn.Module) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """The torch.nn.utils.prune masks of `model`: {"fc1.weight": (module, "weight", mask)},
    mask of the tensor's shape, 1 = kept (a copy of the X_mask buffer)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"torch_prune_masks: model must be an nn.Module, got {type(model).__name__}")
    masks = {}
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                attr = hook._tensor_name
                name = f"{module_name}.{attr}" if module_name else attr
                masks[name] = (module, attr, getattr(module, attr + "_mask").detach().clone())
    return masks


@torch.no_grad()
def from_torch_prune(model: nn.Module, pruner: MacKayPruner, *, remove: bool = False) -> dict[str, Any]:
    """Import the torch.nn.utils.prune masks of `model` into `pruner`: alpha = +inf (and w = 0)
    on every masked entry of an ARD weight. Build the pruner (and its optimizer) on the
    reparametrised model, so that its targets are the X_orig Parameters; its layer names are
    then "fc1.weight_orig".

    A mask must remove whole alpha groups: with granularity "input"/"output"/"filter" a mask that
    cuts a group in part is refused (use granularity="weight" for that layer).

    remove: False (default) keeps the reparametrisation: module.X stays X_orig * X_mask, the mask
        agrees with alpha and the model's state_dict keeps its X_orig / X_mask entries.
        True calls prune.remove: module.X is the plain Parameter again (the same object, so the
        optimizer and pruner keep it, and go on updating it; the pruner's names keep their "_orig").
    Masks on tensors without a prior (biases, layers outside `layers`) stay as they are.

    Returns {"imported": {layer: weights pruned}, "left": [tensors whose mask was not imported]}.
    """
    _check_pruner(pruner, "from_torch_prune")
    masks = torch_prune_masks(model)
    by_param = {id(t.param): name for name, t in pruner.targets.items()}
    plans, left = [], []
    for tensor_name, (module, attr, mask) in masks.items():
        layer = by_param.get(id(module._parameters[attr + "_orig"]))
        if layer is None:
            left.append(tensor_name)
            continue
        param, alpha = pruner.targets[layer].param, pruner.alpha(layer)
        pruned = mask == 0
        dims, _ = group_dims(param, alpha)
        group_pruned = pruned.all(dim=dims, keepdim=True) if dims else pruned
        if dims and not torch.equal(group_pruned.expand_as(pruned), pruned):
            raise ValueError(f"from_torch_prune: the mask of {tensor_name} removes part of an alpha "
                             f"group of {layer} (granularity {pruner.granularity[layer]!r}, alpha shape "
                             f"{tuple(alpha.shape)}); expected whole groups, or granularity='weight'")
        plans.append((tensor_name, module, attr, layer, param, alpha, pruned, group_pruned))
    imported = {}
    for tensor_name, module, attr, layer, param, alpha, pruned, group_pruned in plans:   # all checked
        alpha.masked_fill_(group_pruned.reshape(alpha.shape), math.inf)
        param.masked_fill_(pruned, 0)   # alpha = +inf means w = 0 exactly
        imported[layer] = int((alpha == math.inf).expand_as(param).sum())
        if remove:
            torch_prune.remove(module, attr)
            pruner.targets[layer].attr = attr   # the same Parameter, now held as module.<attr>
    return {"imported": imported, "left": left}
