"""``timm:<name>``: any timm architecture, built without weights, behind our interface."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from classlab.errors import ConfigError, did_you_mean

_UNSUPPORTED = {
    "truncate_at": "timm passthrough models cannot be truncated: use a registered family (see `classlab models`)",
    "head_conv": "model.head_conv applies to registered efficientnet_* models only: remove it",
}


def check_spec(name: str, spec: dict[str, Any]) -> None:
    import timm

    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ConfigError(f"unknown timm model {name!r}{hint}: see timm.list_models() for the names")
    for key, why in _UNSUPPORTED.items():
        # head_conv: true is the config's default (keep the head conv), which every timm model satisfies.
        if spec.get(key) is not None and not (key == "head_conv" and spec[key] is True):
            raise ConfigError(f"model.{key} is not supported for timm:{name}: {why}")
    if spec.get("head") not in (None, "linear"):
        raise ConfigError(f"model.head={spec['head']!r} is not supported for timm:{name}: use head: linear")
    freeze = str(spec.get("freeze") or "none")
    if freeze not in ("none", "all"):
        raise ConfigError(f"model.freeze={freeze!r} is not supported for timm:{name}: use none or all")


class TimmNet(nn.Module):
    """Gives a timm model the methods the engine expects (features, parameter groups, freezing)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(model.num_features)
        self._frozen = False
        head = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is head and n]
        self.head_prefixes = tuple(f"{n}." for n in names)  # relative to self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    # Parameters are told apart by name, not identity, so copies (EMA, deepcopy) agree.
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.model.named_parameters() if not n.startswith(self.head_prefixes))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.model.named_parameters() if n.startswith(self.head_prefixes))

    def freeze_backbone(self) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(False)
        self._frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> TimmNet:
        super().train(mode)
        if self._frozen and mode:
            head = self.model.get_classifier()
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(m is h for h in head.modules()):
                    m.eval()
        return self


def create(name: str, num_classes: int, in_chans: int, spec: dict[str, Any]) -> TimmNet:
    import timm

    check_spec(name, spec)
    net = TimmNet(timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans))
    if str(spec.get("freeze") or "none") == "all":
        net.freeze_backbone()
    return net
