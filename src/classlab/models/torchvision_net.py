"""Every torchvision classification model by its torchvision name (``mobilenet_v2``, ``convnext_tiny``, ...).

Names that classlab registers itself (``resnet18``, ``efficientnet_b0``, ...) keep their
classlab family; every other name in ``torchvision.models.list_models()`` is built by
torchvision as it is and wrapped, so saved torchvision state dicts load key for key.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import nn

from classlab.errors import ConfigError, command
from classlab.models.timm_net import WrappedNet

_UNSUPPORTED = ("truncate_at",)


@cache
def torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def is_torchvision_name(name: str) -> bool:
    return name in torchvision_names()


def check_spec(name: str, spec: dict[str, Any]) -> None:
    for key in _UNSUPPORTED:
        if spec.get(key) is not None:
            raise ConfigError(
                f"model.{key} is not supported for torchvision model {name!r}: use a registered family "
                f"(see {command('`classlab models`')})"
            )
    if spec.get("head") not in (None, "linear"):
        raise ConfigError(f"model.head={spec['head']!r} is not supported for torchvision model {name!r}: use linear")
    freeze = str(spec.get("freeze") or "none")
    if freeze not in ("none", "all"):
        raise ConfigError(f"model.freeze={freeze!r} is not supported for torchvision model {name!r}: use none or all")


def _extra_kwargs(name: str) -> dict[str, Any]:
    # GoogLeNet and Inception-v3 return auxiliary outputs in training mode; one output is what we train.
    return {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}


def _classifier_keys(name: str, num_classes: int) -> tuple[list[str], int]:
    """State-dict keys whose shape follows the number of classes (the classifier), and its input width.

    Found by building the model twice on the meta device (no memory, no arithmetic) with two
    class counts: whatever changes shape is the classifier, for every torchvision family alike.
    """
    import torchvision

    with torch.device("meta"):
        a = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **_extra_kwargs(name)
        ).state_dict()
        b = torchvision.models.get_model(name, weights=None, num_classes=num_classes + 1, **_extra_kwargs(name))
        b = b.state_dict()
    keys = [k for k in a if a[k].shape != b[k].shape]
    weight = next(k for k in keys if a[k].ndim >= 2)
    return keys, int(a[weight].shape[1])


class TorchvisionNet(WrappedNet):
    """A torchvision classifier; ``forward_features`` is the input of its last layer."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        last = self.model.get_submodule(self.head_prefixes[-1].rstrip("."))
        seen: list[torch.Tensor] = []
        handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return seen[-1].flatten(1)


def create(name: str, num_classes: int, in_chans: int, spec: dict[str, Any]) -> TorchvisionNet:
    import torchvision

    check_spec(name, spec)
    if in_chans != 3:
        raise ConfigError(f"torchvision model {name!r} takes 3-channel images: use timm:{name} or a classlab family")
    keys, features = _classifier_keys(name, num_classes)
    model: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_extra_kwargs(name))
    prefixes = tuple(sorted({k.rsplit(".", 1)[0] + "." for k in keys}))
    net = TorchvisionNet(model, prefixes, features)
    if str(spec.get("freeze") or "none") == "all":
        net.freeze_backbone()
    return net
