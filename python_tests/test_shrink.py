"""Physical shrinking (mackay_ext.shrink) of pruned coupled groups, end to end on the issue's seven
test models (random init, small inputs): zero a random third of the groups, shrink, and check
fewer parameters, outputs equal to the pruned model's (float64, relative 1e-10), torch.export with
a dynamic batch, and ONNX (dynamo exporter) in onnxruntime."""
import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mackay_ext.coupling import CouplingError, channel_groups
from mackay_ext.shrink import shrink


# -- the test models -----------------------------------------------------------------------
class BlockA(nn.Module):
    """CIFAR ResNet basic block with the zero-padding (option A) shortcut of He et al. 2016."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def shortcut(self, x):
        if self.pad is None:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    def __init__(self, widths=(4, 8, 12), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BlockA(cin, w, 1 if i == 0 else 2), BlockA(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12 * 4 * 4, 20), nn.ReLU(), nn.Dropout(), nn.Linear(20, 10))


def build(name):
    torch.manual_seed(0)
    image = (torch.randn(2, 3, 32, 32),)
    if name == "resnet18":
        return pytest.importorskip("torchvision").models.resnet18(num_classes=10), image
    if name == "mobilenet_v2":
        return pytest.importorskip("torchvision").models.mobilenet_v2(num_classes=10, width_mult=0.25), image
    if name == "cifar_resnet_a":
        return CifarResNetA(), (torch.randn(2, 3, 16, 16),)
    if name == "vgg_bn":
        return vgg_bn(), (torch.randn(2, 3, 16, 16),)
    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), (torch.randn(2, 5, 16),)
    if name == "vit_tiny":
        timm = pytest.importorskip("timm")
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                                 num_classes=10), image
    if name == "bert":
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=24,
                                         max_position_embeddings=16, num_labels=3)
        return transformers.BertForSequenceClassification(config), (torch.randint(0, 50, (2, 7)),)
    if name == "gpt2":   # transformers' Conv1D projections ((in, out) weights, addmm)
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                         num_labels=3, pad_token_id=0, use_cache=False)
        return transformers.GPT2ForSequenceClassification(config), (torch.randint(1, 50, (2, 7)),)
    raise KeyError(name)


MODELS = ["resnet18", "mobilenet_v2", "cifar_resnet_a", "vgg_bn", "transformer_encoder", "vit_tiny", "bert", "gpt2"]


def logits(model, inputs):
    out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out


def to_double(model, inputs):
    return model.double().eval(), tuple(t.double() if t.is_floating_point() else t for t in inputs)


def zero_random_groups(model, inputs, share=3, seed=0):
    groups = channel_groups(model, inputs)
    rng = random.Random(seed)
    chosen = rng.sample(groups, len(groups) // share)
    heads = [g for g in groups if g.kind == "head"]
    chosen += [g for g in heads[:1] if g not in chosen]   # every attention model loses a head
    for g in chosen:
        g.zero_(model)
    return chosen


def assert_equal_outputs(expected, got, rtol=1e-10):
    assert got.shape == expected.shape
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= rtol * scale, (got - expected).abs().max().item() / scale


# -- end to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_shrink_end_to_end(name):
    model, inputs = to_double(*build(name))
    chosen = zero_random_groups(model, inputs)
    pruned = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = logits(model, inputs)
    small, report = shrink(model, inputs, report=True)

    assert len(report.removed) + len(report.kept_zero) == len(chosen)
    assert report.params_after == sum(p.numel() for p in small.parameters()) < report.params_before
    assert report.macs_after < report.macs_before
    assert sum(p.numel() for p in model.parameters()) == report.params_before   # input model untouched
    assert all(type(m).__module__.split(".")[0] != "mackay_ext" for m in small.modules())
    with torch.no_grad():
        assert_equal_outputs(expected, logits(small, inputs))
    assert all(torch.equal(p, pruned[n]) for n, p in model.named_parameters())   # shrink made a copy

    assert_exports(small, inputs)


def assert_exports(small, inputs):
    """torch.export with a dynamic batch serves another batch size with the same program; ONNX
    through the dynamo exporter runs in onnxruntime (float32: what a deployment runs)."""
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = tuple({0: batch} for _ in inputs)
    program = torch.export.export(small, inputs, dynamic_shapes=dynamic)
    three = tuple(torch.cat([t, t[:1]]) for t in inputs)
    with torch.no_grad():
        assert_equal_outputs(logits(small, three), logits(program.module(), three))

    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    small32 = copy.deepcopy(small).float()
    three32 = tuple(t.float() if t.is_floating_point() else t for t in three)
    inputs32 = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    onnx_program = torch.onnx.export(small32, inputs32, dynamo=True, dynamic_shapes=dynamic, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), three32)}
    with torch.no_grad():
        assert_equal_outputs(logits(small32, three32), torch.from_numpy(session.run(None, feeds)[0]), rtol=1e-4)


def test_unpruned_model_shrinks_to_an_equal_model():
    model, inputs = to_double(vgg_bn(), (torch.randn(3, 3, 16, 16),))
    small, report = shrink(model, inputs, report=True)
    assert report.removed == [] and report.params_after == report.params_before
    assert [p.shape for p in small.parameters()] == [p.shape for p in model.parameters()]
    with torch.no_grad():
        assert torch.equal(model(*inputs), small(*inputs))
    assert small is not model


class ConvBnConv(nn.Module):
    def __init__(self, affine=True, widths=(8, 12)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0], affine=affine)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
        self.fc = nn.Linear(widths[1], 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean(dim=(2, 3)))


def trained_like(model):
    """Running statistics that are not 0/1, so BatchNorm of a zero filter is a real constant."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def test_batchnorm_without_affine_zero_filter_is_a_constant_and_still_exact():
    model, inputs = to_double(trained_like(ConvBnConv(affine=False)), (torch.randn(2, 3, 6, 5),))
    group = channel_groups(model, inputs)[2]        # conv1 filter 2 => conv2 input channel 2
    group.zero_(model)
    with torch.no_grad():
        constant = model.bn1(model.conv1(inputs[0]))[:, 2]
    assert constant.abs().min() > 0                 # the channel is not zero, only ignored
    with torch.no_grad():
        expected = model(*inputs)
        small = shrink(model, inputs)
        assert_equal_outputs(expected, small(*inputs))
    assert small.conv1.out_channels == small.bn1.num_features == small.conv2.in_channels == 7
    assert small.bn1.running_mean.shape == (7,)


def test_round_to_keeps_channel_counts_a_multiple():
    model, inputs = to_double(trained_like(ConvBnConv()), (torch.randn(2, 3, 5, 5),))
    groups = channel_groups(model, inputs)
    for g in groups[:5] + groups[8:15]:             # conv1: 8 -> 3 kept, conv2: 12 -> 5 kept
        g.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, round_to=4, report=True)
    assert (small.conv1.out_channels, small.conv2.out_channels) == (4, 8)
    assert len(report.removed) == 4 + 4
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
    assert shrink(model, inputs, round_to=1).conv1.out_channels == 3
    with pytest.raises(ValueError, match="round_to must be a positive int"):
        shrink(model, inputs, round_to=0)


def test_round_to_on_a_residual_network():
    """Residual-stream groups span several layers: giving one back for one layer changes what
    the others remove (this used to raise IndexError)."""
    import mackay_ext
    torch.manual_seed(0)
    model = mackay_ext.models.create("resnet-20").double().eval()
    inputs = (torch.randn(2, 3, 16, 16, dtype=torch.float64),)
    zero_random_groups(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
        small = shrink(model, inputs, round_to=8)
        assert_equal_outputs(expected, small(*inputs))
    for module in small.modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels % 8 == 0


class SeparableGroupNormNet(nn.Module):
    """Depthwise-separable residual blocks with GroupNorm: a normalisation group's channels share
    statistics, so they are coupled into one group and leave together."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, c, 1)
        self.gn = nn.GroupNorm(4, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + torch.relu(self.gn(self.pw(self.dw(h))))
        return self.head(h.mean((2, 3)))


def test_whole_groupnorm_groups_are_removed():
    torch.manual_seed(0)
    model, inputs = to_double(SeparableGroupNormNet(), (torch.randn(2, 3, 6, 6),))
    groups = channel_groups(model, inputs)
    assert len(groups) == 4 and all(len(g.members[0].indices) == 4 for g in groups)
    groups[1].zero_(model)
    groups[3].zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
        small, report = shrink(model, inputs, report=True)
        assert_equal_outputs(expected, small(*inputs))
    assert (small.gn.num_groups, small.gn.num_channels, small.stem.out_channels) == (2, 8, 8)
    assert len(report.removed) == 2 and not report.kept_zero


def test_refuses_to_remove_every_channel_of_a_layer():
    model, inputs = to_double(ConvBnConv(), (torch.randn(1, 3, 4, 4),))
    for g in channel_groups(model, inputs)[:8]:
        g.zero_(model)
    with pytest.raises(ValueError, match="every channel of layer 'conv1'"):
        shrink(model, inputs)


def test_attention_heads_of_multihead_attention_stay_with_a_reason():
    model, inputs = to_double(*build("transformer_encoder"))
    head = [g for g in channel_groups(model, inputs) if g.kind == "head"][1]
    head.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert report.removed == [] and len(report.kept_zero) == 1
    assert "nn.MultiheadAttention" in report.kept_zero[0][1]
    assert f"(zero groups kept: {report.kept_zero[0][1]} (1))" in str(report)   # the summary says why
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


@pytest.mark.parametrize("name, path, attr, cut", [
    ("vit_tiny", "blocks.0.attn", "num_heads", 2),
    ("bert", "bert.encoder.layer.0.attention.self", "num_attention_heads", 2),
    # GPT-2 splits one c_attn output into q, k and v at split_size (shrink re-sizes it)
    ("gpt2", "transformer.h.0.attn", "num_heads", 1)])
def test_timm_and_hf_attention_lose_heads(name, path, attr, cut):
    model, inputs = to_double(*build(name))
    heads = [g for g in channel_groups(model, inputs) if g.kind == "head" and g.module == path]
    for g in heads[:cut]:
        g.zero_(model)
    with torch.no_grad():
        expected = logits(model, inputs)
    small = shrink(model, inputs)
    assert getattr(small.get_submodule(path), attr) == len(heads) - cut
    longer = tuple(torch.cat([t, t[:, :3]], dim=1) if t.dim() == 2 and not t.is_floating_point() else t
                   for t in inputs)   # another sequence length: nothing was sized to the example
    with torch.no_grad():
        assert_equal_outputs(expected, logits(small, inputs))
        assert_equal_outputs(logits(model, longer), logits(small, longer))


def test_transformers_conv1d_units_nothing_reads_or_that_are_constant_go():
    """GPT-2's MLP is two transformers Conv1D layers ((in, out) weights): hidden units whose
    outgoing rows are pruned (unread) or whose incoming columns are (constant: gelu(bias) folded
    into c_proj's bias) were kept and counted nowhere, shrink knowing only nn.Linear's layout."""
    model, inputs = to_double(*build("gpt2"))
    mlp = model.transformer.h[1].mlp
    hidden = mlp.c_fc.weight.shape[1]
    with torch.no_grad():
        mlp.c_proj.weight[:5] = 0        # units 0-4: nothing reads them
        mlp.c_fc.weight[:, 10:13] = 0    # units 10-12: gelu(bias), whatever the input
        mlp.c_fc.bias.normal_()
        expected = logits(model, inputs)
    small, report = shrink(model, inputs, report=True)
    assert small.transformer.h[1].mlp.c_fc.nf == small.transformer.h[1].mlp.c_fc.weight.shape[1] == hidden - 8
    assert (len(report.unread), len(report.folded), report.kept_unused) == (5, 3, [])
    with torch.no_grad():
        assert_equal_outputs(expected, logits(small, inputs))


def test_forward_code_that_hard_codes_a_channel_count_is_refused():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(x.shape[0], 6, -1).mean(-1))

    model, inputs = to_double(Model(), (torch.randn(2, 3, 2, 3),))
    channel_groups(model, inputs)[1].zero_(model)
    with pytest.raises(CouplingError, match="hard-codes a channel count"):
        shrink(model, inputs)


def test_a_hard_coded_count_that_breaks_a_later_round_is_not_blamed_on_the_inputs():
    """The first round's cut leaves a model whose forward reshapes to a fixed channel split, so
    the second round cannot trace it: the error says so, not that example_inputs fail."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            h = F.relu(self.conv(x))
            return self.head(h.view(h.shape[0], 2, 4, *h.shape[2:]).sum(1).mean((2, 3)))

    model, inputs = to_double(Model(), (torch.randn(4, 3, 8, 8),))
    with torch.no_grad():
        model.conv.weight[[1, 5]] = 0
        model.conv.bias[[1, 5]] = 0
    with pytest.raises(CouplingError, match=r"^shrink: after round 1 cut channels, the smaller model no "
                                            r"longer runs .*hard-codes a channel count"):
        shrink(model, inputs)


def test_units_that_a_raw_parameter_makes_and_nothing_reads_are_reported_not_passed_over():
    """A hidden layer written as F.linear on the module's own Parameters: its units that the next
    Linear never reads cannot be cut (shrink does not know that module), and the report says so."""
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b = nn.Parameter(torch.randn(32, 20)), nn.Parameter(torch.zeros(32))
            self.out = nn.Linear(32, 5)

        def forward(self, x):
            return self.out(F.relu(F.linear(x, self.W, self.b)))

    model, inputs = to_double(Custom(), (torch.randn(4, 20),))
    with torch.no_grad():
        model.out.weight[:, :10] = 0
    small, report = shrink(model, inputs, report=True)
    assert report.removed == [] and len(report.kept_unused) == 10
    assert all("does not know what W (Custom) does with it" in reason for _, reason in report.kept_unused)
    assert "10 unread or constant groups kept" in str(report)


def test_units_a_tied_weight_makes_are_kept_with_the_tie_as_the_reason():
    """A Linear whose weight is tied to another module's: shrink cannot see the other use, and
    said it did "not know what a.weight (Linear) does", of a Linear. The reason is the tie; a
    constant unit (its rows pruned) is reported too, where it was passed over."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(torch.relu(self.a(h)) + torch.relu(self.b(h)) + self.c(h))

    model, inputs = to_double(Tied(), (torch.randn(4, 6),))
    with torch.no_grad():
        model.c.weight[:, 0] = 0     # hidden unit 0 of inp: c, the reader shrink knows, leaves it unread
        model.inp.weight[1] = 0      # hidden unit 1 of inp: constant
    _, report = shrink(model, inputs, report=True)
    reasons = [reason for _, reason in report.kept_unused]
    assert len(reasons) == 2 and all("a.weight is tied to another module" in r for r in reasons), reasons
    assert not any("does not know" in r for r in reasons)
    assert any("leave it unread" in r for r in reasons) and any("leave it constant" in r for r in reasons)


@pytest.mark.parametrize("padding", [0, 1])
def test_channels_a_grouped_conv_reads_go_when_unread_or_constant(padding):
    """A grouped conv reads column j of its weight from input channel j of every conv group
    (one coupled group): with that column pruned the channels are unread, with their makers'
    rows pruned they are constant, and both went unreported (shrink knew ungrouped convs only)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 16, 3), nn.ReLU(), nn.Conv1d(16, 8, 3, padding=padding, groups=4),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model, inputs = to_double(model, (torch.randn(5, 2, 12),))
    model(*inputs)   # the lazy layer takes its size
    with torch.no_grad():
        model[2].weight[:, 1] = 0                 # column 1: channels 1, 5, 9, 13 unread
        model[0].weight[[2, 6, 10, 14]] = 0       # column 2's channels: relu(bias), constant
        model[0].bias[[2, 6, 10, 14]] = torch.tensor([0.5, -0.3, 1.0, 0.2], dtype=torch.double)
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert len(report.unread) == 1
    if padding:   # the constant is read as zeros at the borders: kept, with the reason
        assert len(report.folded) == 0 and "pads with zeros" in report.kept_unused[0][1]
        assert small[2].in_channels == 12
    else:
        assert len(report.folded) == 1 and report.kept_unused == []
        assert small[2].in_channels == 8 and small[2].groups == 4
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


def test_the_report_leaves_a_training_model_s_batchnorm_statistics_alone():
    """report=True counts MACs with one forward of each model: in eval mode, so the caller's
    BatchNorm running statistics (and the copy's) do not move, and the training flags come back."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for layer in (net[0], net[1]):
            layer.weight[:3] = 0
            layer.bias[:3] = 0
    net, (x,) = to_double(net, (torch.randn(5, 3, 10, 10) * 3 + 1,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    small, report = shrink(net.train(), (x,), report=True)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and all(m.training for m in net.modules()) and report.removed
    with torch.no_grad():
        assert_equal_outputs(net.eval()(x), small.eval()(x))


def test_training_mode_is_kept():
    model = ConvBnConv().train()
    inputs = (torch.randn(2, 3, 4, 4),)
    channel_groups(model, inputs)[0].zero_(model)
    small = shrink(model, inputs)
    assert model.training and small.training and small.conv1.out_channels == 7


def test_memory_format_channels_last_kept_or_asked_for():
    model, inputs = to_double(trained_like(ConvBnConv()), (torch.randn(2, 3, 6, 6),))
    channel_groups(model, inputs)[3].zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    plain = shrink(model, inputs)
    assert plain.conv1.weight.is_contiguous() and plain.conv1.out_channels == 7
    asked = shrink(model, inputs, memory_format=torch.channels_last)
    assert not asked.conv1.weight.is_contiguous()
    assert asked.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    kept = shrink(copy.deepcopy(model).to(memory_format=torch.channels_last), inputs)
    assert kept.conv2.weight.is_contiguous(memory_format=torch.channels_last)   # the layout it came with
    assert not kept.conv2.weight.is_contiguous()
    with torch.no_grad():
        for small in (plain, asked, kept):
            assert_equal_outputs(expected, small(*inputs))
    assert_exports(asked, inputs)
    with pytest.raises(ValueError, match="memory_format must be None or a torch.memory_format"):
        shrink(model, inputs, memory_format="channels_last")


def _tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_tf32_flags_are_put_back_after_shrink_and_after_its_errors():
    """shrink turns TF32 off while it measures and checks (see the CUDA test below); what the
    user had set is back afterwards, also when shrink raises."""
    saved = _tf32_flags()
    try:
        for flags in ((True, False), (False, True)):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
            model, inputs = to_double(ConvBnConv(), (torch.randn(1, 3, 4, 4),))
            shrink(model, inputs)
            assert _tf32_flags() == flags
            for g in channel_groups(model, inputs)[:8]:
                g.zero_(model)
            with pytest.raises(ValueError, match="every channel"):
                shrink(model, inputs)
            assert _tf32_flags() == flags
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deep_float32_network_shrinks_on_cuda_with_tf32_on():
    """The first GPU run of bench/reproduce_cifar.py: cuDNN's TF32 default (on since Ampere) moved
    a pruned float32 ResNet-56's outputs by ~1e-3 against its shrunk copy, and shrink refused it
    as a wrong shrink. It measures and checks in full float32 now."""
    from mackay_ext import models
    from mackay_ext._float32 import full_float32

    saved = _tf32_flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        torch.manual_seed(0)
        model = trained_like(models.create("resnet-56", in_channels=1)).cuda().eval()
        inputs = (torch.randn(4, 1, 32, 32, device="cuda"),)
        chosen = zero_random_groups(model, inputs)
        small, report = shrink(model, inputs, report=True)
        assert _tf32_flags() == (True, True)
        assert report.params_after < report.params_before
        assert len(report.removed) + len(report.kept_zero) == len(chosen)
        with torch.no_grad(), full_float32():
            assert_equal_outputs(model(*inputs), small(*inputs), rtol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_sparsified_model_is_densified_on_a_copy_and_shrinks():
    """The README's storage recipe (sparsify, save_compressed, load_compressed, shrink) with a
    per-weight pruned model: its sparse layers are made dense on shrink's copy first."""
    from mackay_ext import densify, sparsify
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < 0.3)
        model[0].weight[:8] = 0   # eight units with no incoming weight: constant, folded away
    sparse = sparsify(copy.deepcopy(model))
    x = torch.randn(4, 20, dtype=torch.float64)
    small, report = shrink(sparse, (x,), report=True)
    expected_small, expected = shrink(densify(copy.deepcopy(sparse)), (x,), report=True)
    assert (report.params_before, report.params_after) == (expected.params_before, expected.params_after)
    assert report.params_after < report.params_before == sum(p.numel() for p in model.parameters())
    assert all(type(m).__module__.split(".")[0] != "mackay_ext" for m in small.modules())
    assert any(type(m).__name__ == "SparseLinear" for m in sparse.modules())   # the input is untouched
    with torch.no_grad():
        assert_equal_outputs(sparse(x), small(x))


def test_shrink_names_its_own_arguments():
    with pytest.raises(TypeError, match="shrink: model must be a torch.nn.Module, got str"):
        shrink("not a model", (torch.randn(1, 3),))


class ChannelShuffle(nn.Module):
    """torchvision's channel_shuffle between two convs: channel c of conv1 becomes channel
    (c % 4) * 2 + c // 4 of conv2's input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_a_channel_shuffle_keeps_its_channels_and_says_why():
    """Removing one shuffled channel would reorder the others (the view splits by the count), so
    its groups are zeroed exactly but kept by shrink, with the reason; shrink used to fail its
    own output check here."""
    model, x = ChannelShuffle().double().eval(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    groups = channel_groups(model, (x,))
    shuffled = [g for g in groups if any(m.name == "conv1.weight" for m in g.members)]
    assert len(shuffled) == 8 and all("channel shuffle" in g.fixed for g in shuffled)
    assert all(g.fixed is None for g in groups if g not in shuffled)
    for g in shuffled[1:7] + [g for g in groups if any(m.name == "conv2.weight" and m.dim == 0 for m in g.members)][:3]:
        g.zero_(model)
    with torch.no_grad():
        expected = model(x)
    small, report = shrink(model, (x,), report=True)
    assert len(report.kept_zero) == 6 and len(report.removed) == 3
    assert small.conv1.out_channels == 8 and small.conv2.out_channels == 5
    with torch.no_grad():
        assert_equal_outputs(expected, small(x))


def test_torchvision_shufflenet_shrinks_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, inputs = to_double(torchvision.models.shufflenet_v2_x0_5(num_classes=10), (torch.randn(2, 3, 64, 64),))
    chosen = zero_random_groups(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    small, report = shrink(model, inputs, report=True)
    assert len(report.removed) + len(report.kept_zero) == len(chosen)
    assert report.removed and report.params_after < report.params_before
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))


class NormWithoutTensors(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c1, self.norm, self.c2 = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.norm(self.c1(x))))


@pytest.mark.parametrize("norm, zeroed, kept", [
    (lambda: nn.GroupNorm(2, 8, affine=False), [0, 1, 2, 3], 4),   # a whole normalisation group
    (lambda: nn.BatchNorm2d(8, affine=False, track_running_stats=False), [1, 5], 6),
    (lambda: nn.InstanceNorm2d(8), [1, 5], 6),
], ids=["GroupNorm(affine=False)", "BatchNorm2d(no affine, no stats)", "InstanceNorm2d"])
def test_norms_holding_no_tensor_of_their_size_are_resized(norm, zeroed, kept):
    """No weight or running statistics says how many channels such a norm has now; shrink reads it
    from the norm's input in one forward (GroupNorm(affine=False) crashed, InstanceNorm kept a
    stale num_features and warned at every call)."""
    torch.manual_seed(0)
    model = NormWithoutTensors(norm()).eval()
    with torch.no_grad():
        model.c1.weight[zeroed] = 0
        model.c1.bias[zeroed] = 0
    small = shrink(model, torch.randn(2, 3, 6, 6))
    assert small.c2.in_channels == kept
    size = small.norm.num_channels if isinstance(small.norm, nn.GroupNorm) else small.norm.num_features
    assert size == kept
    if isinstance(small.norm, nn.GroupNorm):
        assert small.norm.num_groups == 1
    x = torch.randn(5, 3, 7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_report_says_its_macs_are_the_example_batch():
    """The MACs are of one forward on example_inputs, so 8 times one example's at batch 8; the
    report said only 'MACs' while everything else in the library counts per example."""
    from mackay_ext import count_macs, models
    net = models.create("lenet-300-100").eval()
    _, report = shrink(net, (torch.randn(8, 1, 28, 28),), report=True)
    assert report.batch == 8 and report.macs_before == 8 * count_macs(net, (torch.randn(1, 1, 28, 28),))
    assert "MACs (one forward on the example batch of 8) 2,129,600" in str(report)
    _, report = shrink(net, {"input": torch.randn(3, 1, 28, 28)}, report=True)
    assert report.batch == 3


@pytest.mark.parametrize("alias", [False, True])
def test_a_layer_under_two_names_shrinks_as_under_one(alias):
    """self.block2 = self.block: shrink took the module's second name for a tie to another module
    and kept every unread unit (1,443 parameters stayed 1,443; 17 without the alias)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.block, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
            if alias:
                self.block2 = self.block

        def forward(self, x):
            h = torch.relu(self.block(torch.relu(self.inp(x))))
            return self.out(torch.relu(self.block(h)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():   # what per-weight pruning leaves: one path of single weights
        for layer, keep in ((net.inp, [(27, 5)]), (net.block, [(21, 18)]), (net.out, [(1, 13), (2, 13)])):
            mask = torch.zeros_like(layer.weight, dtype=torch.bool)
            for i, j in keep:
                mask[i, j] = True
            layer.weight.mul_(mask)
    x = torch.randn(5, 8)
    small, report = shrink(net, (x,), report=True)
    assert report.params_after == 17 and not report.kept_unused
    # to rounding: the shrunk layers' GEMMs sum over fewer terms, in a CPU-dependent order
    torch.testing.assert_close(small(x), net(x), rtol=1e-6, atol=1e-7)
    assert (small.block is small.block2) if alias else not hasattr(small, "block2")


@pytest.mark.parametrize("with_norm", [False, True])
def test_a_channel_of_exact_zeros_goes_even_when_its_consumer_pads_with_zeros(with_norm):
    """A filter pruned whole outputs exactly 0 (bias 0, or a BatchNorm whose scale and shift are
    0): its contribution is 0 at the borders too, but shrink kept it whenever the next conv padded
    with zeros ('the constant's contribution is different at the borders'). A nonzero constant
    still stays there, with that reason."""
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(16)] if with_norm else []
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *norm, nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        net[0].weight[:6] = 0
        net[0].bias[:6] = 0
        if with_norm:
            net[1].running_mean.uniform_(-1, 1)
            net[1].weight[:6] = 0
            net[1].bias[:6] = 0
    x = torch.randn(2, 3, 16, 16)
    small, report = shrink(net, (x,), report=True)
    assert small[0].out_channels == 10 and not report.kept_unused
    torch.testing.assert_close(small(x), net(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        net[0].bias[0] = 0.5 if not with_norm else 0.0
        if with_norm:
            net[1].bias[0] = 0.5
    small, report = shrink(net, (x,), report=True)
    assert small[0].out_channels == 11
    assert any("pads with zeros" in reason for _, reason in report.kept_unused)


@pytest.mark.parametrize("name", ["transformer_encoder", "vit_tiny", "bert", "gpt2"])
def test_a_head_whose_output_columns_are_zero_is_removed_as_unread(name):
    """Per-input pruning of the attention's output projection (granularity='filter') leaves heads
    nothing reads while their q, k and v rows stay: shrink kept all of them and reported none
    (a tiny BERT with 3 of 4 heads unread kept 4). Such a head is unread, and goes where shrink
    can remove heads; where it cannot (nn.MultiheadAttention), it is kept with the reason."""
    from mackay_ext import shrink_constant
    model, inputs = to_double(*build(name))
    head = next(g for g in channel_groups(model, inputs) if g.kind == "head")
    with torch.no_grad():
        for path, member in shrink_constant.roles(model, head).consumers:
            weight = model.get_parameter(member.name)
            weight.index_fill_(member.dim, torch.tensor(member.indices), 0.0)
        expected = logits(model, inputs)
    small, report = shrink(model, inputs, report=True)
    with torch.no_grad():
        assert_equal_outputs(expected, logits(small, inputs))
    removed = [g for g in report.unread if g.kind == "head"]
    kept = [reason for g, reason in report.kept_unused if g.kind == "head"]
    if name == "transformer_encoder":
        assert not removed and "MultiheadAttention ties the width" in kept[0]
    else:
        assert len(removed) == 1 and not kept
        assert report.params_after < report.params_before


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_an_embedding_bag_loses_the_columns_of_its_pruned_channels(mode):
    """nn.EmbeddingBag stopped the trace (and granularity='channel', channel_groups) with a bare
    TypeError: its op returns four tensors. Its output channel d reads column d of the rows each
    bag picks, whatever the mode, so the channels are its columns, as for nn.Embedding."""
    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bags, self.head = nn.EmbeddingBag(20, 6, mode=mode), nn.Linear(6, 3)

        def forward(self, index, weights=None):
            return self.head(self.bags(index, per_sample_weights=weights))

    model, _ = to_double(Bags(), ())
    index = torch.randint(0, 20, (5, 4))
    inputs = (index, torch.rand(5, 4, dtype=torch.double)) if mode == "sum" else (index,)
    groups = [g for g in channel_groups(model, inputs) if any(m.name == "bags.weight" for m in g.members)]
    assert len(groups) == 6
    for g in groups[:2]:
        g.zero_(model)
    with torch.no_grad():
        expected = model(*inputs)
    small = shrink(model, inputs)
    assert small.bags.weight.shape == (20, 4) and small.bags.embedding_dim == 4
    with torch.no_grad():
        assert_equal_outputs(expected, small(*inputs))
