"""ef-exact's conv layers take their training weight gradient from the per-example products the
accumulator adds up (mackay_ext.conv_weight_grad): every gradient of the step equals plain
autograd's (float64), on odd geometries, for inputs that need a gradient or not; the fallbacks
(a module used twice, records that did not pair, paused capture, a second backward over one
graph, checkpointing) give the library's; what is not served keeps its own forward."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mackay_ext.curvature import FisherAccumulator

# name -> (module factory, input shape)
LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 5, 3), (6, 3, 9, 8)),
    "strided-padded-dilated": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
                               (5, 4, 11, 9)),
    "no-bias": (lambda: nn.Conv2d(2, 3, 5, bias=False), (4, 2, 12, 12)),
    "grouped": (lambda: nn.Conv2d(6, 4, 3, groups=2, padding=1), (3, 6, 7, 7)),
    "depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4), (3, 4, 6, 6)),
    "wide-many-positions": (lambda: nn.Conv2d(8, 4, 3, padding=1), (2, 8, 20, 20)),   # library route
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (5, 3, 13)),
}


def count_taken(monkeypatch):
    """How many backward calls took the accumulator's gradient (and how many found none)."""
    counts = {"taken": 0, "none": 0}
    take = FisherAccumulator.take_weight_grad

    def counting(self, module, x, grad_output):
        grad = take(self, module, x, grad_output)
        counts["taken" if grad is not None else "none"] += 1
        return grad
    monkeypatch.setattr(FisherAccumulator, "take_weight_grad", counting)
    return counts


def assert_same_grads(model, reference, rtol=1e-12, atol=1e-14):
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("input_needs_grad", [False, True])
@pytest.mark.parametrize("case", list(LAYERS))
def test_training_gradients_equal_autograd(case, input_needs_grad, monkeypatch):
    factory, shape = LAYERS[case]
    torch.manual_seed(0)
    model = nn.Sequential(factory(), nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    model(x)   # materialise the lazy layer
    reference = copy.deepcopy(model)
    counts = count_taken(monkeypatch)
    acc = FisherAccumulator(model)
    y = torch.randint(0, 3, (shape[0],))
    x_model, x_ref = x.clone().requires_grad_(input_needs_grad), x.clone().requires_grad_(input_needs_grad)
    F.cross_entropy(model(x_model), y).backward()
    F.cross_entropy(reference(x_ref), y).backward()
    assert_same_grads(model, reference)
    if input_needs_grad:
        torch.testing.assert_close(x_model.grad, x_ref.grad, rtol=1e-12, atol=1e-14)
    assert counts == {"taken": 1, "none": 0}
    assert acc.counts[model[0].weight] == shape[0]


def test_float32_network_and_inplace_relu(monkeypatch):
    """A conv followed by an in-place activation (the served output is a tensor of its own)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))
    reference = copy.deepcopy(model)
    counts = count_taken(monkeypatch)
    FisherAccumulator(model)
    x, y = torch.randn(16, 1, 24, 24), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    assert_same_grads(model, reference, rtol=1e-5, atol=1e-6)
    assert counts == {"taken": 2, "none": 0}


class LibraryConvBackwards(TorchDispatchMode):
    """The output masks of the library's convolution backwards run inside."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


def test_a_served_conv_asks_the_library_for_its_input_gradient_only():
    """With the weight's gradient served, the bias's is the output gradient's sum: asked for it,
    oneDNN runs its weight-gradient pass in full (as long as the served products took again on
    LeNet-5's second conv), so the library is asked for the input's gradient alone, or not at
    all; the gradients are autograd's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 10)).double()
    reference = copy.deepcopy(model)
    FisherAccumulator(model)
    x, y = torch.randn(8, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (8,))
    loss = F.cross_entropy(model(x), y)
    with LibraryConvBackwards() as library:
        loss.backward()
    F.cross_entropy(reference(x), y).backward()
    assert_same_grads(model, reference)
    assert library.masks == [[True, False, False]]   # the second conv's input; the first asks nothing


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.conv(x))).flatten(1))


def test_module_used_twice_gets_the_library_gradient(monkeypatch):
    torch.manual_seed(0)
    model = Twice().double()
    reference = copy.deepcopy(model)
    counts = count_taken(monkeypatch)
    FisherAccumulator(model)
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    assert_same_grads(model, reference)
    assert counts == {"taken": 0, "none": 2}


def test_forward_without_backward_paused_and_second_backward(monkeypatch):
    """Records that did not pair and a paused accumulator fall back to the library's weight
    gradient, which adds up as autograd's does; a second backward over one graph is refused
    before it changes any gradient (its squares would not be the sum's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    reference = copy.deepcopy(model)
    counts = count_taken(monkeypatch)
    acc = FisherAccumulator(model)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 2, (5,))
    model(x)                                    # a forward that gets no backward
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward reached 3 .Linear"):
        loss.backward()                         # the same graph again
    acc.paused = True
    F.cross_entropy(model(x), y).backward()
    for _ in range(2):
        F.cross_entropy(reference(x), y).backward()
    assert_same_grads(model, reference)
    assert counts["taken"] == 0 and counts["none"] == 1   # (the unpaired record; the paused forward ran the module's own)
    assert acc.counts[model[0].weight] == 5


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing(use_reentrant):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Tanh())
    model = nn.ModuleDict({"body": body, "head": nn.Linear(4 * 6 * 6, 3)}).double()
    reference = copy.deepcopy(model)
    FisherAccumulator(model)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64, requires_grad=use_reentrant), torch.randint(0, 3, (5,))
    hidden = torch.utils.checkpoint.checkpoint(model["body"], x, use_reentrant=use_reentrant)
    F.cross_entropy(model["head"](hidden.flatten(1)), y).backward()
    F.cross_entropy(reference["head"](reference["body"](x).flatten(1)), y).backward()
    assert_same_grads(model, reference)


def test_double_backward_is_refused_before_any_gradient():
    """A gradient penalty (create_graph=True) has per-example gradients the squares cannot give:
    refused at the first layer it reaches, and a paused accumulator's double backward is autograd's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    reference = copy.deepcopy(model)
    acc = FisherAccumulator(model)
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(RuntimeError, match="create_graph=True reached 3 .Linear.*curvature='ef-batch'"):
        torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()), create_graph=True)
    acc.paused = True
    for net in (model, reference):
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()), create_graph=True)
        sum(g.square().sum() for g in grads).backward()
    assert_same_grads(model, reference)
    assert not acc.saw(model[0].weight)


def test_hooks_of_the_users_on_the_conv_output(monkeypatch):
    """A forward hook that replaces the output, and a tensor hook that scales its gradient (as
    gradient reversal does): the weight gradient is what autograd gives, and the curvature is
    built from the gradient the layer's backward receives (hooks included)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.conv(x)
            h.register_hook(lambda g: g * 3)
            return self.head(torch.tanh(h).mean((2, 3)))

    model = Net().double()
    model.conv.register_forward_hook(lambda module, inputs, output: output * 2)
    reference = copy.deepcopy(model)
    counts = count_taken(monkeypatch)
    acc = FisherAccumulator(model, loss_reduction="sum")
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 2, (4,))
    F.cross_entropy(model(x), y, reduction="sum").backward()
    F.cross_entropy(reference(x), y, reduction="sum").backward()
    assert_same_grads(model, reference)
    assert counts == {"taken": 1, "none": 0}
    expected = torch.zeros_like(model.conv.weight)
    for n in range(4):   # per-example gradients of the same network, hooks and all
        example = copy.deepcopy(reference)
        example.zero_grad()
        F.cross_entropy(example(x[n:n + 1]), y[n:n + 1], reduction="sum").backward()
        expected += example.conv.weight.grad ** 2 / 4   # curvature(): the mean over examples
    torch.testing.assert_close(acc.curvature(model.conv.weight), expected, rtol=1e-10, atol=0)


def test_empty_batch_and_torch_func_transforms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double()
    reference = copy.deepcopy(model)
    acc = FisherAccumulator(model)
    empty = torch.randn(0, 3, 6, 6, dtype=torch.float64)
    model(empty).sum().backward()
    reference(empty).sum().backward()
    assert_same_grads(model, reference)
    assert acc.num_examples == 0
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.randint(0, 2, (3,))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xs, ys):
        return F.cross_entropy(torch.func.functional_call(model, p, (xs,)), ys)
    per_example = torch.func.vmap(torch.func.grad(lambda p, xi, yi: loss(p, xi[None], yi[None])),
                                  in_dims=(None, 0, 0))(params, x, y)
    torch.testing.assert_close(per_example["0.weight"].mean(0), torch.func.grad(loss)(params, x, y)["0.weight"])
    torch.func.jvp(model, (x,), (torch.ones_like(x),))
    assert acc.num_examples == 0   # nothing captured under the transforms


class OwnConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("layer", [
    OwnConv(2, 2, 3), nn.Conv2d(2, 2, 3, padding="same"), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    nn.Linear(3, 2)], ids=["subclass", "string-padding", "reflect-padding", "linear"])
def test_what_is_not_served_keeps_its_forward(layer):
    FisherAccumulator(nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)))
    assert "forward" not in vars(layer)


def test_fisher_mc_and_detach_leave_the_modules_forward():
    conv = nn.Conv2d(2, 2, 3)
    FisherAccumulator(nn.Sequential(conv, nn.Flatten()), mode="fisher-mc")
    assert "forward" not in vars(conv)
    acc = FisherAccumulator(nn.Sequential(conv))
    assert "forward" in vars(conv)
    acc.detach()
    assert "forward" not in vars(conv)


def test_unbatched_input_and_no_grad_run_the_modules_own_forward(monkeypatch):
    """An unbatched input (C, H, W) is one example, for the curvature too (it raised before)."""
    counts = count_taken(monkeypatch)
    conv = nn.Conv2d(2, 3, 3).double()
    reference = copy.deepcopy(conv)
    acc = FisherAccumulator(nn.Sequential(conv), loss_reduction="sum")
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    conv(x).sum().backward()
    reference(x).sum().backward()
    assert_same_grads(conv, reference)
    assert acc.counts[conv.weight] == 1
    torch.testing.assert_close(acc.curvature(conv.weight), reference.weight.grad ** 2, rtol=1e-12, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(conv(x[None]), reference(x[None]), rtol=0, atol=0)
    assert counts == {"taken": 0, "none": 0}
