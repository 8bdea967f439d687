"""Logits for a whole loader, outside Lightning, on one process.

Evaluation after training, ``classlab eval`` and ``predict`` all come through here, so the
numbers in summary.json and the ones ``eval`` prints are computed the same way: by torchmetrics,
the same implementation the LightningModule's validation metrics use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from classlab.data.rotation import rotate_batch


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Iterable, *, rotation: bool = False, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every batch of ``loader``; the model is put in eval mode and restored."""
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if rotation:
                x, y = rotate_batch(x)
            outs.append(model(x).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(labels)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of examples whose label is among the ``k`` highest scores (torchmetrics ``MulticlassAccuracy``)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    if len(labels) == 0:
        return float("nan")
    classes = logits.shape[1]
    return float(multiclass_accuracy(logits, labels, num_classes=classes, top_k=min(k, classes), average="micro"))


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] of the arg-max predictions (torchmetrics ``MulticlassConfusionMatrix``)."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return multiclass_confusion_matrix(logits, labels, num_classes=num_classes)
