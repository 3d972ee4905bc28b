"""Networks of the source paper's experiments and the usual compression benchmarks."""
from __future__ import annotations

import torch
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
    """The VGG-like CIFAR-10 net of the paper's experiments (Zagoruyko's "cifar.torch"): 13 conv
    3x3 layers with batch norm, max pooling after each block, then fc 512 -> 512 -> 10."""

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


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:  # option B: 1x1 projection
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for CIFAR (He et al. 2016, section 4.2): depth 6n + 2, widths 16/32/64."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


MODELS = {
    "digits-mlp": DigitsMLP,
    "lenet-300-100": LeNet300100,
    "lenet-5-caffe": LeNet5Caffe,
    "vgg-like": VGGLike,
    "resnet-20": lambda num_classes=10: CifarResNet(20, num_classes),
    "resnet-56": lambda num_classes=10: CifarResNet(56, num_classes),
}
DEFAULT_DATASET = {"digits-mlp": "digits", "lenet-300-100": "mnist", "lenet-5-caffe": "mnist",
                   "vgg-like": "cifar10", "resnet-20": "cifar10", "resnet-56": "cifar10"}


def create(name: str, num_classes: int = 10) -> nn.Module:
    """A model by name: one of MODELS."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    return MODELS[name](num_classes=num_classes)
