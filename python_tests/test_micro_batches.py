"""ef-exact under gradient accumulation: every backward of an optimizer step is a micro-batch of
the step's mean loss (mackay_ext.micro_batches)."""
import warnings

import pytest
import torch
from torch import nn

from mackay_ext import MacKayPruner

EXAMPLES = 10


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(EXAMPLES, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (EXAMPLES,), generator=generator)


def _per_example_reference(x, y):
    """The mean over the examples of each example's squared loss gradient, one example at a time."""
    net = _net()
    total = {name: torch.zeros_like(p) for name, p in net.named_parameters() if name.endswith("weight")}
    for n in range(len(y)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[n:n + 1]), y[n:n + 1]).backward()
        for name in total:
            total[name] += net.get_parameter(name).grad ** 2
    return {name.removesuffix(".weight"): value / len(y) for name, value in total.items()}


def _pruner_curvature(splits, divide=True, gradient_scale=1.0, steps=1, summed=False):
    """The pruner's ef-exact estimate after `steps` optimizer steps at lr 0, each over the
    micro-batches `splits` (sizes) of the same examples."""
    x, y = _data()
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    pruner = MacKayPruner(net, optimizer, num_data=100, curvature="ef-exact")
    for _ in range(steps):
        optimizer.zero_grad()
        for part in torch.arange(EXAMPLES).split(splits):
            loss = nn.functional.cross_entropy(net(x[part]), y[part], reduction="sum" if summed else "mean")
            (loss / len(splits) if divide else loss).backward()
        pruner.gradient_scale = gradient_scale
        optimizer.step()
    pruner.update(prune=False)
    return {name: pruner.curvature(name) for name in ("0", "2")}, pruner


@pytest.mark.parametrize("splits", [[10], [5, 5], [4, 3, 3], [1] * 10], ids=str)
def test_the_curvature_is_the_same_whatever_the_micro_batches(splits):
    """Under torch's recipe (each micro-batch loss divided by their number) the estimate is the
    per-example one of the whole step, uneven micro-batches too (it was 1/A^2 of it)."""
    x, y = _data()
    expected = _per_example_reference(x, y)
    got, _ = _pruner_curvature(splits, steps=2)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)


def test_steps_of_different_micro_batch_counts_are_weighted_by_their_examples():
    """A window with steps of A = 1 and A = 2 (same examples): both read the same per-example
    squares, so the estimate is that of either."""
    x, y = _data()
    expected = _per_example_reference(x, y)
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    pruner = MacKayPruner(net, optimizer, num_data=100, curvature="ef-exact")
    for splits in ([10], [5, 5], [5, 5]):
        optimizer.zero_grad()
        for part in torch.arange(EXAMPLES).split(splits):
            (nn.functional.cross_entropy(net(x[part]), y[part]) / len(splits)).backward()
        optimizer.step()
    # per-step A^2 weighted by examples: (10 * 1 + 20 * 4) / 30 = 3, where steps 2 and 3 need 4
    # and step 1 needs 1: the estimate is exact only where A is constant over the window
    pruner.update(prune=False)
    squares_read = (10 * 1 / 1 + 20 * 1 / 4) / 30   # each step's share of the raw sum, in units of the true one
    for name in expected:
        torch.testing.assert_close(pruner.curvature(name), expected[name] * squares_read * 3, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("splits", [[5, 5], [10]], ids=["undivided-micro-batches", "one-batch"])
def test_a_loss_c_times_the_mean_with_gradient_scale_c_reads_the_mean_s(splits):
    """The README's gradient_scale = c for a loss c times the step's mean (the sum of A micro-batch
    means left undivided, c = A; a sum over the batch, c = B): each backward's gradients are c
    times the examples', and the squares were read c^2 too large (a new user's reduction='sum' with
    gradient_scale = B: 1,024 times). Clipping (c < 1) scales after the backward: nothing here."""
    x, y = _data()
    expected = _per_example_reference(x, y)
    scale = float(len(splits)) if len(splits) > 1 else float(EXAMPLES)
    got, _ = _pruner_curvature(splits, divide=False, gradient_scale=scale, summed=len(splits) == 1)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)
    clipped, _ = _pruner_curvature([5, 5], gradient_scale=0.5)
    for name in expected:
        torch.testing.assert_close(clipped[name], expected[name], rtol=1e-10, atol=1e-14)


def test_a_resumed_window_counts_its_micro_batches_as_the_uninterrupted_one():
    x, y = _data()
    runs = []
    for resume in (False, True):
        net = _net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        pruner = MacKayPruner(net, optimizer, num_data=100, curvature="ef-exact")
        for step in range(3):
            if resume and step == 2:   # a checkpoint between two steps, loaded into a new pruner
                state = pruner.state_dict()
                pruner.detach()
                pruner = MacKayPruner(net, optimizer, num_data=100, curvature="ef-exact")
                pruner.load_state_dict(state)
            splits = [10] if step == 0 else [5, 5]
            optimizer.zero_grad()
            for part in torch.arange(EXAMPLES).split(splits):
                (nn.functional.cross_entropy(net(x[part]), y[part]) / len(splits)).backward()
            optimizer.step()
        pruner.update(prune=False)
        runs.append({name: pruner.curvature(name).clone() for name in ("0", "2")})
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-12, atol=0)


def test_a_step_that_raised_does_not_merge_with_the_next():
    """A notebook user's Ctrl-C in optimizer.step, the batch then run again: the raised step's
    backward pass was counted with the redone step's, as two micro-batches (A = 2, the squares of
    that step multiplied by 4). Each step's passes are closed before it runs: the estimate is that
    of the batch seen twice (it was, with the same weights)."""
    x, y = _data()
    expected = _per_example_reference(x, y)   # the same examples each pass, lr 0: any multiple reads it
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    pruner = MacKayPruner(net, optimizer, num_data=100, curvature="ef-exact")
    interrupted = []

    def ctrl_c_once(*_):
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
    optimizer.register_step_pre_hook(ctrl_c_once)   # after the pruner's own: the step body never runs
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        try:
            optimizer.step()
        except KeyboardInterrupt:
            continue   # the user runs the cell again: the same batch
    pruner.update(prune=False)
    assert interrupted
    for name in expected:
        torch.testing.assert_close(pruner.curvature(name), expected[name], rtol=1e-10, atol=1e-14)


def test_a_loss_factor_times_clipping_in_gradient_scale_is_said():
    """gradient_scale = A x c (an undivided accumulation and clipping): the hooks see A, not c,
    and cannot tell them apart: said, with torch's recipe as the way out."""
    with pytest.warns(RuntimeWarning, match=r"gradient_scale=1.5 over 2 backward pass\(es\) looks like that factor "
                                            r"times clipping's"):
        _pruner_curvature([5, 5], divide=False, gradient_scale=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _pruner_curvature([5, 5], divide=False, gradient_scale=2.0)   # the factor alone
        _pruner_curvature([10], summed=True, gradient_scale=10.0)
