"""``timm:<name>``: any timm architecture (tagged names and ``hf-hub:`` names too), behind our interface.

Weights come separately, through ``models.pretrained``, so that every source is loaded and
reported the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from classlab.errors import ConfigError, command, did_you_mean

_UNSUPPORTED = {
    "truncate_at": "timm passthrough models cannot be truncated: use a registered family (see {models})",
    "head_conv": "model.head_conv applies to registered efficientnet_* models only: remove it",
}


def check_spec(name: str, spec: dict[str, Any]) -> None:
    import timm

    # hf-hub:<repo> names are resolved by the hub itself (their config lives there).
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ConfigError(f"unknown timm model {name!r}{hint}: see timm.list_models() for the names")
    for key, why in _UNSUPPORTED.items():
        # head_conv: true is the config default; only asking to drop the neck is unsupported.
        if spec.get(key) is not None and not (key == "head_conv" and spec[key] is True):
            why = why.format(models=command("`classlab models`"))
            raise ConfigError(f"model.{key} is not supported for timm:{name}: {why}")
    if spec.get("head") not in (None, "linear"):
        raise ConfigError(f"model.head={spec['head']!r} is not supported for timm:{name}: use head: linear")
    freeze = str(spec.get("freeze") or "none")
    if freeze not in ("none", "all"):
        raise ConfigError(f"model.freeze={freeze!r} is not supported for timm:{name}: use none or all")


class WrappedNet(nn.Module):
    """Gives another library's model the methods the engine expects (features, parameter groups, freezing).

    ``head_prefixes`` name the classifier's parameters relative to ``self.model``; everything
    else is the backbone.
    """

    def __init__(self, model: nn.Module, head_prefixes: tuple[str, ...], num_features: int) -> None:
        super().__init__()
        self.model = model
        self.num_features = int(num_features)
        self.head_prefixes = head_prefixes
        self._frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # Parameters are told apart by name, not identity, so copies (EMA, deepcopy) agree.
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.model.named_parameters() if not n.startswith(self.head_prefixes))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.model.named_parameters() if n.startswith(self.head_prefixes))

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or, with ``frozen=False``, restart) training the backbone; its BatchNorm stays in eval while frozen."""
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        self._frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> WrappedNet:
        super().train(mode)
        if self._frozen and mode:
            heads = tuple(p.rstrip(".") for p in self.head_prefixes)
            for name, m in self.model.named_modules():
                in_head = any(name == h or name.startswith(h + ".") for h in heads)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not in_head:
                    m.eval()
        return self


class TimmNet(WrappedNet):
    """A timm model behind classlab's interface; timm knows its own classifier and features."""

    def __init__(self, model: nn.Module) -> None:
        head = model.get_classifier()
        names = [n for n, m in model.named_modules() if m is head and n]
        super().__init__(model, tuple(f"{n}." for n in names), int(model.num_features))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def create(name: str, num_classes: int, in_chans: int, spec: dict[str, Any]) -> TimmNet:
    import timm

    check_spec(name, spec)
    net = TimmNet(timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans))
    if str(spec.get("freeze") or "none") == "all":
        net.freeze_backbone()
    return net
