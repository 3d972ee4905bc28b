"""Networks of the source paper's experiments and the usual compression benchmarks.

The CIFAR networks follow the source paper's public code (codes-kzhan/MacKayARDNetworkCompression_PyTorch,
vgg/ and resnet/): VGG "D6" and "G5" (Table 4) and ResNet-20/56/110 with zero-padding shortcuts
(Table 6). All take any number of input channels (32x32 images) and classes.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn


class DigitsMLP(nn.Sequential):
    """Small MLP for scikit-learn's 8x8 digits: 64 -> 100 -> 100 -> 10."""

    def __init__(self, num_classes: int = 10, hidden: int = 100):
        super().__init__(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, num_classes))


class LeNet300100(nn.Sequential):
    """LeNet-300-100 (LeCun et al. 1998): 784 -> 300 -> 100 -> 10, 266,610 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))


class LeNet5Caffe(nn.Sequential):
    """LeNet-5 as in Caffe's MNIST example: conv 20 (5x5), pool, conv 50 (5x5), pool,
    fc 800 -> 500, fc 500 -> 10; 431,080 parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, num_classes))


class VGGLike(nn.Sequential):
    """The VGG-like CIFAR-10 net of Zagoruyko's "cifar.torch": 13 conv 3x3 layers with batch norm,
    max pooling after each block, then fc 512 -> 512 -> 10 with dropout and batch norm. (The
    source paper's own version of it, without dropout and classifier batch norm, is VGG "D6".)"""

    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        layers: list[nn.Module] = []
        channels = in_channels
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        layers += [nn.Flatten(), nn.Dropout(0.5), nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                   nn.Dropout(0.5), nn.Linear(512, num_classes)]
        super().__init__(*layers)


def _check_sizes(where: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


# -- VGG nets of the paper's Table 4 -----------------------------------------------------------
# Channel widths of the 3x3 conv layers; "M": 2x2 max pooling, "A": 2x2 average pooling.
VGG_CONFIGS = {
    # Zagoruyko's cifar.torch VGG-16: 13 convs, five max pools (32x32 -> 1x1).
    "D6": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    # 16 convs (VGG-19's layout); the last pool averages, leaving one 512-vector for a single Linear.
    "G5": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "A"),
}
# Hidden widths of the classifier after the 512 features: D6 512 -> 512 -> classes, G5 512 -> classes.
VGG_HIDDEN = {"D6": (512,), "G5": ()}


class PaperVGG(nn.Module):
    """VGG of the source paper's CIFAR experiments (Table 4): every conv is 3x3 (padding 1, with
    bias) -> BatchNorm -> ReLU; the classifier is Linear/ReLU layers without dropout or batch norm,
    as in the paper's code. Weights He-normal (fan in), biases zero.

    config: "D6" (13 convs, classifier 512-512-classes, 14,977,728 conv and Linear weights for 10
    classes) or "G5" (16 convs, classifier 512-classes, 20,024,000). Input (N, in_channels, 32, 32),
    output (N, num_classes)."""

    def __init__(self, config: str = "D6", num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ValueError(f"PaperVGG: config must be one of {tuple(VGG_CONFIGS)}, got {config!r}")
        _check_sizes("PaperVGG", num_classes=num_classes, in_channels=in_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG_CONFIGS[config]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            elif item == "A":
                layers.append(nn.AvgPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        for width in VGG_HIDDEN[config]:
            head += [nn.Linear(channels, width), nn.ReLU()]
            channels = width
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)
        self.config = config
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_d6(num_classes: int = 10, in_channels: int = 3) -> PaperVGG:
    """VGG "D6" (Zagoruyko's cifar.torch VGG-16 with BatchNorm, classifier 512-512-classes)."""
    return PaperVGG("D6", num_classes, in_channels)


def vgg_g5(num_classes: int = 10, in_channels: int = 3) -> PaperVGG:
    """VGG "G5" (16 convs with BatchNorm, average pool, classifier 512-classes)."""
    return PaperVGG("G5", num_classes, in_channels)


# -- CIFAR ResNets of the paper's Table 6 --------------------------------------------------------
class ZeroPadShortcut(nn.Module):
    """He et al. 2016's option-A shortcut: the identity, subsampled by `stride`, with the new
    channels filled with zeros (half before, half after the old ones). No parameters, so the
    residual stream's channels are the identity's and a block's inner channels are its own."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: out_channels ({out_channels}) must be at least "
                             f"in_channels ({in_channels}); zero padding cannot drop channels")
        self.stride = stride
        self.front = (out_channels - in_channels) // 2
        self.back = out_channels - in_channels - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.front, self.back))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3x3 convs without bias.

    conv1 makes the block's inner channels, read only by conv2: the source paper puts ARD on it
    alone (paper_ard_layers), so a pruned filter removes a channel without touching the residual
    stream. shortcut: "A" zero padding (the paper's), "B" a 1x1 conv + BatchNorm projection."""

    def __init__(self, in_channels: int, channels: int, stride: int, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = ZeroPadShortcut(in_channels, channels, stride) if shortcut == "A" else \
                nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for CIFAR (He et al. 2016, section 4.2): depth 6n + 2, a 3x3 stem of 16 channels, three
    stages of n basic blocks at widths 16/32/64 (stride 2 entering stages 2 and 3), global average
    pooling, Linear 64 -> classes. Weights He-normal (fan in), as in the paper's code.

    Parameters with option A: 269,722 (ResNet-20), 853,018 (ResNet-56), 1,730,714 (ResNet-110).
    Module names (conv1, bn1, layer1.0.conv1, ..., linear) are those of the widely used CIFAR
    ResNet checkpoints the paper starts from, so their state_dicts load without renaming.
    Input (N, in_channels, H, W), output (N, num_classes)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CifarResNet: shortcut must be 'A' (zero padding) or 'B' (projection), "
                             f"got {shortcut!r}")
        _check_sizes("CifarResNet", num_classes=num_classes, in_channels=in_channels)
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        channels = 16
        for stage, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1, shortcut))
                channels = width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def paper_ard_layers(model: nn.Module, include_stem: bool = False) -> list[str]:
    """Names of the layers that carry ARD in the source paper's ResNet experiments: the first conv
    of every residual block (its filters are the block's inner channels, removable without
    touching the residual stream), in model order; pass as MacKayPruner(layers=...).
    A pruned filter's channel still carries its BatchNorm shift, a constant that shrink cannot
    fold past the next conv's zero padding: the Trainer zeroes such channels before its fine-tune
    (mackay_ext.dead_channels.cut_dead_channels, for a loop of your own), and shrink then removes
    them.

    include_stem: also the stem conv, as the paper's code does (it wraps the stem in its ARD conv
    too). A pruned stem filter still feeds the residual stream the constant its BatchNorm adds, so
    it is zeroed, not removable; off by default.
    Works on any model holding CifarResNets (names carry their prefix). Raises ValueError for a
    model without one: in the paper's VGG and LeNet experiments every conv and Linear carries
    ARD, which is MacKayPruner's default (layers=None).
    """
    names: list[str] = []
    for prefix, net in model.named_modules():
        if not isinstance(net, CifarResNet):
            continue
        dot = f"{prefix}." if prefix else ""
        if include_stem:
            names.append(f"{dot}conv1")
        names += [f"{dot}{name}.conv1" for name, block in net.named_modules() if isinstance(block, BasicBlock)]
    if not names:
        raise ValueError(f"paper_ard_layers: {type(model).__name__} holds no CifarResNet, so it has no "
                         "residual blocks to name; for the paper's VGG and LeNet protocol every conv "
                         "and Linear layer carries ARD: leave MacKayPruner(layers=None)")
    return names


MODELS = {
    "digits-mlp": DigitsMLP,
    "lenet-300-100": LeNet300100,
    "lenet-5-caffe": LeNet5Caffe,
    "vgg-like": VGGLike,
    "vgg-d6": vgg_d6,
    "vgg-g5": vgg_g5,
    "resnet-20": functools.partial(CifarResNet, 20),
    "resnet-56": functools.partial(CifarResNet, 56),
    "resnet-110": functools.partial(CifarResNet, 110),
}
DEFAULT_DATASET = {"digits-mlp": "digits", "lenet-300-100": "mnist", "lenet-5-caffe": "mnist",
                   "vgg-like": "cifar10", "vgg-d6": "cifar10", "vgg-g5": "cifar10",
                   "resnet-20": "cifar10", "resnet-56": "cifar10", "resnet-110": "cifar10"}


def create(name: str, num_classes: int = 10, in_channels: int | None = None) -> nn.Module:
    """A model by name: one of MODELS. in_channels: image channels (the CIFAR networks take any
    number, e.g. 1 for MNIST padded to 32x32); None keeps the model's own."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"create: {arg} must be a positive int, got {value!r}")
    if in_channels is None:
        return MODELS[name](num_classes=num_classes)
    if "in_channels" not in inspect.signature(MODELS[name]).parameters:
        takes = tuple(n for n, f in MODELS.items() if "in_channels" in inspect.signature(f).parameters)
        raise ValueError(f"create: {name} has a fixed input and takes no in_channels; models that "
                         f"do: {takes}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
