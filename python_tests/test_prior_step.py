"""The proximal prior under optimizers other than MacKayAdam takes the step the optimizer gives
the data per unit of gradient (mackay_ext.prior_step): with s = lr under Adam, the prior pulled
1/sqrt(v) times weaker than the data, the weights never reached the posterior mode, and the
first pruning update removed nearly every weight (a tiny BERT under the HF Trainer's AdamW)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayPruner
from mackay_ext.prior_step import step_per_unit_gradient

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.01),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.1),
    "SGD-nesterov": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "Adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "RAdam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "RMSprop-momentum": lambda p: torch.optim.RMSprop(p, lr=0.001, momentum=0.5),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.01),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_step_per_unit_gradient_is_the_one_the_optimizer_takes(name):
    """Under a constant gradient, each optimizer's own step of a weight, divided by its gradient,
    settles at the value read from its state (the reference is the optimizer's step itself)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.zeros(50, dtype=torch.float64))
    gradient = torch.randn(50, dtype=torch.float64) * torch.logspace(-4, 1, 50, dtype=torch.float64)
    optimizer = OPTIMIZERS[name]([weight])
    for _ in range(2000):   # Adam's bias corrections and a velocity's build-up are past
        before = weight.detach().clone()
        weight.grad = gradient.clone()
        optimizer.step()
    taken = (before - weight.detach()) / gradient
    expected = step_per_unit_gradient(optimizer, optimizer.param_groups[0], weight)
    expected = torch.as_tensor(expected, dtype=torch.float64).expand_as(taken)
    torch.testing.assert_close(taken, expected, rtol=3e-2, atol=0)


@pytest.mark.parametrize("stateful", [False, True])
def test_an_optimizer_it_does_not_know_is_named_when_the_pruner_is_built(stateful):
    """Said once, where the pruner is built (it came at the first step after the warm-up update,
    pointing into the library), and for a stateless one too: a sign-SGD, which keeps no state,
    was read as SGD without a word and fell to chance at the first pruning update."""
    class SignSGD(torch.optim.Optimizer):   # a step of lr whatever the gradient's size (as Lion)
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    direction = p.grad
                    if stateful:
                        state = self.state[p]
                        state["exp_avg"] = direction = 0.9 * state.get("exp_avg", torch.zeros_like(p)) + 0.1 * p.grad
                    p.add_(direction.sign(), alpha=-group["lr"])

    model = nn.Linear(4, 3)
    optimizer = SignSGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="does not know the per-weight step of SignSGD .* taken as Adam's "
                                            "where it keeps Adam's state .* else as lr .* use MacKayAdam") as caught:
        pruner = MacKayPruner(model, optimizer, num_data=10, batch_size=2)
    assert caught[0].filename == __file__
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    pruner.update(prune=False)   # alpha set: the prior's step is taken from here on
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # and says nothing more
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()


def _quadratic_fit(optimizer_factory, alpha, num_data, steps=6000):
    """Weights under the mean loss 1/2 sum c (w - w*)^2 plus the pruner's proximal prior with a
    fixed alpha; returns (weights, the posterior mode c w* / (c + alpha / N))."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 1, bias=False).double()
    target = torch.randn(1, 8, dtype=torch.float64)
    curvature = torch.logspace(-2, 1, 8, dtype=torch.float64)
    optimizer = optimizer_factory(layer.parameters())
    pruner = MacKayPruner(layer, optimizer, num_data=num_data, batch_size=1)
    pruner.alpha(next(iter(pruner.targets))).fill_(alpha)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * (layer.weight - target).square()).sum().backward()
        optimizer.step()
    return layer.weight.detach(), curvature * target / (curvature + alpha / num_data)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "SGD-momentum"])
def test_data_and_prior_balance_at_the_posterior_mode(name):
    """The weights settle where the data's gradient and the prior's cancel, as MacKay's update
    assumes. Under Adam with s = lr they settled at w* (the prior's pull 1/sqrt(v) times weaker,
    and v -> 0 at the fit): here 91 times the mode for the most shrunk weight."""
    factory = OPTIMIZERS[name] if name != "RMSprop" else (lambda p: torch.optim.RMSprop(p, lr=0.001))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, mode = _quadratic_fit(factory, alpha=2.0, num_data=1.0)
    torch.testing.assert_close(weights, mode, rtol=2e-2, atol=1e-4)


def test_what_a_step_reads_of_alpha_follows_every_change_to_it():
    """The pruned mask and the finite alpha are kept between steps (mackay_ext.alpha_views): an
    alpha written in place or replaced is read afresh at the next step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner = MacKayPruner(model, optimizer, num_data=10, batch_size=2)

    def step():
        optimizer.zero_grad()
        model(torch.randn(2, 4)).square().sum().backward()
        optimizer.step()
    step()
    pruner.update(prune=False)
    step()
    name = next(iter(pruner.targets))
    pruner.alpha(name)[0, 1] = float("inf")   # in place: the view must not be the old one
    step()
    assert float(model.weight.detach()[0, 1]) == 0.0 and float(model.weight.detach()[0, 0]) != 0.0
    before = model.weight.detach().clone()
    pruner.alpha(name).fill_(0.0)   # prior off everywhere: a step is Adam's alone
    expected = torch.nn.Linear(4, 3)
    expected.load_state_dict(model.state_dict())
    reference = torch.optim.Adam(expected.parameters(), lr=0.01)
    reference.load_state_dict(copy.deepcopy(optimizer.state_dict()))   # (torch would share the moments)
    torch.manual_seed(1)
    step()
    torch.manual_seed(1)
    reference.zero_grad()
    expected(torch.randn(2, 4)).square().sum().backward()
    reference.step()
    assert not torch.equal(model.weight, before)
    torch.testing.assert_close(model.weight, expected.weight, rtol=0, atol=0)


def _train(model, optimizer, count):
    """`count` steps on batches of 8 of a fixed random classification set (6 inputs, 3 classes)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    for step in range(count):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[step % 5 * 8:][:8]), y[step % 5 * 8:][:8]).backward()
        optimizer.step()


@pytest.mark.parametrize("name", ["Adam", "SGD-momentum", "RMSprop-momentum"])
def test_a_pruned_weights_optimizer_state_is_held_at_zero(name):
    """Left alone, Adam's moments (or SGD's velocity) at a pruned weight decay geometrically under
    its zero gradient into denormal floats, which the CPU handles ~100x slower: 234,874 of
    LeNet-300-100's first-layer moments were denormal some 700 steps after a prune, and the step
    took 5-17 ms instead of 2.6. They are set to 0 when the weight is pruned, and stay 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = OPTIMIZERS[name](model.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=40, batch_size=8)

    def steps(count):
        _train(model, optimizer, count)
    steps(20)
    pruner.update(prune=False)
    steps(5)
    first = next(iter(pruner.targets))
    pruner.alpha(first)[:, :3] = float("inf")   # as an update prunes: in place
    steps(5)
    weight = pruner.targets[first].param
    held = [value for value in optimizer.state[weight].values() if isinstance(value, torch.Tensor) and value.dim()]
    held.append(pruner.curvature(first))   # h decays by rho = 0.99 a step: the same fate
    assert len(held) > 1 and all(bool((value[:, :3] == 0).all()) and bool((value[:, 3:] != 0).any()) for value in held)
    assert bool((weight[:, :3] == 0).all())


def test_mackay_adams_curvature_at_pruned_weights_is_held_at_zero():
    """MacKayAdam holds its moments at 0 there itself; the curvature is set to 0 by the update
    that prunes (it decayed into denormals: 806 pruned entries of a 20-50-3 net, all still
    nonzero 10,000 steps on)."""
    from mackay_ext import MacKayAdam, ard_param_groups
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 3))
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=10)
    pruner = MacKayPruner(model, optimizer, num_data=100)
    x, y = torch.randn(100, 20), torch.randint(0, 3, (100,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(300):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[step % 10 * 10:][:10]), y[step % 10 * 10:][:10]).backward()
            optimizer.step()
            if step in (100, 200):
                pruner.update()
    pruned = (pruner.alpha("0") == float("inf")).expand_as(model[0].weight)
    assert int(pruned.sum()) > 100
    assert bool((pruner.curvature("0")[pruned] == 0).all()) and bool((pruner.curvature("0")[~pruned] > 0).any())


def test_a_layer_at_lr_zero_is_not_pruned_while_it_stays_there():
    """A param group at lr 0 (a common way to freeze a layer): the update pruned 90% of such a
    layer from its initial weights, unsaid; a layer frozen with requires_grad_(False) is left out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 0.0},
                                   {"params": model[2].parameters()}], lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=40, batch_size=8, prune="alpha", threshold=1.0)
    frozen = model[0].weight.detach().clone()

    def steps(count):
        _train(model, optimizer, count)
    with pytest.warns(RuntimeWarning, match="its param group's lr is 0 \\(others' are not\\)") as caught:
        for _ in range(3):
            steps(20)
            report = pruner.update()
    assert sum("param group's lr is 0" in str(w.message) for w in caught) == 1
    assert torch.equal(model[0].weight, frozen)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["0"]["kept"] == layers["0"]["total"] and layers["2"]["kept"] < layers["2"]["total"]
    assert any("lr is 0" in note for note in report["notes"])
    optimizer.param_groups[0]["lr"] = 1e-2   # trained from here: pruned as any layer
    steps(20)
    pruner.update()
    steps(20)
    for group in optimizer.param_groups:   # every group at 0: a schedule's end (HF's linear decay)
        group["lr"] = 0.0
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert pruner.update()["layers"][0]["kept"] < layers["0"]["total"]
    assert not [w for w in said if "lr is 0" in str(w.message)]


@pytest.mark.parametrize("name", ["Adamax", "Adam", "RMSprop-momentum", "Adagrad"])
def test_a_pruned_weight_stays_exactly_zero_and_finite_under_every_rule(name):
    """Its optimizer state is 0 (held so), and the prior's factor d / (d + s alpha / N) must not
    read 0 / 0 there (Adamax's u held at 0 made NaN before the masks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = OPTIMIZERS[name](model.parameters())
    pruner = MacKayPruner(model, optimizer, num_data=40, batch_size=8)
    _train(model, optimizer, 10)
    pruner.update(prune=False)
    first = next(iter(pruner.targets))
    pruner.alpha(first)[:, :3] = float("inf")
    _train(model, optimizer, 2)
    state = optimizer.state[model[0].weight]
    step = step_per_unit_gradient(optimizer, optimizer.param_groups[0], model[0].weight)
    assert bool(torch.isfinite(torch.as_tensor(step)).all())
    assert bool((model[0].weight[:, :3] == 0).all()) and all(bool(torch.isfinite(v).all()) for v in state.values())
