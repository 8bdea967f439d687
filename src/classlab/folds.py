"""k-fold cross-validation: ``classlab train CONFIG --folds K`` (or ``data.folds: K`` without ``data.fold``).

Each fold is an ordinary run, ``runs/<exp>/fold{i}``, whose validation set is fold i of a
seeded split (stratified by class, or grouped by ``data.group_column`` so that one person
never sits in two folds). The folder above them is not a run: it holds ``folds.json`` (the
config and K), ``classes.json``, ``oof.csv`` and a ``summary.json`` with each fold's figures
and their mean and standard deviation.

``oof.csv`` holds the out-of-fold predictions: every usable training image once, predicted by
the one fold model that did not train on it. It is the honest estimate of how the recipe
generalises, and the input of any stacking a competitor tries next. A second call continues
where the first stopped: finished folds are kept, an unfinished one resumes.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

import torch

from classlab.config import Config, validate
from classlab.errors import ClassLabError
from classlab.run import RunFolder, atomic_write_text, move_aside, new_run_path

FOLDS_FILE = "folds.json"
OOF_FILE = "oof.csv"


def is_fold_group(path: str | Path) -> bool:
    """A folder made by a k-fold run (it holds fold{i} runs and folds.json)."""
    return (Path(path) / FOLDS_FILE).is_file()


def fold_runs(path: str | Path) -> list[Path]:
    """The fold run folders of a k-fold folder, in fold order (only those that exist)."""
    folder = Path(path)
    k = int(RunFolder(folder).read_json(FOLDS_FILE)["folds"])
    return [folder / f"fold{i}" for i in range(k) if (folder / f"fold{i}" / "config.yaml").is_file()]


def _top_folder(cfg: Config, resume: bool, force: bool) -> RunFolder:
    default = f"{cfg.data.dataset}_{cfg.model.name.replace(':', '_')}_{cfg.data.folds}fold"
    path, _ = new_run_path(cfg.run.root, cfg.exp_name, default, numbered=not resume and not cfg.exp_name)
    if path.exists() and not resume:
        if not is_fold_group(path):
            raise ClassLabError(f"'{path}' exists and is not a k-fold folder; choose another exp_name")
        if force:
            move_aside(path)
        # Without --force an existing k-fold folder is continued: finished folds are kept.
    elif resume and not path.is_dir():
        raise ClassLabError(f"--resume: k-fold folder '{path}' does not exist; start it without --resume")
    return RunFolder(path)


def train_folds(cfg: Config, *, resume: bool = False, force: bool = False, quiet: bool = False) -> RunFolder:
    """Train every fold in turn, then write the out-of-fold predictions and the mean ± std summary."""
    from classlab.training import train

    if cfg.stages:
        raise ClassLabError("data.folds with stages is not supported; run the folds of one stage at a time")
    top = _top_folder(cfg, resume, force)
    top.path.mkdir(parents=True, exist_ok=True)
    tree = cfg.to_dict()
    tree["exp_name"] = top.path.name
    if is_fold_group(top.path) and top.read_json(FOLDS_FILE).get("folds") != cfg.data.folds:
        raise ClassLabError(f"'{top.path}' holds a {top.read_json(FOLDS_FILE)['folds']}-fold run; use --force")
    top.write_json(FOLDS_FILE, {"folds": cfg.data.folds, "seed": cfg.seed, "config": tree})
    top.update_summary(status="running", exp_name=top.path.name, folds=cfg.data.folds)
    for i in range(cfg.data.folds):
        fold_tree = dict(tree, exp_name=f"fold{i}")
        fold_tree["run"] = dict(tree["run"], root=str(top.path))
        fold_tree["data"] = dict(tree["data"], fold=i)
        fold = RunFolder(top.path / f"fold{i}")
        status = fold.summary().get("status") if (fold.path / "summary.json").is_file() else None
        if status == "finished":
            continue
        if not quiet:
            print(f"fold {i + 1}/{cfg.data.folds}", flush=True)
        train(validate(fold_tree), resume=status is not None, quiet=quiet)
    return write_out_of_fold(top)


def _predict_fold(run: Path) -> dict[str, Any]:
    """The best checkpoint of one fold on its own validation images: probabilities and labels."""
    from classlab.data.pipeline import load_data
    from classlab.engine.evaluate import predict_logits
    from classlab.inference import load

    loaded = load(run)
    folder = RunFolder(run)
    split = folder.read_json("split.json")
    data = load_data(loaded.cfg, split=split, with_test=False)
    if data.val is None:
        raise ClassLabError(f"fold run '{run}' has no validation images")
    loader = data.val.loader(loaded.cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    task_probs: list[torch.Tensor] = []
    if loaded.tasks is not None:
        from classlab.multitask import predict_tasks

        task_logits, logits, labels = predict_tasks(loaded.model, loader)
        task_probs = [t.softmax(1) for t in task_logits]
    else:
        logits, labels = predict_logits(loaded.model, loader)
    return {
        "index": list(split["val"]),
        "files": data.train_files,
        "probs": logits.softmax(1),
        "labels": labels,
        "task_probs": task_probs,
        "classes": loaded.classes,
        "layout": loaded.tasks,
    }


def prediction_metrics(
    probs: torch.Tensor, labels: torch.Tensor, layout: Any = None, task_probs: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """acc and macro-F1 of the combined class, and per task (``<task>/acc``, ``<task>/f1``) for multitask."""
    from classlab.engine.evaluate import macro_f1, top_k_accuracy

    out = {"acc": top_k_accuracy(probs, labels, 1), "f1": macro_f1(probs, labels, probs.shape[1])}
    if layout is not None and task_probs:
        for name, p, target, size in zip(layout.names, task_probs, layout.split(labels), layout.sizes):
            out[f"{name}/acc"] = top_k_accuracy(p, target, 1)
            out[f"{name}/f1"] = macro_f1(p, target, size)
    return out


def _oof_rows(fold: int, pred: dict[str, Any]) -> list[dict[str, Any]]:
    classes, layout = pred["classes"], pred["layout"]
    rows = []
    per_task = pred["layout"].split(pred["labels"]) if layout is not None else []
    for j, index in enumerate(pred["index"]):
        p = pred["probs"][j]
        best = int(p.argmax())
        row: dict[str, Any] = {
            "index": index,
            "path": pred["files"][index] if pred["files"] else "",
            "fold": fold,
            "label": classes[int(pred["labels"][j])],
            "pred": classes[best],
            "prob": round(float(p[best]), 6),
        }
        for t, name in enumerate(layout.names if layout is not None else ()):
            tp = pred["task_probs"][t][j]
            row[f"{name}_label"] = layout.classes[t][int(per_task[t][j])]
            row[f"{name}_pred"] = layout.classes[t][int(tp.argmax())]
            row[f"{name}_prob"] = round(float(tp.max()), 6)
        row.update({f"p:{c}": round(float(v), 6) for c, v in zip(classes, p.tolist())})
        rows.append(row)
    return rows


def write_out_of_fold(top: RunFolder) -> RunFolder:
    """oof.csv (each training image once, by the fold that held it out) and the fold summary."""
    k = int(top.read_json(FOLDS_FILE)["folds"])
    rows: list[dict[str, Any]] = []
    per_fold: list[dict[str, float]] = []
    probs, labels, task_probs = [], [], []
    layout = None
    wall = 0.0
    for i in range(k):
        run = top.path / f"fold{i}"
        if RunFolder(run).summary().get("status") != "finished":
            raise ClassLabError(f"fold {i} ('{run}') has not finished; run the same command again to continue it")
        pred = _predict_fold(run)
        layout = pred["layout"]
        rows += _oof_rows(i, pred)
        per_fold.append(prediction_metrics(pred["probs"], pred["labels"], layout, pred["task_probs"]))
        probs.append(pred["probs"])
        labels.append(pred["labels"])
        task_probs.append(pred["task_probs"])
        wall += float(RunFolder(run).summary().get("wall_time_s") or 0.0)
        if i == 0:
            top.write_classes(pred["classes"])
    _check_coverage(rows, RunFolder(top.path / "fold0").read_json("split.json"))
    rows.sort(key=lambda r: r["index"])
    joined_tasks = [torch.cat([tp[t] for tp in task_probs]) for t in range(len(task_probs[0]))] if layout else []
    overall = prediction_metrics(torch.cat(probs), torch.cat(labels), layout, joined_tasks)
    summary: dict[str, Any] = {f"oof_{key}": value for key, value in overall.items()}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        summary[f"fold_{key}"] = [round(v, 6) for v in values]
        summary[f"mean_{key}"] = statistics.fmean(values)
        summary[f"std_{key}"] = statistics.stdev(values) if len(values) > 1 else 0.0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(top.path / OOF_FILE, buffer.getvalue())
    top.update_summary(status="finished", images=len(rows), wall_time_s=round(wall, 2), **summary)
    return top


def _check_coverage(rows: list[dict[str, Any]], split: dict[str, Any]) -> None:
    """Every usable training image exactly once: a k-fold run that is not that is a bug, not a result."""
    seen = sorted(r["index"] for r in rows)
    expected = int(split.get("source_images") or len(split["train"]) + len(split["val"]))
    if seen != list(range(expected)):
        raise ClassLabError(
            f"out-of-fold predictions cover {len(set(seen))} of {expected} training images "
            f"({len(seen) - len(set(seen))} twice); the fold runs do not come from one k-fold split"
        )


def fold_mean_rows(runs: list[Any], rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """``classlab compare``: one 'mean ± std' row per k-fold folder whose fold runs are in the table."""
    out = []
    by_parent: dict[Path, list[dict[str, Any]]] = {}
    for run, row in zip(runs, rows):
        if is_fold_group(run.path.parent) and run.config.get("data.fold") is not None:
            by_parent.setdefault(run.path.parent, []).append(row)
    for parent, members in by_parent.items():
        mean_row: dict[str, Any] = {"run": f"{parent.name} mean ± std ({len(members)} folds)", "status": ""}
        for m in metrics:
            values = [float(r[m]) for r in members if isinstance(r.get(m), (int, float))]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                mean_row[m] = f"{statistics.fmean(values):.4f} ± {std:.4f}"
        out.append(mean_row)
    return out
