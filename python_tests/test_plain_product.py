"""A layer subclass with a forward of its own under the exact estimators: refused at its first
captured forward when its output does not depend on its weight through the layer's plain product
(a transformed weight, a padded input), let through with no word when it does (a plain wrapper, an
added branch that does not read the weight), its curvature then equal to a float64 reference."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from conftest import DEVICES

from mackay_ext.curvature import FisherAccumulator


class StandardizedConv(nn.Conv2d):   # timm's StdConv2d, the weight-standardized conv of BiT
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class HalfWeightLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 0.5 * self.weight, self.bias)


class PaddedSameConv(nn.Conv2d):   # timm's Conv2dSame: TF "SAME" padding, asymmetric, in forward
    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WrappedLinear(nn.Linear):   # timm's Linear: the same product, its own forward
    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


class LowRankBranchConv1d(nn.Conv1d):   # an added branch that does not read the weight (LoRA-like)
    def __init__(self, *args, rank=2, **kwargs):
        super().__init__(*args, **kwargs)
        self.down = nn.Parameter(torch.randn(rank, self.in_channels) / 4)
        self.up = nn.Parameter(torch.randn(self.out_channels, rank) / 4)

    def forward(self, x, scale=1.0):
        branch = torch.einsum("or,ri,nil->nol", self.up, self.down, x[..., : self.conv_out(x)])
        return super().forward(x) + scale * branch

    def conv_out(self, x):
        return x.shape[-1] - self.kernel_size[0] + 1


class DropConnectLinear(nn.Linear):   # draws random numbers in forward: the check must not move them
    def forward(self, x):
        return F.linear(x, F.dropout(self.weight, 0.0, self.training) * 1.0, self.bias) + 0 * torch.rand(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["ef-exact", "fisher-mc"])
@pytest.mark.parametrize("layer, why", [
    (StandardizedConv(3, 4, 3, padding=1), "changes with its weight unlike the plain product"),
    (PaddedSameConv(3, 4, 3, stride=2), r"has shape \(5, 4, 3, 3\) where the plain product of its input gives"),
])
def test_a_transformed_weight_or_input_is_refused_at_the_first_forward(mode, layer, why, device):
    """A new user's StdConv2d read a curvature 5-200x too small under one construction-time
    warning; Conv2dSame failed inside loss.backward()."""
    model = nn.Sequential(copy.deepcopy(layer), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          HalfWeightLinear(4, 3)).to(device)
    accumulator = FisherAccumulator(model, mode=mode)
    x = torch.randn(5, 3, 6, 6, device=device)
    with pytest.raises(RuntimeError, match=rf"0 \({type(layer).__name__}\) is a subclass whose forward does not "
                                           rf"use its weight as nn.Conv2d does: its output {why}.*ef-batch"):
        if mode == "ef-exact":
            with accumulator:
                model(x)
        else:
            with accumulator.capture_mc():
                model(x)
    # refused again at the next forward, and the Linear behind it too once the conv is left out
    with pytest.raises(RuntimeError, match=r"0 \("), accumulator.capture_mc() if mode == "fisher-mc" \
            else accumulator:
        model(x)
    accumulator.detach()
    rest = FisherAccumulator(model, mode="ef-exact", modules=["4"])
    with pytest.raises(RuntimeError, match=r"4 \(HalfWeightLinear\).*changes with its weight.*off by 0\.5 of"), rest:
        model(x)


def reference_squares(model, x, y):
    """Per-example squared gradients, averaged over the batch, in float64 (torch.func)."""
    model = copy.deepcopy(model).double().cpu()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = x.cpu(), y.cpu()

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])
    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)
    return {k: (g ** 2).mean(0) for k, g in grads.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_a_plain_product_with_an_own_forward_is_served_with_no_word(device):
    """timm's Linear drew the old warning too (users learned to ignore it); a branch added beside
    the product, keyword arguments to the forward included, leaves the weight's gradient that of
    the plain product: the curvature equals the float64 reference, and nothing is said."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = LowRankBranchConv1d(3, 4, 3), WrappedLinear(4 * 6, 5)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x, scale=0.5)).flatten(1))
    model = Net().double().to(device)
    x = torch.randn(7, 3, 8, dtype=torch.float64, device=device)
    y = torch.randint(0, 5, (7,), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulator = FisherAccumulator(model)
        with accumulator:
            F.cross_entropy(model(x), y).backward()
    expected = reference_squares(model, x, y)
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"):
        got = accumulator.curvature(dict(model.named_parameters())[name])
        torch.testing.assert_close(got.cpu(), expected[name], rtol=1e-9, atol=1e-12)


def test_the_check_leaves_the_random_streams_and_the_training_as_they_were():
    """The check runs the layer's forward once more: one that draws random numbers must leave
    the run's random state where the run without the accumulator leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(DropConnectLinear(4, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(6, 4)
    torch.manual_seed(1)
    with FisherAccumulator(model):
        out = model(x)
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.testing.assert_close(twin(x), out, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)


class CastingLinear(nn.Linear):   # modded-nanogpt's CastedLinear: the weight cast to the input's dtype
    def forward(self, x):
        return F.linear(x, self.weight.type_as(x), self.bias.type_as(x))


class FloatHeadLinear(nn.Linear):   # a float32 head under autocast: autocast off, the input upcast
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


class KeepsItsOutput(nn.Linear):   # its output kept for an auxiliary loss, its calls counted
    calls = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = []

    def forward(self, x):
        self.last_out = out = super().forward(x)
        self.kept.append(out)
        self.calls += 1
        return out


@pytest.mark.parametrize("case", ["cast weight, bfloat16 input", "float32 head under autocast", "kept output"])
def test_casts_autocast_and_kept_outputs_pass_the_check_unchanged(case):
    """A review's cases: the check formed the plain product from the raw input and a direction in
    the weight's dtype (a dtype error inside the forward hook), judged an autocast run at float32's
    tolerance (a false refusal), and left its own forward's attributes on the module (the kept
    output then carried no gradient for the user's auxiliary loss)."""
    torch.manual_seed(0)
    layer = {"cast weight, bfloat16 input": CastingLinear, "float32 head under autocast": FloatHeadLinear,
             "kept output": KeepsItsOutput}[case](6, 3)
    model = nn.Sequential(nn.Linear(4, 6), layer)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accumulator = FisherAccumulator(model)
        with accumulator:
            if case == "cast weight, bfloat16 input":
                logits = layer(model[0](x).bfloat16()).float()
            elif case == "float32 head under autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(x)
            else:
                logits = model(x)
                logits = logits + 0.1 * layer.last_out.square()   # the auxiliary term
            F.cross_entropy(logits, y).backward()
    assert accumulator.counts[layer.weight] == 5
    if case == "kept output":
        assert layer.calls == 1 and layer.last_out.requires_grad and len(layer.kept) == 1


def test_a_layer_only_ever_run_compiled_is_said_when_its_curvature_is_read():
    """Inside a torch.compile'd forward the check cannot run: a 0.5 * weight Linear ran with no
    word (the construction-time warning it replaced had said something)."""
    torch._dynamo.reset()
    model = nn.Sequential(HalfWeightLinear(8, 4))
    accumulator = FisherAccumulator(model)
    compiled = torch.compile(model, backend="eager")
    with accumulator:
        F.cross_entropy(compiled(torch.randn(5, 8)), torch.randint(0, 4, (5,))).backward()
    with pytest.warns(UserWarning, match=r"0 \(HalfWeightLinear\) .* all ran under torch.compile"):
        accumulator.curvature(model[0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once
        accumulator.curvature(model[0].weight)
    torch._dynamo.reset()


def test_a_layer_called_with_its_input_by_keyword_is_captured():
    """layer(input=x) raised IndexError in the forward hook (found in a review)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = WrappedLinear(4, 3)

        def forward(self, x):
            return self.fc(input=x)
    model = Net().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    accumulator = FisherAccumulator(model)
    with accumulator:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(accumulator.curvature(model.fc.weight), reference_squares(model, x, y)["fc.weight"],
                               rtol=1e-9, atol=1e-12)


def test_a_layer_called_without_its_input_tensor_first_is_named():
    """A first argument that is no tensor (a config dict) raised AttributeError in the hook."""
    class ConfigFirst(nn.Linear):
        def forward(self, config, x):
            return super().forward(x) * config["gain"]
    model = nn.Sequential(nn.Linear(3, 4))
    layer = ConfigFirst(4, 2)
    FisherAccumulator(nn.ModuleList([model, layer]))
    with pytest.raises(RuntimeError, match=r"1 \(ConfigFirst\) was called with a dict first, not its input tensor"):
        layer({"gain": 1.0}, model(torch.randn(2, 3)))


def test_an_empty_first_batch_leaves_the_check_to_the_next():
    model = nn.Sequential(HalfWeightLinear(3, 2))
    accumulator = FisherAccumulator(model)
    with accumulator:
        model(torch.randn(0, 3))
        with pytest.raises(RuntimeError, match="does not use its weight as nn.Linear"):
            model(torch.randn(2, 3))
