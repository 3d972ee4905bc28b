"""L0 regularisation through hard-concrete gates (Louizos, Welling and Kingma 2018, "Learning
Sparse Neural Networks through L0 Regularization"), on units: the structured peer.

A gate z_g in [0, 1] multiplies a whole group of weights, the groups MacKay's group recipes put
one alpha on: each input neuron of a Linear (a column of its weight) and each conv filter (its
weights and bias). During training z is a hard-concrete sample, one per gate per batch:
    u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = min(1, max(0, s (zeta - gamma) + gamma)),
and the objective per example is cross-entropy + lambda / N * sum_g |g| P(z_g != 0), with
P(z_g != 0) = sigmoid(log_alpha_g - beta log(-gamma / zeta)) and |g| the group's weight count,
so lambda prices a weight. At test time z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) +
gamma)); gates at 0 remove their group. The test-time gates are then folded into the weights
(exact: the gates are >= 0 and sit before a ReLU / max-pool or on a Linear's inputs) and the
kept weights fine-tuned as every method's last phase.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mackay_ext.data import Splits

from . import common

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # the paper's hard-concrete temperature and stretch


class Gates(nn.Module):
    """`count` hard-concrete gates; init_keep is the initial probability of a gate being open
    (0.9: a trained dense network starts almost unchanged)."""

    def __init__(self, count: int, init_keep: float = 0.9):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((count,), math.log(init_keep / (1 - init_keep))))

    def forward(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))


Gated = list[tuple[nn.Module, Gates, int, torch.utils.hooks.RemovableHandle]]


def attach(model: nn.Module) -> Gated:
    """Gates on every Linear's inputs and every Conv2d's filters, through forward pre-hooks
    (Linear: the inputs scaled) and forward hooks (Conv2d: the outputs scaled). Returns
    (layer, gates, weights per gate, hook) for the penalty and the folding."""
    gated = []
    for layer in common.prunable(model):
        if isinstance(layer, nn.Linear):
            gates = Gates(layer.in_features)
            hook = layer.register_forward_pre_hook(lambda m, args, g=gates: (args[0] * g(),))
            per_gate = layer.out_features
        else:
            gates = Gates(layer.out_channels)
            hook = layer.register_forward_hook(lambda m, args, out, g=gates: out * g()[:, None, None])
            per_gate = layer.weight[0].numel() + (layer.bias is not None)
        layer.add_module("l0_gates", gates)   # so the optimizer and .train()/.eval() see them
        gated.append((layer, gates, per_gate, hook))
    return gated


@torch.no_grad()
def fold(gated: Gated) -> None:
    """Multiply the test-time gates into the weights, then remove gates and hooks."""
    for layer, gates, _, hook in gated:
        z = gates.eval()()
        if isinstance(layer, nn.Linear):
            layer.weight.mul_(z[None, :])
        else:
            layer.weight.mul_(z.view(-1, *([1] * (layer.weight.dim() - 1))))
            if layer.bias is not None:
                layer.bias.mul_(z)
        del layer.l0_gates
        hook.remove()


def run(model: nn.Module, data: Splits, *, lam: float, l0_epochs: int, finetune_epochs: int,
        lr: float, finetune_lr: float, seed: int, shift: int, batch_size: int = 128,
        log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """The L0 phase on the dense `model` (changed in place), the gates folded, then fine-tuning."""
    gated = attach(model)
    num_data = len(data.x_train)

    def penalty(epoch: int, step: int) -> torch.Tensor:
        expected = sum(per_gate * gates.open_probability().sum() for _, gates, per_gate, _ in gated)
        return lam * expected / num_data

    common.train(model, data, epochs=l0_epochs, lr=lr, seed=seed, tag=1000, shift=shift,
                 batch_size=batch_size, extra_loss=penalty, log=log)
    fold(gated)
    return common.train(model, data, epochs=finetune_epochs, lr=finetune_lr, seed=seed,
                        tag=1_000_000, shift=shift, batch_size=batch_size, cosine=True,
                        keep_best=True, masks=common.masks_from_zeros(model), log=log)
