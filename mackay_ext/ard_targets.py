"""Which parameters carry an ARD prior, and how their weights group under one alpha.

By default every trainable parameter with dim >= 2 gets a prior: Linear, Conv1d/2d/3d and
ConvTranspose weights, nn.Embedding tables, the input/hidden matrices of nn.LSTM/GRU/RNN,
nn.MultiheadAttention's packed in_proj_weight, and any other matrix (per-weight ARD needs nothing
layer-specific). A parameter shared by several modules (tied weights) is one target. Everything
left out is listed with the reason, so a report never looks complete when it is not.

Naming: a module's `weight` is named by its module ("fc1", "0"); any other matrix by its full
parameter name ("lstm.weight_ih_l0", "attn.in_proj_weight").
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList
from torch.nn.utils.spectral_norm import SpectralNorm   # the hook forms, before parametrize
from torch.nn.utils.weight_norm import WeightNorm

from .coupling.groups import is_hf_conv1d

GRANULARITIES = ("weight", "input", "output", "filter")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)
_RECURRENT = (nn.RNNBase, nn.RNNCellBase)  # nn.LSTM, nn.GRU, nn.RNN and their cells


@dataclass
class ARDTarget:
    """One parameter under an ARD prior. `layout` says which dimensions are the groups:
    "linear" (out, in), "linear_in_out" (in, out: transformers' Conv1D), "conv" (out,
    in/groups, *kernel), "conv_transpose" (in, out/groups, *kernel), "embedding" (tokens,
    features) or "other" (no known groups)."""

    name: str
    param: nn.Parameter
    module: nn.Module
    module_name: str
    attr: str
    layout: str
    owners: list[str] = field(default_factory=list)  # every module holding it (tied weights)
    # the module that reads this module's weight itself instead of calling it (so the module's
    # own hooks never see the product), e.g. nn.MultiheadAttention and its out_proj
    read_by: str | None = None

    @property
    def description(self) -> str:
        kind = type(self.module).__name__
        tied = f", tied: {' = '.join(self.owners)}" if len(self.owners) > 1 else ""
        return f"{self.name} ({kind}.{self.attr}, shape {tuple(self.param.shape)}{tied})"


def _layout(module: nn.Module, attr: str) -> str:
    if attr.endswith("_orig") and hasattr(module, attr[:-5] + "_mask"):
        attr = attr[:-5]  # torch.nn.utils.prune keeps the weight as weight_orig beside weight_mask
    if isinstance(module, _CONV) and attr == "weight":
        return "conv"
    if isinstance(module, _CONV_TRANSPOSE) and attr == "weight":
        return "conv_transpose"
    if isinstance(module, _EMBEDDING) and attr == "weight":
        return "embedding"
    if isinstance(module, nn.Linear) and attr == "weight":
        return "linear"
    if attr == "weight" and is_hf_conv1d(module):
        return "linear_in_out"
    if isinstance(module, _RECURRENT) and attr.startswith("weight_"):
        return "linear"   # weight_ih_l{k}: (gates * hidden, input), weight_hh: (gates * hidden, hidden)
    if isinstance(module, nn.MultiheadAttention) and attr in ("in_proj_weight", "q_proj_weight",
                                                              "k_proj_weight", "v_proj_weight"):
        return "linear"
    return "other"


def alpha_shape_for(layout: str, shape: tuple[int, ...], granularity: str,
                    groups: int = 1) -> tuple[int, ...]:
    """Shape of alpha for a weight of `shape`. "input": one per input neuron / channel / token;
    "output": one per output neuron / filter / feature; "filter": one per conv filter, and for
    anything else one per input (the grouping of the source paper's experiments)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"MacKayPruner: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "weight":
        return tuple(shape)
    ones = (1,) * (len(shape) - 2)
    if layout == "other":
        raise ValueError(f"granularity {granularity!r} needs a layer with known groups")
    if layout == "conv":
        if granularity == "input" and groups != 1:
            raise ValueError(f"granularity 'input' is not defined for a grouped convolution "
                             f"(groups={groups}): use 'output' or 'weight'")
        return (1, shape[1]) + ones if granularity == "input" else (shape[0], 1) + ones
    if layout == "conv_transpose":
        if granularity == "input":
            return (shape[0], 1) + ones
        if groups != 1:
            raise ValueError(f"granularity {granularity!r} is not defined for a grouped transposed "
                             f"convolution (groups={groups}): use 'input' or 'weight'")
        return (1, shape[1]) + ones
    if layout == "embedding":  # rows are tokens (the input), columns the features
        return (shape[0], 1) if granularity in ("input", "filter") else (1, shape[1])
    if layout == "linear_in_out":   # transformers' Conv1D (GPT-2's projections): a Linear stored (in, out)
        return (shape[0], 1) if granularity in ("input", "filter") else (1, shape[1])
    # linear: (out, in)
    return (1, shape[1]) + ones if granularity in ("input", "filter") else (shape[0], 1) + ones


def alpha_shape(module: nn.Module, granularity: str, attr: str = "weight") -> tuple[int, ...]:
    """Shape of alpha for `module`'s parameter `attr` at `granularity` (see alpha_shape_for)."""
    param = getattr(module, attr)
    return alpha_shape_for(_layout(module, attr), tuple(param.shape), granularity,
                           getattr(module, "groups", 1))


PARAMETRIZED = ("an input of a parametrization (weight_norm, spectral_norm, orthogonal, ...): a prior "
                "there is not a prior on the weight the layer computes, and a pruned row of weight_norm's "
                "direction makes that weight 0/0; remove the parametrization "
                "(torch.nn.utils.parametrize.remove_parametrizations; for the older hook forms "
                "torch.nn.utils.weight_norm and spectral_norm, torch.nn.utils.remove_weight_norm and "
                "remove_spectral_norm) to cover the layer")


FROZEN = "frozen (requires_grad=False)"
NOT_SELECTED = "not in layers="
NO_CHANNEL_GROUP = "in no channel group of granularity='channel', so without a prior"
# what report()["excluded"] says of a weight frozen when the pruner was built and trained since
UNFROZEN = ("frozen when the pruner was built, trained since without a prior (a pruner's layers are "
            "fixed when it is built: a second MacKayPruner(model, optimizer, ..., layers=[...]) on the unfrozen "
            "layers gives them one; pruners over different layers coexist)")
# ... and where a second pruner now puts its prior on it (no warning)
UNFROZEN_COVERED = "frozen when this pruner was built; another pruner puts its prior on it since"


def _parametrization_input(module: nn.Module, attr: str) -> bool:
    """Is `attr` of `module` what a parametrization computes the layer's weight from? (The new
    torch.nn.utils.parametrize: held by a ParametrizationList; the old hook forms, read by a
    forward pre-hook: torch.nn.utils.weight_norm's weight_g / weight_v, spectral_norm's
    weight_orig, which the hook divides by its largest singular value, so that a prior on it is
    on a scale the layer never sees.)"""
    return isinstance(module, ParametrizationList) or _hook_output(module, attr) is not None


def is_parametrization_input(layer: nn.Module, attr: str) -> bool:
    """Has a parametrization (either API) been put on `layer`'s `attr` since it was a plain
    weight? (Registering one moves the weight into layer.parametrizations[attr].original.)"""
    return parametrize.is_parametrized(layer, attr) or any(
        _hook_output(layer, name) == attr for name in (attr + "_g", attr + "_v", attr + "_orig"))


def _hook_output(module: nn.Module, attr: str) -> str | None:
    """The tensor a hook form of weight_norm or spectral_norm computes from `attr`, or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and attr in (hook.name + "_g", hook.name + "_v"):
            return hook.name
        if isinstance(hook, SpectralNorm) and attr == hook.name + "_orig":
            return hook.name
    return None


def _selectable(module_name: str, module: nn.Module, attr: str) -> tuple[str, ...]:
    """The names in layers= that select a parameter: its target and parameter names, and for an
    input of torch.nn.utils.parametrize (held at "<layer>.parametrizations.<tensor>") also the
    layer and "<layer>.<tensor>", and for a hook form's (weight_g) "<layer>.<tensor>": the names
    its user knows it by (the selection then says it is a parametrization's input, where it said
    the layer had no weight)."""
    names = _names_of(module_name, attr)
    if isinstance(module, ParametrizationList):
        layer, _, tensor = module_name.rpartition(".parametrizations.")
        names += (layer, f"{layer}.{tensor}" if layer else tensor)
    elif (tensor := _hook_output(module, attr)) is not None:   # the hook forms: weight_g -> weight
        names += (f"{module_name}.{tensor}" if module_name else tensor,)
    return names


def _names_of(module_name: str, attr: str) -> tuple[str, str]:
    """A parameter's target name ("fc1" for fc1.weight) and its named_parameters() name."""
    return _target_name(module_name, attr), f"{module_name}.{attr}" if module_name else attr


def _target_name(module_name: str, attr: str) -> str:
    if attr == "weight":
        return module_name or "weight"
    return f"{module_name}.{attr}" if module_name else attr


def find_targets(model: nn.Module, optimizer=None, selected=None,
                 ard_groups_only: bool = False) -> tuple[dict[str, ARDTarget], list[dict[str, str]]]:
    """The ARD targets of `model` and the parameters left out, with reasons.

    selected: names of modules (their dim >= 2 parameters) or of targets; None = every trainable
        parameter with dim >= 2.
    ard_groups_only: with a MacKayAdam, parameters in ard=False groups are left out (listed).
    """
    from .sparse import _CSRWeight   # (sparse imports what imports this module)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, attr))
    in_optimizer = None
    ard_flags: dict[int, bool] = {}
    if optimizer is not None:
        in_optimizer = set()
        for group in optimizer.param_groups:
            for param in group["params"]:
                in_optimizer.add(id(param))
                ard_flags[id(param)] = bool(group.get("ard", True))

    targets: dict[str, ARDTarget] = {}
    excluded: list[dict[str, str]] = []
    unsure: list[str] = []   # (1, ...) parameters read as biases whose names do not say so
    if selected is not None:
        selected = list(selected)
        known = set(dict(model.named_modules())) | {
            name for holders in owners.values() for m, module, a in holders for name in _selectable(m, module, a)}
        unknown = [name for name in selected if name not in known]
        if unknown:
            raise ValueError(f"MacKayPruner: layers {unknown} are neither modules nor parameters "
                             "of the model")
    seen = set()
    for full_name, param in model.named_parameters():  # shared parameters appear once
        if id(param) in seen:
            continue
        seen.add(id(param))
        holders = owners[id(param)]
        module_name, module, attr = holders[0]
        name = _target_name(module_name, attr)
        holder_names = [_target_name(m, a) for m, _, a in holders]
        if selected is not None and not any(
                m in selected or any(n in selected for n in _selectable(m, module_, a)) for m, module_, a in holders):
            if param.dim() >= 2:   # (the weights: report()["excluded"] lists every one without a prior)
                excluded.append({"name": full_name, "reason": NOT_SELECTED})
            continue
        reason = None
        if isinstance(module, _CSRWeight) and attr == "values":
            reason = (f"the nonzeros of a {type(module).__name__} (stored sparse): no prior; "
                      "mackay_ext.densify(model) first to prune it further")
        elif param.dim() < 2:
            reason = "1-D (a bias, a norm's scale, or another per-channel vector such as PReLU's slopes): no prior"
        elif isinstance(module, nn.MultiheadAttention) and attr in ("bias_k", "bias_v"):
            reason = ("a bias of the attention's keys or values (add_bias_kv): no prior (pruned to 0 it "
                      "would still take part in the softmax)")
        elif not param.requires_grad:
            reason = FROZEN
        elif in_optimizer is not None and id(param) not in in_optimizer:
            reason = "not trained by the optimizer"
        elif ard_groups_only and not ard_flags.get(id(param), True):
            reason = "in a MacKayAdam param group with ard=False"
        elif _parametrization_input(module, attr):
            reason = PARAMETRIZED
        elif selected is None and _added_like_a_bias(module, param):
            reason = (f"a {tuple(param.shape)} parameter of a {type(module).__name__}, shaped as a position "
                      "embedding or a class token is (broadcast over the batch and added to the activations as "
                      "a bias): no prior unless named in layers=")
            if not _named_like_an_embedding(attr):
                unsure.append(full_name)
        if reason is not None:
            if selected is not None and param.dim() >= 2:
                raise ValueError(f"MacKayPruner: {name} was asked for but is {reason}")
            excluded.append({"name": full_name, "reason": reason})
            continue
        targets[name] = ARDTarget(name, param, module, module_name, attr, _layout(module, attr),
                                  holder_names, weight_reader(model, module_name))
    if selected is not None:
        covered = {m for t in targets.values() for m in t.owners} | {
            m for t in targets.values() for m in [t.module_name]} | {
            _names_of(t.module_name, t.attr)[1] for t in targets.values()}
        empty = [name for name in selected if name not in covered]
        if empty:
            raise ValueError(f"MacKayPruner: layers {empty} have no trainable parameter with "
                             "dim >= 2 to put a prior on")
    if unsure:
        warnings.warn(f"MacKayPruner: no prior on {', '.join(unsure)}: (1, ...) parameters of a module of your "
                      "own, which the pruner reads as added to the activations (a position embedding, a class "
                      "token). Where such a parameter multiplies the activations instead (a GAT layer's attention "
                      "vector (1, heads, channels), a point-wise weight used with matmul), name it in layers= "
                      "with the other layers to give it a prior", UserWarning, stacklevel=3)
    return targets, excluded


def _named_like_an_embedding(attr: str) -> bool:
    """timm's pos_embed, cls_token, dist_token, reg_token and the like: no word about them."""
    return any(part in attr.lower() for part in ("pos", "embed", "token", "cls", "query", "prompt", "register"))


_LAYERS = (nn.Linear, nn.Bilinear, nn.MultiheadAttention, *_CONV, *_CONV_TRANSPOSE, *_EMBEDDING, *_RECURRENT)


def _added_like_a_bias(module: nn.Module, param: nn.Parameter) -> bool:
    """A parameter of shape (1, ...) with 3 or more dims held by a module that is not a layer
    torch knows (timm's pos_embed (1, tokens, width), cls_token (1, 1, width)): broadcast over the
    batch and added to the activations, it is a bias, whose zeros save no work; the ARD prior
    on it emptied it in a ViT (the 'would empty a layer' warning every update)."""
    return param.dim() >= 3 and param.shape[0] == 1 and not isinstance(module, _LAYERS)


def weight_reader(model: nn.Module, module_name: str) -> str | None:
    """The parent that reads `module_name`'s weight itself, by its type's name, or None.
    nn.MultiheadAttention hands out_proj.weight to F.multi_head_attention_forward and never calls
    out_proj (TransformerEncoderLayer's fused path, which reads linear1.weight, runs only at
    inference, so training forwards still call those layers)."""
    if not module_name:   # the model itself has no parent
        return None
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return type(parent).__name__
    return None


def layer_detail(module: nn.Module) -> str:
    """A layer's type, and for a convolution the padding the exact curvature does not take."""
    detail = type(module).__name__
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros":
            detail += f", padding_mode={module.padding_mode!r}"
        elif isinstance(module.padding, str):
            detail += f", padding={module.padding!r} with an even dilated kernel: one more on the right"
    return detail


def exact_curvature_problem(target: ARDTarget, supported) -> str | None:
    """Why the exact curvature estimators cannot serve `target`, in a few words (None when
    they can): per-example gradients come from module hooks on nn.Linear / nn.Conv1d / Conv2d,
    and a tied weight's per-example gradient is the sum over its uses, which separate hooks
    cannot square."""
    if len(target.owners) > 1:
        return f"{target.name} (tied: {' = '.join(target.owners)})"
    pruned_by_torch = target.attr == "weight_orig" and isinstance(getattr(target.module, "weight_mask", None),
                                                                   torch.Tensor)
    if (target.attr != "weight" and not pruned_by_torch) or not supported(target.module):
        # (a torch.nn.utils.prune weight_orig is served: the accumulator masks its squares)
        detail = layer_detail(target.module) if target.attr == "weight" else type(target.module).__name__
        return f"{target.name} ({detail})"
    if target.read_by is not None:
        return f"{target.name} ({target.read_by} reads its weight itself: the layer's hooks never run)"
    return None
