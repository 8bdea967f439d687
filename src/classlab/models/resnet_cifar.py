"""The CIFAR ResNets of He et al. 2016 (section 4.2): depth 6n+2, 0.27M-1.7M parameters.

Option-A shortcuts (subsample + zero-padded channels) keep the parameter
counts of the paper's table 6; a projection shortcut would add parameters
the paper does not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet
from classlab.models.registry import Preset, register_model

PAPER_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: take every other pixel, pad the new channels with zeros."""

    def __init__(self, n_in: int, n_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = n_out - n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # Split the zero channels both sides, as the reference Torch code did.
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.shortcut = PadShortcut(n_in, n_out, stride) if stride > 1 or n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def he_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model(
    "resnet_cifar",
    presets={f"resnet{d}": Preset({"depth": d}, description=f"He et al.'s ResNet-{d} (Table 6)") for d in PAPER_DEPTHS},
    default_image_size=32,
    description="He et al. 2016 CIFAR ResNet, depth 6n+2",
)
def build_resnet_cifar(num_classes: int, in_chans: int, image_size: int, depth: int = 20) -> ClassifierNet:
    """Blocks are the 3n basic blocks across the three stages (16, 32, 64 channels)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"model.depth must be 6n+2 ({', '.join(map(str, PAPER_DEPTHS))}): got {depth!r}")
    n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    blocks = []
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(channels, width, stride))
            channels = width
    model = ClassifierNet(stem, nn.Sequential(*blocks), None, num_classes, in_chans=in_chans, image_size=image_size)
    he_init(model)
    return model
