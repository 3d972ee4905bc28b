"""integrations._step_curvature: the ef-batch curvature the callbacks use, read from the gradient
of each optimizer step; checked against h computed by hand from the full batch's gradient."""
import math

import pytest
import torch
from torch import nn

from mackay_ext.integrations._step_curvature import StepCurvaturePruner

RHO = 0.9


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(steps, batch):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(steps, batch, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (steps, batch), generator=generator))


def _reference(x, y, batch_size, names):
    """h after each step of SGD on the whole batch, the EMA of B g^2 written out."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    curvature = {name: torch.zeros_like(model.get_parameter(name)) for name in names}
    for xb, yb in zip(x, y):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        for name in names:
            grad = model.get_parameter(name).grad
            curvature[name] = RHO * curvature[name] + (1 - RHO) * batch_size * grad * grad
        optimizer.step()
    return curvature


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_accumulated_micro_batches_give_the_whole_batch_estimate(accumulation):
    x, y = _data(steps=3, batch=8)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # num_data large: the proximal prior step (alpha = 0 anyway) leaves SGD as in the reference
    pruner = StepCurvaturePruner(model, optimizer, num_data=1000, batch_size=8, curvature_decay=RHO)
    for xb, yb in zip(x, y):
        optimizer.zero_grad()
        for xm, ym in zip(xb.chunk(accumulation), yb.chunk(accumulation)):
            (nn.functional.cross_entropy(model(xm), ym) / accumulation).backward()
        optimizer.step()
    expected = _reference(x, y, 8, ["0.weight", "2.weight"])
    for name in ("0", "2"):
        assert bool((expected[name + ".weight"] > 0).all())
        torch.testing.assert_close(pruner.curvature(name), expected[name + ".weight"], rtol=1e-10, atol=0)


def test_backward_without_step_adds_nothing_and_pruned_gradients_stay_zero():
    x, y = _data(steps=1, batch=8)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = StepCurvaturePruner(model, optimizer, num_data=1000, batch_size=8)
    pruner.alpha("0")[0, 0] = math.inf
    nn.functional.cross_entropy(model(x[0]), y[0]).backward()
    assert not bool(pruner.curvature("0").any())   # read at the step, not at the backward
    assert model[0].weight.grad[0, 0] == 0 and bool((model[0].weight.grad[1:] != 0).all())
    optimizer.step()
    assert pruner.curvature("0")[0, 0] == 0 and model[0].weight[0, 0] == 0
    assert bool((pruner.curvature("0")[1:] > 0).all())


@pytest.mark.parametrize("clipped", [False, True])
def test_grad_scaler_with_an_optimizer_that_unscales_in_its_step(clipped):
    """torch's fused Adam takes GradScaler's scale into its own step (and unscales the gradients
    in place): a step with inf gradients runs (and skips itself). clipped: unscale_ first, as
    gradient clipping under a GradScaler does (the Trainer's max_grad_norm)."""
    x, y = _data(steps=2, batch=8)
    model = _model().float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    assert optimizer._step_supports_amp_scaling
    pruner = StepCurvaturePruner(model, optimizer, num_data=1000, batch_size=8, curvature_decay=RHO)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    xb, yb = x[0].float(), y[0]
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(xb), yb)).backward()
    grad = model[0].weight.grad / 1024.0
    if clipped:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    expected = (1 - RHO) * 8 * grad * grad
    torch.testing.assert_close(pruner.curvature("0"), expected, rtol=1e-5, atol=0)
    # an overflowing step: the optimizer skips it, and so does the curvature
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(xb), yb)).backward()
    model[0].weight.grad[0, 0] = math.inf
    if clipped:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert torch.equal(pruner.curvature("0"), expected)


def test_channel_members_tracked_by_channel_ard_read_at_the_step():
    x, y = _data(steps=2, batch=8)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = StepCurvaturePruner(model, optimizer, num_data=1000, batch_size=8, curvature_decay=RHO,
                                 granularity="channel", example_inputs=x[0])
    assert "0.bias" in pruner.channel._own   # a 1-D member of the hidden units' groups
    for xb, yb in zip(x, y):
        optimizer.zero_grad()
        for xm, ym in zip(xb.chunk(2), yb.chunk(2)):
            (nn.functional.cross_entropy(model(xm), ym) / 2).backward()
        optimizer.step()
    expected = _reference(x, y, 8, ["0.weight", "0.bias"])
    torch.testing.assert_close(pruner.channel.curvature("0.bias"), expected["0.bias"], rtol=1e-10, atol=0)
    torch.testing.assert_close(pruner.curvature("0"), expected["0.weight"], rtol=1e-10, atol=0)


def test_penalty_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"prior='penalty' is not available there"):
        StepCurvaturePruner(model, torch.optim.SGD(model.parameters(), lr=0.1), num_data=10,
                            batch_size=2, prior="penalty")
