"""``classlab.evaluate(run)``: top-1, top-5, per-class accuracy and the confusion matrix of a split.

Reads only the run folder: the saved config, class map and split, so the validation images
are exactly the ones training held out. With ``tta`` the same images are scored again under
test-time augmentation (``engine.tta``) and both figures are kept side by side.

``report`` adds the error analysis, next to the confusion matrix:

- ``per_class.csv``: precision, recall, F1 and support of each class (accuracy hides a class the
  model never predicts; precision/recall do not);
- ``confident_errors.png``: the images the model got wrong with the highest confidence, with true
  and predicted names (these are often label noise, or the clearest failure mode);
- ``reliability.png`` and the expected calibration error (ECE, 15 equal-width confidence bins as in
  Guo et al. 2017): how far the predicted probability is from the observed accuracy.

``calibrate`` fixes what the ECE shows: one temperature fitted on the run's validation split
(``engine.calibration``), kept in the run folder for the checkpoint it was fitted on, and from then on
used by eval, predict, ``classlab.load``, ensembles and export of that checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from classlab.config import Config, DataSection, train_command
from classlab.data.labelled_files import labelled_files
from classlab.data.pipeline import DataBundle, Part, load_data
from classlab.data.preprocess import image_to_tensor
from classlab.data.sources import Source, open_dataset
from classlab.data.tasks import task_columns, task_orders
from classlab.engine.calibration import (
    calibration_record,
    fit_temperature,
    nll,
    no_temperature,
    temperature_in_use,
)
from classlab.engine.ensemble import expand_runs, load_runs
from classlab.engine.exported import ExportedRun, exported_for_eval, is_exported_file
from classlab.engine.file_batches import file_batches, images_a_batch
from classlab.engine.load import LoadedRun, load
from classlab.engine.metrics import (
    ECE_BINS,
    calibration,
    confusion_matrix,
    macro_f1,
    macro_mean,
    per_class_scores,
    rounded,
    task_accuracies,
    task_f1_scores,
    top_k_accuracy,
    weighted_mean,
)
from classlab.engine.predict import autocast, predict_logits, predict_split
from classlab.engine.tta import (
    TTAPlan,
    parse_tta,
    scale_protocol_metrics,
    scale_protocol_probabilities,
    tta_probabilities_batches,
    tta_probabilities_images,
    views_per_image,
    views_probabilities,
)
from classlab.errors import ClassLabError, option, option_name
from classlab.run import (
    RunFolder,
    atomic_write_bytes,
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    new_figure,
    open_run,
    run_and_checkpoint,
)

GRID_IMAGES = 25
EXPORTED_BATCH = 64  # images an onnxruntime call scores for eval FILE.onnx --data (no run config to say)


def evaluate(
    run: str | Path | RunFolder | list[str | Path | RunFolder],
    split: str = "test",
    checkpoint: str | None = None,
    *,
    tta: str | None = None,
    report: bool = False,
    data: str | Path | None = None,
    calibrate: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run's checkpoint on ``split`` (test or val); write eval/<split>/ and return the metrics.

    ``run`` may also be an ONNX file written by ``classlab export`` (the deployed model), with ``data``: its
    images are read and scored as ``classlab predict FILE`` reads them (onnxruntime, the input recipe and the
    class names in the file's metadata), and the files are written into ``out`` only (None: nothing written,
    the metrics returned with ``out`` None).

    ``data``: labelled images the run never saw instead of a split (a folder of class folders, its
    test/ part when it has one, or a CSV manifest), scored through the prediction path (any image
    size, unreadable files listed and left out); written to eval/data-<name>/.

    ``tta``: ``flip``, ``translate``, ``tencrop``, ``multiscale:S1,S2,..`` or several joined by commas,
    or one of the published multi-scale protocols ``perscale:S1,..`` / ``fullconv:S1,..`` (engine.tta);
    the metrics gain a ``tta`` entry beside the plain top-1/top-5 (with ``per_scale`` rows for those).
    ``report``: also write per-class precision/recall/F1, the most confidently wrong images and the
    reliability diagram (ECE).
    ``calibrate``: first fit the temperature of the run's checkpoint on its validation split (each run of an
    ensemble or k-fold folder on its own) and write it into the run folder (calibration.json), so that these
    figures, and every later eval, predict, load and export of that checkpoint, use the calibrated
    probabilities; argmax and accuracy are the same by construction. The metrics gain ``calibration`` (T, and
    the evaluated images' ECE and NLL before and after) whenever a single run's calibration is in use, and
    ``calibrated_members`` when an ensemble's runs were fitted now.
    """
    if split not in ("test", "val"):
        raise ClassLabError(f"{option('split', split)}: choose 'test' or 'val'")
    if isinstance(run, (str, Path)) and is_exported_file(run) and Path(run).is_file():
        loaded = exported_for_eval(run, data, checkpoint, calibrate)
        assert data is not None
        return _evaluate_labelled(loaded, data, _out_folder(out), None, tta, report, [])
    if out is not None:
        raise ClassLabError(
            f"{option('out')} is for an exported model, which has no run folder; a run's evaluation is "
            "written into the run folder (eval/<split>/, eval/data-<name>/)"
        )
    if isinstance(run, (str, Path)):
        run, checkpoint = run_and_checkpoint(run, checkpoint)  # a run's checkpoint file stands for the run
    checkpoint = checkpoint or "best"
    if not calibrate:
        return _evaluate(run, split, checkpoint, tta, report, data, [])
    fits = fit_calibrations(run, checkpoint)
    try:
        return _evaluate(run, split, checkpoint, tta, report, data, [record for record, _ in fits])
    except BaseException:
        # The error (a wrong --data or --tta, a run without a test part) is the command's whole answer: the
        # calibrations it fitted first, unseen, are taken back, and the runs' earlier ones (if any) put back.
        _take_back(fits)
        raise


def _evaluate(
    run: Any, split: str, checkpoint: str, tta: str | None, report: bool, data: Any, fitted: list[dict[str, Any]]
) -> dict[str, Any]:
    """``evaluate`` once the calibrations asked for are fitted (``fitted``, one a run): a split of the run's own,
    or ``data``."""
    if data is not None:
        return _evaluate_files(run, data, checkpoint, tta, report, fitted)
    loaded, run, out = _load_for_eval(run, checkpoint, split)
    cfg = loaded.cfg
    if (tta or report) and cfg.task == "rotation":
        raise ClassLabError(
            f"{option_name('tta')} and {option_name('report')} apply to classifiers; this run is a rotation pretext run"
        )
    plan = parse_tta(tta, loaded.image_size) if tta else None
    data = load_data(cfg, split=run.read_split(), with_test=split == "test")
    part = _evaluated_part(data, split, loaded)
    loader = part.loader(cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    # In the run's precision, as its final test was: the figures match summary.json's, and a bf16 run
    # evaluates at bf16 speed.
    with autocast(cfg, next(loaded.model.parameters()).device):
        logits, labels, metrics = _plain_metrics(loaded, loader, split, checkpoint)
        probs = logits.softmax(1)
        if plan is not None:
            probs = _tta_metrics(loaded, plan, loader, (data, part, split, run), labels, metrics)
    if getattr(loaded, "members", None):
        metrics["members"] = [str(p) for p in loaded.members]
    _add_calibration(metrics, loaded, logits, labels, fitted)
    return _write_eval(out, (probs, labels), loaded, _example_reader(data, part), plan, metrics, report)


def _write_eval(
    out: Path | None,
    scored: tuple[torch.Tensor, torch.Tensor],
    loaded: LoadedRun,
    reader: tuple[Callable[[int], torch.Tensor], Callable[[int], str] | None],
    plan: TTAPlan | None,
    metrics: dict[str, Any],
    report: bool,
) -> dict[str, Any]:
    """The evaluation's folder: metrics.json and the confusion matrix, with --report's files, or without an earlier
    --report's when those are of other predictions (``drop_stale_report``). ``out`` None (an exported file without
    --out): the figures are returned, nothing is written."""
    probs, labels = scored
    if report:
        _report(out, probs, labels, loaded, reader, plan, metrics)
    elif out is not None:
        drop_stale_report(out, loaded, plan, metrics)
    if out is not None:
        atomic_write_json(out / "metrics.json", rounded(metrics))
        _write_confusion(out, probs, labels, loaded.classes, metrics, plan)
    return {**metrics, "out": str(out) if out is not None else None}


def _evaluated_part(data: DataBundle, split: str, loaded: LoadedRun) -> Part:
    """The split's images, or one line saying why there are none."""
    part = data.test if split == "test" else data.val
    if part is None or len(part) == 0:
        if split == "test" and getattr(loaded, "members", None):
            # --split val, the single run's way out, is refused for fold runs: point at what an ensemble can use.
            new_images = f" or score new images with {option('data')}" if loaded.tasks is None else ""  # classifiers
            raise ClassLabError(
                "the ensemble's runs have no test images (their data have no test part); train them with a test set "
                f"(data.test_csv_file=...){new_images}; a k-fold folder's honest validation figures are its "
                "out-of-fold ones (oof.csv, summary.json)"
            )
        raise ClassLabError(
            f"this run has no {split} images"
            + (
                f" (the dataset has no test part; use {option('split', 'val')})"
                if split == "test"
                else " (data.val_fraction was 0)"
            )
        )
    return part


def _report(
    out: Path | None,
    probs: torch.Tensor,
    labels: torch.Tensor,
    loaded: LoadedRun,
    reader: tuple[Callable[[int], torch.Tensor], Callable[[int], str] | None],
    plan: TTAPlan | None,
    metrics: dict[str, Any],
) -> None:
    """--report's files, of the predictions the metrics are of (TTA, calibrated), which their titles name."""
    image_at, describe = reader
    inputs = _inputs(loaded, plan, metrics.get("data_path"))
    source = _source(loaded, plan)
    rep = write_report(out, probs, labels, loaded.classes, image_at, describe=describe, source=source, inputs=inputs)
    metrics["report"] = {"ece": rep["ece"], "macro_f1": rep["macro_f1"], "per_class": rep["per_class"]}


def _source(loaded: LoadedRun, plan: TTAPlan | None) -> str:
    """The predictions a report is of, as its titles and report.json's ``predictions`` name them."""
    source = f"tta:{plan.text}" if plan else "plain"
    if loaded.temperature is not None:
        source += f", calibrated T={loaded.temperature:.4g}"
    elif loaded.calibration_note:  # an ensemble whose members are calibrated each by its own T
        source += ", calibrated members"
    return source


def _inputs(loaded: LoadedRun, plan: TTAPlan | None, data_path: str | None = None) -> dict[str, Any] | None:
    """What a report's predictions are of (report.json's ``inputs``): a run's ``report_inputs``; an exported file's
    own bytes, TTA and baked temperature; with --data, those images too. None for an ensemble."""
    if getattr(loaded, "members", None):
        return None
    if isinstance(loaded, ExportedRun):
        inputs = {
            "model": str(loaded.path.resolve()),
            "model_sha256": file_sha256(loaded.path),
            "tta": plan.text if plan else None,
            "temperature": loaded.temperature,
        }
    else:
        inputs = report_inputs(loaded.run, loaded.checkpoint, plan)
    return inputs | ({"data": data_path} if data_path else {})


REPORT_FILES = ("report.json", "per_class.csv", "reliability.png", "confident_errors.png", "errors")


def drop_stale_report(out: Path, loaded: LoadedRun, plan: TTAPlan | None, metrics: dict[str, Any]) -> None:
    """An eval without --report: an earlier --report's files in ``out`` that are of other predictions than this
    eval's (another checkpoint or checkpoint file, TTA, temperature; another exported file or other --data images)
    are removed, with one note, so the folder holds one evaluation; files of the same predictions are kept. They
    are derived: eval --report writes them again. An ensemble's report records no inputs: its predictions' name
    (TTA, calibration) is compared."""
    try:
        before = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or not one classlab could have written: nothing is taken away
        return
    if not isinstance(before, dict) or not {"predictions", "calibration_bins"} <= set(before):
        return  # a report.json of the user's own in an --out folder they chose
    now = _inputs(loaded, plan, metrics.get("data_path"))
    if now is None:
        was, source = before.get("predictions"), _source(loaded, plan)
        what = None if was == source else f"{was or 'other'} predictions, not {source}"
    else:
        what = _changed(before.get("inputs"), rounded(now))
    if what is None:
        return
    removed = [name for name in REPORT_FILES if (out / name).exists()]
    for name in removed:  # report.json first: classlab report reads the others only beside it
        if (out / name).is_dir():
            _drop_thumbnails(out / name)
            with contextlib.suppress(OSError):
                (out / name).rmdir()  # only when nothing but its thumbnails was in it
        else:
            (out / name).unlink(missing_ok=True)
    shown = ", ".join(f"{n}/" if n == "errors" else n for n in removed)
    metrics["notes"] = [
        *(metrics.get("notes") or []),
        f"removed the earlier --report files in {out} ({shown}): they were of {what}; eval --report writes them again",
    ]


def _changed(was: Any, now: dict[str, Any]) -> str | None:
    """How the predictions an earlier report.json's ``inputs`` describe differ from ``now``'s; None: the same."""
    if was == now:
        return None
    if not isinstance(was, dict):
        return "predictions it did not record (an older report)"

    def tta(value: Any) -> str:
        return f"TTA {value}" if value else "plain predictions"

    def temperature(value: Any) -> str:
        return f"temperature T={value:.4g}" if value else "uncalibrated probabilities"

    parts = []
    if "model" in was or "model" in now:  # an exported file's: the file itself, by its bytes
        if (was.get("model"), was.get("model_sha256")) != (now.get("model"), now.get("model_sha256")):
            parts.append(f"another model ({was.get('model') or str(was.get('checkpoint')) + '.ckpt of a run'})")
    elif was.get("checkpoint") != now.get("checkpoint"):
        parts.append(f"{was.get('checkpoint')}.ckpt, not {now.get('checkpoint')}.ckpt")
    elif was.get("checkpoint_sha256") != now.get("checkpoint_sha256"):
        parts.append(f"an earlier {now.get('checkpoint')}.ckpt (the file has changed since)")
    if was.get("tta") != now.get("tta"):
        parts.append(f"{tta(was.get('tta'))}, not {tta(now.get('tta'))}")
    if was.get("temperature") != now.get("temperature"):
        parts.append(f"{temperature(was.get('temperature'))}, not {temperature(now.get('temperature'))}")
    if was.get("data") != now.get("data"):
        parts.append(f"other images ({was.get('data')})" if was.get("data") else "other images")
    return "; ".join(parts) or "other predictions"


def report_inputs(run: RunFolder, checkpoint: str = "best", plan: TTAPlan | None = None) -> dict[str, Any]:
    """What a single run's report files are of: the checkpoint file (by SHA-256), the TTA and the calibration in
    use. ``classlab report`` reuses the files only when these are still the run's: after a resumed run's new
    best.ckpt, a calibration or a --tta eval, they described other predictions than the page's."""
    return {
        "checkpoint": checkpoint,
        "checkpoint_sha256": file_sha256(run.checkpoint(checkpoint)),
        "tta": plan.text if plan else None,
        "temperature": temperature_in_use(run, checkpoint),
    }


# ---------------------------------------------------------------------------------------------
# --calibrate: temperature scaling fitted on the validation split (engine.calibration)
# ---------------------------------------------------------------------------------------------

NOT_CALIBRATED = {
    "rotation": "{run} is a rotation pretext run, whose classes are quarter turns: calibrate the classifier "
    "trained from it ({start_from}) instead",
    "multitask": "{run} is a multitask run, and one temperature calibrates a single-label classifier: "
    "evaluate it without calibrating (its heads keep their plain probabilities)",
}


def fit_calibrations(run: Any, checkpoint: str) -> list[tuple[dict[str, Any], bytes | None]]:
    """``--calibrate``: fit the temperature of each run's checkpoint (one run, the runs of an ensemble, the folds
    of a k-fold folder) on that run's own validation split, the very images ``--split val`` reads (a fold's:
    its held-out fold), and write it into that run's folder. Returns each record (with its ``file``) and the
    bytes of the file it replaced (None: there was none). A run that cannot be calibrated is one line, checked
    for every run before any is fitted, with nothing written: calibrating on the test images instead would
    flatter every test figure after."""
    paths = expand_runs(run if isinstance(run, (list, tuple)) else [run])
    folders = [open_run(p) for p in paths]
    for folder, path in zip(folders, paths):
        _check_calibratable(folder, path)
    fits: list[tuple[dict[str, Any], bytes | None]] = []
    try:
        for folder in folders:
            fits.append(_fit_calibration(folder, checkpoint))
    except BaseException:
        _take_back(fits)  # a member that failed leaves none of the ensemble's calibrations half-made
        raise
    return fits


def _check_calibratable(folder: RunFolder, path: Path) -> None:
    task = folder.read_config_tree().get("task") or "classify"
    if task in NOT_CALIBRATED:
        start_from = train_command(f"model.init_from={path}")
        why = NOT_CALIBRATED[task].format(run=path, start_from=start_from)
        raise ClassLabError(f"{option_name('calibrate')}: {why}")
    if not folder.read_split().get("val"):
        raise ClassLabError(
            f"{option_name('calibrate')} fits the temperature on the run's validation images, and {path} has none "
            "(data.val_fraction was 0): train it again with data.val_fraction=0.1; fitting it on the test "
            "images instead would flatter every test figure after"
        )


def _fit_calibration(folder: RunFolder, checkpoint: str) -> tuple[dict[str, Any], bytes | None]:
    """One run's temperature, fitted on its validation images and written into its folder."""
    digest = file_sha256(folder.checkpoint(checkpoint))  # before the weights are read (calibration_record)
    loaded = load(folder, checkpoint, calibrated=False)
    data = load_data(loaded.cfg, split=folder.read_split(), with_test=False)
    assert data.val is not None
    loader = data.val.loader(loaded.cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    with autocast(loaded.cfg, next(loaded.model.parameters()).device):
        logits, labels = predict_logits(loaded.model, loader)
    temperature, held = fit_temperature(logits, labels)
    if held:
        raise no_temperature(temperature, len(labels))
    record = calibration_record(folder, loaded.checkpoint, logits, labels, temperature, digest)
    path = folder.calibration_path(loaded.checkpoint)
    previous = path.read_bytes() if path.is_file() else None
    folder.write_calibration(loaded.checkpoint, record)
    return {**record, "file": str(path), "run": str(folder.path)}, previous


def _take_back(fits: list[tuple[dict[str, Any], bytes | None]]) -> None:
    """Each calibration written removed, or the one it replaced put back."""
    for record, previous in fits:
        path = Path(record["file"])
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, previous)


def _add_calibration(
    metrics: dict[str, Any],
    loaded: LoadedRun,
    logits: torch.Tensor,
    labels: torch.Tensor,
    fitted: list[dict[str, Any]],
) -> None:
    """The calibration in use and what it does to the evaluated images: ECE and NLL before and after (top-1 is
    the same by construction). ``logits`` are the calibrated model's (or log-probabilities): times T, a softmax
    gives the plain probabilities again. An ensemble's members fitted now are listed (``calibrated_members``):
    each has its own T, and the mean of their probabilities has no single T to undo."""
    if loaded.calibration_note and not fitted:
        metrics["notes"] = [*(metrics.get("notes") or []), loaded.calibration_note]
    if len(fitted) > 1:
        shown = ("run", "temperature", "val_images", "val_nll_before", "val_nll_after", "file")
        metrics["calibrated_members"] = [{k: record[k] for k in shown} for record in fitted]
    if loaded.calibration is None or len(labels) == 0:
        return
    temperature = float(loaded.calibration["temperature"])
    after = logits.double()
    before = after * temperature
    keep = ("temperature", "file", "checkpoint", "val_images")
    keep += ("val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after")
    metrics["calibration"] = {
        **{k: loaded.calibration[k] for k in keep if k in loaded.calibration},
        "fitted_now": bool(fitted),
        "ece_before": calibration(before.softmax(1), labels)["ece"],
        "ece_after": calibration(after.softmax(1), labels)["ece"],
        "nll_before": nll(before, labels),
        "nll_after": nll(after, labels),
    }


def _load_for_eval(run: Any, checkpoint: str, split: str) -> tuple[LoadedRun, RunFolder, Path]:
    """The run (or the mean ensemble of several runs / a k-fold folder) and where its eval files go.

    An ensemble is scored on the first member's split: its test set is every member's, but fold
    runs each hold out a different validation fold, so ``--split val`` is refused for them.
    """
    paths = expand_runs(run if isinstance(run, (list, tuple)) else [run])
    if len(paths) == 1:
        folder = open_run(paths[0])
        return load(folder, checkpoint), folder, folder.path / "eval" / split
    loaded = load_runs(list(paths), checkpoint)
    splits = {json.dumps(open_run(p).read_split().get("val")) for p in paths}
    if split == "val" and len(splits) > 1:
        raise ClassLabError(
            f"{option('split', 'val')}: the ensemble's runs hold out different validation images (k-fold runs do); "
            "their out-of-fold figures are in the k-fold folder's oof.csv and summary.json"
        )
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    return loaded, open_run(paths[0]), common / "ensemble" / "eval" / split


def _plain_metrics(
    loaded: LoadedRun, loader: Any, split: str, checkpoint: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(logits, labels, metrics) of the split without test-time augmentation."""
    task_acc: dict[str, float] = {}
    task_f1: dict[str, float] = {}
    rotation = loaded.cfg.task == "rotation"
    task_logits, logits, labels = predict_split(loaded.model, loader, loaded.tasks is not None, rotation=rotation)
    if loaded.tasks is not None:
        task_acc = task_accuracies(loaded.tasks.names, task_logits, loaded.tasks.split(labels), split)
        task_f1 = task_f1_scores(loaded.tasks, task_logits, labels, split)
    metrics = _scores(logits, labels, loaded.classes, split, checkpoint)
    if task_acc:  # multitask: top1/top5 are of the combined class, these of each task's own head
        metrics["tasks"] = {key.split("/")[1]: value for key, value in task_acc.items()}
        metrics["tasks_f1"] = {key.split("/")[1]: value for key, value in task_f1.items()}
    return logits, labels, metrics


def _scores(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], split: str, checkpoint: str) -> dict:
    cm = confusion_matrix(logits, labels, len(classes))
    return {
        "split": split,
        "checkpoint": checkpoint,
        "images": int(len(labels)),
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, min(5, len(classes))),
        "f1": macro_f1(logits, labels, len(classes)),
        "per_class": {n: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() > 0 else None) for i, n in enumerate(classes)},
    }


def _tta_figures(plan: TTAPlan, probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    return {
        "modes": plan.text,
        "views": views_per_image(plan),
        "scales": list(plan.scales),
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, min(5, len(classes))),
        "f1": macro_f1(probs, labels, len(classes)),
    }


def _evaluate_files(
    run: Any, data: str | Path, checkpoint: str, tta: str | None, report: bool, fitted: list[dict[str, Any]]
) -> dict[str, Any]:
    """``--data``: a labelled folder or manifest outside the run, read as predict reads files."""
    name = Path(data).stem if Path(data).suffix.lower() == ".csv" else Path(data).resolve().name
    loaded, _, out = _load_for_eval(run, checkpoint, f"data-{name or 'root'}")
    out = _own_folder(out, Path(data).resolve())
    if loaded.cfg.task != "classify":
        raise ClassLabError(
            f"{option('data')} scores a classifier; this is a {loaded.cfg.task} run: evaluate its own split"
        )
    return _evaluate_labelled(loaded, data, out, checkpoint, tta, report, fitted)


def _evaluate_labelled(
    loaded: LoadedRun,
    data: str | Path,
    out: Path | None,
    checkpoint: str | None,
    tta: str | None,
    report: bool,
    fitted: list[dict[str, Any]],
) -> dict[str, Any]:
    """Labelled images scored through the prediction path, by a run (``checkpoint``) or by an exported file (None;
    its default manifest columns, and ``out`` None when no --out was given)."""
    exported = isinstance(loaded, ExportedRun)
    section = DataSection() if exported else loaded.cfg.data
    found = labelled_files(section, data, loaded.classes, "the model" if exported else "the run")
    # A stray file (notes.txt in a class folder) or an empty class folder is listed and left out, as an
    # unreadable image is: eval takes no overrides, so the data.skip_bad_images=true that training's refusal
    # names could not be given here, and predict passes such files over too.
    plan = parse_tta(tta, loaded.image_size) if tta else None
    if plan is not None and plan.protocol != "average":
        raise ClassLabError(
            f"{option_name('tta')} {plan.protocol} scores the run's own splits; with {option('data')} use "
            "multiscale:S1,S2,..."
        )
    plain, labels, files, skipped = _score_files(loaded, found.files, found.labels, None)
    if not files:
        raise ClassLabError(f"{option('data', data, quoted=True)}: no readable image among {len(found.files)} file(s)")
    labels_plain = labels
    metrics = _scores(plain.clamp_min(1e-30).log(), labels, loaded.classes, "data", checkpoint)
    metrics |= {"data": found.where, "data_path": str(Path(data).resolve())}
    if exported:  # no checkpoint of a run: the file, run as predict runs it
        metrics |= {"model": str(loaded.path), "backend": "onnxruntime"}
    # What the data lists but is no image to score (a manifest's row with an empty label or listed twice, a stray
    # file, an empty class folder), apart from the images that could not be read: one heading told of both.
    metrics["left_out"] = list(found.problems)
    metrics["skipped"] = [f"{p}: {e}" for p, e in skipped]
    seen = 0 if exported else _among_own_data(loaded.cfg, files)
    if seen:
        metrics["notes"] = [
            f"{seen} of these {len(files)} images are among the run's own data ({loaded.cfg.data.root}: its training "
            "and validation images): these figures are not of images it never saw"
        ]
    probs = plain  # the report's predictions: the TTA ones when asked, as eval --report on a split
    if plan is not None:
        probs, labels, _, _ = _score_files(loaded, files, [int(v) for v in labels], plan)
        metrics["tta"] = _tta_figures(plan, probs, labels, loaded.classes)
    if getattr(loaded, "members", None):
        metrics["members"] = [str(p) for p in loaded.members]
    _add_calibration(metrics, loaded, plain.clamp_min(1e-30).log(), labels_plain, fitted)
    reader = (lambda i: loaded.to_tensor(files[i])), (lambda i: str(files[i]))
    return _write_eval(out, (probs, labels), loaded, reader, plan, metrics, report)


def left_out_lines(metrics: dict[str, Any], shown: int = 20) -> list[str]:
    """What eval --data left out, under headings that say what each list holds: the manifest's rows (or the
    folder's entries) that are no image to score, then the images that could not be read; ``shown`` of each."""
    lines = []
    data = Path(metrics.get("data_path") or "")
    manifest = data.suffix.lower() in (".csv", ".tsv")
    rows = f"row(s) of {data.name}" if manifest else f"file(s) or folder(s) in {data} are not images to score and"
    for items, heading in (
        (metrics.get("left_out") or [], f"{rows} are left out:"),
        (metrics.get("skipped") or [], "file(s) could not be read and are left out:"),
    ):
        if items:
            more = [f"  ... and {len(items) - shown} more"] if len(items) > shown else []
            lines += [f"{len(items)} {heading}", *(f"  {line}" for line in items[:shown]), *more]
    return lines


def _out_folder(out: str | Path | None) -> Path | None:
    """--out of an exported file's evaluation: a folder (made when missing), never a file's place."""
    if out is None:
        return None
    if Path(out).exists() and not Path(out).is_dir():
        raise ClassLabError(
            f"{option('out', out, quoted=True)} is a file; give a folder for metrics.json, confusion.csv and "
            "confusion.png"
        )
    return Path(out)


def _among_own_data(cfg: Config, files: list[Any]) -> int:
    """How many of ``files`` the run trained or validated on: eval --data given the run's own folder or manifest
    scored its training images as new ones without a word. Only a folder or a manifest names files: a torchvision
    set (or the sample) would be read, or downloaded, in full to find none."""
    if cfg.data.dataset not in ("folder", "csv"):
        return 0
    try:
        own = open_dataset(cfg.data).train.files or []
    except (ClassLabError, OSError):
        return 0  # the run's data moved or is gone: nothing to compare against
    resolved = {os.path.realpath(str(f)) for f in own}
    return sum(os.path.realpath(str(f)) in resolved for f in files)


def _own_folder(out: Path, data: Path) -> Path:
    """eval/data-<name>/, or data-<name>-<hash of the path>/ when that folder holds the figures of other data of the
    same name (two test/ folders): a second eval --data then writes beside the first instead of over it."""
    try:
        before = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("data_path")
    except (OSError, ValueError, AttributeError):
        return out
    if before in (None, str(data)):
        return out
    return out.with_name(f"{out.name}-{hashlib.sha1(str(data).encode()).hexdigest()[:8]}")


def _score_files(
    loaded: LoadedRun, files: list[Path], labels: list[int], plan: TTAPlan | None
) -> tuple[torch.Tensor, torch.Tensor, list[Path], list[tuple[str, str]]]:
    """(probabilities, labels, files) of the readable files, and (file, why) of the others."""
    batch_size = loaded.cfg.data.batch_size if loaded.cfg is not None else EXPORTED_BATCH
    label_of = dict(zip(files, labels))
    probs, kept, skipped = [], [], []
    with _precision(loaded):
        for chunk, batch, errors in file_batches(files, loaded, images_a_batch(batch_size, plan), 4, plan):
            skipped += [(str(f), e) for f, e in zip(chunk, errors) if e]
            kept += [f for f, e in zip(chunk, errors) if not e]
            if batch is not None and plan is None:
                probs.append(loaded.probabilities(batch).float())
            elif batch is not None:
                probs.append(views_probabilities(loaded.probabilities, batch, plan, loaded.image_size, batch_size))
    n = len(loaded.classes)
    out = torch.cat(probs) if probs else torch.empty(0, n)
    return out, torch.tensor([label_of[f] for f in kept], dtype=torch.long), kept, skipped


def _precision(loaded: LoadedRun) -> Any:
    """The run's inference precision (``autocast``); an exported file runs in onnxruntime as it was exported."""
    if loaded.model is None:
        return contextlib.nullcontext()
    return autocast(loaded.cfg, next(loaded.model.parameters()).device)


def _tta_metrics(
    loaded: LoadedRun, plan: TTAPlan, loader: Any, where: tuple, labels: torch.Tensor, metrics: dict[str, Any]
) -> torch.Tensor:
    """Score the split again under ``plan``; add its figures to ``metrics`` and return its probabilities."""
    data, part, split, run = where
    k5 = min(5, len(loaded.classes))
    if plan.protocol != "average":  # perscale / fullconv: each scale scored at its own resolution
        source, indices = _originals(loaded.cfg, data, part, split, run)
        per_scale = scale_protocol_probabilities(
            loaded.model, lambda: _read_all(source, indices), plan, loaded.channels
        )
        metrics["tta"], tta_probs = scale_protocol_metrics(per_scale, labels, plan, k5)
        return tta_probs
    if plan.needs_originals:
        source, indices = _originals(loaded.cfg, data, part, split, run)
        images = _read_all(source, indices)
        tta_probs = tta_probabilities_images(loaded.model, images, plan, loaded.image_size, loaded.channels)
    else:
        tta_probs, tta_labels = tta_probabilities_batches(loaded.model, loader, plan.batch_modes, loaded.image_size)
        assert torch.equal(tta_labels, labels)
    metrics["tta"] = _tta_figures(plan, tta_probs, labels, loaded.classes)
    return tta_probs


def _write_confusion(
    out: Path, probs: torch.Tensor, labels: torch.Tensor, classes: list[str], metrics: dict, plan: TTAPlan | None
) -> None:
    """confusion.csv and .png of the predictions the report reads: with --tta, the TTA ones (the matrix was of
    the plain predictions beside a per_class.csv of the TTA ones, and neither said which it held)."""
    cm = confusion_matrix(probs, labels, len(classes))
    source = f"tta:{plan.text}" if plan else ""
    top1 = metrics["tta"]["top1"] if plan else metrics["top1"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true\\predicted", *classes])
    for i, name in enumerate(classes):
        writer.writerow([name, *cm[i].tolist()])
    atomic_write_text(out / "confusion.csv", buffer.getvalue())
    atomic_write_figure(out / "confusion.png", _confusion_figure(cm, classes, top1, source))


def _originals(cfg: Config, data: DataBundle, part: Part, split: str, run: RunFolder) -> tuple[Source, np.ndarray]:
    """The source holding the evaluated images at full size, and each evaluated image's index in it.

    The decoded cache only has images at the training size; multiscale and ten-crop testing need
    the originals, so the saved split is mapped back onto the source.
    """
    dataset = open_dataset(cfg.data, tasks=task_columns(cfg), orders=task_orders(cfg))
    source = dataset.test if split == "test" else dataset.train
    if source is None:
        raise ClassLabError(f"the dataset has no {split} part any more; point data.root at the original data")
    # Skipped bad files shift positions: the loaded data knows which source images it kept.
    kept = data.kept["test" if split == "test" else "train"]
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


def _confusion_figure(cm: Any, classes: list[str], top1: float, source: str = "") -> Any:
    """Rows true, columns predicted; each cell's count written on a colour of its row's share, so a rare class's
    errors show as strongly as a common one's (the title says which is which: it used to say "rows sum to 1"
    above numbers that were counts)."""
    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig, ax = new_figure(figsize=(size, size))
    rates = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "confusion: numbers are counts, colour the share of the true class (row)"
    top = f"{source + ' ' if source else ''}top-1 {top1:.4f}"
    ax.set_title(f"{title}\n{top}", fontsize=9)
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
    if _title_overflows(fig, ax):  # a narrow figure (2 or 3 classes) cut it off at the right edge
        ax.set_title(title.replace(", colour", ",\ncolour") + "\n" + top, fontsize=9)
        for _ in range(2):  # as below: the square image settles on the second pass
            fig.tight_layout()
    if n <= 6 and _labels_collide(fig, ax):
        ax.tick_params(axis="x", labelrotation=90)
        for _ in range(2):  # the square image settles in the space the upright names leave on the second pass
            fig.tight_layout()
    return fig


def _title_overflows(fig: Any, ax: Any) -> bool:
    """Whether the axes' title, centred over them, runs past the figure's left or right edge as drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    box = ax.title.get_window_extent(FigureCanvasAgg(fig).get_renderer())
    return box.x0 < fig.bbox.x0 or box.x1 > fig.bbox.x1


def _labels_collide(fig: Any, ax: Any) -> bool:
    """Whether the x labels, drawn level, run into each other: a few long class names ('golden_retriever',
    'labrador_retriever') were written over one another, as only more than 6 classes had them turned upright.
    Measured as drawn (the names' own width in the figure's font), with a little room between two."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
    gap = 2 * fig.dpi / 72  # two points
    return any(left.x1 + gap > right.x0 for left, right in zip(boxes, boxes[1:]))


# ---------------------------------------------------------------------------------------------
# --report: where the model is wrong, and whether its confidence means anything
# ---------------------------------------------------------------------------------------------


def display_width(text: str) -> int:
    """Columns a terminal gives ``text``: Korean, Chinese and Japanese class names take two a character."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` terminal columns (str.ljust counts characters, not columns)."""
    return text + " " * max(0, width - display_width(text))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-class table eval --report prints, its macro and support-weighted averages last (as scikit-learn's
    classification_report); every row ends in the same column (the first column is as wide as the widest of the
    class names and 'weighted avg', which short names like red/green/blue left sticking out)."""
    width = max([len("weighted avg"), *(display_width(r["class"]) for r in rows)])
    lines = [f"  {'class':<{width}}  precision  recall      f1  support"]
    for r in rows:
        lines.append(
            f"  {pad(r['class'], width)}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:.4f}  {r['support']:7d}"
        )
    support = sum(r["support"] for r in rows)
    for name, mean in (("macro avg", macro_mean), ("weighted avg", weighted_mean)):
        avg = {k: mean(rows, k) for k in ("precision", "recall", "f1")}
        lines.append(f"  {name:<{width}}  {avg['precision']:9.4f}  {avg['recall']:6.4f}  {avg['f1']:.4f}  {support:7d}")
    return "\n".join(lines)


def write_report(
    out: Path | None,
    probs: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    image_at: Callable[[int], torch.Tensor],
    *,
    describe: Callable[[int], str] | None = None,
    source: str = "plain",
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write per_class.csv, confident_errors.png, reliability.png and report.json into ``out``.

    ``image_at(i)`` gives the uint8 (C, H, W) image of example ``i``; only the few shown are read.
    ``inputs``: what the predictions are of (``report_inputs``), kept in report.json.
    ``out`` None: the report's figures only, nothing written (an exported file evaluated without --out).
    """
    pred = probs.argmax(1)
    rows = per_class_scores(pred, labels, classes)
    cal = calibration(probs, labels)
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
    report = {
        "predictions": source,
        "ece": cal["ece"],
        "ece_bins": ECE_BINS,
        "macro_f1": macro_mean(rows, "f1"),
        "weighted_f1": weighted_mean(rows, "f1"),
        "per_class": rows,
        "confident_errors": errors,
        "calibration_bins": cal["bins"],
        **({"inputs": inputs} if inputs is not None else {}),
    }
    if out is not None:
        _write_report_files(out, rows, cal, source, [image_at(i) for i in order], errors)
        atomic_write_json(out / "report.json", rounded(report))  # last: the others are complete beside it
    return report


def _write_report_files(
    out: Path, rows: list[dict[str, Any]], cal: dict[str, Any], source: str, images: list[torch.Tensor], errors: list
) -> None:
    """per_class.csv, reliability.png, confident_errors.png and errors/ of ``write_report``."""
    buffer = io.StringIO()
    columns = ["class", "precision", "recall", "f1", "support", "predicted"]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, **{k: f"{r[k]:.6f}" for k in ("precision", "recall", "f1")}})
    atomic_write_text(out / "per_class.csv", buffer.getvalue())
    atomic_write_figure(out / "reliability.png", _reliability_figure(cal, source))
    atomic_write_figure(out / "confident_errors.png", _errors_figure(images, errors))
    _write_thumbnails(out / "errors", images)


def _drop_thumbnails(folder: Path) -> None:
    """The numbered PNGs ``_write_thumbnails`` wrote, and only those: an exported file's --out is a folder the user
    chose, whose errors/ may hold files of their own."""
    for png in folder.glob("[0-9][0-9].png") if folder.is_dir() else []:
        png.unlink(missing_ok=True)


def _write_thumbnails(folder: Path, images: list[torch.Tensor]) -> None:
    """Each confidently wrong image as its own PNG (``classlab report`` shows them with their names)."""
    _drop_thumbnails(folder)  # a previous evaluation's errors are not this one's
    for k, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG")
        atomic_write_bytes(folder / f"{k:02d}.png", buffer.getvalue())


def _reliability_figure(cal: dict[str, Any], source: str) -> Any:
    fig, ax = new_figure(figsize=(5.5, 5.5))
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
    return fig


def _errors_figure(images: list[torch.Tensor], errors: list[dict[str, Any]]) -> Any:
    n = len(images)
    cols = min(5, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = new_figure(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
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
    return fig
