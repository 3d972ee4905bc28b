"""Which backward passes are a layer's training curvature under ef-exact: a gradient to the inputs
alone (an FGSM step) is not; a loss built on gradients (create_graph) and a second backward through
one forward are refused; a pass whose gradient is dropped before the step (a GAN's generator loss
through a trainable discriminator) is said. Each against a float64 per-example reference."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mackay_ext import MacKayPruner
from mackay_ext.curvature import FisherAccumulator


def per_example_squares(model, x, y):
    """Sum over examples of each parameter's squared gradient of its own cross-entropy (float64)."""
    total = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), y[n:n + 1]), list(model.parameters()))
        for (name, _), grad in zip(model.named_parameters(), grads):
            total[name] += grad.square()
    return total


def summed_curvature(acc, model):
    """The accumulator's estimate as a sum over its examples (curvature() is their mean)."""
    return {name: (acc.curvature(param) * acc.counts[param]).clone() for name, param in model.named_parameters()}


def models():
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double(), (6, 5)),
        "cnn": (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)).double(),
                (6, 2, 5, 5)),
    }


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_an_fgsm_step_is_no_training_pass(kind):
    """Adversarial training: the attack's gradient to the inputs (torch.autograd.grad) reads
    nothing; the step on the adversarial batch is the curvature, one pass of its examples."""
    model, shape = models()[kind]
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)
    attacked = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(F.cross_entropy(model(attacked), y), attacked)
    adversarial = (x + 0.1 * gradient.sign()).detach()
    F.cross_entropy(model(adversarial), y).backward()
    got, passes, examples = summed_curvature(acc, model), acc.backward_passes, acc.num_examples
    acc.detach()
    expected = per_example_squares(model, adversarial, y)
    assert passes == 1 and examples == shape[0]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)


def test_the_checks_hold_over_steps_and_after_a_move_by_data():
    """Each layer's gradient accumulators are found once a backward, and asked again where the
    answer is no: an FGSM step each training step stays no pass, and model.double() (which moves
    the parameters by .data, giving them new accumulators) leaves the training pass read."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    acc = FisherAccumulator(model)

    def step(dtype):
        x, y = torch.randn(6, 5, dtype=dtype), torch.randint(0, 3, (6,))
        attacked = x.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(F.cross_entropy(model(attacked), y), attacked)
        adversarial = (x + 0.1 * gradient.sign()).detach()
        F.cross_entropy(model(adversarial), y).backward()
        return adversarial, y

    for _ in range(3):
        step(torch.float32)
    model.double()
    before = summed_curvature(acc, model)
    adversarial, y = step(torch.float64)
    added = {name: summed_curvature(acc, model)[name] - before[name] for name in before}
    assert acc.backward_passes == 4 and acc.num_examples == 24
    acc.detach()
    expected = per_example_squares(model, adversarial, y)
    for name in expected:
        torch.testing.assert_close(added[name], expected[name], rtol=1e-5, atol=1e-7)


def test_a_model_whose_parameter_hook_reaches_it_is_freed():
    """The gradient accumulators found in a backward are dropped at its end: held, each kept its
    parameter alive from outside Python's collector, and a cycle through it (a gradient hook that
    reaches the model, whose forward hooks reach the accumulator) was never freed."""
    import gc
    import weakref
    refs = []
    for _ in range(3):
        model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3))
        acc = FisherAccumulator(model)
        model[0].weight.register_hook(lambda grad, model=model, acc=acc: grad)
        F.cross_entropy(model(torch.randn(4, 20)), torch.randint(0, 3, (4,))).backward()
        refs.append(weakref.ref(model))
        del model, acc
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_backward_to_other_inputs_is_no_training_pass():
    model, shape = models()["mlp"]
    x, y = torch.randn(*shape, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)
    F.cross_entropy(model(x), y).backward(inputs=[x])
    assert acc.backward_passes == 0 and not acc.saw(model[0].weight)


def test_gradient_probes_are_no_training_pass():
    """torch.autograd.grad writes no .grad: VQGAN's adaptive loss weight probes the gradient of
    two losses at the last layer (retain_graph), then one backward trains on their weighted sum,
    which alone is the curvature (the first probe was squared, and the rest refused as a second
    backward)."""
    model, shape = models()["mlp"]
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)
    logits = model(x)
    nll, other = F.cross_entropy(logits, y), logits.square().mean()
    (g_nll,) = torch.autograd.grad(nll, model[2].weight, retain_graph=True)
    (g_other,) = torch.autograd.grad(other, model[2].weight, retain_graph=True)
    weight = float(g_nll.norm() / (g_other.norm() + 1e-4))
    (nll + weight * other).backward()
    got, passes = summed_curvature(acc, model), acc.backward_passes
    acc.detach()
    expected = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    for n in range(shape[0]):
        out = model(x[n:n + 1])
        loss = F.cross_entropy(out, y[n:n + 1]) + weight * out.square().sum() / (3 * shape[0]) * shape[0]
        for (name, _), grad in zip(model.named_parameters(), torch.autograd.grad(loss, list(model.parameters()))):
            expected[name] += grad.square()
    assert passes == 1
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)


def test_a_probe_under_ef_batch_is_no_pass():
    """The batch-size check asks torch whether a pass writes .grad, which torch.autograd.grad to
    the parameters does not answer: no pass (it raised inside the probe)."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature="ef-batch")
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    loss.backward()
    optimizer.step()


def test_a_layer_whose_weight_is_not_stored_as_its_own_is_read():
    """A flat parameter's views (FSDP's use_orig_params=False) leave nothing in the layer's
    _parameters: its backward is read as training it."""
    torch.manual_seed(0)
    flat = nn.Parameter(torch.randn(5 * 7 + 7, dtype=torch.float64))
    layer = nn.Linear(5, 7).double()
    del layer.weight, layer.bias
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(7, 3).double())
    acc = FisherAccumulator(model)
    layer.weight, layer.bias = flat[:35].view(7, 5), flat[35:]
    F.cross_entropy(model(torch.randn(6, 5, dtype=torch.float64)), torch.randint(0, 3, (6,))).backward()
    assert acc.backward_passes == 1 and acc.num_examples == 6


def test_a_gradient_penalty_is_refused():
    """WGAN-GP: the critic's gradient to interpolated inputs, with create_graph for the penalty."""
    model, shape = models()["mlp"]
    FisherAccumulator(model)
    mixed = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"create_graph=True reached 2 \(Linear\).*WGAN-GP.*curvature='ef-batch'"):
        torch.autograd.grad(model(mixed).sum(), mixed, create_graph=True)


def test_a_second_backward_through_one_forward_is_refused():
    """Distillation split in two: ce.backward(retain_graph=True); kd.backward(). Refused at the
    first layer the second pass reaches again (here the last, before any gradient changes); a
    second pass that trains no layer goes through."""
    model, shape = models()["mlp"]
    x, y = torch.randn(*shape, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)
    logits = model(x)
    F.cross_entropy(logits, y).backward(retain_graph=True)
    grads = [param.grad.clone() for param in model.parameters()]
    logits.square().mean().backward(inputs=[x], retain_graph=True)   # (to the input alone)
    with pytest.raises(RuntimeError, match=r"a second backward reached 2 \(Linear\).*sum of the losses once"):
        logits.square().mean().backward()
    for param, before in zip(model.parameters(), grads):
        torch.testing.assert_close(param.grad, before, rtol=0, atol=0)
    torch.autograd.grad(logits.square().mean(), list(model.parameters()), retain_graph=True)   # (a probe)
    model(x)   # a forward between the two passes (an evaluation with gradients on)
    with pytest.raises(RuntimeError, match="a second backward"):
        logits.square().mean().backward()
    # the next forward and backward start afresh
    F.cross_entropy(model(x), y).backward()
    assert acc.num_examples == 2 * shape[0]


def gan_steps(discriminator, generator, freeze: bool, steps: int = 4):
    opt_d = torch.optim.Adam(discriminator.parameters(), 1e-3)
    opt_g = torch.optim.Adam(generator.parameters(), 1e-3)
    pruner = MacKayPruner(discriminator, opt_d, num_data=256, batch_size=16, curvature="ef-exact")
    ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            real, fake = torch.randn(16, 6) + 1, generator(torch.randn(16, 3))
            opt_d.zero_grad()
            (F.binary_cross_entropy_with_logits(discriminator(real), ones)
             + F.binary_cross_entropy_with_logits(discriminator(fake.detach()), zeros)).backward()
            opt_d.step()
            opt_g.zero_grad()
            discriminator.requires_grad_(not freeze)
            F.binary_cross_entropy_with_logits(discriminator(fake), ones).backward()
            discriminator.requires_grad_(True)
            opt_g.step()
    return pruner, [str(w.message) for w in caught if "dropped" in str(w.message)]


def test_a_gan_discriminator_trainable_in_the_generator_step_is_said():
    generator = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6))
    discriminator = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    first, said = gan_steps(discriminator, generator, freeze=False)
    first.detach()
    assert len(said) == 1 and "through 0, 2 whose gradient was then dropped" in said[0] \
        and "D.requires_grad_(False)" in said[0]
    pruner, said = gan_steps(discriminator, generator, freeze=True)
    assert said == [] and pruner._micro_batches.factor() == 1.0   # (one pass a step)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_accumulation_and_clipping_are_not_dropped_gradients(set_to_none):
    """Two micro-batches into one gradient, clipped before the step, zeroed after it: every
    pass's gradient reached the step."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature="ef-exact")
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad(set_to_none=set_to_none)
            for half in (x[:8], x[8:]):
                (F.cross_entropy(model(half), y[:8]) / 2).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            optimizer.step()
    assert not [w for w in caught if "dropped" in str(w.message)]


def test_an_fgsm_step_is_no_micro_batch_under_ef_batch():
    """The batch-size check (step_batch.py) counts no pass that trains nothing."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    pruner = MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature="ef-batch")
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            attacked = x.clone().requires_grad_()
            (gradient,) = torch.autograd.grad(F.cross_entropy(model(attacked), y), attacked)
            optimizer.zero_grad()
            F.cross_entropy(model((x + 0.05 * gradient.sign()).detach()), y).backward()
            optimizer.step()
        pruner.update()
    assert not [w for w in caught if "micro-batch" in str(w.message)]


def test_a_step_the_scaler_skips_is_no_dropped_gradient():
    """GradScaler skips a step with inf gradients (the usual first steps of fp16 training): no
    optimizer step ran, and the next zero_grad drops a gradient nothing was to use."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    MacKayPruner(model, optimizer, num_data=64, batch_size=16, curvature="ef-exact")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) * (float("inf") if step == 0 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert scaler.get_scale() < 2.0 ** 16   # (the first step was skipped)
    assert not [w for w in caught if "dropped" in str(w.message)]


class RoutedExperts(nn.Module):
    """Top-1 routing: each expert runs on the rows routed to it (a mixture of experts)."""

    def __init__(self):
        super().__init__()
        self.router, self.experts, self.head = nn.Linear(5, 2), nn.ModuleList([nn.Linear(5, 5), nn.Linear(5, 5)]), \
            nn.Linear(5, 3)

    def forward(self, x):
        choice = self.router(x).argmax(1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            rows = choice == index
            out = out.index_put((rows.nonzero().squeeze(1),), expert(x[rows]))
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("mode", ["ef-exact", "fisher-mc"])
def test_layers_on_different_rows_in_one_backward_are_said_once(mode):
    """A routed expert's rows are part of the batch (its curvature read at their share): said,
    naming the layers and their rows; layers on the batch's rows alike say nothing."""
    torch.manual_seed(0)
    model = RoutedExperts()
    acc = FisherAccumulator(model, mode=mode)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            if mode == "fisher-mc":
                with acc.capture_mc():
                    logits = model(x)
                acc.accumulate_mc_from(logits)
            else:
                F.cross_entropy(model(x), y).backward()
    said = [str(w.message) for w in caught if "different numbers of rows" in str(w.message)]
    assert len(said) == 1 and "head: 16" in said[0] and "experts.0" in said[0] and "ef-batch" in said[0]
    plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    FisherAccumulator(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(plain(x), y).backward()


def test_a_forward_under_torch_func_is_said_once():
    """A physics-informed loss whose residual differentiates the network with vmap(jacrev(...)):
    the hooks do not see that forward, and its share of the curvature is missing; said once.
    Without gradients (an evaluation under torch.func) nothing is said."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    FisherAccumulator(model)
    points = torch.randn(6, 2)
    with torch.no_grad():
        torch.func.vmap(model)(points)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            slopes = torch.func.vmap(torch.func.jacrev(lambda p: model(p).squeeze()))(points)
            (slopes.square().mean() + model(points).square().mean()).backward()
    said = [str(w.message) for w in caught if "torch.func's transforms" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("FisherAccumulator (ef-exact): 0 (Linear) ran under")


def test_two_forwards_then_their_two_backward_passes_read_both_batches():
    """l1 = f(x1); l2 = f(x2); l1.backward(); l2.backward(): the second batch's records were
    dropped at the first backward's end, its curvature lost with no word. A forward that gets
    no backward stays one backward longer, then goes (a Double DQN's greedy forward each step)."""
    model, shape = models()["mlp"]
    x1, x2 = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    y1, y2 = torch.randint(0, 3, (shape[0],)), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)
    first, second = F.cross_entropy(model(x1), y1), F.cross_entropy(model(x2), y2)
    first.backward()
    second.backward()
    got = summed_curvature(acc, model)
    assert acc.num_examples == 2 * shape[0] and acc.backward_passes == 2
    for _ in range(5):   # a greedy forward that is never backpropagated, then a training step
        model(x2)
        F.cross_entropy(model(x1), y1).backward()
    assert max(len(records) for records in acc._pending.values()) == 1
    acc.detach()
    expected = per_example_squares(model, x1, y1)
    for name, value in per_example_squares(model, x2, y2).items():
        expected[name] += value
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14)


def test_a_backward_through_a_dropped_input_is_said_and_a_recompute_is_not_kept():
    """Three forwards, then their three backward passes: the first's input is gone by the third
    (inputs no backward used are kept one pass): said, not silent. A forward recomputed inside
    the backward (non-reentrant checkpointing) is kept no longer than that backward."""
    model, shape = models()["mlp"]
    acc = FisherAccumulator(model)
    batches = [(torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))) for _ in range(3)]
    losses = [F.cross_entropy(model(x), y) for x, y in batches]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loss in losses:
            loss.backward()
    said = [str(w.message) for w in caught if "whose input was dropped" in str(w.message)]
    assert len(said) == 1 and acc.num_examples == 2 * shape[0]
    acc.detach()
    acc = FisherAccumulator(model)
    x, y = batches[0]
    hidden = torch.utils.checkpoint.checkpoint(model[0], x.requires_grad_(), use_reentrant=False)
    F.cross_entropy(model[2](torch.tanh(hidden)), y).backward()
    assert not acc._pending and acc.num_examples == shape[0]


def test_an_unbatched_input_of_a_linear_is_one_example():
    model, _ = models()["mlp"]
    x, y = torch.randn(5, dtype=torch.float64), torch.tensor(2)
    acc = FisherAccumulator(model)
    F.cross_entropy(model(x), y).backward()
    got = summed_curvature(acc, model)
    acc.detach()
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), grad in zip(model.named_parameters(), grads):
        torch.testing.assert_close(got[name], grad.square(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_every_layer_checkpointed_is_one_backward_pass(use_reentrant):
    """Every layer inside checkpointed segments, one of them in two: a reentrant checkpoint's
    gradients come in tasks of their own, which read as two backward passes (under a pruner,
    gradient accumulation's A = 2: x4); its layer used in two segments is said."""
    torch.manual_seed(0)
    shared, second, head = nn.Linear(5, 5).double(), nn.Linear(5, 5).double(), nn.Linear(5, 3).double()
    model = nn.ModuleList([shared, second, head])

    def logits(x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(shared(t)), x, use_reentrant=use_reentrant)
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(shared(second(t))), h, use_reentrant=use_reentrant)
        return torch.utils.checkpoint.checkpoint(head, h, use_reentrant=use_reentrant)

    x, y = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (6,))
    acc = FisherAccumulator(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(logits(x), y).backward()
    said = [str(w.message) for w in caught if "two segments of a reentrant checkpoint" in str(w.message)]
    got, passes = summed_curvature(acc, model), acc.backward_passes
    acc.detach()
    expected = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    def plain(x):   # (the same function, without checkpoints: a reentrant one refuses autograd.grad)
        return head(torch.tanh(shared(second(torch.tanh(shared(x))))))

    for n in range(6):
        grads = torch.autograd.grad(F.cross_entropy(plain(x[n:n + 1]), y[n:n + 1]), list(model.parameters()))
        for (name, _), grad in zip(model.named_parameters(), grads):
            expected[name] += grad.square()
    assert passes == 1
    assert len(said) == (1 if use_reentrant else 0) and (not said or said[0].startswith("FisherAccumulator (ef-exact): 0 "))
    for name in expected:   # (the layer in both reentrant segments: each use's squares apart, as said)
        if not (use_reentrant and name.startswith("0.")):
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-14)


def test_an_fgsm_step_through_a_checkpoint_is_no_training_pass():
    """The attack's backward recomputes the checkpointed segment, which put it on record: it
    counted as a backward pass (a micro-batch of the step under a pruner: x4)."""
    model, shape = models()["mlp"]
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    acc = FisherAccumulator(model)

    def logits(t):
        return model[2](torch.utils.checkpoint.checkpoint(lambda u: torch.tanh(model[0](u)), t, use_reentrant=False))

    attacked = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(F.cross_entropy(logits(attacked), y), attacked)
    assert acc.backward_passes == 0
    F.cross_entropy(logits((x + 0.1 * gradient.sign()).detach()), y).backward()
    assert acc.backward_passes == 1 and acc.num_examples == shape[0]
