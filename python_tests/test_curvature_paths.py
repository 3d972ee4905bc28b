"""The faster routes of the exact curvature give the same numbers as the reference: conv layers'
squared per-example gradients by the fused kernel, by the batch-as-groups convolution backward
and by unfold + bmm, and
fisher-mc's backward to the layers' outputs (no parameter gradients) against vmap(grad) on the
labels it sampled."""

import pytest
import torch
from conftest import DEVICES
from test_curvature import check_against_reference
from torch import nn
from torch.func import functional_call, grad, vmap

from mackay_ext import conv_curvature
from mackay_ext.curvature import FisherAccumulator


class ReusedConv(nn.Module):
    """One Conv1d applied twice: its per-example gradients add up before squaring."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1))


CONV_MODELS = {   # name -> (model, input shape of one batch)
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 4, 3)),
             (9, 2, 7, 6)),
    "conv-strided": (lambda: nn.Sequential(nn.Conv2d(2, 4, (3, 2), stride=2, padding=1), nn.Tanh(),
                                           nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), (9, 2, 7, 6)),
    "conv-dilated": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2, bias=False),
                                           nn.Flatten(), nn.Linear(3 * 7 * 6, 3)), (9, 2, 7, 6)),
    "conv-grouped": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(),
                                           nn.Conv2d(6, 6, 3, stride=2, groups=6), nn.Flatten(),
                                           nn.Linear(6 * 3 * 2, 3)), (9, 4, 7, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=2, dilation=2), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(5 * 6, 3)), (9, 3, 11)),
    "conv1d-reused": (ReusedConv, (9, 4, 6)),
}
# route -> (fused kernel on, smallest input channels per group of the convolution-backward route,
#           most positions the fused kernel takes from a layer of that many channels)
ROUTES = {"fused": (True, 0, 1 << 30), "conv-backward": (False, 0, 0), "unfold": (False, 1 << 30, 0)}


def take_route(monkeypatch, route):
    fused, min_channels, max_positions = ROUTES[route]
    monkeypatch.setattr(conv_curvature, "FUSED_CONV", fused)
    monkeypatch.setattr(conv_curvature, "CONV_BACKWARD_MIN_CHANNELS", min_channels)
    monkeypatch.setattr(conv_curvature, "FUSED_MAX_POSITIONS", max_positions)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("name", list(CONV_MODELS))
def test_conv_routes_match_vmap(device, route, name, monkeypatch):
    take_route(monkeypatch, route)
    torch.manual_seed(0)
    factory, shape = CONV_MODELS[name]
    check_against_reference(factory(), torch.randn(shape), torch.randint(0, 3, (shape[0],)), "mean",
                            "ext", device)


@pytest.mark.parametrize("route", list(ROUTES))
def test_conv_routes_chunk_the_batch(route, monkeypatch):
    """Per-example gradients held in chunks smaller than the batch: the sums still add up."""
    take_route(monkeypatch, route)
    monkeypatch.setattr(conv_curvature, "CHUNK_BYTES", 4 * 8 * 6 * 4 * 9)   # 4 examples of the conv
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 5 * 4, 3))
    check_against_reference(model, torch.randn(11, 4, 7, 6), torch.randint(0, 3, (11,)), "sum", "ext", "cpu")


class InPlaceHead(nn.Module):
    """A Linear whose output an in-place activation overwrites: the tensor its hook sits on is
    then no longer the one the loss sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 5 * 4, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(torch.relu_(self.fc(torch.tanh(self.conv(x)).flatten(1))))


MC_MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 4)),
    "conv": lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 4, 4)),
    "in-place": InPlaceHead,
}


@pytest.mark.parametrize("name", list(MC_MODELS))
def test_fisher_mc_is_the_squared_gradient_of_its_sampled_labels(name):
    """accumulate_mc, exactly: the per-example squared gradients of -log p(y_n | x_n) for the
    labels y_n it drew (drawn again here from the same generator state), and no .grad or
    parameter gradient computed where only the layers' output gradients are needed."""
    torch.manual_seed(0)
    model = MC_MODELS[name]().double()
    x = torch.randn(8, 7, dtype=torch.float64) if name == "mlp" else torch.randn(8, 2, 7, 6, dtype=torch.float64)
    acc = FisherAccumulator(model, mode="fisher-mc")
    weight_grads = []
    for param in model.parameters():
        param.register_hook(lambda g: weight_grads.append(g))
    torch.manual_seed(1)
    acc.accumulate_mc(x)
    torch.manual_seed(1)
    with torch.no_grad():
        labels = torch.multinomial(torch.softmax(model(x).float(), 1), 1).squeeze(1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_example = vmap(grad(lambda p, xi, yi: nn.functional.cross_entropy(
        functional_call(model, p, (xi[None],)), yi[None], reduction="sum")), in_dims=(None, 0, 0))(params, x, labels)
    for name_, param in model.named_parameters():
        assert param.grad is None
        torch.testing.assert_close(acc.curvature(param), (per_example[name_] ** 2).mean(0), rtol=1e-9, atol=1e-12)
    # the in-place model cannot differentiate to its layers' outputs: it falls back to the params
    assert bool(weight_grads) == (name == "in-place")


@pytest.mark.parametrize("shape", [(6, 4, 7), (5, 2, 3, 7), (4, 0, 7)], ids=["sequence", "4-d", "no-positions"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_a_linear_on_positions_takes_the_fused_kernel_and_agrees_with_torch_func(monkeypatch, shape, contiguous):
    """A Linear on [N, ..., in] inputs (a transformer's feed-forward layers): each example's
    gradient sums its positions', squared by the fused conv kernel as a kernel-1 convolution."""
    from mackay_ext import _extension
    if not _extension.is_loaded():
        pytest.skip("the compiled extension is not loaded")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    if not contiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    target = torch.randn(*shape[:-1], 3, dtype=torch.float64)
    served = []
    real = FisherAccumulator._accumulate_sequence_fused
    monkeypatch.setattr(FisherAccumulator, "_accumulate_sequence_fused",
                        lambda self, *args: (served.append(1), real(self, *args))[1])
    accumulator = FisherAccumulator(model, loss_reduction="sum")
    with accumulator:
        ((model(x) - target) ** 2).sum().backward()
    assert len(served) == 2
    params = {name: p.detach() for name, p in model.named_parameters()}
    per_example = vmap(grad(lambda p, xi, ti: ((functional_call(model, p, (xi[None],)) - ti[None]) ** 2).sum()),
                       in_dims=(None, 0, 0))(params, x, target)
    for name, param in model.named_parameters():
        torch.testing.assert_close(accumulator.sums[param], (per_example[name] ** 2).sum(0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_seq_first_transformer_layer_reads_its_examples_along_dim_1(batch_first):
    """nn.TransformerEncoderLayer(batch_first=False), torch's default: its feed-forward layers get
    [T, N, d], whose rows are positions (read as examples, linear2's bias read 0.04x, linear1's
    weight 1.36x, no word). Against a float64 per-example loop; an unbatched [T, d] input too."""
    import torch.nn.functional as F
    from mackay_ext.curvature import FisherAccumulator
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).double()
    head = nn.Linear(8, 3).double()
    model = nn.ModuleDict({"encoder": layer, "head": head})

    def logits(x):   # x: [N, T, d]
        hidden = layer(x) if batch_first else layer(x.transpose(0, 1)).transpose(0, 1)
        return head(hidden.mean(1))

    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    acc = FisherAccumulator(model)
    F.cross_entropy(logits(x), y).backward()
    single = torch.randn(5, 8, dtype=torch.float64)   # unbatched: one example
    F.cross_entropy(head(layer(single).mean(0)), y[0]).backward()
    got = {name: acc.curvature(param) * acc.counts[param] for name, param in model.named_parameters()
           if acc.saw(param)}
    acc.detach()
    assert {"encoder.linear1.weight", "encoder.linear2.bias", "head.weight"} <= set(got)
    for name, param in model.named_parameters():
        if name not in got:
            continue
        expected = torch.zeros_like(param)
        for n in range(4):
            (grad,) = torch.autograd.grad(F.cross_entropy(logits(x[n:n + 1]), y[n:n + 1]), param)
            expected += grad.square()
        (grad,) = torch.autograd.grad(F.cross_entropy(head(layer(single).mean(0)), y[0]), param)
        torch.testing.assert_close(got[name], expected + grad.square(), rtol=1e-9, atol=1e-14)


def test_a_reentrant_checkpoint_around_a_seq_first_feed_forward_block():
    """The recompute runs outside the layer's call, where its layout is not noted: read as the
    layer is built (read as rows, linear2's bias 0.11x)."""
    import torch.nn.functional as F
    from mackay_ext.curvature import FisherAccumulator

    class Checkpointed(nn.TransformerEncoderLayer):
        def _ff_block(self, x):
            return torch.utils.checkpoint.checkpoint(super()._ff_block, x, use_reentrant=True)

    torch.manual_seed(0)
    layer, head = Checkpointed(8, 2, 16, dropout=0.0).double(), nn.Linear(8, 3).double()
    model = nn.ModuleDict({"layer": layer, "head": head})
    x, y = torch.randn(5, 4, 8, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (4,))   # [T, N, d]
    acc = FisherAccumulator(model)
    F.cross_entropy(head(layer(x).mean(0)), y).backward()
    got = {name: acc.curvature(param) * acc.counts[param] for name, param in model.named_parameters()
           if acc.saw(param)}
    acc.detach()
    plain = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).double()
    plain.load_state_dict(layer.state_dict())
    for name in ("layer.linear1.weight", "layer.linear2.bias"):
        param = dict(plain.named_parameters())[name.split(".", 1)[1]]
        expected = torch.zeros_like(param)
        for n in range(4):
            (grad,) = torch.autograd.grad(F.cross_entropy(head(plain(x[:, n:n + 1]).mean(0)), y[n:n + 1]), param)
            expected += grad.square()
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=1e-14)
