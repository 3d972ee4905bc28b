"""sparsify / densify on whole models: every model sparsify accepts keeps working (attention,
tied weights, shared modules, exclusions), an optimizer built before sparsify goes on training
the sparse values (as the dense model would with the pruned weights held at zero), reduced
precision and autocast, torch.export with a dynamic batch, densify as the inverse."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mackay_ext
from mackay_ext import models
from mackay_ext.sparse import (SparseConv2d, SparseLinear, densify, load_compressed, save_compressed,
                               sparsify)


def prune_(model, density, seed=0, types=(nn.Linear, nn.Conv2d)):
    """Zero all but a random `density` of the weights of every layer of `types`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, types):
                module.weight.mul_(torch.rand(module.weight.shape, generator=generator) < density)
    return model


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]


def sparsify_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsify(*args, **kwargs)
    return [str(w.message) for w in caught if "sparsify" in str(w.message)]


# ------------------------------------------------------------------ models that keep working

class Encoder(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 40, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_keeps_working(batch_first):
    """MultiheadAttention reads out_proj.weight, and the encoder's fast path (eval, batch_first)
    linear1/2.weight: those stay dense, named in the warning; the head is sparse."""
    model = prune_(Encoder(batch_first).double(), 0.3)
    dense = copy.deepcopy(model)
    messages = sparsify_warnings(model)
    assert isinstance(model.head, SparseLinear) and len(sparse_layers(model)) == 1
    assert len(messages) == 1
    for i in range(2):
        for name, reader in (("self_attn.out_proj", "MultiheadAttention"),
                             ("linear1", "TransformerEncoderLayer"), ("linear2", "TransformerEncoderLayer")):
            assert f"encoder.layers.{i}.{name} ({reader} " in messages[0]
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    for mode in (True, False):  # train mode (slow path) and eval (fast path when batch_first)
        model.train(mode), dense.train(mode)
        torch.testing.assert_close(model(x), dense(x), rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense(x), rtol=1e-12, atol=1e-12)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.hidden = nn.Linear(12, 12)
        self.out = nn.Linear(12, 50, bias=False)
        self.out.weight = self.embed.weight  # tied

    def forward(self, tokens):
        return self.out(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_stay_tied():
    model = TiedLM()
    with torch.no_grad():
        model.embed.weight.mul_(torch.rand(50, 12) < 0.1)
        model.hidden.weight.mul_(torch.rand(12, 12) < 0.2)
    tokens = torch.randint(0, 50, (4, 9))
    expected = model(tokens)
    messages = sparsify_warnings(model)
    assert isinstance(model.out, nn.Linear) and model.out.weight is model.embed.weight
    assert isinstance(model.hidden, SparseLinear)
    assert len(messages) == 1 and "out (its weight is tied to another module" in messages[0]
    torch.testing.assert_close(model(tokens), expected)


def test_shared_module_converted_once():
    shared = prune_(nn.Linear(10, 10), 0.2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(4, 10)
    expected = model(x)
    sparsify(model)
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]
    torch.testing.assert_close(model(x), expected)


class ReadsWeight(nn.Module):
    """A user module that reads a child's weight itself (as attention blocks do)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(x, self.proj.weight) * 2


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x).relu()


def test_every_skip_is_named_with_its_reason():
    hooked = nn.Linear(8, 8)
    hooked.register_forward_hook(lambda module, args, output: None)
    model = nn.Sequential(ReadsWeight(), nn.Conv2d(4, 4, 3, groups=2), OwnForward(8, 8), hooked,
                          nn.Linear(8, 8), nn.Linear(8, 8))
    prune_(model, 0.1)
    with torch.no_grad():
        model[5].weight.fill_(1.0)  # dense: not sparse enough, so not mentioned
    messages = sparsify_warnings(model)
    assert len(messages) == 1
    for expected in ("0.proj (ReadsWeight (0) reads proj.weight directly)", "1 (a grouped",
                     "2 (OwnForward has its own forward", "3 (it has hooks"):
        assert expected in messages[0]
    assert "5 (" not in messages[0] and "4 (" not in messages[0]
    assert isinstance(model[4], SparseLinear) and isinstance(model[5], nn.Linear)


def test_package_curvature_hooks_do_not_block():
    """A model copied in the middle of exact-curvature pruning carries the accumulator's hooks:
    they belong to the dense layers and go with them; the copy still converts, quietly."""
    from mackay_ext.curvature import FisherAccumulator
    model = prune_(MLP(), 0.1)
    accumulator = FisherAccumulator(model, mode="ef-exact")
    assert model[0]._forward_hooks
    copied = copy.deepcopy(model)
    assert sparsify_warnings(copied) == [] and len(sparse_layers(copied)) == 3
    del accumulator


def test_exclude_by_name_and_predicate():
    def build():
        return prune_(nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), nn.Linear(6, 6)), 0.2)
    model = sparsify(build(), exclude="0")  # a name excludes everything inside it
    assert [type(m) for m in (model[0][0], model[0][1], model[1])] == [nn.Linear, nn.Linear, SparseLinear]
    model = sparsify(build(), exclude=["0.1", lambda name, module: name == "1"])
    assert [type(m) for m in (model[0][0], model[0][1], model[1])] == [SparseLinear, nn.Linear, nn.Linear]
    assert sparsify_warnings(build(), exclude=["0.0", "0.1", "1"]) == []  # on request: no warning
    with pytest.raises(ValueError, match=r"exclude names modules the model does not have: \['0.2'\]"):
        sparsify(build(), exclude=["0.2"])
    with pytest.raises(TypeError, match="exclude must hold module names"):
        sparsify(build(), exclude=[3])


# --------------------------------------------------------- the optimizer goes on training

class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(13, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 3))


def masks_of(model):
    return {name: p != 0 for name, p in model.named_parameters() if name.endswith("weight")}


def train(model, optimizer, steps, seed, masks=None):
    """`steps` steps of mean-squared error on random data; with `masks`, the dense model's
    pruned weights are held at zero (their gradients masked)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(11, 13, generator=generator, dtype=torch.float64)
        target = torch.randn(11, 3, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        if masks:
            for name, p in model.named_parameters():
                if name in masks:
                    p.grad.mul_(masks[name])
        optimizer.step()


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5),
    "mackay-adam": lambda params: mackay_ext.MacKayAdam(params, lr=1e-2, num_data=100, batch_size=11),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_goes_on_training_the_sparse_values(name):
    """Dense model with pruned weights held at zero, trained; a copy is sparsified with the
    optimizer; both go on training: the sparse values follow the dense kept weights exactly."""
    torch.manual_seed(0)
    dense = prune_(MLP().double(), 0.15)
    sparse = copy.deepcopy(dense)
    masks = masks_of(dense)
    optimizer, sparse_optimizer = OPTIMIZERS[name](dense.parameters()), OPTIMIZERS[name](sparse.parameters())
    if name == "mackay-adam":
        for model, opt in ((dense, optimizer), (sparse, sparse_optimizer)):
            for layer in (model[0], model[2], model[4]):  # per weight: +inf where pruned
                alpha = opt.ard_state(layer.weight)["alpha"]
                alpha.copy_(torch.where(layer.weight != 0, 3.0, math.inf))
        masks = None  # alpha = +inf holds them at zero
    train(dense, optimizer, 3, seed=1, masks=masks)  # both alike, up to the sparsify
    train(sparse, sparse_optimizer, 3, seed=1, masks=masks)
    sparsify(sparse, sparse_optimizer)
    assert len(sparse_layers(sparse)) == 3
    sparse_params = {id(p) for group in sparse_optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in sparse.parameters()} == sparse_params
    before = [layer.values.detach().clone() for layer in sparse_layers(sparse)]
    train(dense, optimizer, 4, seed=2, masks=masks)
    train(sparse, sparse_optimizer, 4, seed=2)
    for layer, old, index in zip(sparse_layers(sparse), before, (0, 2, 4)):
        assert not torch.equal(layer.values, old)
        torch.testing.assert_close(layer.dense_weight(), dense[index].weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.bias, dense[index].bias, rtol=1e-12, atol=1e-12)
        assert layer.bias is not None and any(layer.bias is p for p in sparse_optimizer.param_groups[0]["params"])


def test_group_alpha_is_gathered_for_the_values():
    """MacKayAdam's alpha per input neuron ((1, in), +inf = pruned column) becomes one alpha
    per kept value; the pruned columns are not stored."""
    model = nn.Sequential(nn.Linear(9, 5))
    optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-3, num_data=10)
    alpha = torch.arange(1.0, 10.0).reshape(1, 9)
    alpha[0, [1, 4]] = math.inf
    optimizer.ard_state(model[0].weight)["alpha"] = alpha
    with torch.no_grad():
        model[0].weight[:, [1, 4]] = 0   # as a pruning update leaves them (else kept: test_sparse)
    sparsify(model, optimizer, min_sparsity=0.2)
    layer = model[0]
    state = optimizer.state[layer.values]
    assert layer.nnz == 35 and state["alpha"].shape == (35,) and state["alpha"].dtype == torch.float32
    cols = layer.col_indices.long()
    torch.testing.assert_close(state["alpha"], alpha[0, cols])
    assert state["exp_avg"].shape == (35,)


def test_optimizer_state_that_cannot_be_carried():
    model = prune_(MLP(), 0.1)
    optimizer = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match="LBFGS is not one number per weight"):
        sparsify(model, optimizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.state[model[2].weight]["odd"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"sparsify \(2\): optimizer state 'odd' has shape \(7,\)"):
        sparsify(model, optimizer)
    assert not sparse_layers(model)  # checked before anything changed
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        sparsify(model, {"lr": 0.1})


@pytest.mark.parametrize("optimizer_kind", ["Adam", "MacKayAdam"])
def test_converting_without_the_pruners_optimizer_is_said_at_its_next_step(optimizer_kind):
    """A new user fine-tuned after sparsify(model): the optimizer went on stepping the old dense
    weights, the sparse layers' values stayed as converted, with no word."""
    torch.manual_seed(0)
    model = prune_(MLP().double(), 0.1)
    if optimizer_kind == "Adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = mackay_ext.MacKayPruner(model, optimizer, num_data=100, batch_size=11)
    else:
        optimizer = mackay_ext.MacKayAdam(mackay_ext.ard_param_groups(model), lr=1e-2, num_data=100, batch_size=11)
        pruner = mackay_ext.MacKayPruner(model, optimizer, num_data=100)
    sparsify(model)
    with pytest.warns(RuntimeWarning, match=r"stepped after sparsify replaced 0, 2, 4 without it: .*sparsify\(model, optimizer\)"):
        train(model, optimizer, 1, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, 1, seed=2)   # said once
    densify(model)
    pruner.detach()   # a detached pruner says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, 1, seed=3)


def test_an_optimizer_of_another_model_is_refused_before_anything_changes():
    model = prune_(MLP(), 0.1)
    with pytest.raises(ValueError, match="sparsify: the optimizer holds none of this model's parameters"):
        sparsify(model, torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1))
    assert not sparse_layers(model)
    sparsify(model)
    with pytest.raises(ValueError, match="densify: the optimizer holds none of this model's parameters"):
        densify(model, torch.optim.SGD(MLP().parameters(), lr=0.1))
    assert len(sparse_layers(model)) == 3


def test_a_frozen_part_converts_with_the_optimizer_of_the_rest():
    """sparsify(frozen_part, optimizer) where the optimizer trains the rest of the model: nothing
    to rebind, as before the optimizer check (which refused it)."""
    frozen, rest = prune_(MLP(), 0.1), nn.Linear(4, 4)
    frozen.requires_grad_(False)
    sparsify(frozen, torch.optim.SGD(rest.parameters(), lr=0.1))
    assert len(sparse_layers(frozen)) == 3


# ------------------------------------------------------------------- densify

def test_densify_inverts_sparsify():
    torch.manual_seed(0)
    model = prune_(models.create("lenet-5-caffe"), 0.05)
    x = torch.randn(3, 1, 28, 28)
    expected = model(x)
    reference = copy.deepcopy(model)
    sparsify(model)
    assert len(sparse_layers(model)) == 4
    biases = [layer.bias for layer in sparse_layers(model)]
    assert densify(model) is model
    assert not sparse_layers(model)
    assert not any(type(m).__module__.startswith("mackay_ext.sparse") for m in model.modules())
    assert [type(m) for m in model if isinstance(m, (nn.Linear, nn.Conv2d))] == [nn.Conv2d, nn.Conv2d, nn.Linear, nn.Linear]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    for (key, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), key
    assert [m.bias for m in model if isinstance(m, (nn.Linear, nn.Conv2d))] == biases
    with pytest.raises(ValueError, match="the model itself is a sparse layer"):
        densify(SparseLinear.from_dense(prune_(nn.Linear(4, 4), 0.5)))


def test_densify_rebinds_the_optimizer():
    model = nn.Sequential(nn.Linear(9, 5))
    optimizer = mackay_ext.MacKayAdam(model.parameters(), lr=1e-3, num_data=10)
    alpha = torch.full((5, 9), 2.0)
    alpha[:, :4] = math.inf
    optimizer.ard_state(model[0].weight)["alpha"] = alpha
    optimizer.ard_state(model[0].weight)["exp_avg"].fill_(0.5)
    with torch.no_grad():
        model[0].weight[:, :4] = 0   # as a pruning update leaves them
    sparsify(model, optimizer, min_sparsity=0.4)
    assert isinstance(model[0], SparseLinear) and optimizer.state[model[0].values]["exp_avg"].shape == (25,)
    densify(model, optimizer)
    weight = model[0].weight
    assert isinstance(model[0], nn.Linear) and optimizer.param_groups[0]["params"][0] is weight
    state = optimizer.state[weight]
    assert torch.equal(state["alpha"], alpha)  # +inf again where nothing was stored
    assert torch.equal(state["exp_avg"], torch.where(alpha.isinf(), 0.0, 0.5))
    model(torch.randn(2, 9)).sum().backward()
    optimizer.step()
    assert torch.all(weight[:, :4] == 0) and torch.all(weight[:, 4:] != 0)


# ------------------------------------------------------------ precision, export, files

@pytest.mark.parametrize("path", ["csr", "dense"])
def test_autocast_bfloat16_through_a_sparse_layer(path):
    dense = prune_(nn.Linear(64, 24), 0.05)
    layer = SparseLinear.from_dense(dense, path=path)
    x = torch.randn(10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = F.linear(x.bfloat16().double(), dense.weight.bfloat16().double(), dense.bias.bfloat16().double())
    torch.testing.assert_close(y.double(), reference, rtol=1.6e-2, atol=1.6e-2)
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and layer.values.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sparsified_model_in_half_precision(dtype):
    model = prune_(models.create("lenet-300-100"), 0.02)
    x = torch.randn(5, 1, 28, 28)
    reference = model.double()(x.double())
    sparsify(model)
    model.to(dtype)
    y = model(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference, rtol=5e-2, atol=5e-2)


def lenet_300_100_sparse():
    """LeNet-300-100 at about 1.25% kept overall (per layer 1%, 3%, 20%)."""
    torch.manual_seed(0)
    model = models.create("lenet-300-100")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer, density in zip((model[1], model[3], model[5]), (0.01, 0.03, 0.2)):
            layer.weight.mul_(torch.rand(layer.weight.shape, generator=generator) < density)
    return model


def test_export_with_a_dynamic_batch(tmp_path):
    """Each layer's path is fixed when built, so one exported program serves batch 1 and 300."""
    from torch.export import Dim, export
    model = sparsify(lenet_300_100_sparse()).eval()
    assert [layer.path for layer in sparse_layers(model)] == ["csr", "dense", "dense"]
    x = torch.randn(300, 1, 28, 28)
    program = export(model, (x[:2],), dynamic_shapes=({0: Dim("batch", min=1, max=4096)},))
    for batch in (1, 300):
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x[:batch]), model(x[:batch]), rtol=1e-6, atol=1e-6)
    # files and state_dict round-trip; training still moves the values of both paths
    sizes = save_compressed(model, str(tmp_path / "m.pt"), model_name="lenet-300-100")
    assert sizes["bytes"] * 20 < sizes["dense_bytes"]
    loaded = load_compressed(str(tmp_path / "m.pt")).eval()
    assert [layer.path for layer in sparse_layers(loaded)] == ["csr", "dense", "dense"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    again = sparsify(lenet_300_100_sparse())
    again.load_state_dict(model.state_dict())
    before = [layer.values.detach().clone() for layer in sparse_layers(again)]
    optimizer = torch.optim.SGD(again.parameters(), lr=0.1)
    F.cross_entropy(again(x[:16]), torch.arange(16) % 10).backward()
    optimizer.step()
    again.eval()
    for layer, old in zip(sparse_layers(again), before):
        assert not torch.equal(layer.values, old)
    with torch.no_grad():  # the dense path's cached weight follows the step
        expected = lenet_300_100_sparse()
        for index, layer in zip((1, 3, 5), sparse_layers(again)):
            expected[index].weight.copy_(layer.dense_weight())
            expected[index].bias.copy_(layer.bias)
        torch.testing.assert_close(again(x), expected(x), rtol=1e-5, atol=1e-5)


def test_save_compressed_does_not_send_to_sparsify_the_layers_it_leaves_dense(tmp_path):
    """A depthwise conv and a tied Linear, 90% zeros: sparsify names them as left dense, and
    save_compressed told the user to call sparsify for them."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(self.dw(x).mean((2, 3))))
    model = Net()
    with torch.no_grad():
        for weight in (model.dw.weight, model.a.weight):
            weight.view(-1)[: int(0.9 * weight.numel())] = 0
    with pytest.warns(UserWarning, match="sparsify: left dense, though sparse enough: .*dw"):
        sparsify(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_compressed(model, tmp_path / "model.pt")


def test_pruned_parameters_a_forward_uses_itself_are_named_as_left_dense():
    """A hand-written LoRA adapter (A, B as Parameters) pruned by a pruner: sparsify said nothing of
    them, or named the frozen base as 'the sparsest' at 0%."""
    class LoRALinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(8, 8).requires_grad_(False)
            self.lora_A, self.lora_B = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(8, 2))

        def forward(self, x):
            return self.base(x) + x @ self.lora_A.t() @ self.lora_B.t()
    model = nn.Sequential(LoRALinear())
    with torch.no_grad():
        model[0].lora_B[:6] = 0
    with pytest.warns(UserWarning, match=r"left dense, though sparse enough: 0.lora_B \(a parameter LoRALinear's "
                                         r"forward uses itself: no sparse form; 12 of 16 weights zero\)") as said:
        sparsify(model)
    assert not [w for w in said if "the sparsest" in str(w.message)]
