"""torchvision's ImageNet ResNets (He et al. 2016) in classlab's stem/blocks/head shape.

The torchvision modules are reused as they are, so weights saved from a plain
torchvision ResNet load here (see ``convert_state_dict``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn

from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet, renumber_blocks
from classlab.models.registry import register_model

DEPTHS = (18, 34, 50, 101, 152)


class TorchvisionResNet(ClassifierNet):
    """Blocks are all residual blocks of layer1..layer4, in order."""

    stage_lengths: tuple[int, ...] = ()

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision key names (conv1, layer2.1, fc) -> ours (stem.conv1, blocks.N, head.fc)."""
        prefixes = {"conv1.": "stem.conv1.", "bn1.": "stem.bn1.", "fc.": "head.fc."}
        return renumber_blocks(state, r"layer(\d)\.(\d+)\.(.*)", self.stage_lengths, 1, prefixes)


def _build(depth: int, num_classes: int, in_chans: int, image_size: int, stem: str) -> TorchvisionResNet:
    if stem not in ("imagenet", "cifar"):
        raise ConfigError(f"model.stem must be imagenet or cifar: got {stem!r}")
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if stem == "cifar":
        # Small images: a 3x3 stride-1 stem and no max-pool keep 32x32 at
        # 32x32 into layer1 instead of shrinking it to 8x8 before any block.
        conv1: nn.Module = nn.Conv2d(in_chans, 64, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        pool: nn.Module = nn.Identity()
    else:
        conv1 = tv.conv1 if in_chans == 3 else nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        pool = tv.maxpool
    stem_mod = nn.Sequential(OrderedDict(conv1=conv1, bn1=tv.bn1, relu=tv.relu, maxpool=pool))
    layers = [tv.layer1, tv.layer2, tv.layer3, tv.layer4]
    blocks = nn.Sequential(*(b for layer in layers for b in layer))
    model = TorchvisionResNet(stem_mod, blocks, None, num_classes, in_chans=in_chans, image_size=image_size)
    model.stage_lengths = tuple(len(layer) for layer in layers)
    return model


def _register(depth: int) -> None:
    @register_model(
        f"resnet{depth}",
        default_image_size=224,
        description=f"torchvision ResNet-{depth} (stem: imagenet | cifar)",
    )
    def build(num_classes: int, in_chans: int, image_size: int, stem: str = "imagenet") -> TorchvisionResNet:
        return _build(depth, num_classes, in_chans, image_size, stem)

    build.__doc__ = f"ResNet-{depth}; ``stem: cifar`` swaps the 7x7/2 conv + max-pool for one 3x3/1 conv."


for _depth in DEPTHS:
    _register(_depth)
