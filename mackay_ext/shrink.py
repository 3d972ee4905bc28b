"""Physically remove pruned coupled groups: a smaller plain-PyTorch model (DESIGN.md §3b).

A group is removed when every parameter member is exactly zero (ChannelGroup.is_zero). That is
exact without folding anything into a bias: the group holds every parameterised reader of the
channel (consumer input slices), so whatever value the channel still carries (a zero filter
through BatchNorm gives the constant beta - gamma*mean/sqrt(var+eps), here with gamma = beta = 0
also zero, and without affine it is read only through zero columns) contributes nothing; and
channels that reach a reader without parameters (the model output, LayerNorm statistics) are
never in a group (mackay_ext.coupling). shrink checks the result against the input model on
example_inputs and raises instead of returning a model that differs.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .coupling import ChannelGroup, CouplingError, split_inputs, trace_coupling

__all__ = ["ShrinkReport", "shrink", "count_macs"]


@dataclasses.dataclass
class ShrinkReport:
    """Sizes before and after, the removed groups, and zero groups kept with the reason."""
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed: list[ChannelGroup]
    kept_zero: list[tuple[ChannelGroup, str]]

    def __str__(self) -> str:
        return (f"shrink: parameters {self.params_before:,} -> {self.params_after:,}, "
                f"MACs {self.macs_before:,} -> {self.macs_after:,}, {len(self.removed)} groups removed, "
                f"{len(self.kept_zero)} zero groups kept")


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward on example_inputs (matmuls, convolutions, attention)."""
    args, kwargs = split_inputs(example_inputs)
    # with autograd on, nn.TransformerEncoder takes its decomposed path, which the counter can see
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def shrink(model: nn.Module, example_inputs, round_to: int = 1, *, report: bool = False):
    """A copy of `model` without its pruned (all-zero) coupled groups.

    example_inputs: as for mackay_ext.coupling.channel_groups. round_to: channel counts of every
    layer are rounded up to a multiple of it (zero channels kept back), e.g. 8 for tensor cores.
    Returns the new model (plain torch.nn modules, same classes, smaller tensors, num_heads
    updated; the input model is unchanged), or (model, ShrinkReport) when report=True.
    Raises ValueError when a layer would lose every channel, naming the layer.
    """
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"shrink: round_to must be a positive int, got {round_to!r}")
    coupling = trace_coupling(model, example_inputs)
    removable, kept = [], []
    for group in coupling.groups:
        if not group.is_zero(model):
            continue
        reason = group.fixed or _unsupported(model, group)
        (kept.append((group, reason)) if reason else removable.append(group))
    removable = _round(model, removable, round_to)
    removal = _removal(removable)
    _refuse_empty_layers(model, removal)
    small = copy.deepcopy(model)
    for (name, dim), indices in removal.items():
        _slice(small, name, dim, indices)
    for module in small.modules():
        for kind, fix in _FIXERS:
            if _looks_like(module, kind) if isinstance(kind, str) else isinstance(module, kind):
                fix(module)
                break
    _verify(model, small, example_inputs)
    if not report:
        return small
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return small, ShrinkReport(params(model), params(small), count_macs(model, example_inputs),
                               count_macs(small, example_inputs), removable, kept)


# -- what can be removed -----------------------------------------------------------------
def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    path, _, local = name.rpartition(".")
    return path, model.get_submodule(path), local


def _unsupported(model: nn.Module, group: ChannelGroup) -> str | None:
    if group.kind == "head":
        attention = model.get_submodule(group.module) if group.module else None
        if isinstance(attention, nn.MultiheadAttention):
            return ("nn.MultiheadAttention ties the width of q, k and v to embed_dim, so a head cannot be "
                    "removed from it; the zeroed head stays")
        if attention is None or not any(_looks_like(attention, k) for k, _ in _FIXERS if isinstance(k, str)):
            cls = type(attention).__name__ if attention is not None else "?"
            return f"shrink does not know how attention module '{group.module}' ({cls}) counts its heads"
    for m in group.members + group.buffers:
        path, module, local = _owner(model, m.name)
        if isinstance(module, nn.MultiheadAttention):
            return f"'{path}' is an nn.MultiheadAttention, whose embed_dim shrink cannot change"
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed:
                return f"'{path}' is a transposed convolution"
            if module.groups > 1 and not (module.groups == module.in_channels == module.out_channels):
                return f"'{path}' is a grouped convolution ({module.groups} groups)"
        if isinstance(module, nn.GroupNorm) and not module.affine:
            return (f"'{path}' is a GroupNorm without affine parameters: its channel count cannot "
                    "be read back after the cut")
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            return f"'{path}' is a LayerNorm over several dimensions"
    return None


def _removal(groups) -> dict[tuple[str, int], set[int]]:
    removal: dict[tuple[str, int], set[int]] = {}
    for group in groups:
        for m in group.members + group.buffers:
            removal.setdefault((m.name, m.dim), set()).update(m.indices)
    return removal


def _round(model: nn.Module, groups: list[ChannelGroup], round_to: int) -> list[ChannelGroup]:
    """Give back removed groups until every weight's output count is a multiple of round_to."""
    if round_to == 1:
        return groups
    groups = list(groups)
    changed = True
    while changed:
        changed = False
        for name, dim in list(_removal(groups)):
            param = model.get_parameter(name) if dim == 0 and name.endswith("weight") else None
            if param is None or param.dim() < 2:
                continue
            size = param.shape[0]
            # a group given back for one layer (a residual stream spans several) changes what
            # the others remove: read this layer's removal afresh
            indices = _removal(groups).get((name, dim), set())
            while (size - len(indices)) % round_to and indices:
                touching = [g for g in groups if any(m.name == name and m.dim == 0 for m in g.members)]
                groups.remove(touching[-1])
                indices = _removal(groups).get((name, dim), set())
                changed = True
    return groups


def _refuse_empty_layers(model: nn.Module, removal) -> None:
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for (name, dim), indices in removal.items():
        tensor = tensors[name]
        if len(indices) >= tensor.shape[dim]:
            path = name.rpartition(".")[0] or "<root>"
            raise ValueError(f"shrink: every channel of layer '{path}' ({name}, dim {dim}) is pruned; "
                             "removing them all would leave an empty layer, so shrink refuses")


# -- cutting -----------------------------------------------------------------------------
def _slice(model: nn.Module, name: str, dim: int, indices: set[int]) -> None:
    _, module, local = _owner(model, name)
    old = getattr(module, local)
    keep = torch.tensor([i for i in range(old.shape[dim]) if i not in indices], dtype=torch.long,
                        device=old.device)
    new = old.detach().index_select(dim, keep).contiguous()
    if local in module._parameters:
        module._parameters[local] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[local] = new


def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    if m.groups > 1:   # depthwise: one filter per channel
        m.groups = m.in_channels = m.out_channels = m.weight.shape[0]
    else:
        m.out_channels, m.in_channels = m.weight.shape[:2]


def _fix_batch_norm(m: nn.modules.batchnorm._NormBase) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


def _fix_layer_norm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_group_norm(m: nn.GroupNorm) -> None:
    # the coupling keeps a normalisation group's channels together (they share statistics), so
    # whole groups go: the group size stays, the count of groups shrinks
    size = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // size


def _fix_embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _fix_timm_attention(m: nn.Module) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)   # children may be fixed after
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * m.head_dim


def _fix_hf_attention(m: nn.Module) -> None:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size


_DUCK = {"timm-attention": ("qkv", "num_heads", "head_dim"),
         "hf-attention": ("query", "num_attention_heads", "attention_head_size", "all_head_size")}


def _looks_like(module: nn.Module, kind: str) -> bool:
    return kind in _DUCK and all(hasattr(module, a) for a in _DUCK[kind]) and \
        isinstance(getattr(module, _DUCK[kind][0]), nn.Linear)


# One attribute fixer per module type (checked in order; strings are duck-typed attention modules).
_FIXERS = [(nn.Linear, _fix_linear), (nn.modules.conv._ConvNd, _fix_conv),
           (nn.modules.batchnorm._NormBase, _fix_batch_norm), (nn.LayerNorm, _fix_layer_norm),
           (nn.GroupNorm, _fix_group_norm),
           (nn.Embedding, _fix_embedding), ("timm-attention", _fix_timm_attention),
           ("hf-attention", _fix_hf_attention)]


def _verify(model: nn.Module, small: nn.Module, example_inputs) -> None:
    """Compare outputs on example_inputs (eval mode); a mismatch means forward code hard-codes sizes."""
    args, kwargs = split_inputs(example_inputs)
    modes = model.training
    model.eval(), small.eval()
    try:
        with torch.no_grad():
            expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))
            try:
                got = torch.utils._pytree.tree_leaves(small(*args, **kwargs))
            except Exception as err:
                raise CouplingError(f"shrink: the shrunk model does not run ({type(err).__name__}: {err}); "
                                    "its forward code probably hard-codes a channel count") from err
    finally:
        model.train(modes), small.train(modes)
    for a, b in zip(expected, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(a.dtype, 1e-2)
            scale = a.abs().max().item() if a.numel() else 0.0
            if a.shape != b.shape or (a.numel() and (a - b).abs().max().item() > tol * max(scale, 1e-30)):
                raise CouplingError("shrink: the shrunk model's outputs differ from the pruned model's; "
                                    "its forward code probably hard-codes a channel count")
