"""ef-exact under torch.amp.GradScaler (mackay_ext.loss_scale): a new user's fp32 + GradScaler run
read the curvature scale^2 = 2^24 times too large, silently, and a step the scaler skipped for
its inf gradients stopped the next update with "training has diverged". Now the squares of a
scaled loss equal those of the unscaled one (Linear, a served conv, the fused conv route), a
skipped step adds nothing and counts as no backward pass (equal to skipping it by hand), the
training gradients stay the scaled ones the scaler expects, and fisher-mc's own backward is
left alone."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mackay_ext import MacKayAdam, ard_param_groups
from mackay_ext.curvature import FisherAccumulator
from mackay_ext.pruner import MacKayPruner

SCALE = 2.0 ** 12


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12 * 6 * 6, 5))


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, 6, generator=generator), torch.randint(0, 5, (16,), generator=generator))
            for _ in range(count)]


def run(scaler, poison=None, skip=None, optimizer_kind="adam"):
    """Four steps of ef-exact training; `poison`: the step whose loss is made inf (the scaler skips
    it); `skip`: the step left out by hand. Returns the pruner and the training gradients seen."""
    model = convnet()
    if optimizer_kind == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        pruner = MacKayPruner(model, optimizer, num_data=640, batch_size=16, curvature="ef-exact")
    else:
        optimizer = MacKayAdam(ard_param_groups(model), lr=1e-3, num_data=640, batch_size=16)
        pruner = MacKayPruner(model, optimizer, num_data=640, curvature="ef-exact")
    grads = []
    for step, (x, y) in enumerate(batches(4)):
        if step == skip:
            continue
        loss = F.cross_entropy(model(x), y)
        if step == poison:
            loss = loss * float("inf")
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            grads.append([p.grad.clone() / SCALE for p in model.parameters()])
            scaler.step(optimizer)
            scaler.update()
    return pruner, grads


def curvatures(pruner):
    return {name: pruner.curvature_estimate(name) for name in pruner.targets}


@pytest.mark.parametrize("optimizer_kind", ["adam", "mackay-adam"])
def test_a_scaled_loss_gives_the_curvature_of_the_unscaled_one(optimizer_kind):
    plain, plain_grads = run(None, optimizer_kind=optimizer_kind)
    plain.update(prune=False)
    scaled, scaled_grads = run(torch.amp.GradScaler("cpu", init_scale=SCALE), optimizer_kind=optimizer_kind)
    scaled.update(prune=False)
    for name, expected in curvatures(plain).items():
        torch.testing.assert_close(curvatures(scaled)[name], expected, rtol=1e-5, atol=0)
    # the training gradients (the served convs' from the same products) are the scaled ones
    for before, after in zip(plain_grads, scaled_grads):
        for a, b in zip(before, after):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("optimizer_kind", ["adam", "mackay-adam"])
def test_a_step_the_scaler_skips_adds_nothing(optimizer_kind):
    by_hand, _ = run(None, skip=2, optimizer_kind=optimizer_kind)
    by_hand.update(prune=False)
    skipped, _ = run(torch.amp.GradScaler("cpu", init_scale=SCALE), poison=2, optimizer_kind=optimizer_kind)
    assert skipped.accumulator.num_examples == 3 * 16
    skipped.update(prune=False)   # (it raised NonFiniteError: "training has diverged")
    for name, expected in curvatures(by_hand).items():
        torch.testing.assert_close(curvatures(skipped)[name], expected, rtol=1e-5, atol=0)


def test_a_bare_accumulator_reads_a_scaled_loss_unscaled_and_fisher_mc_is_left_alone():
    model = convnet()
    (x, y), = batches(1)
    plain = FisherAccumulator(model)
    with plain:
        F.cross_entropy(model(x), y).backward()
    expected = {p: plain.curvature(p).clone() for p in model.parameters()}
    plain.detach()
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaled = FisherAccumulator(model)
    with scaled:
        scaler.scale(F.cross_entropy(model(x), y)).backward()
    assert scaled.num_examples == 0   # held until the scaler's step is known to have run
    scaler.step(optimizer)
    scaler.update()
    for p, value in expected.items():
        torch.testing.assert_close(scaled.curvature(p), value, rtol=1e-5, atol=0)
    scaled.detach()
    mc = FisherAccumulator(model, mode="fisher-mc")
    torch.manual_seed(3)
    with mc.capture_mc():
        logits = model(x)
    mc.accumulate_mc_from(logits)
    scaler.scale(F.cross_entropy(logits, y)).backward()   # the training backward: no hooks of mc's
    reference = FisherAccumulator(convnet(), mode="fisher-mc")
    torch.manual_seed(3)
    with reference.capture_mc():
        reference_logits = reference.model(x)
    reference.accumulate_mc_from(reference_logits)
    for p, q in zip(model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(mc.curvature(p), reference.curvature(q), rtol=1e-5, atol=0)


def test_a_micro_batch_that_overflows_drops_its_whole_step():
    """Gradient accumulation (A = 4, each loss / 4) with one micro-batch of step 1 inf, and an
    overflow between two layers (the layer above it finite): the scaler skips the whole step, so
    the curvature must equal the run that left step 1 out by hand (it kept the finite micro-batches
    and layers, and read A from the passes of two steps: 2.3x and 11x too large)."""
    def train(scaler, poison):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        pruner = MacKayPruner(model, optimizer, num_data=640, batch_size=32, curvature="ef-exact")
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            batches = [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
                       for _ in range(4)]
            if scaler is None and step == 1:
                continue   # left out by hand
            for micro, (x, y) in enumerate(batches):
                hidden = model[1](model[0](x))
                if poison == "between layers" and step == 1 and micro == 2:   # layer 2's gradient stays finite
                    hidden.register_hook(lambda grad: grad * float("inf"))
                loss = F.cross_entropy(model[2](hidden), y) / 4
                if poison == "a micro-batch" and step == 1 and micro == 2:
                    loss = loss * float("inf")
                (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()
        pruner.update(prune=False)
        return curvatures(pruner)

    expected = train(None, None)
    for poison in ("a micro-batch", "between layers"):
        got = train(torch.amp.GradScaler("cpu", init_scale=SCALE), poison)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=0, msg=f"{poison}: {name}")


@pytest.mark.parametrize("scaled", [False, True])
def test_reentrant_checkpointing_is_one_backward_pass(scaled):
    """torch.utils.checkpoint(use_reentrant=True) runs the recomputed segment's backward as a graph
    task of its own inside the training one: it was counted as a second backward pass (the
    micro-batch factor then read A = 2: the curvature 4x too large), its end dropped the inputs of
    the layers before the segment (their curvature lost), and under GradScaler its layers were read
    unscaled (2^24 too large)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 7), nn.Linear(7, 3)

        def forward(self, x, reentrant):
            hidden = torch.tanh(self.c(x))
            if reentrant:
                hidden = checkpoint(lambda t: torch.relu(self.a(t)), hidden, use_reentrant=True)
            else:
                hidden = torch.relu(self.a(hidden))
            return self.b(hidden)

    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    results = []
    for reentrant in (False, True):
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = MacKayPruner(model, optimizer, num_data=100, batch_size=8, curvature="ef-exact")
        loss = F.cross_entropy(model(x, reentrant), y)
        if scaled:
            scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        assert pruner._micro_batches.factor() == 1.0
        pruner.update(prune=False)
        results.append(curvatures(pruner))
    for name, value in results[0].items():
        assert float(value.abs().max()) > 0
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=0, msg=name)


def test_a_backward_that_raised_leaves_no_task_on_record():
    """A backward that raises never reaches its end callback: its task stayed on the stack, and
    every later backward read as nested in it (no pass counted, nothing settled)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    accumulator = FisherAccumulator(model)
    with accumulator:
        hidden = model[1](model[0](x))
        hidden.register_hook(lambda grad: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            F.cross_entropy(model[2](hidden), y).backward()
        accumulator.reset()
        F.cross_entropy(model(x), y).backward()
    assert accumulator.backward_passes == 1
    reference = FisherAccumulator(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    reference.model.load_state_dict(model.state_dict())
    with reference:
        F.cross_entropy(reference.model(x), y).backward()
    for p, q in zip(model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(accumulator.curvature(p), reference.curvature(q), rtol=1e-6, atol=0)
