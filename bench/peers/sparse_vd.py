"""Sparse variational dropout (Molchanov, Ashukha and Vetrov 2017, "Variational Dropout
Sparsifies Deep Neural Networks").

Each weight w_ij = theta_ij (1 + sqrt(alpha_ij) eps) is parameterised additively,
w ~ N(theta, sigma^2) with sigma^2 = alpha theta^2 a parameter of its own (log sigma2), which
keeps the gradient's variance low at large alpha. Training uses the local reparameterisation:
a layer's pre-activations are sampled, mean x theta^T and variance x^2 sigma^2^T. The objective
is the ELBO per example: cross-entropy + kl_weight * KL / N, with the paper's approximation of
-KL(q || log-uniform prior) = k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1, and
kl_weight rising linearly from 0 to 1 (the paper's warm-up). At test time a weight is theta, or 0
when log alpha > threshold (3 in the paper).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from mackay_ext.data import Splits

from . import common

K1, K2, K3 = 0.63576, 1.87320, 1.48695  # the paper's fit of the KL term


def neg_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """-KL(q(w | theta, alpha) || p(w)) per weight, the paper's approximation (eq. 14)."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1


class _VariationalLayer(nn.Module):
    """Holds theta (the dense layer's weight to start from), log sigma2 and the bias."""

    def __init__(self, layer: nn.Module, log_sigma2_init: float = -10.0):
        super().__init__()
        self.theta = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.theta, log_sigma2_init))
        self.threshold = 3.0

    def log_alpha(self) -> torch.Tensor:
        return torch.clamp(self.log_sigma2 - torch.log(self.theta ** 2 + 1e-16), -10.0, 10.0)

    def kl(self) -> torch.Tensor:
        return -neg_kl(self.log_alpha()).sum()

    def test_weight(self) -> torch.Tensor:
        return self.theta * (self.log_alpha() <= self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._apply(x, self.test_weight(), self.bias)
        mean = self._apply(x, self.theta, self.bias)
        variance = self._apply(x * x, torch.exp(self.log_sigma2), None)
        return mean + torch.sqrt(variance + 1e-8) * torch.randn_like(mean)


class LinearSVD(_VariationalLayer):
    def _apply(self, x, weight, bias):
        return F.linear(x, weight, bias)


class Conv2dSVD(_VariationalLayer):
    def __init__(self, layer: nn.Conv2d, log_sigma2_init: float = -10.0):
        super().__init__(layer, log_sigma2_init)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups

    def _apply(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def variational(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Linear / Conv2d replaced by its variational layer."""
    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, LinearSVD(child))
        elif isinstance(child, nn.Conv2d):
            setattr(model, name, Conv2dSVD(child))
        elif list(child.children()):
            setattr(model, name, variational(child))
    return model


@torch.no_grad()
def deterministic(variational_model: nn.Module, dense: nn.Module, threshold: float) -> nn.Module:
    """`dense` (same architecture, changed in place) given the test-time weights at `threshold`."""
    layers = [m for m in variational_model.modules() if isinstance(m, _VariationalLayer)]
    for layer, target in zip(layers, common.prunable(dense), strict=True):
        layer.threshold = threshold
        target.weight.copy_(layer.test_weight())
        if layer.bias is not None:
            target.bias.copy_(layer.bias)
    return dense


def train_variational(model: nn.Module, data: Splits, *, epochs: int, lr: float, seed: int,
                      shift: int, batch_size: int = 128, kl_warmup_fraction: float = 0.3,
                      log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """The variational phase from the dense `model`: returns the trained variational copy."""
    svd = variational(model)
    layers = [m for m in svd.modules() if isinstance(m, _VariationalLayer)]
    num_data = len(data.x_train)
    warmup = max(1, round(kl_warmup_fraction * epochs))

    def kl_term(epoch: int, step: int) -> torch.Tensor:
        weight = min(1.0, (epoch + 1) / warmup)
        return weight * sum(layer.kl() for layer in layers) / num_data

    common.train(svd, data, epochs=epochs, lr=lr, seed=seed, tag=1000, shift=shift,
                 batch_size=batch_size, extra_loss=kl_term, log=log)
    return svd


def finetune(model: nn.Module, data: Splits, *, epochs: int, lr: float, seed: int, shift: int,
             batch_size: int = 128, log: Callable[[str], None] = lambda message: None) -> nn.Module:
    """The kept weights trained on the data alone, the pruned ones held at 0 (the recipes' last
    phase, so every method gets the same budget and ending)."""
    return common.train(model, data, epochs=epochs, lr=lr, seed=seed, tag=1_000_000, shift=shift,
                        batch_size=batch_size, cosine=True, keep_best=True,
                        masks=common.masks_from_zeros(model), log=log)
