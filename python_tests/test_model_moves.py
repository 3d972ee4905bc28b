"""model.to(dtype) after MacKayAdam or MacKayPruner was built: their state follows the
parameters (torch's Adam makes its state at the first step and never sees a move; ours exists
from the start). Reference: the same training with everything built after the move, or moved
through state_dict / load_state_dict, which cast to the parameters' dtype by design."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mackay_ext

CURVATURES = ["ef-batch", "ef-exact", "fisher-mc"]
BATCH = 32
NUM_DATA = 600   # enough data that the prior prunes some weights, not all


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))


def _build(model, optimizer_kind, curvature, granularity):
    if optimizer_kind == "mackay":
        optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-2, num_data=NUM_DATA, batch_size=BATCH)
        extra = {}
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        extra = {"batch_size": BATCH}
    if granularity == "channel":
        extra["example_inputs"] = (torch.randn(2, 10).to(next(model.parameters()).dtype),)
    pruner = mackay_ext.MacKayPruner(model, optimizer, curvature=curvature, num_data=NUM_DATA,
                                     granularity=granularity, **extra)
    return optimizer, pruner


def _train(model, optimizer, pruner, curvature, rounds, first_round=0):
    generator = torch.Generator().manual_seed(1)
    for round_index in range(first_round + rounds):
        x = torch.randn(BATCH, 10, generator=generator)
        y = torch.randint(0, 3, (BATCH,), generator=generator)
        if round_index < first_round:
            continue   # the same batches as a run that trained the earlier rounds
        dtype = next(model.parameters()).dtype
        for _ in range(3):
            optimizer.zero_grad()
            if curvature == "fisher-mc":
                pruner.accumulate_mc(x.to(dtype))
            F.cross_entropy(model(x.to(dtype)), y).backward()
            optimizer.step()
        pruner.update(prune=round_index > 0)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("optimizer_kind", ["mackay", "torch"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_moved_after_building_trains_as_if_built_after(curvature, optimizer_kind, granularity):
    moved = _model()
    optimizer, pruner = _build(moved, optimizer_kind, curvature, granularity)
    moved.to(torch.float64)
    _train(moved, optimizer, pruner, curvature, rounds=3)

    reference = _model().to(torch.float64)
    ref_optimizer, ref_pruner = _build(reference, optimizer_kind, curvature, granularity)
    _train(reference, ref_optimizer, ref_pruner, curvature, rounds=3)

    assert all(p.dtype == torch.float64 for p in moved.parameters())
    for (name, a), b in zip(moved.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    for name in pruner.targets:
        torch.testing.assert_close(pruner.alpha(name), ref_pruner.alpha(name), rtol=0, atol=0, msg=name)
        assert pruner.curvature(name).dtype == torch.float64
    assert 0 < pruner.report()["sparsity"] == ref_pruner.report()["sparsity"] < 1


@pytest.mark.parametrize("curvature", CURVATURES)
def test_moved_mid_training_matches_a_checkpoint_loaded_after_the_move(curvature):
    """Two rounds in float32, then float64: moving the live model equals saving both state
    dicts, moving, and loading them into a fresh optimizer and pruner. (torch's Adam itself
    cannot go on after such a move: its exp_avg keeps the old dtype and its step fails.)"""
    moved = _model()
    optimizer, pruner = _build(moved, "mackay", curvature, "weight")
    _train(moved, optimizer, pruner, curvature, rounds=2)
    # an exact estimate half accumulated when the move comes
    x = torch.randn(BATCH, 10)
    optimizer.zero_grad()
    if curvature == "fisher-mc":
        pruner.accumulate_mc(x)
    moved(x).square().mean().backward()
    optimizer.step()

    reference = _model()
    reference.load_state_dict(moved.state_dict())
    # copies, as torch.save would make: a state_dict shares the optimizer's tensors
    saved_optimizer, saved_pruner = copy.deepcopy((optimizer.state_dict(), pruner.state_dict()))

    moved.to(torch.float64)
    torch.manual_seed(2)   # fisher-mc's sampled labels alike in both runs
    _train(moved, optimizer, pruner, curvature, rounds=2, first_round=2)

    reference.to(torch.float64)
    ref_optimizer, ref_pruner = _build(reference, "mackay", curvature, "weight")
    ref_optimizer.load_state_dict(saved_optimizer)
    ref_pruner.load_state_dict(saved_pruner)
    torch.manual_seed(2)
    _train(reference, ref_optimizer, ref_pruner, curvature, rounds=2, first_round=2)

    for (name, a), b in zip(moved.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for name in pruner.targets:
        torch.testing.assert_close(pruner.alpha(name), ref_pruner.alpha(name), rtol=1e-6, atol=0, msg=name)


def test_optimizer_alone_follows_a_move_after_its_first_step():
    """MacKayAdam with state from float32 steps keeps training after model.to(float64), as
    torch's Adam would after load_state_dict (exp_avg and exp_avg_sq cast, step kept)."""
    model = _model()
    optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-2, num_data=NUM_DATA, batch_size=BATCH)
    x, y = torch.randn(BATCH, 10), torch.randint(0, 3, (BATCH,))
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.to(torch.float64)
    optimizer.zero_grad()
    F.cross_entropy(model(x.double()), y).backward()
    optimizer.step()
    state = optimizer.state[model[0].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == state["curvature"].dtype == torch.float64
    assert state["alpha"].dtype == state["step"].dtype == torch.float32
    assert float(state["step"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("optimizer_kind", ["mackay", "torch"])
def test_moved_to_cuda_after_building_trains_as_if_built_after(optimizer_kind, granularity):
    moved = _model()
    optimizer, pruner = _build(moved, optimizer_kind, "ef-exact", granularity)
    moved.cuda()
    reference = _model().cuda()
    ref_optimizer, ref_pruner = _build(reference, optimizer_kind, "ef-exact", granularity)
    for model, opt, prn in ((moved, optimizer, pruner), (reference, ref_optimizer, ref_pruner)):
        generator = torch.Generator().manual_seed(1)
        for round_index in range(3):
            x = torch.randn(BATCH, 10, generator=generator).cuda()
            y = torch.randint(0, 3, (BATCH,), generator=generator).cuda()
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            prn.update(prune=round_index > 0)
    for (name, a), b in zip(moved.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert pruner.report()["sparsity"] == ref_pruner.report()["sparsity"]
