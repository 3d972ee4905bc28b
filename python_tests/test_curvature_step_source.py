"""A plain MacKayPruner with a non-MacKayAdam optimizer reads its ef-batch curvature from each
optimizer step's gradient (MacKayPruner.ef_batch_source == "step"), as MacKayAdam's fused step
does: under gradient accumulation, GradScaler and DistributedDataParallel the update sees the
curvature, and gives the alpha, of one batch of the effective size, the same on every rank. Checked
against h = (1 - rho^t)-weighted B g^2 written out by hand from the whole batch's float64
gradient and alpha = gamma / w^2 (MacKay's rule) from it. Without an optimizer (prior="penalty")
only the backward marks a step: h is read there."""
import copy
import math

import pytest
import torch
from ddp_ranks import run_on_ranks
from torch import nn

from mackay_ext.pruner import MacKayPruner

RHO = 0.99
B = 8
N = 100.0
ALPHA = 3.0   # every weight's alpha before the checked update (no warm-up: gamma reads h)


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _batch(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(B, 5, generator=generator, dtype=torch.float64).to(dtype),
            torch.randint(0, 3, (B,), generator=generator))


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _expected(model, x, y, steps):
    """By hand, float64, lr = 0 (the gradient stays the same): h after `steps` steps on the
    whole batch, and the alpha MacKay's rule gives from it, alpha = ALPHA before."""
    twin = copy.deepcopy(model).double()
    _loss(twin, x.double(), y).backward()
    expected = {}
    for name in ("0", "2"):
        w = twin.get_parameter(name + ".weight")
        h = (1 - RHO ** steps) * B * w.grad.detach() ** 2
        n_h = N * h / (1 - RHO ** steps)   # the update reads h / (1 - rho^t)
        gamma = n_h / (n_h + ALPHA)
        expected[name] = (h, gamma / (w.detach() ** 2 + 1e-16))
    return expected


def _pruner(model, optimizer, **options):
    return MacKayPruner(model, optimizer, num_data=N, batch_size=B, curvature_decay=RHO, **options)


def _update(pruner):
    for name in pruner.targets:
        pruner.alpha(name).fill_(ALPHA)
    return pruner.update(prune=False)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_accumulation_gives_one_batch_of_eight(accumulation):
    """accumulation micro-batches of B / accumulation, each loss / accumulation, 3 optimizer
    steps: h and alpha of one batch of B (old code: each backward's partial gradient, 3 x
    accumulation updates of h)."""
    x, y = _batch()
    model = _model()
    expected = _expected(model, x, y, steps=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    pruner = _pruner(model, optimizer)
    assert pruner.ef_batch_source == "step"
    for _ in range(3):
        optimizer.zero_grad()
        before = pruner.curvature("0").clone()
        for xm, ym in zip(x.chunk(accumulation), y.chunk(accumulation)):
            (_loss(model, xm, ym) / accumulation).backward()
        assert torch.equal(pruner.curvature("0"), before)   # nothing read at the backward
        optimizer.step()
    _update(pruner)
    for name, (h, alpha) in expected.items():
        assert float(pruner._own[name]["curvature_steps"]) == 3.0
        torch.testing.assert_close(pruner.curvature(name), h, rtol=1e-10, atol=0)
        torch.testing.assert_close(pruner.alpha(name), alpha.float(), rtol=1e-6, atol=0)


def test_channel_members_tracked_here_read_the_step_too():
    """granularity="channel" with torch.optim.Adam: the bias channel_ard tracks itself follows the
    pruner's source (old code: a hook per backward, 2 updates from the halves' gradients)."""
    x, y = _batch()
    model = _model()
    twin = copy.deepcopy(model)
    _loss(twin, x, y).backward()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    pruner = _pruner(model, optimizer, granularity="channel", example_inputs=x)
    assert pruner.channel.members["0.bias"].where == "own"
    optimizer.zero_grad()
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        (_loss(model, xm, ym) / 2).backward()
    optimizer.step()
    for name in ("0.bias", "0.weight"):
        torch.testing.assert_close(pruner.channel.curvature(name), (1 - RHO) * B * twin.get_parameter(name).grad ** 2,
                                   rtol=1e-10, atol=0)


def test_detach_stops_reading_the_step():
    x, y = _batch()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = _pruner(model, optimizer)
    pruner.detach()
    _loss(model, x, y).backward()
    optimizer.step()
    assert not bool(pruner.curvature("0").any())
    assert float(pruner._own["0"]["curvature_steps"]) == 0.0


def test_penalty_prior_with_accumulation_reads_the_data_gradient():
    """prior="penalty": the penalty's gradient alpha/N w (in each micro-batch's loss / A) is in
    the step's gradient; h holds the data's B g^2 only."""
    x, y = _batch()
    model = _model()
    expected = _expected(model, x, y, steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = _pruner(model, optimizer, prior="penalty")
    for name in pruner.targets:
        pruner.alpha(name).fill_(1e4)   # a penalty gradient far above the data's
    optimizer.zero_grad()
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        ((_loss(model, xm, ym) + pruner.penalty()) / 2).backward()
    optimizer.step()
    for name, (h, _) in expected.items():
        torch.testing.assert_close(pruner.curvature(name), h, rtol=1e-10, atol=0)


def test_without_an_optimizer_each_backward_is_read():
    """prior="penalty" and no optimizer: no step to read at, so h is read at each backward
    (the documented per-backward source), the penalty's gradient taken off there."""
    x, y = _batch()
    model = _model()
    expected = _expected(model, x, y, steps=1)
    pruner = _pruner(model, None, prior="penalty")
    assert pruner.ef_batch_source == "backward"
    for name in pruner.targets:
        pruner.alpha(name).fill_(1e4)
    (_loss(model, x, y) + pruner.penalty()).backward()
    for name, (h, _) in expected.items():
        torch.testing.assert_close(pruner.curvature(name), h, rtol=1e-10, atol=0)


def _fused_adam_on_cpu(model):
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)
        optimizer.zero_grad()
        _loss(model, *_batch(torch.float32)).backward()
        optimizer.step()   # fused CPU kernels are recent: a RuntimeError where they are absent
    except RuntimeError as error:
        pytest.skip(f"fused Adam on the CPU is not available here: {error}")
    optimizer.zero_grad()
    return torch.optim.Adam(model.parameters(), lr=0.0, fused=True)


@pytest.mark.parametrize("fused", [False, True], ids=["adam", "fused_adam"])
def test_grad_scaler_reads_the_unscaled_gradient(fused):
    """GradScaler (scale 1024): h from the unscaled gradient (old code: the scaled one, 1024^2
    times too large), an overflowing step skipped (h and t unchanged). fused=True: an optimizer
    that takes the scale into its own step (read before it, skipped on the device)."""
    x, y = _batch(torch.float32)
    model = _model(torch.float32)
    expected = _expected(model, x, y, steps=1)
    optimizer = (_fused_adam_on_cpu(model) if fused
                 else torch.optim.Adam(model.parameters(), lr=0.0))
    pruner = _pruner(model, optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(optimizer)
    scaler.update()
    for name, (h, _) in expected.items():
        torch.testing.assert_close(pruner.curvature(name), h.float(), rtol=1e-5, atol=0)
    before = pruner.curvature("0").clone()
    optimizer.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    model[0].weight.grad[0, 0] = math.inf
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(pruner.curvature("0"), before)
    assert float(pruner._own["0"]["curvature_steps"]) == 1.0


def test_a_step_grad_scaler_skipped_leaves_the_weights_to_the_proximal_prior_too():
    """Adam(fused=True) takes GradScaler's found_inf into its own step and is stepped even when
    the scaler found an inf; it then changes nothing, but the pruner's proximal prior still
    shrank every weight by 1 / (1 + lr alpha / N) after it. A skipped step now leaves the
    weights exactly as they were; a step that ran takes the prior's step as before."""
    x, y = _batch(torch.float32)
    model = _model(torch.float32)
    optimizer = _fused_adam_on_cpu(model)
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    pruner = _pruner(model, optimizer)
    for name in pruner.targets:
        pruner.alpha(name).fill_(ALPHA * 1e3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    model[0].weight.grad[0, 0] = math.inf
    scaler.step(optimizer)
    scaler.update()
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p.detach(), old)
    optimizer.zero_grad()
    scaler.scale(_loss(model, x, y)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model[0].weight.detach(), before[0])


WORLD = 2
DDP_STEPS = 3


def _train(model, optimizer, pruner, x, y, step_batch):
    """DDP_STEPS Adam steps (lr > 0: the weights move), then one update from alpha = ALPHA."""
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        _loss(step_batch[0], x, y).backward()
        optimizer.step()
    _update(pruner)
    return {name: (pruner.curvature(name).clone(), pruner.alpha(name).clone()) for name in pruner.targets}


def _ddp_worker(rank, world):
    x, y = _batch()   # the global batch: each rank gets half
    local = slice(rank * B // world, (rank + 1) * B // world)
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = _pruner(model, optimizer)   # batch_size=B: the global batch of one step
    return _train(model, optimizer, pruner, x[local], y[local], (ddp,))


def test_ddp_ranks_end_with_identical_alpha(tmp_path):
    """2 gloo processes, half of the batch each, torch.optim.Adam: h and alpha identical on both
    ranks and equal to one process's on the whole batch (old code: each rank's h from its own
    half's gradient, and its own alpha)."""
    ranks = run_on_ranks(_ddp_worker, tmp_path)
    x, y = _batch()
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    whole = _train(model, optimizer, _pruner(model, optimizer), x, y, (model,))
    for name, (h, alpha) in whole.items():
        assert bool((h > 0).all())
        for result in ranks:
            torch.testing.assert_close(result[name][0], h, rtol=1e-9, atol=0)
            torch.testing.assert_close(result[name][1], alpha, rtol=1e-5, atol=0)
        assert torch.equal(ranks[0][name][1], ranks[1][name][1])
