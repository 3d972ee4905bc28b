"""Coupled groups as data: Member, ChannelGroup and the union-find classes turned into groups."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn


class CouplingError(ValueError):
    """The model cannot be traced, or uses an op whose channel coupling is unknown."""


class InputsDoNotRun(CouplingError):
    """example_inputs fail in the model's own forward: the inputs, not the trace (advice about ops
    the trace cannot follow would send the user away from the granularity they chose)."""


@dataclasses.dataclass(frozen=True)
class Member:
    """Entries `indices` along dimension `dim` of the parameter or buffer called `name`."""
    name: str
    dim: int
    indices: tuple[int, ...]

    def __repr__(self) -> str:
        return f"{self.name}[{self._role()}{_ranges(self.indices)}]"

    def _role(self) -> str:
        if self._ndim < 2:   # a bias or norm vector: the index is the channel
            return ""
        roles = {0: "out ", 1: "in "} if self._rows_out else {0: "in ", 1: "out "}
        return roles.get(self.dim, f"dim{self.dim} ")

    _ndim: int = dataclasses.field(default=1, compare=False)
    _rows_out: bool = dataclasses.field(default=True, compare=False)   # False: an (in, out) weight


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """One coupled channel (kind "channel") or attention head (kind "head").

    members: parameter slices that exist only for this channel (gamma and the squared norm of
    group ARD sum over them; pruning zeroes all of them). buffers: buffer slices (BatchNorm
    running statistics) that `shrink` removes with the channel. fixed: None when `shrink` can
    remove the group, else why it keeps it (zeroing is still exact). module: the attention module
    of a head group.
    """
    members: tuple[Member, ...]
    buffers: tuple[Member, ...] = ()
    kind: str = "channel"
    fixed: str | None = None
    module: str | None = None

    def __repr__(self) -> str:
        text = " => ".join(repr(m) for m in self.members)
        return f"{self.kind}: {text}" + (f"  (kept by shrink: {self.fixed})" if self.fixed else "")

    def slices(self, model: nn.Module):
        """Yield (member, tensor of the member's entries) for every parameter member."""
        for m in self.members:
            yield m, model.get_parameter(m.name).index_select(m.dim, _index(m, model))

    def gather(self, lookup) -> torch.Tensor:
        """The group's entries of any per-parameter tensor, flattened and concatenated (1-D).

        lookup: parameter name -> tensor of that parameter's shape (the weights, a curvature h,
        an alpha), e.g. gamma_g = (N h / (N h + alpha_g)).sum() over group.gather(curvature.get).
        """
        parts = []
        for m in self.members:
            tensor = lookup(m.name)
            index = torch.tensor(m.indices, dtype=torch.long, device=tensor.device)
            parts.append(tensor.index_select(m.dim, index).reshape(-1))
        return torch.cat(parts)

    def num_weights(self, model: nn.Module) -> int:
        """n_g: the number of parameter entries in the group."""
        return sum(t.numel() for _, t in self.slices(model))

    def squared_norm(self, model: nn.Module) -> torch.Tensor:
        """sum over every member entry of w_i^2 (float64 scalar)."""
        return sum((t.detach().double().pow(2).sum() for _, t in self.slices(model)),
                   torch.zeros((), dtype=torch.float64))

    def is_zero(self, model: nn.Module) -> bool:
        """True when every parameter entry of the group is exactly zero (the group is pruned)."""
        return all(not bool(t.detach().any()) for _, t in self.slices(model))

    @torch.no_grad()
    def zero_(self, model: nn.Module) -> None:
        """Prune the group: set every parameter member to exactly zero."""
        for m in self.members:
            model.get_parameter(m.name).index_fill_(m.dim, _index(m, model), 0)


def _index(m: Member, model: nn.Module) -> torch.Tensor:
    return torch.tensor(m.indices, dtype=torch.long, device=model.get_parameter(m.name).device)


def _ranges(indices) -> str:
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def group_index(groups, model: nn.Module) -> dict[tuple[str, int], torch.Tensor]:
    """For each (parameter name, dim) some group slices: the group number of every index (-1: none).

    A pruner can scatter per-entry sums into groups with it in one pass. An entry can be in two
    groups at once (a conv weight entry (o, i) is in output group o and input group i).
    """
    if isinstance(groups, nn.Module) or not isinstance(model, nn.Module):
        raise TypeError(f"group_index: takes (groups, model): the groups channel_groups found and the "
                        f"nn.Module they were traced from, got ({type(groups).__name__}, {type(model).__name__})")
    groups = list(groups)
    if not all(isinstance(group, ChannelGroup) for group in groups):
        raise TypeError("group_index: groups must be the ChannelGroups of channel_groups(model, example_inputs)")
    index: dict[tuple[str, int], torch.Tensor] = {}
    for number, group in enumerate(groups):
        for m in group.members:
            key = (m.name, m.dim)
            if key not in index:
                try:
                    param = model.get_parameter(m.name)
                except AttributeError:
                    raise ValueError(f"group_index: the groups were not traced from this model: it has no "
                                     f"parameter {m.name!r}") from None
                if m.dim >= param.dim():
                    raise ValueError(f"group_index: the groups were not traced from this model: its {m.name} "
                                     f"has {param.dim()} dimensions, a group slices dimension {m.dim}")
                index[key] = torch.full((param.shape[m.dim],), -1, dtype=torch.long, device=param.device)
            if max(m.indices, default=-1) >= len(index[key]):
                raise ValueError(f"group_index: the groups were not traced from this model: its {m.name} has "
                                 f"{len(index[key])} entries along dimension {m.dim}, a group reaches index "
                                 f"{max(m.indices)}")
            index[key][list(m.indices)] = number
    return index


@dataclasses.dataclass
class Coupling:
    """Result of one trace: the removable groups and, for inspection, the blocked ones."""
    groups: list[ChannelGroup]
    blocked: list[tuple[ChannelGroup, str]]


def collect(atoms, model: nn.Module) -> Coupling:
    """Turn the union-find classes into ChannelGroups (members merged per parameter dimension)."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffer_shapes = {n: tuple(b.shape) for n, b in model.named_buffers()}
    all_shapes = {**shapes, **buffer_shapes}
    order = {n: i for i, n in enumerate(all_shapes)}
    classes: dict[int, dict[str, Any]] = {}
    for atom in range(atoms.count):
        root = atoms.find(atom)
        info = classes.setdefault(root, {"direct": {}, "entries": {}, "channel": False, "blocked": [],
                                         "fixed": [], "head": None})
        for name, dim, index in atoms.members.get(atom, ()):
            info["direct"].setdefault((name, dim), set()).add(index)
        if atom in atoms.entry:
            name, flat = atoms.entry[atom]
            info["entries"].setdefault(name, set()).add(flat)
        else:
            info["channel"] = True
        if atom in atoms.blocked:
            info["blocked"].append(atoms.blocked[atom])
        if atom in atoms.fixed:
            info["fixed"].append(atoms.fixed[atom])
        if atom in atoms.head:
            info["head"] = atoms.head[atom]
    groups, blocked = [], []
    for info in classes.values():
        if not info["channel"]:
            continue   # parameter entries never met by an activation channel
        reasons = list(info["blocked"])
        slices = dict(info["direct"])
        unknown = sorted({n for n, _ in slices} - all_shapes.keys() | info["entries"].keys() - all_shapes.keys())
        if unknown:   # the trace names a tensor the model does not list: no slice of it can be trusted
            raise CouplingError(f"the traced program reads {', '.join(unknown)}, which is no parameter or "
                                "buffer name of the model (named_parameters / named_buffers); its channel "
                                "coupling cannot be told")
        for name, flats in info["entries"].items():
            plane = _hyperplane(all_shapes[name], flats)
            if plane is None:
                reasons.append(f"{name} is coupled entry by entry, not one slice per channel")
            else:
                slices.setdefault((name, plane[0]), set()).update(plane[1])
        if not slices:
            continue
        for (name, dim), idx in slices.items():
            if len(idx) == all_shapes[name][dim]:
                reasons.append(f"it spans every channel of {name} (dim {dim})")
        members = sorted(slices.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
        params = tuple(Member(n, d, tuple(sorted(i)), _ndim=len(all_shapes[n]),
                              _rows_out=n not in atoms.transposed)
                       for (n, d), i in members if n in shapes)
        buffers = tuple(Member(n, d, tuple(sorted(i)), _ndim=len(all_shapes[n]))
                        for (n, d), i in members if n not in shapes)
        if not params:
            continue
        fixed = [reason for reason in info["fixed"] if not _resized_by_shrink(model, info["head"], reason)]
        group = ChannelGroup(params, buffers, "head" if info["head"] else "channel",
                             fixed[0] if fixed else None, info["head"])
        (blocked.append((group, "; ".join(dict.fromkeys(reasons)))) if reasons else groups.append(group))
    key = lambda g: (order[g.members[0].name], g.members[0].dim, g.members[0].indices)
    groups.sort(key=key)
    blocked.sort(key=lambda gb: key(gb[0]))
    return Coupling(groups, blocked)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's projections): bias + x @ W, its weight stored (in, out)."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def is_hf_gpt2_self_attention(module: nn.Module) -> bool:
    """transformers' GPT-2 self-attention (GPT2Attention and kin): one Conv1D c_attn makes q, k and
    v, which forward splits at split_size and views as heads of head_dim."""
    return (all(hasattr(module, a) for a in ("c_proj", "split_size", "head_dim"))
            and is_hf_conv1d(getattr(module, "c_attn", None))
            and not getattr(module, "is_cross_attention", False))


def _resized_by_shrink(model: nn.Module, head: str | None, reason: str) -> bool:
    """Whether `reason` (the trace's, for keeping a head group at a fixed size) is the split of
    q, k and v inside a GPT-2 self-attention at split_size, which shrink re-sizes with the heads
    (mackay_ext.shrink): then the group is removable, and gets a prior under channel ARD."""
    if not head or f"module '{head}'" not in reason or "indexes its channels at fixed positions" not in reason:
        return False
    try:
        return is_hf_gpt2_self_attention(model.get_submodule(head))
    except AttributeError:   # (a path the trace made that names no submodule)
        return False


def _hyperplane(shape, flats):
    """(dim, indices) when the flat entries are whole slices along one dimension, else None."""
    if not shape:
        return None   # a 0-d parameter has no channel dimension
    coords = np.unravel_index(np.fromiter(flats, dtype=np.int64), shape)
    total = int(np.prod(shape))
    dims = sorted(range(len(shape)), key=lambda d: shape[d] == 1)   # prefer a dimension of size > 1
    for d in dims:
        along = set(coords[d].tolist())
        if len(along) * (total // shape[d]) == len(flats):
            return d, along
    return None
