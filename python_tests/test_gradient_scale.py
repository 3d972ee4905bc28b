"""MacKayPruner.gradient_scale (and MacKayAdam's): a step whose gradient is c times the mean
loss's (c from clip_grad_norm_, or A where a loss summed over A micro-batches is A times the mean)
is taken as a step on c times the whole objective: the prior's pull times c, h from (g / c)^2.
Read as it was, the prior pulled 1/c times harder than the data and h was c^2 too small: a tiny
BERT under the Hugging Face Trainer's default max_grad_norm=1 kept 17 of 21,760 weights, at chance."""
import math
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner

CURVATURE = torch.logspace(-2, 1, 8, dtype=torch.float64)


def _fit(optimizer_kind, factor, told, alpha=2.0, num_data=1.0, steps=6000):
    """Weights under the mean loss 1/2 sum c (w - w*)^2 with a fixed alpha, each step's gradient
    multiplied by `factor` (a clipping that always acts), the pruner told so or not; returns
    (weights, the posterior mode c w* / (c + alpha / N), the pruner)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 1, bias=False).double()
    target = torch.randn(1, 8, dtype=torch.float64)
    if optimizer_kind == "MacKayAdam":
        optimizer = MacKayAdam(layer.parameters(), lr=0.01, num_data=num_data, batch_size=1)
        pruner = MacKayPruner(layer, optimizer, num_data=num_data)
    else:
        optimizer = torch.optim.Adam(layer.parameters(), lr=0.01)
        pruner = MacKayPruner(layer, optimizer, num_data=num_data, batch_size=1)
    pruner.alpha("weight").fill_(alpha)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * CURVATURE * (layer.weight - target).square()).sum().backward()
        layer.weight.grad.mul_(factor)
        if told:   # (it holds for one step)
            pruner.gradient_scale = factor
        optimizer.step()
    return layer.weight.detach(), CURVATURE * target / (CURVATURE + alpha / num_data), pruner


@pytest.mark.parametrize("optimizer_kind", ["Adam", "MacKayAdam"])
def test_a_scaled_gradient_told_reaches_the_posterior_mode(optimizer_kind):
    """Told, the weights settle at the mode of the unscaled objective; not told, the prior pulls
    20 times harder and the weights settle far below it (the most shrunk one at a tenth)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, mode, _ = _fit(optimizer_kind, 0.05, told=True)
        untold, _, _ = _fit(optimizer_kind, 0.05, told=False)
    torch.testing.assert_close(weights, mode, rtol=2e-2, atol=1e-4)
    assert float((untold / mode).min()) < 0.2


def _one_step_pruner(layer, optimizer_kind):
    """(optimizer, pruner) on `layer`: N = 100, B = 10, lr 0.1."""
    if optimizer_kind == "MacKayAdam":
        optimizer = MacKayAdam(layer.parameters(), lr=0.1, num_data=100, batch_size=10)
        return optimizer, MacKayPruner(layer, optimizer, num_data=100)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    return optimizer, MacKayPruner(layer, optimizer, num_data=100, batch_size=10)


@pytest.mark.parametrize("optimizer_kind", ["SGD", "MacKayAdam"])
def test_the_curvature_is_that_of_the_unscaled_gradient(optimizer_kind):
    """One step: h from a gradient c times the mean loss's, told c, is h from the mean loss's."""
    readings = {}
    for factor in (1.0, 0.25):
        layer = nn.Linear(5, 3, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(torch.arange(15, dtype=torch.float64).view(3, 5) / 10)
        optimizer, pruner = _one_step_pruner(layer, optimizer_kind)
        pruner.gradient_scale = factor
        layer.weight.grad = torch.ones(3, 5, dtype=torch.float64) * factor
        optimizer.step()
        readings[factor] = pruner.curvature("weight").double().clone()
    torch.testing.assert_close(readings[0.25], readings[1.0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                          (math.inf, ValueError), ("0.5", TypeError), (True, TypeError)])
def test_a_bad_gradient_scale_is_refused_by_name(value, error):
    layer = nn.Linear(3, 2)
    pruner = MacKayPruner(layer, torch.optim.SGD(layer.parameters(), lr=0.1), num_data=10, batch_size=2)
    with pytest.raises(error, match="MacKayPruner: gradient_scale must be a positive"):
        pruner.gradient_scale = value
    assert pruner.gradient_scale == 1.0   # unchanged
    optimizer = MacKayAdam(layer.parameters(), num_data=10)
    with pytest.raises(error, match="MacKayAdam: gradient_scale must be a positive"):
        optimizer.gradient_scale = value


def test_the_pruner_sets_its_mackay_adams():
    layer = nn.Linear(3, 2)
    optimizer = MacKayAdam(layer.parameters(), num_data=10, batch_size=2)
    pruner = MacKayPruner(layer, optimizer, num_data=10)
    pruner.gradient_scale = 0.3
    assert optimizer.gradient_scale == 0.3


@pytest.mark.parametrize("optimizer_kind", ["SGD", "MacKayAdam"])
def test_it_holds_for_one_step(optimizer_kind):
    """Set only where clipping acted, a factor that stayed applied to every unclipped step after it
    (new-user pass: 4,196 weights kept against 1,175 when set at every step)."""
    layer = nn.Linear(5, 3, bias=False)
    optimizer, pruner = _one_step_pruner(layer, optimizer_kind)
    curvatures = []
    for scale in (0.5, None, None):
        if scale is not None:
            pruner.gradient_scale = scale
        layer.weight.grad = torch.ones(3, 5)
        optimizer.step()
        assert pruner.gradient_scale == 1.0
        if optimizer_kind == "MacKayAdam":
            assert optimizer.gradient_scale == 1.0
        curvatures.append(pruner.curvature("weight").clone())
    # the first step read (g / 0.5)^2, the next ones g^2: with h = rho h + (1 - rho) B g^2
    rho, batch = 0.99, 10
    first = (1 - rho) * batch * 4.0
    torch.testing.assert_close(curvatures[0], torch.full((3, 5), first))
    torch.testing.assert_close(curvatures[1], torch.full((3, 5), rho * first + (1 - rho) * batch))
