"""A model copied while a pruner captures on it (copy.deepcopy, torch.save of the module, shrink's
own copy and its torch.export trace) carries none of the capture: the copy trains without feeding
the original's sums, a pruner built on the copy captures for itself, and the original goes on
capturing as before."""
import copy
import gc
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import pruner_step
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups, shrink
from mackay_ext.curvature import FisherAccumulator


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def carries_an_accumulator(model: nn.Module) -> bool:
    """Whether a FisherAccumulator is reachable from the hooks or instance forwards of model's
    modules (the modules themselves are not followed)."""
    frontier = [h for m in model.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)
                for h in hooks.values()] + [vars(m)["forward"] for m in model.modules() if "forward" in vars(m)]
    seen = set()
    for _ in range(4):
        found = [o for o in frontier if isinstance(o, FisherAccumulator)]
        if found:
            return True
        frontier = [r for o in frontier if id(o) not in seen and not seen.add(id(o))
                    for r in gc.get_referents(o) if not isinstance(r, (nn.Module, torch.Tensor, type))]
    return False


def counts(pruner):
    return {id(p): n for p, n in pruner.accumulator.counts.items()}


@pytest.fixture
def captured():
    model = conv_net()
    optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=4)
    pruner = MacKayPruner(model, optimizer, num_data=100, curvature="ef-exact")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    train_step(model, optimizer, x, y)
    return model, optimizer, pruner, x, y


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_trains_without_feeding_the_original(captured, how):
    model, optimizer, pruner, x, y = captured
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert carries_an_accumulator(model) and not carries_an_accumulator(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))   # the copy computes what the original does
    before = counts(pruner)
    twin_optimizer = torch.optim.Adam(twin.parameters())
    train_step(twin, twin_optimizer, x, y)
    assert counts(pruner) == before
    assert not pruner.accumulator._pending and not pruner.accumulator._grads
    # and the original still captures
    train_step(model, optimizer, x, y)
    assert all(n == 2 * 4 for n in counts(pruner).values())


def test_a_pruner_on_the_copy_captures_for_itself(captured):
    model, _, pruner, x, y = captured
    twin = copy.deepcopy(model)
    twin_optimizer = MacKayAdam(ard_param_groups(twin), lr=1e-2, num_data=100, batch_size=4)
    twin_pruner = MacKayPruner(twin, twin_optimizer, num_data=100, curvature="ef-exact")
    assert twin_pruner.accumulator._served == [twin[0]]   # the copied conv is served again
    train_step(twin, twin_optimizer, x, y)
    assert all(n == 4 for n in counts(twin_pruner).values())
    twin_pruner.update()
    twin_pruner.detach()
    assert "forward" not in vars(twin[0])
    assert pruner.accumulator._served == [model[0]]


def test_shrink_with_an_exact_pruner_attached(captured):
    """shrink copies the model and traces it with torch.export, whose fake tensors must not reach
    the accumulator."""
    model, optimizer, pruner, x, y = captured
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
    model.eval()
    small = shrink(model, (x,))
    assert small[0].out_channels == 5
    assert not carries_an_accumulator(small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))
    assert not pruner.accumulator._pending
    model.train()
    before = counts(pruner)
    train_step(small, torch.optim.Adam(small.parameters()), x, y)
    assert counts(pruner) == before
    train_step(model, optimizer, x, y)
    assert all(n == 2 * 4 for n in counts(pruner).values())


def test_a_copy_leaves_the_price_refits_covariance_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = MacKayPruner(model, optimizer, num_data=16, batch_size=16, granularity="filter", mac_price=1e-4,
                          example_inputs=x)
    train_step(model, optimizer, x, y)
    sampled = {name: moment.clone() for name, moment in pruner._covariance.second_moment.items()}
    calls = dict(pruner._covariance._calls)
    twin = copy.deepcopy(model)
    for _ in range(3):
        train_step(twin, torch.optim.Adam(twin.parameters()), torch.randn(16, 6), y)
    assert pruner._covariance._calls == calls
    assert all(torch.equal(pruner._covariance.second_moment[name], moment) for name, moment in sampled.items())


def built_with(optimizer_kind: str, granularity: str, curvature: str):
    model = conv_net()
    if optimizer_kind == "MacKayAdam":
        optimizer = MacKayAdam(ard_param_groups(model), lr=1e-2, num_data=100, batch_size=4)
        return model, optimizer, MacKayPruner(model, optimizer, num_data=100, curvature=curvature)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, optimizer, MacKayPruner(model, optimizer, num_data=100, curvature=curvature,
                                          **standalone_settings(granularity))


def standalone_settings(granularity: str) -> dict:
    """MacKayPruner's settings under a torch optimizer (example_inputs only where traced)."""
    traced = {"example_inputs": torch.randn(2, 3, 8, 8)} if granularity == "channel" else {}
    return {"batch_size": 4, "granularity": granularity, **traced}


@pytest.mark.parametrize("curvature", ["ef-batch", "ef-exact", "fisher-mc"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("optimizer_kind,granularity", [("MacKayAdam", "weight"), ("Adam", "weight"),
                                                        ("Adam", "channel")])
def test_a_copied_pruner_is_detached_and_says_what_to_do(curvature, how, optimizer_kind, granularity):
    """A snapshot of model, optimizer and pruner together: the copied pruner's hooks stayed with
    the original, so it refuses to go on (it used to update from the original's batches only,
    then find nothing), while the original carries on and a new pruner on the copy works. Under
    a torch optimizer the pruner's gradient hooks on the weights (closures) pickle too: pickle
    refused them."""
    import pickle
    model, optimizer, pruner = built_with(optimizer_kind, granularity, curvature)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))

    def step(pr, net, opt):
        pruner_step(pr, net, opt, x, y)
    step(pruner, model, optimizer)
    snapshot = {"model": model, "optimizer": optimizer, "pruner": pruner}
    snapshot = copy.deepcopy(snapshot) if how == "deepcopy" else pickle.loads(pickle.dumps(snapshot))
    twin, twin_optimizer, twin_pruner = snapshot["model"], snapshot["optimizer"], snapshot["pruner"]
    assert twin_pruner.detached and twin_pruner.copied
    torch.testing.assert_close(twin_pruner.alpha("0"), pruner.alpha("0"))   # its state stays readable
    with pytest.raises(RuntimeError, match=r"update: this pruner is a copy .*build a new MacKayPruner"):
        twin_pruner.update()
    if curvature == "fisher-mc":
        with pytest.raises(RuntimeError, match=r"capture_mc: this pruner is a copy"):
            with twin_pruner.capture_mc():
                pass
    settings = {} if optimizer_kind == "MacKayAdam" else standalone_settings(granularity)
    fresh = MacKayPruner(twin, twin_optimizer, num_data=100, curvature=curvature, **settings)
    fresh.load_state_dict(twin_pruner.state_dict())
    step(fresh, twin, twin_optimizer)
    fresh.update()
    step(pruner, model, optimizer)
    pruner.update()   # the original is untouched by all of it


def test_a_copied_accumulator_refuses_to_capture():
    model = conv_net()
    accumulator = FisherAccumulator(model, mode="fisher-mc")
    twin = copy.deepcopy({"model": model, "accumulator": accumulator})["accumulator"]
    with pytest.raises(RuntimeError, match=r"capture_mc: this accumulator is a copy .*new FisherAccumulator"):
        with twin.capture_mc():
            pass
    with pytest.raises(RuntimeError, match="this accumulator is a copy"):
        with copy.deepcopy(FisherAccumulator(model)):
            pass
