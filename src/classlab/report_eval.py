"""Error analysis of one evaluation: where the model is wrong, and whether its confidence means anything.

``classlab eval RUN --report`` writes, next to the confusion matrix:

- ``per_class.csv``: precision, recall, F1 and support of each class (accuracy hides a class the
  model never predicts; precision/recall do not);
- ``confident_errors.png``: the images the model got wrong with the highest confidence, with true
  and predicted names (these are often label noise, or the clearest failure mode);
- ``reliability.png`` and the expected calibration error (ECE, 15 equal-width confidence bins as in
  Guo et al. 2017): how far the predicted probability is from the observed accuracy.

The numbers come from torchmetrics (precision/recall/F1 with ``average=None``, ``CalibrationError``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from classlab.run import atomic_write_bytes, atomic_write_json, atomic_write_text

ECE_BINS = 15
GRID_IMAGES = 25


def per_class_scores(pred: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class (torchmetrics, ``average=None``).

    A class never predicted has precision 0 (``zero_division=0``), not NaN.
    """
    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision, multiclass_recall

    n = len(classes)
    scores = [
        metric(pred, labels, num_classes=n, average=None, zero_division=0).tolist()
        for metric in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    ]
    support = torch.bincount(labels, minlength=n).tolist()
    return [
        {"class": name, "precision": p, "recall": r, "f1": f1, "support": int(s)}
        for name, p, r, f1, s in zip(classes, *scores, support)
    ]


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE = sum over bins of (bin share) * |accuracy - mean confidence| (torchmetrics ``MulticlassCalibrationError``).

    torchmetrics' bins are [k/B, (k+1)/B), and a confidence of exactly 1.0 (a saturated float32 softmax)
    falls in a bin of its own beyond the last; the per-bin figures of the diagram use the same edges and
    show those 1.0 confidences in the last bar.
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = probs.float()
    if len(labels) == 0:
        return {"ece": 0.0, "bins": []}
    ece = float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=bins, norm="l1"))
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)  # as torchmetrics makes them
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, bins - 1)
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


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len("class"), *(len(r["class"]) for r in rows)])
    lines = [f"  {'class':<{width}}  precision  recall     f1  support"]
    for r in rows:
        lines.append(
            f"  {r['class']:<{width}}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}"
        )
    macro = {k: sum(r[k] for r in rows) / max(1, len(rows)) for k in ("precision", "recall", "f1")}
    lines.append(
        f"  {'macro avg':<{width}}  {macro['precision']:9.4f}  {macro['recall']:6.4f}  {macro['f1']:.4f}"
        f"  {sum(r['support'] for r in rows):7d}"
    )
    return "\n".join(lines)


def write_report(
    out: Path,
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    image_at: Callable[[int], torch.Tensor],
    *,
    describe: Callable[[int], str] | None = None,
    source: str = "plain",
) -> dict[str, Any]:
    """Write per_class.csv, confident_errors.png, reliability.png and report.json into ``out``.

    ``image_at(i)`` gives the uint8 (C, H, W) image of example ``i``; only the few shown are read.
    """
    pred = probs.argmax(1)
    rows = per_class_scores(pred, labels, classes)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["class", "precision", "recall", "f1", "support"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **{k: f"{r[k]:.6f}" for k in ("precision", "recall", "f1")}})
    atomic_write_text(out / "per_class.csv", buffer.getvalue())

    cal = calibration(probs, labels)
    atomic_write_bytes(out / "reliability.png", _reliability_png(cal, source))

    conf = probs.max(1).values
    wrong = (pred != labels).nonzero().flatten()
    order = wrong[conf[wrong].argsort(descending=True)][:GRID_IMAGES].tolist()
    errors = [
        {
            "index": i,
            "true": classes[int(labels[i])],
            "predicted": classes[int(pred[i])],
            "confidence": float(conf[i]),
            "thumbnail": f"errors/{k:02d}.png",
            **({"image": describe(i)} if describe else {}),
        }
        for k, i in enumerate(order)
    ]
    images = [image_at(i) for i in order]
    atomic_write_bytes(out / "confident_errors.png", _errors_png(images, errors))
    _write_thumbnails(out / "errors", images)
    report = {
        "predictions": source,
        "ece": cal["ece"],
        "ece_bins": ECE_BINS,
        "macro_f1": sum(r["f1"] for r in rows) / max(1, len(rows)),
        "per_class": rows,
        "confident_errors": errors,
        "calibration_bins": cal["bins"],
    }
    atomic_write_json(out / "report.json", report)
    return report


def _write_thumbnails(folder: Path, images: list[torch.Tensor]) -> None:
    """Each confidently wrong image as its own PNG (``classlab report`` shows them with their names)."""
    import shutil

    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)  # a previous evaluation's errors are not this one's
    for k, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        atomic_write_bytes(folder / f"{k:02d}.png", buffer.getvalue())


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _reliability_png(cal: dict[str, Any], source: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    bins = cal["bins"]
    width = 1 / len(bins)
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    accs = [b["accuracy"] or 0.0 for b in bins]
    confs = [b["confidence"] if b["confidence"] is not None else c for b, c in zip(bins, centers)]
    ax.bar(centers, accs, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers, [c - a if b["count"] else 0 for c, a, b in zip(confs, accs, bins)], bottom=accs, width=width,
           edgecolor="tab:red", color="tab:red", alpha=0.3, label="gap to confidence")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({source}): ECE {cal['ece']:.4f}, {len(bins)} bins")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _errors_png(images: list[torch.Tensor], errors: list[dict[str, Any]]) -> bytes:
    plt = _plt()
    n = len(images)
    cols = min(5, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not n:
        axes[0, 0].text(0.5, 0.5, "no errors", ha="center", va="center")
    for ax, img, err in zip(axes.flat, images, errors):
        arr = img.permute(1, 2, 0).numpy()
        ax.imshow(arr[:, :, 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(f"true: {err['true']}\npred: {err['predicted']} ({err['confidence']:.2f})", fontsize=8)
    fig.suptitle("most confidently wrong")
    fig.tight_layout()
    return _png(fig)
