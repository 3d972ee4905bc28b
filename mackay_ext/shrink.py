"""Physically remove pruned coupled groups: a smaller plain-PyTorch model (docs/mathematics.md §3b).

A group is removed when every parameter member is exactly zero (ChannelGroup.is_zero). That is
exact without folding anything into a bias: the group holds every parameterised reader of the
channel (consumer input slices), so whatever value the channel still carries (a zero filter
through BatchNorm gives the constant beta - gamma*mean/sqrt(var+eps), here with gamma = beta = 0
also zero, and without affine it is read only through zero columns) contributes nothing; and
channels that reach a reader without parameters (the model output, LayerNorm statistics) are
never in a group (mackay_ext.coupling). Groups that are not zero but carry nothing (unread, or
constant with the constant folded into the consumers' biases) go too: mackay_ext.shrink_constant.
shrink checks the result against the input model on example_inputs and raises instead of
returning a model that differs.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import Counter

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import shrink_constant
from ._eval_mode import eval_mode
from ._float32 import full_float32
from ._validate import check_module, check_not_quantized
from .coupling import ChannelGroup, CouplingError, split_inputs, trace_coupling
from .coupling.ties import modules_of, tied_names
from .coupling.trace import CHECKPOINT_WITHOUT_GRADIENTS
from .coupling.groups import is_hf_gpt2_self_attention

__all__ = ["ShrinkReport", "count_macs", "shrink"]


@dataclasses.dataclass
class ShrinkReport:
    """Sizes before and after, the removed groups, and the groups kept with the reason.

    removed: every group cut (zero, unread and folded alike); folded: the constant ones whose
    contribution went into their consumers' biases; unread: those whose consumer weights were
    all zero; kept_zero: all-zero groups kept; kept_unused: unread or constant groups kept.
    rounds: cuts made (one more each time a cut leaves new unread or constant units); a group
    found in a later round names indices of the model the earlier rounds left.
    macs_before / macs_after: of one forward on example_inputs, so of its whole batch (`batch`,
    the leading size of its first tensor): divide by it for the MACs per example.
    """
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed: list[ChannelGroup]
    kept_zero: list[tuple[ChannelGroup, str]]
    folded: list[ChannelGroup] = dataclasses.field(default_factory=list)
    unread: list[ChannelGroup] = dataclasses.field(default_factory=list)
    kept_unused: list[tuple[ChannelGroup, str]] = dataclasses.field(default_factory=list)
    rounds: int = 1
    batch: int | None = None   # the example inputs' batch (their first tensor's leading size)

    def __str__(self) -> str:
        # the MACs are those of one forward on the example inputs: the whole batch, not one example
        per = f" (one forward on the example batch of {self.batch})" if self.batch is not None else ""
        return (f"shrink: parameters {self.params_before:,} -> {self.params_after:,}, "
                f"MACs{per} {self.macs_before:,} -> {self.macs_after:,}, {len(self.removed)} groups removed "
                f"({len(self.folded)} constant folded into biases, {len(self.unread)} unread) in "
                f"{self.rounds} round(s), {len(self.kept_zero)} zero groups and "
                f"{len(self.kept_unused)} unread or constant groups kept" + self._why_kept())

    def _why_kept(self) -> str:
        """The reasons zero groups were kept, the commonest first (each group's is in kept_zero)."""
        reasons = Counter(why for _, why in self.kept_zero)
        if not reasons:
            return ""
        shown = "; ".join(f"{why} ({count})" for why, count in reasons.most_common(2))
        return f" (zero groups kept: {shown}{'; ...' if len(reasons) > 2 else ''})"


def count_macs(model: nn.Module, example_inputs) -> int:
    """Multiply-accumulates of one forward on example_inputs (matmuls, convolutions, attention),
    run in eval mode: a forward in training mode would move the model's BatchNorm statistics."""
    check_module(model, "model", "count_macs")
    args, kwargs = split_inputs(example_inputs, model)
    # with autograd on, nn.TransformerEncoder takes its decomposed path, which the counter can see
    with eval_mode(model), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        try:
            model(*args, **kwargs)
        except Exception as err:   # name the argument: torch's error names an op deep inside
            raise ValueError(f"count_macs: example_inputs do not run the model: {type(err).__name__}: "
                             f"{err}") from err
    return counter.get_total_flops() // 2


def shrink(model: nn.Module, example_inputs, round_to: int = 1, *,
           memory_format: torch.memory_format | None = None, report: bool = False):
    """A copy of `model` without its pruned coupled groups and the units that carry nothing.

    Removed: all-zero groups; groups whose every consumer weight is zero (unread); groups whose
    every producing weight row is zero (constant: their contribution is added to each consumer's
    bias first, where that is exact; see mackay_ext.shrink_constant). Removing units can leave
    others unread or constant, so the cut repeats until nothing more goes.
    example_inputs: as for mackay_ext.coupling.channel_groups. round_to: channel counts of every
    layer are rounded up to a multiple of it (channels kept back), e.g. 8 for tensor cores.
    memory_format: None keeps each weight's layout; torch.channels_last converts the result
    (Module.to). On CPU that runs the shrunk LeNet-5 about 3x faster at batch 256, mostly because
    max_pool2d is about 5x faster in it (bench/results/deploy.md, per-layer table).
    Returns the new model (plain torch.nn modules, same classes, smaller tensors, num_heads
    updated, a bias added to a bias-less consumer that a constant was folded into; a tied
    parameter is still one Parameter shared by the same modules; the input model is unchanged),
    or (model, ShrinkReport) when report=True.
    A sparsified model (SparseLinear / SparseConv2d) is densified first, on a copy: the result
    and the report's "before" figures are those of plain layers.
    Raises ValueError when a layer would lose every channel to pruned groups, naming the layer.
    """
    check_module(model, "model", "shrink")
    if not isinstance(report, bool):   # any truthy value turned the result into a tuple
        raise TypeError(f"shrink: report must be True or False, got {report!r}")
    check_not_quantized(model, "shrink", "shrink the float model, then quantize the smaller one")
    from .sparse import _CSRWeight, densify
    if any(isinstance(m, _CSRWeight) for m in model.modules()):
        model = densify(copy.deepcopy(model))   # the tracer follows parameters, not CSR products
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"shrink: round_to must be a positive int, got {round_to!r}")
    if memory_format is not None and not isinstance(memory_format, torch.memory_format):
        raise ValueError(f"shrink: memory_format must be None or a torch.memory_format such as "
                         f"torch.channels_last, got {memory_format!r}")
    small, rounds = model, []
    # the constants folded into biases are measured, and the result checked, without TF32
    with full_float32(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHECKPOINT_WITHOUT_GRADIENTS)
        for _ in range(_MAX_ROUNDS):
            try:
                step = _shrink_once(small, example_inputs, round_to)
            except CouplingError as err:
                if not rounds:
                    raise   # the caller's model and inputs: the message says what of them failed
                raise CouplingError(
                    f"shrink: after round {len(rounds)} cut channels, the smaller model no longer runs "
                    f"or traces on example_inputs ({err}); its forward code probably hard-codes a "
                    "channel count") from None
            small = step.model
            rounds.append(step)
            if not (step.unread or step.folded):
                break   # zero groups cannot make more of anything; unread or folded ones can
        if memory_format is not None:
            small = small.to(memory_format=memory_format)   # small is already a copy
        _verify(model, small, example_inputs, folded=any(step.folded for step in rounds))
    if not report:
        return small
    params = lambda m: sum(p.numel() for p in m.parameters())
    collected = lambda key: [g for step in rounds for g in getattr(step, key)]
    return small, ShrinkReport(params(model), params(small), count_macs(model, example_inputs),
                               count_macs(small, example_inputs), collected("removed"),
                               rounds[-1].kept_zero, collected("folded"), collected("unread"),
                               rounds[-1].kept_unused, len(rounds), _batch_of(example_inputs))


def _batch_of(example_inputs) -> int | None:
    """The leading size of the first tensor among the example inputs (None if there is none)."""
    args, kwargs = split_inputs(example_inputs)
    return next((int(value.shape[0]) for value in (*args, *kwargs.values())
                 if isinstance(value, torch.Tensor) and value.dim() > 0), None)


_MAX_ROUNDS = 64


@dataclasses.dataclass
class _Round:
    model: nn.Module
    removed: list
    folded: list
    unread: list
    kept_zero: list
    kept_unused: list


def _shrink_once(model: nn.Module, example_inputs, round_to: int) -> _Round:
    coupling = trace_coupling(model, example_inputs)
    aliases = tied_names(model)
    zero, unread, constant, kept, kept_unused = [], [], [], [], []
    for group in coupling.groups:
        if group.is_zero(model):
            reason = _kept_because(model, group, aliases)
            (kept.append((group, reason)) if reason else zero.append(group))
            continue
        found = "unread" if shrink_constant.unread(model, group) else \
            "constant" if shrink_constant.is_constant(model, group) else None
        if found:
            reason = _kept_because(model, group, aliases)
            (kept_unused.append((group, reason)) if reason else
             (unread if found == "unread" else constant).append(group))
        elif reason := shrink_constant.unused_but_unknown(model, group):
            kept_unused.append((group, reason))   # said in the report, not passed over
    folds, refused = shrink_constant.constant_contributions(model, constant, example_inputs)
    kept_unused += [(constant[i], reason) for i, reason in refused.items()]
    folded = [constant[i] for i in folds]
    adds = {id(constant[i]): add for i, add in folds.items()}
    # unread and folded groups go last: rounding and emptied layers give groups back from the end
    removable = _round(model, zero + unread + folded, round_to)
    removable = _keep_one_unit(model, removable, {id(g) for g in unread + folded}, kept_unused)
    removal = _removal(removable)
    _refuse_empty_layers(model, removal)
    small = copy.deepcopy(model)
    made = set()
    for group in removable:
        for path, add in adds.get(id(group), {}).items():
            made |= {path} if _add_to_bias(small.get_submodule(path), add) else set()
    for (name, dim), indices in removal.items():
        _slice(small, name, dim, indices)
    for path in made:   # a bias made here is in no group: it follows its layer's output rows
        if removal.get((f"{path}.weight", 0)):
            _slice(small, f"{path}.bias", 0, removal[f"{path}.weight", 0])
    for module in small.modules():
        for kind, fix in _FIXERS:
            if _looks_like(module, kind) if isinstance(kind, str) else isinstance(module, kind):
                fix(module)
                break
    if removal:
        _size_norms_by_their_inputs(small, example_inputs)
    kept_ids = {id(g) for g in removable}
    return _Round(small, removable, [g for g in folded if id(g) in kept_ids],
                  [g for g in unread if id(g) in kept_ids], kept, kept_unused)


# -- what can be removed -----------------------------------------------------------------
def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module, str]:
    path, _, local = name.rpartition(".")
    return path, model.get_submodule(path), local


def _kept_because(model: nn.Module, group: ChannelGroup, aliases: dict[str, tuple[str, ...]]) -> str | None:
    """Why shrink keeps `group` (the trace's fixed reason, or a module it cannot cut), or None."""
    # (a GPT-2 attention's own split of q, k and v is no reason: the trace leaves it out of fixed,
    # and _fix_gpt2_attention re-sizes it)
    return group.fixed or _unsupported(model, group, aliases)


def _unsupported(model: nn.Module, group: ChannelGroup, aliases: dict[str, tuple[str, ...]]) -> str | None:
    """Why shrink cannot cut `group` from some module holding a member, or None.

    aliases: tied_names(model); a tied member is checked in every module that holds it."""
    if group.kind == "head":
        attention = model.get_submodule(group.module) if group.module else None
        if isinstance(attention, nn.MultiheadAttention):
            return ("nn.MultiheadAttention ties the width of q, k and v to embed_dim, so a head cannot be "
                    "removed from it; the zeroed head stays")
        if attention is None or not any(_looks_like(attention, k) for k in (*_DUCK, "hf-gpt2-attention")):
            cls = type(attention).__name__ if attention is not None else "?"
            return f"shrink does not know how attention module '{group.module}' ({cls}) counts its heads"
    for m in group.members + group.buffers:
        names = aliases.get(m.name, (m.name,))
        for name in names:
            reason = _unsupported_module(model, name)
            if reason:
                return reason + (f" (its {m.name} is tied: the same tensor in {modules_of(names)}, so "
                                 "no module holding it can lose the channel)" if len(names) > 1 else "")
    return None


def _unsupported_module(model: nn.Module, name: str) -> str | None:
    path, module, _local = _owner(model, name)
    if isinstance(module, nn.MultiheadAttention):
        return f"'{path}' is an nn.MultiheadAttention, whose embed_dim shrink cannot change"
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return f"'{path}' is a transposed convolution"
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


def _keep_one_unit(model: nn.Module, groups: list[ChannelGroup], optional: set[int], kept: list):
    """Give back unread or folded groups (ids in `optional`) that would empty a layer: such a
    layer is still exact with one unit left, and refusing is for pruned groups only."""
    groups = list(groups)
    sizes = {**{n: b.shape for n, b in model.named_buffers()}, **{n: p.shape for n, p in model.named_parameters()}}
    while True:
        removal = _removal(groups)
        emptied = [key for key, indices in removal.items() if len(indices) >= sizes[key[0]][key[1]]]
        back = next((g for key in emptied for g in reversed(groups) if id(g) in optional
                     and any((m.name, m.dim) == key for m in g.members + g.buffers)), None)
        if back is None:
            return groups
        groups.remove(back)
        kept.append((back, "every other unit of its layer goes, and a layer keeps at least one"))


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
    """Cut `indices` along `dim` of the parameter or buffer `name`, in every module holding it
    (a tied tensor gets one new tensor, shared as the old one was)."""
    _, module, local = _owner(model, name)
    old = getattr(module, local)
    keep = torch.tensor([i for i in range(old.shape[dim]) if i not in indices], dtype=torch.long,
                        device=old.device)
    new = old.detach().index_select(dim, keep).contiguous(memory_format=_layout(old))
    if local in module._parameters:
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    for holder in model.modules():
        for table in (holder._parameters, holder._buffers):
            for key, tensor in table.items():
                if tensor is old:
                    table[key] = new


def _add_to_bias(module: nn.Module, add: torch.Tensor) -> bool:
    """Fold a constant channel's contribution into a consumer's bias; True when the bias is new."""
    made = module.bias is None
    if made:
        module.bias = nn.Parameter(torch.zeros_like(add), requires_grad=module.weight.requires_grad)
    with torch.no_grad():
        module.bias.add_(add)
    return made


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format a sliced copy keeps: a channels-last weight stays channels-last."""
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if tensor.dim() == ndim and tensor.is_contiguous(memory_format=fmt) and not tensor.is_contiguous():
            return fmt
    return torch.contiguous_format


def _fix_linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_conv(m: nn.modules.conv._ConvNd) -> None:
    # m's attributes still hold the sizes before the cut (the coupling's two grouped cases)
    per_group = m.out_channels // m.groups
    m.out_channels = m.weight.shape[0]
    if m.groups > 1 and m.in_channels == m.groups:   # depthwise: whole conv groups went
        m.groups = m.in_channels = m.out_channels // per_group
    else:   # plain or grouped: the same positions went from every conv group
        m.in_channels = m.weight.shape[1] * m.groups


def _fix_batch_norm(m: nn.modules.batchnorm._NormBase) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:   # else no tensor holds its size: _size_norms_by_their_inputs
        m.num_features = ref.shape[0]


def _fix_layer_norm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _fix_group_norm(m: nn.GroupNorm, channels: int | None = None) -> None:
    # the coupling keeps a normalisation group's channels together (they share statistics), so
    # whole groups go: the group size stays, the count of groups shrinks
    if channels is None and m.weight is None:
        return   # affine=False: no tensor holds its size (_size_norms_by_their_inputs)
    size = m.num_channels // m.num_groups
    m.num_channels = m.weight.shape[0] if channels is None else channels
    m.num_groups = m.num_channels // size


def _unsized_norm(module: nn.Module) -> bool:
    """A norm whose channel count no tensor of its own holds (no affine parameters, no running
    statistics): GroupNorm(affine=False), InstanceNorm, BatchNorm without either."""
    if isinstance(module, nn.GroupNorm):
        return module.weight is None
    return (isinstance(module, nn.modules.batchnorm._NormBase) and module.weight is None
            and module.running_mean is None)


def _size_norms_by_their_inputs(small: nn.Module, example_inputs) -> None:
    """Set each unsized norm's channel count from the input it gets in one forward of the shrunk
    model (a pre-hook runs before the norm's own size check)."""
    norms = [m for m in small.modules() if _unsized_norm(m)]
    if not norms:
        return

    def resize(module, args):
        channels = args[0].shape[1]
        if isinstance(module, nn.GroupNorm):
            _fix_group_norm(module, channels)
        else:
            module.num_features = channels

    handles = [m.register_forward_pre_hook(resize) for m in norms]
    try:
        args, kwargs = split_inputs(example_inputs, small)
        with torch.no_grad(), eval_mode(small):
            small(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _fix_embedding(m: nn.Embedding | nn.EmbeddingBag) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _fix_hf_conv1d(m: nn.Module) -> None:
    m.nf = m.weight.shape[1]   # transformers' Conv1D: weight (in, out), nf = out


def _fix_timm_attention(m: nn.Module) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)   # children may be fixed after
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * m.head_dim


def _fix_gpt2_attention(m: nn.Module) -> None:
    # forward splits c_attn's output into q, k and v at split_size and views heads of head_dim
    m.split_size = m.c_attn.weight.shape[1] // 3
    m.num_heads = m.split_size // m.head_dim


def _fix_hf_attention(m: nn.Module) -> None:
    m.all_head_size = m.query.weight.shape[0]
    m.num_attention_heads = m.all_head_size // m.attention_head_size


_DUCK = {"timm-attention": ("qkv", "num_heads", "head_dim"),
         "hf-attention": ("query", "num_attention_heads", "attention_head_size", "all_head_size")}


def _looks_like(module: nn.Module, kind: str) -> bool:
    if kind == "hf-conv1d":
        return shrink_constant.is_hf_conv1d(module)
    if kind == "hf-gpt2-attention":   # self-attention: one c_attn makes q, k and v
        return is_hf_gpt2_self_attention(module)
    return kind in _DUCK and all(hasattr(module, a) for a in _DUCK[kind]) and \
        isinstance(getattr(module, _DUCK[kind][0]), nn.Linear)


# One attribute fixer per module type (checked in order; strings are duck-typed attention modules).
_FIXERS = [(nn.Linear, _fix_linear), (nn.modules.conv._ConvNd, _fix_conv),
           (nn.modules.batchnorm._NormBase, _fix_batch_norm), (nn.LayerNorm, _fix_layer_norm),
           (nn.GroupNorm, _fix_group_norm),
           (nn.Embedding, _fix_embedding), (nn.EmbeddingBag, _fix_embedding), ("timm-attention", _fix_timm_attention),
           ("hf-attention", _fix_hf_attention), ("hf-gpt2-attention", _fix_gpt2_attention),
           ("hf-conv1d", _fix_hf_conv1d)]


def _verify(model: nn.Module, small: nn.Module, example_inputs, folded: bool = False) -> None:
    """Compare outputs on example_inputs (eval mode); a mismatch means forward code hard-codes sizes."""
    args, kwargs = split_inputs(example_inputs, model)
    modes = model.training
    model.eval(), small.eval()
    low_precision = []   # a layer run under autocast: its outputs carry ~3 digits, whatever the output's dtype

    def look(module, inputs, output):
        if not low_precision and any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda")):
            low_precision.append(module)
    handles = [m.register_forward_hook(look) for m in model.modules()]
    try:
        with torch.no_grad():
            try:
                expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))
            finally:
                for handle in handles:
                    handle.remove()
            try:
                got = torch.utils._pytree.tree_leaves(small(*args, **kwargs))
            except Exception as err:
                raise CouplingError(f"shrink: the shrunk model does not run ({type(err).__name__}: {err}); "
                                    "its forward code probably hard-codes a channel count") from err
    finally:
        model.train(modes), small.train(modes)
    for names in tied_names(model).values():
        held = {id(_get_tensor(small, n)) for n in names}
        if len(held) != 1:
            raise CouplingError(f"shrink: {', '.join(names)} are one tied tensor in the input model but not "
                                f"in the shrunk one; the tie between {modules_of(names)} would be broken")
    if len(expected) != len(got):   # zip would compare the common part and pass
        raise CouplingError(f"shrink: the shrunk model returns {len(got)} outputs where the pruned one "
                            f"returns {len(expected)}; its forward code probably depends on a channel count")
    for a, b in zip(expected, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            tol = 1e-2 if low_precision else {torch.float64: 1e-9, torch.float32: 1e-4}.get(a.dtype, 1e-2)
            scale = a.abs().max().item() if a.numel() else 0.0
            if a.shape != b.shape or (a.numel() and (a - b).abs().max().item() > tol * max(scale, 1e-30)):
                raise CouplingError("shrink: the shrunk model's outputs differ from the pruned model's; "
                                    "its forward code probably hard-codes a channel count" +
                                    (", or a unit taken for constant and folded into a bias was not "
                                     "constant" if folded else ""))


def _get_tensor(model: nn.Module, name: str):
    path, _, local = name.rpartition(".")
    return getattr(model.get_submodule(path), local, None)
