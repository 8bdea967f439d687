"""A plain VGG-style CNN from a layer list: convolutions and poolings, nothing else.

The default list is classlab's default model: about 243k parameters and
40 MFLOPs at 32x32, small enough to train CIFAR-sized data on a laptop CPU.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet
from classlab.models.registry import Preset, register_model

DEFAULT_LAYERS: tuple[Any, ...] = (32, "p", 64, "p", 128, 128, "p")

# The model-template project's normal_CNN for CIFAR-10 (see cnn docstring).
NORMAL_CNN = [16, 16, "p", 32, 32, "p", 64, 64, "p", 128, 128, "p", 256, 256]


def conv_bn_act(
    n_in: int, n_out: int, activation: str, *, batchnorm: bool = True, bias: bool | None = None
) -> nn.Sequential:
    """3x3 conv (+ BatchNorm) + activation; ``bias=None``: a bias only when no BatchNorm follows."""
    act: nn.Module = nn.LeakyReLU(0.1, inplace=True) if activation == "leaky_relu" else nn.ReLU(inplace=True)
    conv = nn.Conv2d(n_in, n_out, 3, padding=1, bias=not batchnorm if bias is None else bias)
    return nn.Sequential(conv, nn.BatchNorm2d(n_out), act) if batchnorm else nn.Sequential(conv, act)


def _pool(kind: str) -> nn.Module:
    # 'p' halves the map; 'p3' is the template's overlapping 3x3/2 pooling,
    # which shrinks 32 -> 15 -> 7 -> 3 -> 1 in four steps.
    return nn.MaxPool2d(3, stride=2) if kind == "p3" else nn.MaxPool2d(2)


@register_model(
    "cnn",
    presets={
        "normal_cnn": Preset(
            {"layers": NORMAL_CNN, "pool": "p3", "conv_bias": True},
            description="model-template normal_CNN (CIFAR-10, 1,183,322 params as published)",
        )
    },
    default_image_size=32,
    description="plain conv-BN-ReLU stack from a layer list (classlab's default)",
)
def build_cnn(
    num_classes: int,
    in_chans: int,
    image_size: int,
    layers: list[Any] | tuple[Any, ...] = DEFAULT_LAYERS,
    dropout: float = 0.0,
    activation: str = "relu",
    pool: str = "p",
    batchnorm: bool = True,
    conv_bias: bool | None = None,
) -> ClassifierNet:
    """An int is a 3x3 conv+BN+act with that many channels, 'p' a pooling; each entry is one block.

    ``pool: p3`` makes every 'p' an overlapping 3x3 stride-2 max-pool, as in the
    model-template project (32 -> 15 -> 7 -> 3 -> 1 over its four poolings). Its
    ``normal_cnn`` preset counts 1,183,322 parameters, the template's figure: the
    template's convolutions carry a bias even before BatchNorm (``conv_bias: true``,
    992 parameters that BatchNorm's shift makes redundant; ``conv_bias: false`` drops
    them: 1,182,330). ``batchnorm: false`` is the template's
    ``batch_normalization_use=False``: conv + bias + activation.
    """
    if activation not in ("relu", "leaky_relu"):
        raise ConfigError(f"model.activation must be relu or leaky_relu: got {activation!r}")
    if pool not in ("p", "p3"):
        raise ConfigError(f"model.pool must be p (2x2) or p3 (3x3 stride 2): got {pool!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1): got {dropout!r}")
    blocks: list[nn.Module] = []
    channels = in_chans
    for item in layers:
        if item == "p":
            blocks.append(_pool(pool))
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            blocks.append(conv_bn_act(channels, item, activation, batchnorm=bool(batchnorm), bias=conv_bias))
            channels = item
        else:
            raise ConfigError(
                f"model.layers entries must be positive integers (conv channels) or 'p' (pooling): got {item!r}"
            )
    if channels == in_chans and not any(isinstance(i, int) for i in layers):
        raise ConfigError("model.layers needs at least one convolution (an integer)")
    stem = nn.Identity()
    return ClassifierNet(
        stem,
        nn.Sequential(*blocks),
        None,
        num_classes,
        in_chans=in_chans,
        image_size=image_size,
        head_dropout=float(dropout),
    )
