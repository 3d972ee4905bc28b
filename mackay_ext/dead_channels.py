"""Channels that pruning silenced but that still carry a constant shrink cannot fold: cut them
before the fine-tune.

Filter pruning zeroes every weight row making a channel, yet the channel is not zero: its
BatchNorm shift (or the conv's bias) still adds a constant, and the layers reading it still read
that constant. shrink (mackay_ext.shrink_constant) removes such a channel exactly when the
constant's contribution can be moved into its readers' biases, which a zero-padded convolution
forbids: at the borders it reads zeros instead of the constant. A pruned BatchNorm ResNet or VGG
is full of these. Zeroing the whole coupled group (the constant too, and the readers' slices)
changes the network a little, which is why it happens before the fine-tune, which makes up for
it; the channel is then exactly zero and stays so while fine-tuning (the readers' slices are
pruned in the pruner, which holds them at 0, so the constant gets no gradient), and shrink cuts
it out.
"""
from __future__ import annotations

import torch
from torch import nn

from ._follow import MOMENT_KEYS
from .coupling import ChannelGroup, trace_coupling
from .shrink_constant import constant_contributions, is_constant, roles, unread

__all__ = ["cut_dead_channels", "may_hold_dead_channels"]

_Conv = nn.modules.conv._ConvNd


def may_hold_dead_channels(model: nn.Module) -> bool:
    """Cheap test, no tracing: some Linear / conv weight has an all-zero output row (a pruned
    unit) and some conv pads with zeros (where shrink cannot fold a constant)."""
    pads = any(isinstance(m, _Conv) and m.padding_mode == "zeros"
               and (m.padding == "same" if isinstance(m.padding, str) else any(m.padding))
               for m in model.modules())
    if not pads:
        return False
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, _Conv)) and isinstance(weight, torch.Tensor) and weight.numel():
            if not weight.detach().reshape(weight.shape[0], -1).any(dim=1).all():
                return True
    return False


@torch.no_grad()
def cut_dead_channels(model: nn.Module, example_inputs, *, optimizer: torch.optim.Optimizer | None = None,
                      pruner=None, groups: list[ChannelGroup] | None = None,
                      every_dead: bool = False) -> list[ChannelGroup]:
    """Zero every coupled channel whose making rows are all zero but which shrink could not remove
    (its constant reaches a zero-padded conv, or differs between positions), with the optimizer's
    Adam moments of its entries. Returns the groups zeroed.

    pruner: a MacKayPruner of the model: the zeroed weights under its prior are marked pruned
    (alpha +inf), so its counts and reports agree with the weights and its masks hold them at 0.

    every_dead: also zero the channels shrink removes by itself (constants it can fold, channels
    whose readers are all pruned): bench/reproduce_cifar.py's rows were made so.
    A layer keeps its strongest channel, as the pruner's layers do. groups: the model's coupled
    groups if already traced on this architecture (else traced here from example_inputs).
    Raises CouplingError for a model torch.export cannot trace.
    """
    if groups is None:
        groups = trace_coupling(model, example_inputs).groups
    constant, silent = [], []
    for group in groups:
        if group.fixed or group.is_zero(model):
            continue
        if is_constant(model, group):
            constant.append(group)
        elif every_dead and unread(model, group):
            silent.append(group)
    if every_dead:
        dead = constant + silent
    else:
        _, refused = (constant_contributions(model, constant, example_inputs, zeros_fold=False)
                      if constant else ({}, {}))
        dead = [constant[i] for i in sorted(refused)]
    cut = _spare_the_last_of_each_layer(model, groups, dead)
    for group in cut:
        group.zero_(model)
        if optimizer is not None:
            _zero_moments(model, optimizer, group)
        if pruner is not None:
            _mark_pruned(model, pruner, group)
    return cut


def _layer(model: nn.Module, group: ChannelGroup) -> str | None:
    """The layer making the group's channel (its first producer), None if it has none."""
    producers = roles(model, group).producers
    return producers[0][0] if producers else None


def _spare_the_last_of_each_layer(model: nn.Module, groups: list[ChannelGroup],
                                  dead: list[ChannelGroup]) -> list[ChannelGroup]:
    """`dead` less, for each layer left with no other channel, its strongest dead one."""
    dead_ids = {id(g) for g in dead}
    live = {_layer(model, g) for g in groups if id(g) not in dead_ids and not g.is_zero(model)}
    strongest: dict[str, tuple[float, ChannelGroup]] = {}
    for group in dead:
        layer = _layer(model, group)
        if layer is not None and layer not in live:
            norm = float(group.squared_norm(model))
            if layer not in strongest or norm > strongest[layer][0]:
                strongest[layer] = (norm, group)
    spared = {id(group) for _, group in strongest.values()}
    return [group for group in dead if id(group) not in spared]


def _zero_moments(model: nn.Module, optimizer: torch.optim.Optimizer, group: ChannelGroup) -> None:
    for member in group.members:
        param = model.get_parameter(member.name)
        state = optimizer.state.get(param, {})
        index = torch.tensor(member.indices, dtype=torch.long, device=param.device)
        for key in MOMENT_KEYS:
            moment = state.get(key)
            if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
                moment.index_fill_(member.dim, index, 0)


def _mark_pruned(model: nn.Module, pruner, group: ChannelGroup) -> None:
    for member in group.members:
        param = model.get_parameter(member.name)
        if param.dim() >= 2:
            drop = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            drop.index_fill_(member.dim, torch.tensor(member.indices, dtype=torch.long, device=param.device), True)
            pruner.prune_entries(param, drop)
