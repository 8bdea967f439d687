"""Logits for a whole loader, outside Lightning, on one process.

Evaluation after training, ``classlab eval`` and ``predict`` all come through here, so the
numbers in summary.json and the ones ``eval`` prints are computed the same way.
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
    if len(labels) == 0:
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    pred = logits.argmax(1)
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Macro-averaged F1 of the argmax predictions (torchmetrics'), NaN for no images."""
    from torchmetrics.functional.classification import multiclass_f1_score

    if len(labels) == 0:
        return float("nan")
    k = num_classes or logits.shape[1]
    return float(multiclass_f1_score(logits.argmax(1), labels, num_classes=k, average="macro"))
