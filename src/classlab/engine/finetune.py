"""``model.unfreeze_at_epoch``: train the head alone first, then the whole network."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from classlab.models.surgery import set_backbone_frozen


def trainable_params(net: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in net.parameters() if p.requires_grad}.values())


class UnfreezeBackbone(L.Callback):
    """Backbone frozen (no gradient, BatchNorm statistics fixed) for epochs ``0..epoch-1``, trained from ``epoch`` on.

    The freeze happens at fit start, after the optimizer was built with every parameter, so
    the backbone joins training at ``epoch`` with its own lr group (``optim.backbone_lr_scale``).
    Until then its tensors get no gradient and the optimizers skip them: they stay bit-identical.
    """

    def __init__(self, epoch: int, console: Any = None) -> None:
        self.epoch = epoch
        self.console = console
        self.frozen = False

    def _net(self, pl_module: L.LightningModule) -> nn.Module:
        return pl_module.model.net

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch < self.epoch:
            set_backbone_frozen(self._net(pl_module), True)
            self.frozen = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.frozen and trainer.current_epoch >= self.epoch:
            net = self._net(pl_module)
            set_backbone_frozen(net, False)
            self.frozen = False
            if self.console is not None:
                self.console.print(
                    f"epoch {trainer.current_epoch + 1}: backbone unfrozen, "
                    f"{trainable_params(net):,} trainable parameters"
                )


def trainable_at_start(net: nn.Module, unfreeze_at_epoch: int | None) -> int:
    """Parameters that the first epoch trains: the head only while the backbone waits for unfreeze_at_epoch."""
    if not unfreeze_at_epoch:
        return trainable_params(net)
    set_backbone_frozen(net, True)
    try:
        return trainable_params(net)
    finally:
        set_backbone_frozen(net, False)
