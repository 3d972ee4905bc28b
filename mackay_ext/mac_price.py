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
multiply-accumulates per example of its weights in the full network, each weight times the
number of times one example uses it (the output positions of a convolution, the positions of a
sequence for a Linear), and, when the group is the only reader or the only writer of a channel
(a hidden unit's outgoing column, a filter feeding one conv), those of that channel's other
weights, which die with it (FreedMacs). The group is pruned when gain_g < price * MACs_g: `price` is in nats per MAC, one
knob that trades accuracy (the evidence) against compute. For a coupled channel group
(channel_ard.py) both sums run over all its members, each entry with its alpha_eff, so a filter
pays for its consumers' input slices too. MacKayPruner(mac_price=, mac_price_ramp=) raises
the price over the first pruning updates (pruner.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._alpha import group_dims
from ._eval_mode import eval_mode
from .coupling import CouplingError, trace_coupling
from .coupling.groups import is_hf_conv1d
from .coupling.trace import split_inputs

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COUNTED = (nn.Linear, nn.Embedding, *_CONV, *_CONV_TRANSPOSE)


def weight_uses(model: nn.Module, example_inputs) -> dict[int, float]:
    """id(weight) -> how many multiply-accumulates each of its entries costs per example, for the
    weight of every Linear (transformers' Conv1D too), Conv, ConvTranspose and Embedding the
    forward on example_inputs runs (summed over the modules of a tied weight); from one forward
    in eval mode without gradients, so nothing (BatchNorm statistics) is updated."""
    args, kwargs = split_inputs(example_inputs, model)
    batch = _batch_size(args, kwargs)
    uses: dict[int, float] = {}
    hooks = [module.register_forward_hook(_recorder(module, batch, uses))
             for module in model.modules() if isinstance(module, _COUNTED) or is_hf_conv1d(module)]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    return uses


def target_uses(uses: dict[int, float], targets: dict) -> dict[str, float]:
    """The uses per example of every ARD target's weight; a ValueError names those not counted."""
    missing = [t.description for t in targets.values() if id(t.param) not in uses]
    if missing:
        raise ValueError(f"MacKayPruner: mac_price cannot count the MACs of {'; '.join(missing)}: not the "
                         "weight of a Linear (or transformers' Conv1D), Conv, ConvTranspose or Embedding that "
                         "the forward on example_inputs ran (pass layers= without them)")
    return {name: uses[id(t.param)] for name, t in targets.items()}


def _batch_size(args, kwargs) -> int:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("MacKayPruner: mac_price: example_inputs holds no tensor with a batch dimension")


def _recorder(module, batch, uses):
    def record(_module, inputs, output):
        if isinstance(module, nn.Linear) or is_hf_conv1d(module):   # (Conv1D: nf outputs)
            # output (batch, ..., out): each weight is used once per position of its output
            count = output.numel() / (batch * module.weight.shape[0 if isinstance(module, nn.Linear) else 1])
        elif isinstance(module, _CONV):
            count = output.numel() / (batch * module.out_channels)   # once per output position
        elif isinstance(module, _CONV_TRANSPOSE):
            count = inputs[0].numel() / (batch * module.in_channels)   # once per input position
        else:
            count = 0.0   # an Embedding's lookup multiplies nothing
        uses[id(module.weight)] = uses.get(id(module.weight), 0.0) + float(count)
    return record


def entry_gains(w: torch.Tensor, n_h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Twice each entry's share of gain_g: w^2 (alpha + H) - log(1 + H / alpha); 0 where alpha is
    +inf (pruned) or 0 (prior off)."""
    live = torch.isfinite(alpha) & (alpha > 0)
    safe = torch.where(live, alpha, torch.ones_like(alpha))
    return (w * w * (safe + n_h) - torch.log1p(n_h / safe)).masked_fill(~live, 0.0)


def group_gamma(n_h: torch.Tensor, old_alpha: torch.Tensor, dims: list[int], rule: str) -> torch.Tensor:
    """gamma_g of every group as the update computed it from `old_alpha` (padded to n_h.dim()):
    the group's size under the paper's rule, else sum N h / (N h + alpha) (1 where alpha is 0)."""
    if rule == "paper":
        return torch.full_like(old_alpha, float(math.prod(n_h.shape[d] for d in dims)))
    per_weight = torch.where(old_alpha == 0, torch.ones_like(n_h), n_h / (n_h + old_alpha))
    return per_weight.sum(dim=dims, keepdim=True) if dims else per_weight


@torch.no_grad()
def evidence_gain(weight: torch.Tensor, curvature: torch.Tensor, alpha: torch.Tensor, *,
                  num_data: float) -> torch.Tensor:
    """gain_g (nats, float64, alpha's shape padded to weight.dim()) of every group; a group with
    alpha = +inf (pruned) or 0 (prior off) gets +inf: it is not for sale."""
    dims, padded = group_dims(weight, alpha)
    w = weight.double()
    n_h = (curvature.double() * num_data).clamp(min=0.0)
    alpha = alpha.double().reshape(padded)
    per_weight = entry_gains(w, n_h, alpha)
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
    priced = evidence_gain(weight, curvature, alpha, num_data=num_data) < price * macs
    count = int(priced.sum())
    if count == 0:
        return 0, 0.0
    n_h = (curvature.double() * num_data).clamp(min=0.0)
    gamma = group_gamma(n_h, old_alpha.double().reshape(padded), dims, rule)
    gamma_priced = float(torch.where(priced, gamma, torch.zeros_like(gamma)).sum())
    alpha.masked_fill_(priced.reshape(alpha.shape), math.inf)
    weight.masked_fill_(priced.expand(weight.shape), 0)
    return count, gamma_priced


class FreedMacs:
    """MACs_g of the groups of per-layer ARD targets (granularity weight and filter): what the
    group costs in the full network, with the channel that dies with it.

    A group's own entries count, each times its uses. When the group is one index of the only
    producer (a Linear's or conv's output row) or the only reader (an input column) of a channel
    the coupling trace found, removing it kills the channel, so the entries of the channel's other
    members count too: a hidden unit's outgoing column also pays for its incoming row, as a
    coupled channel group does (channel_group_macs). A model the tracer cannot follow is charged
    its groups' own entries (`note` says why).

    Full network, not the live one: charging only what is still live (a pixel for the hidden
    units left, a conv1 filter for the conv2 filters left) measured no better on LeNet-300-100 (the
    same error against MACs front, at other prices) and far worse on LeNet-5 in channel groups:
    each filter removed from one layer made the next layer's cheaper to keep and its own dearer,
    and conv2 collapsed to one filter (3.88% error at 131K MACs, against 0.84% at 150K).
    """

    def __init__(self, model: nn.Module, example_inputs, uses: dict[int, float]):
        self.model, self.uses, self.note = model, uses, None
        self._names = {id(param): name for name, param in model.named_parameters()}
        try:
            groups = trace_coupling(model, example_inputs).groups
        except CouplingError as error:
            groups = []
            self.note = f"mac_price: channels not traced ({error}): each group pays for its own weights"
        # (parameter name, dim) -> per index of that dim, the MACs of the channel it alone writes
        # or reads, without its own entries
        self._killed: dict[tuple[str, int], dict[int, float]] = {}
        for group in groups:
            if group.kind != "channel":
                continue
            members = [(m.name, m.dim, m.indices, _role(model, m.name, m.dim)) for m in group.members
                       if model.get_parameter(m.name).dim() > 1]
            roles = [role for *_, role in members]
            # a member of unknown role, or no reader among the weights (a channel the model
            # returns): never counted as killed
            if None in roles or "out" not in roles or "in" not in roles:
                continue
            macs = [self._entries(name, dim, indices) for name, dim, indices, _ in members]
            for index, (name, dim, indices, role) in enumerate(members):
                if len(indices) == 1 and roles.count(role) == 1:
                    others = sum(macs) - macs[index]
                    killed = self._killed.setdefault((name, dim), {})
                    killed[indices[0]] = killed.get(indices[0], 0.0) + others
        self._cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def _entries(self, name: str, dim: int, indices) -> float:
        param = self.model.get_parameter(name)
        return len(indices) * param.numel() / param.shape[dim] * self.uses.get(id(param), 0.0)

    @torch.no_grad()
    def group_macs(self, weight: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """MACs_g of every group of `weight` (a parameter of the model, its groups given by
        `alpha`), float64, alpha's shape padded to the weight's; computed once per target."""
        name = self._names.get(id(weight))
        key = (name, tuple(alpha.shape))
        if key not in self._cache:
            dims, padded = group_dims(weight, alpha)
            size = math.prod(weight.shape[d] for d in dims)
            macs = torch.full(padded, size * self.uses.get(id(weight), 0.0), dtype=torch.float64,
                              device=weight.device)
            grouped = [d for d, extent in enumerate(padded) if extent != 1]
            if len(grouped) == 1:   # one index per group: it may be a channel's only link
                for index, extra in self._killed.get((name, grouped[0]), {}).items():
                    macs.view(-1)[index] += extra
            self._cache[key] = macs
        return self._cache[key]


def _role(model: nn.Module, name: str, dim: int) -> str | None:
    """'out' where dimension `dim` of parameter `name` indexes the channels its module writes,
    'in' where it indexes those it reads, None for any other parameter."""
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    if attribute != "weight":
        return None
    if isinstance(module, (nn.Linear, *_CONV)):
        return {0: "out", 1: "in"}.get(dim)
    if isinstance(module, _CONV_TRANSPOSE) or is_hf_conv1d(module):   # (transformers' Conv1D: (in, out))
        return {0: "in", 1: "out"}.get(dim)
    if isinstance(module, nn.Embedding):
        return {1: "out"}.get(dim)
    return None


# ------------------------------------------------------------- coupled channel groups
def channel_group_macs(channel, uses: dict[int, float]) -> torch.Tensor:
    """MACs per example of every coupled group of a ChannelARD (channel_ard.py): the sum over its
    members (a filter, its consumers' input slices, ...) of entries x uses per entry, in the full
    network (see FreedMacs for why not the live entries). Biases and norm entries add, they do
    not multiply: 0."""
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
        for dim, ids in member.views():
            channel._group_sum(member, dim, ids, (ids >= 0).double() * count, macs)
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
        per_entry = entry_gains(w, n_h, alpha_eff)
        for dim, ids, inside, _ in terms:
            channel._group_sum(member, dim, ids, 0.5 * per_entry * inside.double(), gain)
    live_group = torch.isfinite(new) & (new > 0)
    return live_group & (gain < price * channel.macs)
