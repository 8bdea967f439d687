"""Bottleneck ResNets with every architectural knob exposed, for parameter-budget work.

The ``stl10_2m`` preset is the STL-10 "2M parameter budget" model: a
bottleneck ResNet whose stage widths (30/60/96) were shrunk until the whole
network fits under 2,000,000 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from classlab.errors import ConfigError, did_you_mean
from classlab.models.net import ClassifierNet
from classlab.models.registry import Preset, register_model

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        hint = did_you_mean(name, ACTIVATIONS)
        raise ConfigError(f"model.activation {name!r} is not known{hint}: use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand, plus a shortcut."""

    def __init__(self, n_in: int, width: int, expansion: int, stride: int, activation: str) -> None:
        super().__init__()
        n_out = width * expansion
        self.conv1 = nn.Conv2d(n_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, n_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(n_out)
        self.act = make_activation(activation)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or n_in != n_out:
            # Projection only where the shape changes; identity elsewhere.
            self.downsample = nn.Sequential(nn.Conv2d(n_in, n_out, 1, stride=stride, bias=False), nn.BatchNorm2d(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + self.downsample(x))


STL10_2M = {
    "depths": [4, 9, 8],
    "widths": [30, 60, 96],
    "expansion": 4,
    "stem_width": 64,
    "stem_kernel": 4,
    "stem_stride": 1,
    "stem_pool": True,
    "activation": "leaky_relu",
    "zero_init_last_bn": False,
}


def _positive_ints(key: str, values: object) -> list[int]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"model.{key} must be a non-empty list of positive integers: got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"model.{key} must be a non-empty list of positive integers: got {values!r}")
    return list(values)


@register_model(
    "bottleneck_resnet",
    presets={
        "stl10_2m": Preset(
            STL10_2M, image_size=96, description="STL-10 under 2M params: stages [4, 9, 8], widths 30/60/96, LeakyReLU"
        )
    },
    default_image_size=96,
    description="bottleneck ResNet with configurable stem, stages, widths and activation",
)
def build_bottleneck_resnet(
    num_classes: int,
    in_chans: int,
    image_size: int,
    depths: list[int] | tuple[int, ...] = (4, 9, 8),
    widths: list[int] | tuple[int, ...] = (30, 60, 96),
    expansion: int = 4,
    stem_width: int = 64,
    stem_kernel: int = 4,
    stem_stride: int = 1,
    stem_pool: bool = True,
    activation: str = "leaky_relu",
    zero_init_last_bn: bool = True,
) -> ClassifierNet:
    """Stage i has ``depths[i]`` blocks of width ``widths[i]``; every stage after the first halves the map.

    The stem conv is unpadded (a 4x4 kernel has no centre), as in the source
    model: 96x96 -> 93x93, then the 2x2 max-pool -> 46x46. Zero-initialising
    the last BN of each block makes every block start as the identity
    (Goyal et al. 2017); the ``stl10_2m`` preset leaves it off, as its source did.
    """
    depths = _positive_ints("depths", depths)
    widths = _positive_ints("widths", widths)
    if len(depths) != len(widths):
        raise ConfigError(f"model.depths and model.widths must have the same length: got {depths} and {widths}")
    for key, value in (
        ("expansion", expansion),
        ("stem_width", stem_width),
        ("stem_kernel", stem_kernel),
        ("stem_stride", stem_stride),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a positive integer: got {value!r}")
    stem_layers: list[nn.Module] = [
        nn.Conv2d(in_chans, stem_width, stem_kernel, stride=stem_stride, bias=False),
        nn.BatchNorm2d(stem_width),
        make_activation(activation),
    ]
    if stem_pool:
        stem_layers.append(nn.MaxPool2d(2))
    blocks: list[nn.Module] = []
    channels = stem_width
    for stage, (depth, width) in enumerate(zip(depths, widths)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(Bottleneck(channels, width, expansion, stride, activation))
            channels = width * expansion
    model = ClassifierNet(
        nn.Sequential(*stem_layers), nn.Sequential(*blocks), None, num_classes, in_chans=in_chans, image_size=image_size
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # a=0 (gain sqrt(2)) whatever the activation's slope, as the STL-10 project's
            # kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu') left it (and torchvision does)
            nn.init.kaiming_normal_(m.weight, a=0.0, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_last_bn:
        for block in model.blocks:
            nn.init.zeros_(block.bn3.weight)
    return model
