"""Models for the experiments: the seed paper's CIFAR ResNet18 and a small CNN for CPU studies.

Both take float N×C×H×W batches (normalised, see :mod:`isample.experiments.augment`) and
return N×num_classes logits. Use :func:`build_model` to pick one by name.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODELS", "BasicBlock", "ResNet", "SmallCNN", "build_model", "resnet18", "small_cnn"]

#: Names accepted by :func:`build_model`.
MODELS = ("resnet18", "small_cnn")


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or 1×1 conv-BN) shortcut; ReLU after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # No conv biases: each conv feeds a BatchNorm, whose shift makes a bias redundant.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3×3 stride-1 stem, no max-pool, four stages, global average pool."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for s in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # Global average pooling: any input size ≥ 8×8 works (32×32 gives 4×4 here).
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """The standard CIFAR ResNet18 used by the seed paper (He et al. 2016, CIFAR variant).

    3×3 conv stem with stride 1 and no max-pool, BasicBlocks [2, 2, 2, 2] with 64-128-256-512
    channels (stride 2 at the start of stages 2-4, 1×1 conv shortcuts there), global average
    pooling and a linear head. Parameters: 11,173,962 for 10 classes and 3 input channels
    (11,220,132 for 100 classes; 11,172,810 for 10 classes and 1 channel).
    """
    _check_sizes(num_classes, in_channels)
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


class SmallCNN(nn.Module):
    """Two conv(3×3)-BN-ReLU-maxpool(2) blocks (32, 64 channels), a 128-unit ReLU layer, a head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4 (two 2×2 poolings), got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4  # each max-pool floors: 28 -> 14 -> 7, 32 -> 16 -> 8
        self.image_size = image_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"SmallCNN was built for {self.image_size}×{self.image_size} images, got "
                f"{x.shape[-2]}×{x.shape[-1]}"
            )
        return self.classifier(self.features(x))


def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> SmallCNN:
    """A small CNN for CPU-sized studies on the MNISTs (conv 32, conv 64, hidden 128).

    Parameters: 421,738 for 10 classes, 1 channel, 28×28 (Fashion-MNIST); 545,194 for
    10 classes, 3 channels, 32×32. Most of them are in the 64·7·7 → 128 hidden layer.
    """
    _check_sizes(num_classes, in_channels)
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The model called ``name`` (one of :data:`MODELS`) for C classes and C_in×S×S images.

    ``resnet18`` ignores ``image_size`` (global average pooling); ``small_cnn`` needs it for
    its hidden layer's width.
    """
    key = name.lower().replace("-", "_")
    if key == "resnet18":
        return resnet18(num_classes=num_classes, in_channels=in_channels)
    if key == "small_cnn":
        return small_cnn(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def _check_sizes(num_classes: int, in_channels: int) -> None:
    if num_classes < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}"
        )
