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
multiply-accumulates per example of the group's weights (each weight times the number of times
one example uses it: the output positions of a convolution, the positions of a sequence for a
Linear). The group is pruned when gain_g < price * MACs_g: `price` is in nats per MAC, one knob
that trades accuracy (the evidence) against compute. For a coupled channel group (channel_ard.py)
both sums run over all its members, each entry with its alpha_eff, so a filter pays for its
consumers' input slices too. MacKayPruner(mac_price=, mac_price_ramp=) raises the price over the
first pruning updates (pruner.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._alpha import group_dims
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
              old_alpha: torch.Tensor, *, num_data: float, uses: float, price: float,
              rule: str) -> tuple[int, float]:
    """Prune (alpha = +inf, weights 0) every live group of `weight` whose evidence gain is below
    price * its MACs, after an update wrote the new `alpha`. Returns (groups pruned, the sum of
    gamma of those groups, computed from `old_alpha` as the update did)."""
    dims, padded = group_dims(weight, alpha)
    size = math.prod(weight.shape[d] for d in dims)
    priced = evidence_gain(weight, curvature, alpha, num_data=num_data) < price * size * uses
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


# ------------------------------------------------------------- coupled channel groups
def channel_group_macs(channel, uses: dict[int, float]) -> torch.Tensor:
    """MACs per example of every coupled group of a ChannelARD (channel_ard.py): the sum over its
    members (a filter, its consumers' input slices, ...) of entries x uses per entry. Biases and
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
        per_entry = _entry_gains(w, n_h, alpha_eff)
        for dim, ids, inside, _ in terms:
            channel._group_sum(member, dim, ids, 0.5 * per_entry * inside.double(), gain)
    live_group = torch.isfinite(new) & (new > 0)
    return live_group & (gain < price * channel.macs)
