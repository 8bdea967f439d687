"""``classlab.evaluate(run)``: top-1, top-5, per-class accuracy and the confusion matrix of a split.

Reads only the run folder: the saved config, class map and split, so the validation images
are exactly the ones training held out.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from classlab.data.pipeline import load_data
from classlab.engine.evaluate import confusion_matrix, predict_logits, top_k_accuracy
from classlab.errors import ClassLabError
from classlab.inference import load
from classlab.run import RunFolder, atomic_write_bytes, atomic_write_json, atomic_write_text, open_run


def evaluate(run: str | Path | RunFolder, split: str = "test", checkpoint: str = "best") -> dict[str, Any]:
    """Evaluate a run's checkpoint on ``split`` (test or val); write eval/<split>/ and return the metrics."""
    if split not in ("test", "val"):
        raise ClassLabError(f"--split {split}: choose 'test' or 'val'")
    run = run if isinstance(run, RunFolder) else open_run(run)
    loaded = load(run, checkpoint)
    cfg = loaded.cfg
    data = load_data(cfg, split=run.read_json("split.json"), with_test=split == "test")
    part = data.test if split == "test" else data.val
    if part is None or len(part) == 0:
        raise ClassLabError(
            f"this run has no {split} images"
            + (" (the dataset has no test part; use --split val)" if split == "test" else " (data.val_fraction was 0)")
        )
    loader = part.loader(cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    logits, labels = predict_logits(loaded.model, loader, rotation=cfg.task == "rotation")
    classes = loaded.classes
    cm = confusion_matrix(logits, labels, len(classes))
    per_class = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() > 0 else None) for i, name in enumerate(classes)}
    metrics = {
        "split": split,
        "checkpoint": checkpoint,
        "images": int(len(labels)),
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, min(5, len(classes))),
        "per_class": per_class,
    }
    out = run.path / "eval" / split
    atomic_write_json(out / "metrics.json", metrics)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *classes])
    for i, name in enumerate(classes):
        writer.writerow([name, *cm[i].tolist()])
    atomic_write_text(out / "confusion.csv", buffer.getvalue())
    atomic_write_bytes(out / "confusion.png", _confusion_png(cm, classes, metrics["top1"]))
    return metrics


def _confusion_png(cm: Any, classes: list[str], top1: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    rates = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (rows sum to 1), top-1 {top1:.4f}")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
