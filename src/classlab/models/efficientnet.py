"""EfficientNet-B0..B7 (Tan & Le 2019) from timm, split into stem / blocks / neck / head.

``blocks`` are the MBConv blocks of all of timm's stages, flattened (16 for
B0, more for wider variants), so ``truncate_at`` picks any block as the
feature extractor, as the RotNet experiments did. The neck is the final 1x1
conv to 1280 (x width) channels + BN + SiLU; ``head_conv: false`` drops it.

On 32x32 inputs: the stem and four stages stride by 2 (five stride-2 steps,
total stride 32), so the last blocks see a 1x1 feature map; the 3x3/5x5
depthwise convolutions there only see their centre tap and the network works
as a stack of per-pixel MLPs. It trains, but the architecture was searched
for 224x224; upsample small images or use a CIFAR family for fair numbers.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from classlab.models.net import ClassifierNet, renumber_blocks
from classlab.models.registry import register_model

# Resolution each variant was scaled for (the paper's compound scaling).
IMAGE_SIZES = {0: 224, 1: 240, 2: 260, 3: 300, 4: 380, 5: 456, 6: 528, 7: 600}


class EfficientNet(ClassifierNet):
    stage_lengths: tuple[int, ...] = ()
    neck_channels: int = 1280

    def make_neck(self, in_channels: int) -> nn.Module | None:
        # A truncated EfficientNet keeps a head conv, now reading the last kept
        # block's channels (the RotNet "head" option).
        from timm.layers import BatchNormAct2d

        return nn.Sequential(
            OrderedDict(
                conv_head=nn.Conv2d(in_channels, self.neck_channels, 1, bias=False),
                bn2=BatchNormAct2d(self.neck_channels, act_layer=nn.SiLU),
            )
        )

    def convert_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """timm key names (conv_stem, blocks.S.J, conv_head, classifier) -> ours."""
        prefixes = {
            "conv_stem.": "stem.conv_stem.",
            "bn1.": "stem.bn1.",
            "conv_head.": "neck.conv_head.",
            "bn2.": "neck.bn2.",
            "classifier.": "head.fc.",
        }
        return renumber_blocks(state, r"blocks\.(\d+)\.(\d+)\.(.*)", self.stage_lengths, 0, prefixes)


def _build(
    variant: int, num_classes: int, in_chans: int, image_size: int, drop_path_rate: float, tf_same: bool
) -> EfficientNet:
    import timm

    # tf_same: timm's TensorFlow port (same key names): 'same' padding and BatchNorm eps 1e-3,
    # which weights ported from TensorFlow (efficientnet_pytorch's, timm's tf_*) were trained with.
    net = timm.create_model(
        f"tf_efficientnet_b{variant}" if tf_same else f"efficientnet_b{variant}",
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
    )
    stem = nn.Sequential(OrderedDict(conv_stem=net.conv_stem, bn1=net.bn1))
    blocks = nn.Sequential(*(b for stage in net.blocks for b in stage))
    neck = nn.Sequential(OrderedDict(conv_head=net.conv_head, bn2=net.bn2))
    model = EfficientNet(stem, blocks, neck, num_classes, in_chans=in_chans, image_size=image_size)
    model.stage_lengths = tuple(len(stage) for stage in net.blocks)
    model.neck_channels = int(net.num_features)
    return model


def _register(variant: int) -> None:
    @register_model(
        f"efficientnet_b{variant}",
        default_image_size=IMAGE_SIZES[variant],
        description=f"EfficientNet-B{variant} (timm), truncatable at any MBConv block",
    )
    def build(
        num_classes: int, in_chans: int, image_size: int, drop_path_rate: float = 0.0, tf_same: bool = False
    ) -> EfficientNet:
        return _build(variant, num_classes, in_chans, image_size, drop_path_rate, tf_same)


for _v in IMAGE_SIZES:
    _register(_v)
