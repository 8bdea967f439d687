"""The one shape every classlab model has: stem -> blocks -> neck -> head.

Keeping every family in this shape is what lets truncation, head swapping,
freezing, backbone transfer and multi-task heads be written once (in
``surgery.py``) instead of once per family.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from classlab.errors import ConfigError

# How a backbone lays out its output, so that one pooling rule fits every family.
NCHW = "nchw"  # convolutional feature map (B, C, H, W)
TOKENS = "tokens"  # token sequence (B, S, C), e.g. MLP-Mixer
FLAT = "flat"  # already a vector (B, F), e.g. a plain MLP

HEAD_KINDS = ("linear", "conv_fc", "mlp")


class GlobalPool(nn.Module):
    """Reduce any backbone output to a (B, F) vector; the layout decides how."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == NCHW:
            return x.mean(dim=(2, 3))
        if self.layout == TOKENS:
            return x.mean(dim=1)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"


class Head(nn.Module):
    """pre (conv_fc only) -> pool -> dropout -> fc.

    Kept as a named module so that everything outside ``head`` is, by
    definition, the backbone (for freezing, transfer and a separate lr).
    """

    def __init__(
        self,
        kind: str,
        in_features: int,
        num_classes: int,
        layout: str,
        dropout: float = 0.0,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.pre: nn.Module = nn.Identity()
        if kind == "conv_fc":
            if layout != NCHW:
                raise ConfigError(
                    "model.head: conv_fc needs a convolutional feature map but this model "
                    f"produces {layout} features: use head: linear or mlp"
                )
            self.pre = nn.Sequential(
                nn.Conv2d(in_features, in_features, 3, padding=1, bias=False),
                nn.BatchNorm2d(in_features),
                nn.ReLU(inplace=True),
            )
        self.pool = GlobalPool(layout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if kind == "mlp":
            width = hidden or max(in_features, 128)
            self.fc: nn.Module = nn.Sequential(
                nn.Linear(in_features, width), nn.ReLU(inplace=True), nn.Linear(width, num_classes)
            )
        else:
            self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.pre(x))))


class ClassifierNet(nn.Module):
    """A classifier split into the parts that surgery operates on.

    ``blocks`` is the unit ``model.truncate_at`` counts. ``neck`` is whatever
    the family puts between the last block and the pooled features (often
    nothing); it is dropped on truncation unless the family rebuilds it via
    :meth:`make_neck`.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: nn.Sequential,
        neck: nn.Module | None,
        num_classes: int,
        *,
        layout: str = NCHW,
        in_chans: int = 3,
        image_size: int = 32,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = blocks
        self.neck = neck if neck is not None else nn.Identity()
        self.layout = layout
        self.in_chans = in_chans
        self.image_size = image_size
        self.num_classes = num_classes
        self.head_dropout = head_dropout
        self.head_kind = "linear"
        self._frozen: list[str] = []  # submodules kept in eval mode (see train)
        self._fresh: list[str] = []  # key prefixes rebuilt by surgery, not in the family's weights
        self._freeze_when_loaded: list[str] = []  # frozen parts waiting for weights (surgery.freeze)
        self.num_features = self.infer_features()
        self.head = Head("linear", self.num_features, num_classes, layout, head_dropout)

    # -- structure ---------------------------------------------------------
    def make_neck(self, in_channels: int) -> nn.Module | None:
        """The neck to use after truncation at ``in_channels``; None drops it."""
        return None

    def infer_features(self) -> int:
        """Channels of the backbone output, found by a dry run (works on meta too)."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dummy = torch.zeros(1, self.in_chans, self.image_size, self.image_size, device=device)
        was_training = self.training
        self.eval()
        with torch.no_grad():
            out = self.neck(self.blocks(self.stem(dummy)))
        self.train(was_training)
        return int(out.shape[1] if self.layout == NCHW else out.shape[-1])

    # -- forward -----------------------------------------------------------
    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output before pooling (feature map or tokens)."""
        return self.neck(self.blocks(self.stem(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, num_features): what extra task heads sit on."""
        return self.head.pool(self.forward_map(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_map(x))

    # -- parameter groups ----------------------------------------------------
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        for name, p in self.named_parameters():
            if not name.startswith("head."):
                yield p

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    # -- freezing --------------------------------------------------------------
    def train(self, mode: bool = True) -> ClassifierNet:
        # Frozen parts keep their BatchNorm statistics: a frozen backbone whose
        # running means drift with the new data is not frozen.
        super().train(mode)
        for name in self._frozen:
            self.get_submodule(name).eval()
        return self


def renumber_blocks(
    state: dict[str, torch.Tensor],
    block_pattern: str,
    stage_lengths: tuple[int, ...],
    first_stage: int,
    prefixes: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Another library's key names -> ours, so its saved weights load into the stem/blocks/head shape.

    ``block_pattern`` matches ``(stage)(index)(rest)``; stage S (counted from ``first_stage``) index J
    becomes ``blocks.<blocks before S + J>.rest``. Other keys starting with a ``prefixes`` key get its value.
    """
    offsets = [sum(stage_lengths[:i]) for i in range(len(stage_lengths))]
    out = {}
    for key, value in state.items():
        m = re.match(block_pattern, key)
        if m:
            key = f"blocks.{offsets[int(m[1]) - first_stage] + int(m[2])}.{m[3]}"
        else:
            old = next((p for p in prefixes if key.startswith(p)), None)
            if old is not None:
                key = prefixes[old] + key[len(old) :]
        out[key] = value
    return out


class ClassifierModel(nn.Module):
    """Normalisation + network: the whole function from uint8 (or [0, 1] float) images to logits.

    ``temperature``: a calibration's T (``classlab eval --calibrate``), which the logits are divided by, so every
    user of the model (eval, TTA, predict, ensembles, export) sees the calibrated probabilities through one door.
    A plain attribute, not a buffer: it is no part of the checkpoint, whose weights it was fitted for.
    """

    temperature: float | None = None

    def __init__(self, normalize: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.normalize(x))
        if self.temperature is None:
            return logits
        return logits.float() / self.temperature  # in float32: a bf16 division could tie two logits and move argmax
