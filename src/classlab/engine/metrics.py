"""Metrics of a set of predictions: top-k accuracy, the confusion matrix, per-class scores, calibration.

One home for the arithmetic, so the final test of a run, ``classlab eval`` and its ``--report``
agree to the last digit; the numbers come from torchmetrics, the implementation the
LightningModule's validation metrics use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

ECE_BINS = 15
_UNDER_ONE = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))  # the float32 just below 1
PLACES = 6  # what a written figure keeps: a float32 fraction reads 0.3050000071525574 otherwise


def rounded(tree: Any) -> Any:
    """``tree`` with every float rounded to PLACES decimals, for the JSON files a person reads (summary, eval)."""
    if isinstance(tree, float):
        return round(tree, PLACES)
    if isinstance(tree, dict):
        return {k: rounded(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [rounded(v) for v in tree]
    return tree


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of examples whose label is among the ``k`` highest scores (torchmetrics ``MulticlassAccuracy``)."""
    if len(labels) == 0:
        return float("nan")
    classes = logits.shape[1]
    return float(multiclass_accuracy(logits, labels, num_classes=classes, top_k=min(k, classes), average="micro"))


def top5_tells(num_classes: int) -> bool:
    """Whether a top-5 accuracy says anything: with 5 classes or fewer every label is among the top 5 (always 1),
    so eval and the report leave it out."""
    return num_classes > 5


def macro_f1(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Macro-averaged F1 of the arg-max predictions (every class counts the same), NaN for no images."""
    if len(labels) == 0:
        return float("nan")
    k = num_classes or logits.shape[1]
    return float(multiclass_f1_score(logits.argmax(1), labels, num_classes=k, average="macro"))


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted] of predictions or of scores' arg-max (torchmetrics ``MulticlassConfusionMatrix``)."""
    return multiclass_confusion_matrix(pred, labels, num_classes=num_classes)


def per_class_scores(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class (torchmetrics, ``average=None``).

    A class never predicted has precision 0 (``zero_division=0``), not NaN.
    """
    n = len(classes)
    scores = [
        metric(pred, labels, num_classes=n, average=None, zero_division=0).tolist()
        for metric in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    ]
    support = torch.bincount(labels, minlength=n).tolist()
    predicted = torch.bincount(pred, minlength=n).tolist()
    return [
        {"class": name, "precision": p, "recall": r, "f1": f1, "support": int(s), "predicted": int(k)}
        for name, p, r, f1, s, k in zip(classes, *scores, support, predicted)
    ]


def macro_mean(rows: list[dict[str, Any]], key: str) -> float:
    """The macro average of per_class_scores' ``key`` over the classes that occur (as labels or predictions):
    a class absent from both (a subset of a run's classes scored) is not a zero, as in ``macro_f1``."""
    present = [r[key] for r in rows if r["support"] or r.get("predicted", 1)]
    return sum(present) / max(1, len(present))


def weighted_mean(rows: list[dict[str, Any]], key: str) -> float:
    """The average of per_class_scores' ``key`` weighted by each class's support (scikit-learn's 'weighted avg'):
    where classes are imbalanced, the figure the common classes' scores carry."""
    total = sum(r["support"] for r in rows)
    return sum(r[key] * r["support"] for r in rows) / total if total else 0.0


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE = sum over bins of (bin share) * |accuracy - mean confidence| (torchmetrics ``MulticlassCalibrationError``).

    torchmetrics' bins are [k/B, (k+1)/B), and a confidence of exactly 1.0 (a saturated float32 softmax)
    would fall in a bin of its own beyond the last: the diagram's bars, which show it in the last bar as
    Guo et al. bin it, then did not add up to the ECE printed above them. Probabilities are clamped to
    the float just under 1.0 (6e-8 below), so the ECE and the bars are of the same bins.

    ``probs`` are clamped into [0, 1) for a second reason: an average of saturated softmaxes (TTA's ten
    views at 0.1 each) can sum to 1.0000001 in float32, and torchmetrics takes any value outside [0, 1]
    as a sign of logits and softmaxes the whole tensor again, which flattened every confidence and
    reported an ECE of 0.44 for a model right and sure on every image.
    """
    probs = probs.float().clamp(0.0, _UNDER_ONE)
    if len(labels) == 0:
        return {"ece": 0.0, "bins": []}
    ece = float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=bins, norm="l1"))
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)  # as torchmetrics makes them
    index = torch.bucketize(conf, edges, right=True) - 1
    per_bin = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        per_bin.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": count,
                "accuracy": float(correct[mask].mean()) if count else None,
                "confidence": float(conf[mask].double().mean()) if count else None,
            }
        )
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


def task_f1_scores(
    layout: Any, task_logits: Sequence[torch.Tensor], labels: torch.Tensor, prefix: str
) -> dict[str, float]:
    """``{prefix}/<task>/f1``: each task's macro-F1 of a multi-task run (NaN for no images)."""
    return {
        f"{prefix}/{name}/f1": macro_f1(logits, target, size) if len(labels) else float("nan")
        for name, logits, target, size in zip(layout.names, task_logits, layout.split(labels), layout.sizes)
    }
