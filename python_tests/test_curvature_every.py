"""MacKayPruner(curvature_every=k): the exact curvature from one training batch in k."""
import copy

import pytest
import torch
from torch import nn

from mackay_ext import MacKayAdam, MacKayPruner, ard_param_groups

B, STEPS = 5, 7


def make(curvature="ef-exact", every=3, dtype=torch.float64):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    optimizer = MacKayAdam(ard_param_groups(net), lr=1e-2, num_data=100, batch_size=B)
    pruner = MacKayPruner(net, optimizer, num_data=100, curvature=curvature, curvature_every=every)
    return net, optimizer, pruner


def batches(count, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 6, generator=generator, dtype=dtype), torch.randint(0, 3, (B,), generator=generator))
            for _ in range(count)]


def per_example_squares(net, x, y):
    """Sum over the examples of the squared gradient of each example's own loss (a plain loop)."""
    total = [torch.zeros_like(p) for p in (net[0].weight, net[2].weight)]
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, [net[0].weight, net[2].weight])
        for t, g in zip(total, grads):
            t.add_(g * g)
    return total


def train_step(net, optimizer, pruner, x, y):
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    if pruner.curvature_kind == "fisher-mc":
        pruner.accumulate_mc(x)


@pytest.mark.parametrize("every", [1, 3])
def test_ef_exact_averages_exactly_the_sampled_batches(every):
    net, optimizer, pruner = make(every=every)
    sums, examples = None, 0
    for step, (x, y) in enumerate(batches(STEPS)):
        if step % every == 0:   # the first step after an update and every k-th after it
            paused, pruner.accumulator.paused = pruner.accumulator.paused, True   # not into its sums
            squares = per_example_squares(net, x, y)   # at the weights that step's backward sees
            pruner.accumulator.paused = paused
            sums = squares if sums is None else [s + q for s, q in zip(sums, squares)]
            examples += len(x)
        train_step(net, optimizer, pruner, x, y)
    assert pruner.accumulator.num_examples == examples == B * len(range(0, STEPS, every))
    pruner.update()
    for name, expected in zip(("0", "2"), sums):
        torch.testing.assert_close(pruner.curvature(name), expected / examples, rtol=1e-10, atol=1e-14)


def test_sampling_restarts_after_each_update():
    net, optimizer, pruner = make(every=4)
    data = batches(6)
    for x, y in data[:2]:
        train_step(net, optimizer, pruner, x, y)
    pruner.update()   # steps 1 and 2 of a window of 4: the window starts again here
    assert pruner.accumulator.num_examples == 0 and not pruner.accumulator.paused
    for x, y in data[2:]:
        train_step(net, optimizer, pruner, x, y)
    assert pruner.accumulator.num_examples == B   # the first step after the update only


def test_fisher_mc_samples_every_kth_call():
    net, optimizer, pruner = make(curvature="fisher-mc", every=3)
    for x, y in batches(STEPS):
        train_step(net, optimizer, pruner, x, y)
    assert pruner.accumulator.num_examples == 3 * B   # calls 1, 4 and 7
    pruner.update()
    x, y = batches(1, seed=2)[0]
    train_step(net, optimizer, pruner, x, y)
    assert pruner.accumulator.num_examples == B


@pytest.mark.parametrize("curvature", ["ef-exact", "fisher-mc"])
def test_a_resumed_run_samples_the_same_batches(curvature):
    data = batches(9)
    net, optimizer, pruner = make(curvature=curvature, every=3)
    for x, y in data[:5]:
        train_step(net, optimizer, pruner, x, y)
    pruner.update()
    for x, y in data[5:7]:   # mid-window: the next sampled step is the 4th after the update
        train_step(net, optimizer, pruner, x, y)
    saved = copy.deepcopy((net.state_dict(), optimizer.state_dict(), pruner.state_dict()))
    resumed_net, resumed_optimizer, resumed = make(curvature=curvature, every=3)
    resumed_net.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed.load_state_dict(saved[2])
    torch.manual_seed(5)   # fisher-mc samples labels: the same draws for both
    for x, y in data[7:]:
        train_step(net, optimizer, pruner, x, y)
    torch.manual_seed(5)
    for x, y in data[7:]:
        train_step(resumed_net, resumed_optimizer, resumed, x, y)
    # the checkpoint holds the sums of the window's first sampled step (data[5]); after the
    # save both sample step 4 (data[7]) alone, and hold the same estimate
    assert resumed.accumulator.num_examples == pruner.accumulator.num_examples == 2 * B
    for name in ("0", "2"):
        param, resumed_param = net.get_submodule(name).weight, resumed_net.get_submodule(name).weight
        torch.testing.assert_close(resumed.accumulator.curvature(resumed_param),
                                   pruner.accumulator.curvature(param), rtol=0, atol=0)


@pytest.mark.parametrize("every", [0, -2, 2.5, True, "4"])
def test_bad_curvature_every_is_rejected(every):
    net = nn.Linear(3, 2)
    optimizer = MacKayAdam(ard_param_groups(net), lr=1e-2, num_data=10, batch_size=2)
    with pytest.raises(ValueError, match="curvature_every must be an int >= 1"):
        MacKayPruner(net, optimizer, num_data=10, curvature="ef-exact", curvature_every=every)


def test_curvature_every_needs_an_exact_estimator_and_an_optimizer():
    net = nn.Linear(3, 2)
    optimizer = MacKayAdam(ard_param_groups(net), lr=1e-2, num_data=10, batch_size=2)
    with pytest.raises(ValueError, match="ef-batch rides in every optimizer step"):
        MacKayPruner(net, optimizer, num_data=10, curvature="ef-batch", curvature_every=2)
    with pytest.raises(ValueError, match="pass the optimizer"):
        MacKayPruner(net, None, num_data=10, curvature="ef-exact", curvature_every=2, prior="penalty")


def test_ef_exact_without_an_optimizer_still_updates():
    """prior="penalty" needs no optimizer: no steps to count, every backward is taken."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    pruner = MacKayPruner(net, None, num_data=100, curvature="ef-exact", prior="penalty")
    for x, y in batches(2):
        nn.functional.cross_entropy(net(x), y).backward()
    assert pruner.accumulator.num_examples == 2 * B
    pruner.update()
    x, y = batches(1, seed=3)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    assert pruner.accumulator.num_examples == B
