"""MAC-priced pruning: a group is removed when what it adds to the evidence is worth less than
the multiply-accumulates it costs.

MacKay's rule keeps every group the data determine well: a 5x5 filter of a first conv layer is
shared over every output position, its curvature is large, its signal-to-noise ratio is huge and
no threshold prunes it, although it costs more MACs than hundreds of Linear inputs. The evidence
says what the group is worth; the price says what it costs.

Worth: in the Laplace approximation of the diagonal posterior, the log evidence of the model with
the group (prior N(0, 1/alpha_g) on each weight, data curvature H_i = N h_i) against the model
without it (its weights fixed at 0), with w the current weights (the posterior mean), is

    gain_g = 1/2 sum_{i in g} [ w_i^2 (alpha_g + H_i) - log(1 + H_i / alpha_g) ]   (nats)

(the first term is the fit the group buys, the second its Occam factor). Cost: MACs_g, the
multiply-accumulates per example the network saves when the group goes: its live weights, each
times the number of times one example uses it (the output positions of a convolution, the
positions of a sequence for a Linear), and, when the group is the only reader or the only writer
of a channel (a hidden unit's outgoing column, a filter feeding one conv), the live weights of
that channel elsewhere, which die with it (FreedMacs). Live: non-zero, in no channel that is
already dead. The group is pruned when gain_g < price * MACs_g: `price` is in nats per MAC, one
knob that trades accuracy (the evidence) against compute. For a coupled channel group
(channel_ard.py) both sums run over all its members, each entry with its alpha_eff, so a filter
pays for its consumers' live input slices too. MacKayPruner(mac_price=, mac_price_ramp=) raises
the price over the first pruning updates (pruner.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._alpha import group_dims
from .coupling import CouplingError, trace_coupling
from .coupling.trace import split_inputs

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COUNTED = (nn.Linear, nn.Embedding, *_CONV, *_CONV_TRANSPOSE)


def weight_uses(model: nn.Module, example_inputs) -> dict[int, float]:
    """id(weight) -> how many multiply-accumulates each of its entries costs per example, for the
    weight of every Linear, Conv, ConvTranspose and Embedding the forward on example_inputs runs
    (summed over the modules of a tied weight); from one forward in eval mode without gradients,
    so nothing (BatchNorm statistics) is updated."""
    args, kwargs = split_inputs(example_inputs)
    batch = _batch_size(args, kwargs)
    uses: dict[int, float] = {}
    hooks = [module.register_forward_hook(_recorder(module, batch, uses))
             for module in model.modules() if isinstance(module, _COUNTED)]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return uses


def target_uses(uses: dict[int, float], targets: dict) -> dict[str, float]:
    """The uses per example of every ARD target's weight; a ValueError names those not counted."""
    missing = [t.description for t in targets.values() if id(t.param) not in uses]
    if missing:
        raise ValueError(f"MacKayPruner: mac_price cannot count the MACs of {'; '.join(missing)}: not the "
                         "weight of a Linear, Conv, ConvTranspose or Embedding that the forward on "
                         "example_inputs ran (pass layers= without them)")
    return {name: uses[id(t.param)] for name, t in targets.items()}


def _batch_size(args, kwargs) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("MacKayPruner: mac_price: example_inputs holds no tensor with a batch dimension")


def _recorder(module, batch, uses):
    def record(_module, inputs, output):
        if isinstance(module, nn.Linear):
            # output (batch, ..., out): each weight is used once per position of its output
            count = output.numel() / (batch * module.out_features)
        elif isinstance(module, _CONV):
            count = output.numel() / (batch * module.out_channels)   # once per output position
        elif isinstance(module, _CONV_TRANSPOSE):
            count = inputs[0].numel() / (batch * module.in_channels)   # once per input position
        else:
            count = 0.0   # an Embedding's lookup multiplies nothing
        uses[id(module.weight)] = uses.get(id(module.weight), 0.0) + float(count)
    return record


def _entry_gains(w: torch.Tensor, n_h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Twice each entry's share of gain_g: w^2 (alpha + H) - log(1 + H / alpha); 0 where alpha is
    +inf (pruned) or 0 (prior off)."""
    live = torch.isfinite(alpha) & (alpha > 0)
    safe = torch.where(live, alpha, torch.ones_like(alpha))
    return (w * w * (safe + n_h) - torch.log1p(n_h / safe)).masked_fill(~live, 0.0)


@torch.no_grad()
def evidence_gain(weight: torch.Tensor, curvature: torch.Tensor, alpha: torch.Tensor, *,
                  num_data: float) -> torch.Tensor:
    """gain_g (nats, float64, alpha's shape padded to weight.dim()) of every group; a group with
    alpha = +inf (pruned) or 0 (prior off) gets +inf: it is not for sale."""
    dims, padded = group_dims(weight, alpha)
    w = weight.double()
    n_h = (curvature.double() * num_data).clamp(min=0.0)
    alpha = alpha.double().reshape(padded)
    per_weight = _entry_gains(w, n_h, alpha)
    gain = 0.5 * (per_weight.sum(dim=dims, keepdim=True) if dims else per_weight)
    live = torch.isfinite(alpha) & (alpha > 0)
    return torch.where(live, gain, torch.full_like(gain, math.inf))


@torch.no_grad()
def price_out(weight: torch.Tensor, curvature: torch.Tensor, alpha: torch.Tensor,
              old_alpha: torch.Tensor, *, num_data: float, macs: torch.Tensor, price: float,
              rule: str) -> tuple[int, float]:
    """Prune (alpha = +inf, weights 0) every live group of `weight` whose evidence gain is below
    price * its MACs (`macs`: per group, alpha's shape padded to weight.dim(), FreedMacs), after
    an update wrote the new `alpha`. Returns (groups pruned, the sum of gamma of those groups,
    computed from `old_alpha` as the update did)."""
    dims, padded = group_dims(weight, alpha)
    size = math.prod(weight.shape[d] for d in dims)
    priced = evidence_gain(weight, curvature, alpha, num_data=num_data) < price * macs
    count = int(priced.sum())
    if count == 0:
        return 0, 0.0
    n_h = (curvature.double() * num_data).clamp(min=0.0)
    old = old_alpha.double().reshape(padded)
    if rule == "paper":
        gamma = torch.full_like(old, float(size))
    else:
        per_weight = torch.where(old == 0, torch.ones_like(n_h), n_h / (n_h + old))
        gamma = per_weight.sum(dim=dims, keepdim=True) if dims else per_weight
    gamma_priced = float(torch.where(priced, gamma, torch.zeros_like(gamma)).sum())
    alpha.masked_fill_(priced.reshape(alpha.shape), math.inf)
    weight.masked_fill_(priced.expand(weight.shape), 0)
    return count, gamma_priced


class FreedMacs:
    """The MACs per example that removing each group of per-layer ARD targets saves (the cost in
    MacKayPruner(mac_price=...) for granularity weight and filter), from the live weights now.

    A group's own live entries count, each times its uses. When the group is one index of the
    only producer (a Linear's or conv's output row) or the only reader (an input column) of a
    channel the coupling trace found, removing it kills the channel, so the live entries of the
    channel's other members count too: a hidden unit's outgoing column also pays for its incoming
    row. Live: non-zero and in no dead channel (one whose producers or readers are all zero), so a
    pixel's column is charged only for the hidden units still alive. A model the tracer cannot
    follow is charged its groups' own live entries (`note` says why)."""

    def __init__(self, model: nn.Module, example_inputs, uses: dict[int, float]):
        self.model, self.uses, self.note = model, uses, None
        self._names = {id(param): name for name, param in model.named_parameters()}
        try:
            groups = trace_coupling(model, example_inputs).groups
        except CouplingError as error:
            groups = []
            self.note = f"mac_price: channels not traced ({error}): each group pays for its own weights"
        # per channel: (parameter name, dim, indices, role) of its weight members with a known role
        self.channels = []
        for group in groups:
            if group.kind != "channel":
                continue
            members = [(m.name, m.dim, m.indices, _role(model, m.name, m.dim)) for m in group.members
                       if model.get_parameter(m.name).dim() > 1]
            roles = [role for *_, role in members]
            # a channel with a member of unknown role, or with no reader among the weights (one the
            # model returns), is never counted as dead nor as killed
            if None not in roles and "out" in roles and "in" in roles:
                self.channels.append(members)
        # (parameter name, dim) -> (channel, member) where one index of it is the channel's only
        # producer or only reader: removing that index kills the channel
        self._links: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for channel, members in enumerate(self.channels):
            for index, (name, dim, indices, role) in enumerate(members):
                if len(indices) == 1 and sum(1 for m in members if m[3] == role) == 1:
                    self._links.setdefault((name, dim), []).append((channel, index))
        self._alive: list[bool] = [True] * len(self.channels)

    @torch.no_grad()
    def live(self) -> dict[str, torch.Tensor]:
        """Parameter name -> uses per live entry (0 where zero or in a dead channel), float64;
        taken once per update (it also notes which channels are alive for group_macs)."""
        names = {m[0] for members in self.channels for m in members}
        live = {name: (self.model.get_parameter(name) != 0) for name in names}
        self._alive = [self._lives(members, live) for members in self.channels]
        for members, alive in zip(self.channels, self._alive):
            for name, dim, indices, _ in ([] if alive else members):
                index = torch.tensor(indices, dtype=torch.long, device=live[name].device)
                live[name] = live[name].index_fill(dim, index, False)
        return {name: mask.double() * self.uses.get(id(self.model.get_parameter(name)), 0.0)
                for name, mask in live.items()}

    @torch.no_grad()
    def group_macs(self, weight: torch.Tensor, alpha: torch.Tensor,
                   live: dict[str, torch.Tensor]) -> torch.Tensor:
        """MACs per example removing each group of `weight` (a parameter of the model, its groups
        given by `alpha`) saves, float64, alpha's shape padded to the weight's; `live` from the
        live() of this update."""
        name = self._names.get(id(weight))
        dims, padded = group_dims(weight, alpha)
        macs = live[name] if name in live else (weight != 0).double() * self.uses.get(id(weight), 0.0)
        macs = macs.sum(dim=dims, keepdim=True) if dims else macs.clone()
        grouped = [d for d, size in enumerate(padded) if size != 1]
        if len(grouped) != 1:   # one weight per group, or a whole tensor: never a channel's only link
            return macs
        for channel, index in self._links.get((name, grouped[0]), []):
            if self._alive[channel]:
                members = self.channels[channel]
                freed = sum(float(self._slice(m, live).sum()) for j, m in enumerate(members) if j != index)
                macs.view(-1)[members[index][2][0]] += freed
        return macs

    @staticmethod
    def _slice(member, live) -> torch.Tensor:
        name, dim, indices, _ = member
        index = torch.tensor(indices, dtype=torch.long, device=live[name].device)
        return live[name].index_select(dim, index)

    def _lives(self, members, live) -> bool:
        """A channel lives while some producer and some reader still has a non-zero entry."""
        alive = {"out": False, "in": False}
        for member in members:
            if not alive[member[3]] and bool(self._slice(member, live).any()):
                alive[member[3]] = True
        return alive["out"] and alive["in"]


def _role(model: nn.Module, name: str, dim: int) -> str | None:
    """'out' where dimension `dim` of parameter `name` indexes the channels its module writes,
    'in' where it indexes those it reads, None for any other parameter."""
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    if attribute != "weight":
        return None
    if isinstance(module, (nn.Linear, *_CONV)):
        return {0: "out", 1: "in"}.get(dim)
    if isinstance(module, _CONV_TRANSPOSE):
        return {0: "in", 1: "out"}.get(dim)
    if isinstance(module, nn.Embedding):
        return {1: "out"}.get(dim)
    return None


# ------------------------------------------------------------- coupled channel groups
def channel_group_macs(channel, uses: dict[int, float]) -> torch.Tensor:
    """MACs per example of every coupled group of a ChannelARD (channel_ard.py): the sum over its
    members (a filter, its consumers' input slices, ...) of live (non-zero) entries x uses per
    entry, so a filter is charged only for the input slices of consumers still alive. Biases and
    norm entries add, they do not multiply: 0."""
    macs = torch.zeros_like(channel.alpha)
    for member in channel.members.values():
        count = uses.get(id(member.param))
        if count is None:
            if member.param.dim() > 1:
                raise ValueError(f"MacKayPruner: mac_price cannot count the MACs of {member.name} "
                                 f"(shape {tuple(member.param.shape)}), a member of a channel group: not "
                                 "the weight of a Linear, Conv, ConvTranspose or Embedding that the "
                                 "forward on example_inputs ran")
            continue
        live = (member.param.detach() != 0).double() * count
        for dim, ids in member.views():
            channel._group_sum(member, dim, ids, live * (ids >= 0).double(), macs)
    return macs


@torch.no_grad()
def channel_priced_out(channel, new: torch.Tensor, num_data: float, price: float) -> torch.Tensor:
    """The live groups (0 < new alpha < inf) of a ChannelARD whose evidence gain, summed over
    the entries of all their members with each entry's alpha_eff, is below price x their MACs."""
    gain = torch.zeros_like(new)
    for member in channel.members.values():
        w = member.param.detach().double()
        n_h = (channel.curvature_estimate(member.name).double() * num_data).clamp(min=0.0)
        terms, alpha_eff, _ = channel._alpha_terms(member, new)
        per_entry = _entry_gains(w, n_h, alpha_eff)
        for dim, ids, inside, _ in terms:
            channel._group_sum(member, dim, ids, 0.5 * per_entry * inside.double(), gain)
    live_group = torch.isfinite(new) & (new > 0)
    return live_group & (gain < price * channel.macs)
