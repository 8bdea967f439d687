"""Metrics of a set of predictions: top-k accuracy, the confusion matrix, per-class scores, calibration.

One home for the arithmetic, so the final test of a run, ``classlab eval`` and its ``--report``
agree to the last digit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ECE_BINS = 15


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    if len(labels) == 0:
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] of class predictions (or of logits/probabilities: their argmax)."""
    if pred.ndim == 2:
        pred = pred.argmax(1)
    return torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class; a class never predicted has precision 0 (not NaN)."""
    cm = confusion_matrix(pred, labels, len(classes)).double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    rows = []
    for i, name in enumerate(classes):
        p = float(tp[i] / predicted[i]) if predicted[i] > 0 else 0.0
        r = float(tp[i] / actual[i]) if actual[i] > 0 else 0.0
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        rows.append({"class": name, "precision": p, "recall": r, "f1": f1, "support": int(actual[i])})
    return rows


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE = sum over bins of (bin share) * |accuracy - mean confidence|, with the per-bin figures."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 cannot occur.
    index = (torch.bucketize(conf.double(), edges, right=False) - 1).clamp(0, bins - 1)
    ece, per_bin = 0.0, []
    total = max(1, len(labels))
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].double().mean()) if count else None
        if count:
            ece += count / total * abs(acc - mean_conf)
        per_bin.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": count, "accuracy": acc,
                        "confidence": mean_conf})  # fmt: skip
    return {"ece": ece, "bins": per_bin}


def task_accuracies(
    names: Sequence[str], task_logits: Sequence[torch.Tensor], task_labels: Sequence[torch.Tensor], prefix: str
) -> dict[str, float]:
    """``{prefix}/<task>/acc`` for every task of a multi-task run (NaN for no images)."""
    out = dict.fromkeys((f"{prefix}/{name}/acc" for name in names), float("nan"))
    for name, logits, target in zip(names, task_logits, task_labels):
        if len(target):
            out[f"{prefix}/{name}/acc"] = float((logits.argmax(1) == target).float().mean())
    return out
