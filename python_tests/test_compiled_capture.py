"""Exact curvature under torch.compile: dynamo does not guard on module hooks by default, so code it
compiled before a pruner's hooks were added (for this model or another of the same structure)
runs without them. Nothing is then captured, and the error says why and what to do."""
import pytest
import torch
from conftest import pruner_step
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model, compiled, curvature, steps=3):
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=8)
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature=curvature)
    for _ in range(steps):
        pruner_step(pruner, compiled, optimizer, torch.randn(8, 10), torch.randint(0, 3, (8,)))
    pruner.update()
    return pruner


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("curvature", ["ef-exact", "fisher-mc"])
def test_code_compiled_before_the_hooks_is_named_in_the_error(curvature, fresh_dynamo):
    first = net()
    torch.compile(first, backend="aot_eager")(torch.randn(8, 10))   # compiled without hooks
    model = net()
    with pytest.raises(RuntimeError, match=r"torch.compile.*torch._dynamo.reset\(\)"):
        train(model, torch.compile(model, backend="aot_eager"), curvature)
    torch._dynamo.reset()   # the remedy the message gives
    model = net()
    pruner = train(model, torch.compile(model, backend="aot_eager"), curvature)
    assert all(pruner.curvature(name).sum() > 0 for name in pruner.targets)


def test_the_hint_about_compiled_code_needs_compiled_code(monkeypatch):
    """fisher-mc with no sample drawn named torch.compile when nothing was compiled, and only
    accumulate_mc(x), not the capture_mc() + accumulate_mc_from(logits) route the README shows."""
    import mackay_ext.pruner as pruner_module
    monkeypatch.setattr(pruner_module, "_dynamo_compiled_something", lambda: False)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=8, curvature="fisher-mc")
    optimizer.zero_grad()   # a step without the sampling the README shows
    torch.nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
    optimizer.step()
    with pytest.raises(RuntimeError, match=r"no fisher-mc curvature accumulated yet \(on training batches: "
                                           r"`with pruner.capture_mc\(\): .*accumulate_mc_from\(logits\)") as error:
        pruner.update()
    assert "torch.compile" not in str(error.value)
