"""Units that per-weight pruning leaves without a job, found for shrink (docs/mathematics.md §3b).

Unstructured pruning rarely zeroes a whole coupled group (biases and norm entries survive), yet it
leaves two kinds of channel that can be removed exactly all the same:

- unread: every consumer weight reading the channel is zero (all its outgoing weights are
  pruned). Whatever the channel carries, nobody reads it; a non-blocked group holds every
  parameterised reader of its channel (mackay_ext.coupling), so it goes as a zero group does.
- constant: every weight row producing the channel is zero (all its incoming weights are pruned):
  it outputs act(bias) whatever the input. Each consumer then adds the same W[:, j] * c_j at every
  position, which shrink adds to the consumer's bias before cutting the channel.

"The same at every position" is not taken on trust: padding, pooling with count_include_pad, or a
constant multiplied by an input-dependent scale would break it. The consumer's contribution
through the channel is computed from the inputs each consumer really receives (the example
inputs, and a second forward with perturbed floating inputs) and folded only when it is the same
for every example and every position. A consumer convolution with zero padding is refused
outright: its border positions read zeros instead of the constant, at every input size, so the
contribution is not one vector (the group stays, with that reason). shrink still compares the
result with the pruned model at the end.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .coupling import ChannelGroup, split_inputs
from .coupling.groups import is_hf_conv1d
from .coupling.ties import tied_names

__all__ = ["Roles", "constant_contributions", "is_constant", "is_hf_conv1d", "roles", "unread"]

_Conv = nn.modules.conv._ConvNd


@dataclasses.dataclass
class Roles:
    """A group's weight members by what they do to the channel (module path, member) pairs.

    producers: rows of a Linear / conv / transformers Conv1D that compute the channel; consumers:
    the input slices of one that read it (of a grouped conv: weight column j, which reads input
    channel j of every conv group, the channels coupling.layers._grouped makes one group);
    unknown: weight members of other kinds (embedding columns, a tensor tied to another module,
    whose other use the folding here does not see...), which rule out both removals here. One-
    dimensional members (biases, norm entries) and depthwise filters act on the channel itself
    and need no role. tied: the unknown members that are tied to another module.
    """
    producers: list
    consumers: list
    unknown: list
    tied: list = dataclasses.field(default_factory=list)


def _owner(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    path = name.rpartition(".")[0]
    return path, model.get_submodule(path)


def _depthwise(module: nn.Module) -> bool:
    """One input channel per conv group (a channel multiplier allowed): its filters are the channel's own."""
    return isinstance(module, _Conv) and module.groups > 1 and module.groups == module.in_channels


def _tied_to_another_module(model: nn.Module) -> set[str]:
    """Names of tensors shared with another module: a module registered under two names
    (self.block2 = self.block) shares its tensors with itself, and keeps its roles."""
    tied = set()
    for canonical, names in tied_names(model).items():
        if len({id(_owner(model, name)[1]) for name in names}) > 1:
            tied.add(canonical)
    return tied


def roles(model: nn.Module, group: ChannelGroup) -> Roles:
    found = Roles([], [], [])
    tied = _tied_to_another_module(model)
    for m in group.members:
        path, module = _owner(model, m.name)
        if m.name in tied:
            found.unknown.append((path, m))
            found.tied.append((path, m))
            continue
        if m._ndim < 2 or (_depthwise(module) and m.dim == 0):
            continue
        plain = isinstance(module, nn.Linear) or (isinstance(module, _Conv) and not module.transposed)
        if plain and m.name == f"{path}.weight" and m.dim in (0, 1):
            (found.producers if m.dim == 0 else found.consumers).append((path, m))
        elif is_hf_conv1d(module) and m.name == f"{path}.weight" and m.dim in (0, 1):
            (found.producers if m.dim == 1 else found.consumers).append((path, m))   # rows read inputs
        elif isinstance(module, nn.MultiheadAttention) and m.name == f"{path}.in_proj_weight" and m.dim == 0:
            found.producers.append((path, m))   # a head's packed q, k, v rows make it
        else:
            found.unknown.append((path, m))
    return found


def _all_zero(model: nn.Module, members) -> bool:
    for _, m in members:
        param = model.get_parameter(m.name).detach()
        if param.index_select(m.dim, torch.tensor(m.indices, dtype=torch.long, device=param.device)).any():
            return False
    return True


def unread(model: nn.Module, group: ChannelGroup) -> bool:
    """True when the group's channel has consumers and every consumer weight reading it is zero.
    A head too: the output projection's columns read its values, and its queries and keys only
    weigh those values, so with the columns zero nothing of the head reaches the output."""
    if group.kind not in ("channel", "head"):
        return False
    r = roles(model, group)
    return bool(r.consumers) and not r.unknown and _all_zero(model, r.consumers)


def unused_but_unknown(model: nn.Module, group: ChannelGroup) -> str | None:
    """Why a channel that every known reader leaves unread, or every known maker leaves
    constant, is still kept (None if it is not such a channel): some member sits where shrink
    cannot tell whether it reads or makes the channel (a raw Parameter used in forward code, a
    weight tied to another module), so the channel may still matter."""
    if group.kind not in ("channel", "head"):
        return None
    r = roles(model, group)
    if not r.unknown:
        return None
    if r.consumers and _all_zero(model, r.consumers):
        found = f"its readers {', '.join(path for path, _ in r.consumers)} leave it unread"
    elif group.kind == "channel" and r.producers and r.consumers and _all_zero(model, r.producers):
        found = f"its makers {', '.join(path for path, _ in r.producers)} leave it constant"
    else:
        return None
    tied = [m.name for _, m in r.tied]
    other = [(path, m) for path, m in r.unknown if m.name not in tied]
    why = []
    if tied:
        why.append(f"{', '.join(tied)} {'is' if len(tied) == 1 else 'are'} tied to another module, whose "
                   "use of the channel it cannot see")
    if other:
        where = ", ".join(f"{m.name} ({type(model.get_submodule(path)).__name__})" for path, m in other)
        why.append(f"it does not know what {where} does with it (it knows the roles of nn.Linear, conv "
                   "and transformers' Conv1D weights only)")
    return f"{found}, but {'; and '.join(why)}: shrink keeps it"


def is_constant(model: nn.Module, group: ChannelGroup) -> bool:
    """True when every weight row producing the group's channel is zero (and it has a consumer)."""
    if group.kind != "channel":
        return False
    r = roles(model, group)
    return bool(r.producers) and bool(r.consumers) and not r.unknown and _all_zero(model, r.producers)


def constant_contributions(model: nn.Module, groups: list[ChannelGroup], example_inputs, *,
                           zeros_fold: bool = True):
    """What each constant group adds to its consumers' outputs, or why it cannot be folded.

    zeros_fold: a channel whose consumers read exact zeros (a ReLU after a negative constant)
    folds (adds 0) even into a zero-padding conv. dead_channels passes False: a constant that is 0
    in eval mode need not be in train mode (BatchNorm's batch statistics), so it cuts it before
    a fine-tune rather than leave it to train.

    Returns ({group index: {consumer module path: bias increment, shape (out_features,)}},
    {group index: reason}) for groups[i] (each is_constant). The increment is computed in the
    model's dtype from the consumer inputs of a forward on example_inputs (eval mode, no_grad).
    """
    plan = {i: roles(model, g).consumers for i, g in enumerate(groups)}
    paths = {path for consumers in plan.values() for path, _ in consumers}
    seen = _consumer_inputs(model, paths, example_inputs)
    folds, refused = {}, {}
    for i, consumers in plan.items():
        adds, reason = {}, None
        for path, member in consumers:
            module = model.get_submodule(path)
            if len(seen.get(path, [])) != _runs(example_inputs):
                reason = f"its consumer '{path}' is called {len(seen.get(path, []))} times per forward, not once"
            elif (isinstance(module, _Conv) and _pads_with_zeros(module)
                  and not (zeros_fold and _reads_zeros(module, member, seen[path]))):
                # (a channel of exact zeros adds nothing anywhere, borders included: it goes)
                reason = (f"its consumer '{path}' pads with zeros, so the constant's contribution is "
                          "different at the borders")
            else:
                add = _uniform(_contribution(module, member, seen[path]))
                reason = None if add is not None else (
                    f"what it adds to '{path}' is not the same at every position and for every input")
                if add is not None:
                    adds[path] = adds.get(path, 0) + add
            if reason:
                break
        (refused.__setitem__(i, reason) if reason else folds.__setitem__(i, adds))
    return folds, refused


def _pads_with_zeros(module: _Conv) -> bool:
    if module.padding_mode != "zeros":
        return False   # reflect/replicate/circular pad a constant map with the same constant
    padding = module.padding
    return padding == "same" if isinstance(padding, str) else any(p != 0 for p in padding)


def _runs(example_inputs) -> int:
    return 1 + bool(_perturbed(example_inputs))


def _perturbed(example_inputs, model: nn.Module | None = None):
    """The example inputs with noise on every floating tensor, or None without one: a second look
    that a constant really is constant, for example inputs of a single example."""
    args, kwargs = split_inputs(example_inputs, model)
    generator = torch.Generator().manual_seed(0)
    changed = False

    def noisy(t):
        nonlocal changed
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            return t
        changed = True
        scale = max(t.detach().abs().max().item(), 1.0)
        # drawn on the CPU (one generator, the same noise on every device), then moved
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        return t + (0.5 * scale * noise).to(device=t.device, dtype=t.dtype)

    args, kwargs = torch.utils._pytree.tree_map(noisy, (args, kwargs))
    return (args, kwargs) if changed else None


@torch.no_grad()
def _consumer_inputs(model: nn.Module, paths, example_inputs) -> dict[str, list[torch.Tensor]]:
    """The first input of each consumer module, once per call, over both probing forwards."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(path, args):
        if args and isinstance(args[0], torch.Tensor):   # called otherwise: the count will not match
            seen.setdefault(path, []).append(args[0].detach())
        else:
            seen.setdefault(path, []).extend([None, None, None])

    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda module, args, p=p: record(p, args)) for p in paths]
    training = model.training
    model.eval()
    try:
        runs = [split_inputs(example_inputs, model)]
        second = _perturbed(example_inputs, model)
        runs += [second] if second else []
        for args, kwargs in runs:
            model(*args, **kwargs)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return seen


def _input_channels(module: nn.Module, member) -> torch.Tensor:
    """The input channels that the member's weight columns read: the columns themselves, or for
    a grouped conv column j of each conv group, in group order (what its conv expects)."""
    columns = member.indices
    if isinstance(module, _Conv) and module.groups > 1:
        per_group = module.in_channels // module.groups
        columns = [g * per_group + j for g in range(module.groups) for j in columns]
    return torch.tensor(columns, dtype=torch.long, device=module.weight.device)


def _reads_zeros(module: nn.Module, member, inputs: list[torch.Tensor]) -> bool:
    """Is the member's input slice of the consumer exactly 0 in every probing forward?"""
    index = _input_channels(module, member)
    return all(not bool(x.index_select(1, index).any()) for x in inputs)


def _contribution(module: nn.Module, member, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The consumer's output from the member's input slice alone, no bias: (positions, out)."""
    index = torch.tensor(member.indices, dtype=torch.long, device=module.weight.device)
    weight = module.weight.detach().index_select(member.dim, index)
    rows = []
    for x in inputs:
        x = x.to(weight.dtype)   # an input recorded under autocast (bfloat16 beside a float32 weight)
        if isinstance(module, nn.Linear):
            out = F.linear(x.index_select(x.dim() - 1, index), weight)
        elif is_hf_conv1d(module):   # weight (in, out)
            out = x.index_select(x.dim() - 1, index) @ weight
        else:   # (a grouped conv reads its columns' channels in each of its groups)
            channels = _input_channels(module, member)
            out = module._conv_forward(x.index_select(1, channels), weight, None).movedim(1, -1)
        rows.append(out.reshape(-1, out.shape[-1]))
    return torch.cat(rows)


def _uniform(rows: torch.Tensor) -> torch.Tensor | None:
    """rows[0] when every row equals it (up to rounding of the same sum), else None."""
    first = rows[0]
    scale = rows.abs().max().item() if rows.numel() else 0.0
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(rows.dtype, 1e-3) * max(scale, 1e-30)
    return first if (rows - first).abs().max().item() <= tol else None
