"""``classlab.evaluate(run)``: top-1, top-5, per-class accuracy and the confusion matrix of a split.

Reads only the run folder: the saved config, class map and split, so the validation images
are exactly the ones training held out. With ``tta`` the same images are scored again under
test-time augmentation (``engine.tta``) and both figures are kept side by side; with
``report`` the error analysis of ``report_eval`` is written next to the confusion matrix.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from classlab.data.pipeline import DataBundle, Part, load_data
from classlab.data.preprocess import image_to_tensor
from classlab.data.sources import Source, open_dataset
from classlab.engine.evaluate import confusion_matrix, macro_f1, predict_logits, top_k_accuracy
from classlab.engine.tta import parse_tta, tta_probabilities_batches, tta_probabilities_images, views_per_image
from classlab.errors import ClassLabError
from classlab.inference import load
from classlab.run import RunFolder, atomic_write_bytes, atomic_write_json, atomic_write_text, open_run


def evaluate(
    run: str | Path | RunFolder | list[str | Path | RunFolder],
    split: str = "test",
    checkpoint: str = "best",
    *,
    tta: str | None = None,
    report: bool = False,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on ``split`` (test or val); write eval/<split>/ and return the metrics.

    ``tta``: ``flip``, ``translate``, ``tencrop``, ``multiscale:S1,S2,..`` or several joined by commas;
    the metrics gain a ``tta`` entry beside the plain top-1/top-5. ``report``: also write per-class
    precision/recall/F1, the most confidently wrong images and the reliability diagram (ECE).
    """
    if split not in ("test", "val"):
        raise ClassLabError(f"--split {split}: choose 'test' or 'val'")
    loaded, run, out = _load_for_eval(run, checkpoint, split)
    cfg = loaded.cfg
    if (tta or report) and cfg.task == "rotation":
        raise ClassLabError("--tta and --report apply to classifiers; this run is a rotation pretext run")
    plan = parse_tta(tta, loaded.image_size) if tta else None
    data = load_data(cfg, split=run.read_json("split.json"), with_test=split == "test")
    part = data.test if split == "test" else data.val
    if part is None or len(part) == 0:
        raise ClassLabError(
            f"this run has no {split} images"
            + (" (the dataset has no test part; use --split val)" if split == "test" else " (data.val_fraction was 0)")
        )
    loader = part.loader(cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    task_acc: dict[str, float] = {}
    task_f1: dict[str, float] = {}
    if loaded.tasks is not None:
        from classlab.multitask import predict_tasks, task_accuracies, task_f1_scores

        task_logits, logits, labels = predict_tasks(loaded.model, loader)
        task_acc = task_accuracies(loaded.tasks, task_logits, labels, split)
        task_f1 = task_f1_scores(loaded.tasks, task_logits, labels, split)
    else:
        logits, labels = predict_logits(loaded.model, loader, rotation=cfg.task == "rotation")
    classes = loaded.classes
    cm = confusion_matrix(logits, labels, len(classes))
    per_class = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() > 0 else None) for i, name in enumerate(classes)}
    metrics: dict[str, Any] = {
        "split": split,
        "checkpoint": checkpoint,
        "images": int(len(labels)),
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, min(5, len(classes))),
        "f1": macro_f1(logits, labels, len(classes)),
        "per_class": per_class,
    }
    if task_acc:  # multitask: top1/top5 are of the combined class, these of each task's own head
        metrics["tasks"] = {key.split("/")[1]: value for key, value in task_acc.items()}
        metrics["tasks_f1"] = {key.split("/")[1]: value for key, value in task_f1.items()}
    probs = logits.softmax(1)
    if plan is not None:
        if plan.needs_originals:
            source, indices = _originals(cfg, data, part, split, run)
            tta_probs = tta_probabilities_images(
                loaded.model, _read_all(source, indices), plan, loaded.image_size, loaded.channels
            )
        else:
            tta_probs, tta_labels = tta_probabilities_batches(loaded.model, loader, plan.batch_modes, loaded.image_size)
            assert torch.equal(tta_labels, labels)
        metrics["tta"] = {
            "modes": plan.text,
            "views": views_per_image(plan),
            "scales": list(plan.scales),
            "top1": top_k_accuracy(tta_probs, labels, 1),
            "top5": top_k_accuracy(tta_probs, labels, min(5, len(classes))),
        }
        probs = tta_probs
    if report:
        from classlab.report_eval import write_report

        image_at, describe = _example_reader(data, part)
        rep = write_report(
            out, probs, labels, classes, image_at, describe=describe, source=f"tta:{plan.text}" if plan else "plain"
        )
        metrics["report"] = {"ece": rep["ece"], "macro_f1": rep["macro_f1"], "per_class": rep["per_class"]}
    if getattr(loaded, "members", None):
        metrics["members"] = [str(p) for p in loaded.members]
    atomic_write_json(out / "metrics.json", {k: v for k, v in metrics.items()})
    metrics["out"] = str(out)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *classes])
    for i, name in enumerate(classes):
        writer.writerow([name, *cm[i].tolist()])
    atomic_write_text(out / "confusion.csv", buffer.getvalue())
    atomic_write_bytes(out / "confusion.png", _confusion_png(cm, classes, metrics["top1"]))
    return metrics


def _load_for_eval(run: Any, checkpoint: str, split: str) -> tuple[Any, RunFolder, Path]:
    """The run (or the ensemble of several runs / a k-fold folder) and where its eval files go.

    An ensemble is scored on the first member's split: its test set is every member's, but fold
    runs each hold out a different validation fold, so ``--split val`` is refused for them.
    """
    from classlab.ensemble import expand_runs
    from classlab.inference import load_runs

    runs = run if isinstance(run, (list, tuple)) else [run]
    paths = expand_runs(runs)
    if len(paths) == 1:
        folder = open_run(paths[0])
        return load(folder, checkpoint), folder, folder.path / "eval" / split
    loaded = load_runs(list(paths), checkpoint)
    splits = {json.dumps(open_run(p).read_json("split.json").get("val")) for p in paths}
    if split == "val" and len(splits) > 1:
        raise ClassLabError(
            "--split val: the ensemble's runs hold out different validation images (k-fold runs do); "
            "their out-of-fold figures are in the k-fold folder's oof.csv and summary.json"
        )
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    return loaded, open_run(paths[0]), common / "ensemble" / "eval" / split


def _originals(cfg: Any, data: DataBundle, part: Part, split: str, run: RunFolder) -> tuple[Source, np.ndarray]:
    """The source holding the evaluated images at full size, and each evaluated image's index in it.

    The decoded cache only has images at the training size; multiscale and ten-crop testing need
    the originals, so the saved split is mapped back onto the source.
    """
    from classlab.multitask import task_columns

    dataset = open_dataset(cfg.data, tasks=task_columns(cfg))
    source = dataset.test if split == "test" else dataset.train
    if source is None:
        raise ClassLabError(f"the dataset has no {split} part any more; point data.root at the original data")
    if part.indices is not None:  # streamed: the part already holds source indices
        indices = np.asarray(part.indices)
    else:
        if data.bad:
            # Skipped bad files shift positions: ask the decoder (its cache answers) which files it kept.
            from classlab.data.loaders import decode

            kept = decode(source, data.size, cfg.data.cache_dir, threads=cfg.trainer.threads or 2).kept
        else:
            kept = np.arange(len(source))
        indices = kept if split == "test" else kept[np.asarray(data.split["val"], dtype=np.int64)]
    if len(indices) != len(part) or not np.array_equal(source.labels[indices], part.labels.numpy()):
        raise ClassLabError(
            f"the {split} images no longer match the run's split; point data.root at the data the run was trained on"
        )
    return source, indices


def _read_all(source: Source, indices: np.ndarray) -> Iterator[Image.Image]:
    for i in indices:
        if source.array is not None:  # already in memory: skip re-decoding from disk or zip
            yield Image.fromarray(source.array[int(i)])
        else:
            yield source.read(int(i))


def _example_reader(data: DataBundle, part: Part) -> tuple[Callable[[int], torch.Tensor], Callable[[int], str] | None]:
    """Image ``i`` of the part at the training size, and a description of it for report.json."""
    if part.images is not None:
        return (lambda i: part.images[i]), None
    source, indices = part.source, part.indices
    assert source is not None and indices is not None
    return (
        lambda i: image_to_tensor(source.read(int(indices[i])), data.size, source.channels),
        lambda i: source.describe(int(indices[i])),
    )


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
