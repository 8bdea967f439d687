"""The model-template project's residual CNN: a width list read left to right.

Equal neighbouring widths make a residual block; a change of width makes a
parameter-free transition (max-pool + zero-padded channels, the option-A idea
of He et al.), so widening costs no weights. Every list entry is one block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet
from classlab.models.registry import Preset, register_model

TEMPLATE_WIDTHS = [32, 32, 64, 64, 64, 64, 128, 128, 128]


class Transition(nn.Module):
    """Halve the map and widen with zero channels: no parameters."""

    def __init__(self, n_in: int, n_out: int, pool: str) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, stride=2) if pool == "p3" else nn.MaxPool2d(2)
        self.extra = n_out - n_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))


class ResidualBlock(nn.Module):
    """``small``: two 3x3 convs; ``large``: 1x1 -> 3x3 -> 1x1 through a quarter of the width."""

    def __init__(self, channels: int, size: str, bias: bool = False) -> None:
        super().__init__()
        if size == "small":
            shape = [(channels, channels, 3), (channels, channels, 3)]
        else:
            mid = max(channels // 4, 1)
            shape = [(channels, mid, 1), (mid, mid, 3), (mid, channels, 1)]
        layers: list[nn.Module] = []
        for i, (n_in, n_out, k) in enumerate(shape):
            layers += [nn.Conv2d(n_in, n_out, k, padding=k // 2, bias=bias), nn.BatchNorm2d(n_out)]
            if i < len(shape) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x, inplace=True)


@register_model(
    "residual_cnn",
    presets={
        "residual_cnn": Preset(
            {"widths": TEMPLATE_WIDTHS, "block_size": "small", "pool": "p3", "conv_bias": True, "stem_norm": False},
            description="model-template residual_CNN (CIFAR-10, 1,134,026 params as published)",
        )
    },
    default_image_size=32,
    description="residual blocks from a width list; widening transitions are parameter-free",
)
def build_residual_cnn(
    num_classes: int,
    in_chans: int,
    image_size: int,
    widths: list[int] | tuple[int, ...] = tuple(TEMPLATE_WIDTHS),
    block_size: str = "small",
    pool: str = "p3",
    conv_bias: bool | None = None,
    stem_norm: bool = True,
) -> ClassifierNet:
    """Stem: 7x7 stride-2 conv + 3x3 stride-2 max-pool (ImageNet style, so 32x32 becomes 8x8).

    The ``residual_cnn`` preset counts 1,134,026 parameters, the template's
    figure: its convolutions carry a bias before BatchNorm (``conv_bias: true``)
    and its stem has no BatchNorm (``stem_norm: false``). ``conv_bias: false,
    stem_norm: true`` drops the redundant biases and normalises the stem:
    1,132,842. ``pool: p3`` is the template's overlapping 3x3 stride-2 pooling in
    transitions, ``p`` a plain 2x2 halving.
    """
    ws = list(widths)
    if not ws or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in ws):
        raise ConfigError(f"model.widths must be a non-empty list of positive integers: got {widths!r}")
    if any(b < a for a, b in zip(ws, ws[1:])):
        raise ConfigError(f"model.widths must never decrease (a transition only adds channels): got {ws}")
    if block_size not in ("small", "large"):
        raise ConfigError(f"model.block_size must be small or large: got {block_size!r}")
    if pool not in ("p", "p3"):
        raise ConfigError(f"model.pool must be p (2x2) or p3 (3x3 stride 2): got {pool!r}")
    bias = bool(conv_bias)
    stem_layers: list[nn.Module] = [nn.Conv2d(in_chans, ws[0], 7, stride=2, padding=3, bias=bias or not stem_norm)]
    if stem_norm:
        stem_layers.append(nn.BatchNorm2d(ws[0]))
    stem = nn.Sequential(*stem_layers, nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
    blocks: list[nn.Module] = []
    for i, w in enumerate(ws):
        nxt = ws[i + 1] if i + 1 < len(ws) else w
        blocks.append(Transition(w, nxt, pool) if nxt != w else ResidualBlock(w, block_size, bias))
    return ClassifierNet(stem, nn.Sequential(*blocks), None, num_classes, in_chans=in_chans, image_size=image_size)
