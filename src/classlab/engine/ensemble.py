"""Ensembles: several runs that share a class map, used as one model (``--ensemble mean``).

The common case is the K fold runs of ``classlab train --folds K``: a k-fold folder given where
a run is expected stands for its fold runs. The members' softmax probabilities are averaged
(each member with its own normalisation, as it was trained); the ensemble then looks like any
loaded run whose logits are the log of that mean, so ``predict``, ``eval``, TTA and the
submission writer use it unchanged. For a multi-task ensemble each task's probabilities are
averaged as well.

Averaging is only meaningful when index i means the same class in every member: runs with
different class maps are refused by name, never silently mixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classlab.engine.exported import ExportedRun, is_exported_file
from classlab.engine.load import LoadedRun, check_run_given, load
from classlab.errors import ClassLabError, command, option, spelt
from classlab.models.net import ClassifierModel
from classlab.run import FOLDS, RunFolder, fold_runs, is_fold_group

ENSEMBLE_MODES = ("mean",)


def expand_runs(runs: Sequence[str | Path | RunFolder]) -> list[Path]:
    """Run folders as given; a k-fold folder stands for its fold runs."""
    out: list[Path] = []
    for run in runs:
        path = run.path if isinstance(run, RunFolder) else Path(run)
        if is_fold_group(path):
            out.extend(_finished_folds(path))
        else:
            out.append(path)
    return out


def _finished_folds(path: Path) -> list[Path]:
    """Every fold run of a k-fold folder, each finished: a folder stopped in fold 2 of 5 stood for its first fold
    and the half-trained second one, and predict wrote a '5-fold' submission of them without a word."""
    k = int(RunFolder(path).read_json(FOLDS)["folds"])
    found = fold_runs(path)
    status: dict[Path, str] = {}
    for fold in (path / f"fold{i}" for i in range(k)):
        try:
            status[fold] = RunFolder(fold).summary({}).get("status", "not finished") if fold in found else "not started"
        except ClassLabError:
            status[fold] = "unreadable summary.json"
    unfinished = [f"{fold.name} {s}" for fold, s in status.items() if s != "finished"]
    if unfinished:
        again = f"calling the same classlab.train(..., ['data.folds={k}', ...]) again"
        done = [fold for fold, s in status.items() if s == "finished"]
        given = " ".join(str(f) for f in done[:3]) + (" ..." if len(done) > 3 else "")
        use = f", or give the finished fold runs themselves ({given}) {spelt('with --ensemble mean', 'as a list')}"
        use = use if len(done) > 1 else f", or give its finished fold run ({given}) alone" if done else ""
        raise ClassLabError(
            f"k-fold folder '{path}' has {k - len(unfinished)} of {k} folds finished ({', '.join(unfinished)}); "
            f"finish it by {command(f'running the same `classlab train ... --folds {k}` again', again)} (it "
            f"continues){use}"
        )
    return found


class EnsembleNet(nn.Module):
    """Members' mean probabilities as log-probabilities: softmax of the output is that mean.

    Members trained at different image sizes (a 224 px and a 288 px run) read the image at the largest of
    them, and each smaller member sees it resized by its own size over that one (antialiased, as the
    decoder's resize is): the same centre square of the image at the resolution that member was trained at.
    """

    def __init__(
        self,
        members: Sequence[ClassifierModel],
        sizes: Sequence[int] | None = None,
        orders: Sequence[list[int] | None] | None = None,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.sizes = list(sizes) if sizes else [0] * len(members)  # 0: as given
        self.size = max(self.sizes)
        # A member trained with its classes in another order (data.classes) has its columns put in the first's.
        self.orders = list(orders) if orders else [None] * len(members)

    def _inputs(self) -> Any:
        return zip(self.members, self.sizes)

    def _sized(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if not size or size == self.size:
            return x
        h, w = (max(1, round(n * size / self.size)) for n in x.shape[-2:])
        y = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return y.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [m(self._sized(x, s)).float().softmax(1) for m, s in self._inputs()]
        probs = [p if order is None else p[:, order] for p, order in zip(probs, self.orders)]
        return torch.stack(probs).mean(0).clamp_min(1e-30).log()

    def forward_tasks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multitask members: (each task's log mean probabilities, log mean combined probabilities)."""
        outs = [m.net.forward_tasks(m.normalize(self._sized(x, s))) for m, s in self._inputs()]
        tasks = [
            torch.stack([o[0][t].float().softmax(1) for o in outs]).mean(0).clamp_min(1e-30).log()
            for t in range(len(outs[0][0]))
        ]
        combined = torch.stack([o[1].float().softmax(1) for o in outs]).mean(0).clamp_min(1e-30).log()
        return tasks, combined


def _check_compatible(paths: list[Path], loaded: list[Any]) -> None:
    """One class map (and one kind of image: grey or colour) for every member, or one line naming the runs that
    differ. Image sizes may differ (EnsembleNet)."""
    first = loaded[0]
    for path, member in zip(paths[1:], loaded[1:]):
        if member.classes != first.classes and _class_order(first, member) is None:
            if sorted(member.classes) == sorted(first.classes):  # a multitask run: its combined classes
                raise ClassLabError(
                    f"runs {paths[0]} and {path} have their classes in different orders; a multitask ensemble needs "
                    "one order: train them with the same model.tasks (each task's class order: "
                    "model.tasks.<task>.classes)"
                )
            raise ClassLabError(
                f"runs {paths[0]} and {path} have different class maps ({len(first.classes)} classes: "
                f"{', '.join(first.classes[:4])}{' ...' if len(first.classes) > 4 else ''} vs {len(member.classes)}: "
                f"{', '.join(member.classes[:4])}{' ...' if len(member.classes) > 4 else ''}); "
                "an ensemble averages runs trained on the same classes"
            )
        if member.channels != first.channels:
            raise ClassLabError(
                f"runs {paths[0]} ({first.channels} channel(s)) and {path} ({member.channels} channel(s)) take "
                "different images (grey and colour); an ensemble averages runs that read the same kind of image"
            )


def _class_order(first: LoadedRun, member: LoadedRun) -> list[int] | None:
    """The member's class indices in the first member's order, when it is a classifier of the same classes in
    another order (a run trained with ``data.classes`` in another order): averaged by name, not by index."""
    if first.tasks is not None or member.tasks is not None or sorted(member.classes) != sorted(first.classes):
        return None
    if len(set(member.classes)) != len(member.classes):
        return None
    return [member.classes.index(c) for c in first.classes]


def load_ensemble(
    runs: Sequence[str | Path | RunFolder], checkpoint: str | None = None, device: str = "cpu", calibrated: bool = True
) -> LoadedRun:
    """Several runs (or k-fold folders) -> one LoadedRun whose probabilities are the members' mean.

    ``calibrated``: each member calibrated by its own temperature where it has one (``eval --calibrate``),
    before the mean: the members' T differ, and one T for the mean would be fitted on no one's validation set.
    """
    paths = expand_runs(runs)
    if not paths:
        raise ClassLabError("no runs given for the ensemble")
    loaded = [load(p, checkpoint, device, calibrated) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    _check_compatible(paths, loaded)
    first = loaded[0]
    # Each member normalises its own input (fold runs have fold-specific statistics): no outer normalisation.
    sizes = [m.image_size for m in loaded]
    orders = [None if m.classes == first.classes else _class_order(first, m) for m in loaded]
    net = EnsembleNet([m.model for m in loaded], sizes if len(set(sizes)) > 1 else None, orders)
    model = ClassifierModel(nn.Identity(), net).eval().to(device)
    cfg = first.cfg
    if max(sizes) != first.image_size:  # a split is read at the size every member can be given (EnsembleNet)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": max(sizes)})})
    ensemble = LoadedRun(first.run, cfg, model, first.classes, max(sizes), first.channels)
    ensemble.tasks = first.tasks
    ensemble.checkpoint = first.checkpoint
    ensemble.members = paths  # type: ignore[attr-defined]
    ensemble.calibration_note = _members_calibration(loaded)
    return ensemble


def _members_calibration(members: list[LoadedRun]) -> str | None:
    """One line for the members' calibrations: which are calibrated, each by its own T."""
    temperatures = [m.temperature for m in members]
    if all(t is None for t in temperatures):
        return None
    shown = ", ".join(
        f"{m.run.path.name} T={t:.4g}" if t is not None else f"{m.run.path.name} uncalibrated"
        for m, t in zip(members, temperatures)
    )
    count = sum(t is not None for t in temperatures)
    return f"probabilities calibrated: {count} of {len(members)} members, each by its own temperature ({shown})"


def load_runs(run: Any, checkpoint: str | None = None, device: str = "cpu", calibrated: bool = True) -> LoadedRun:
    """What a trained model may be given as (``classlab.load``, predict): a run folder or one of its
    checkpoint files; several runs or a k-fold folder (their mean ensemble); an ONNX file written by
    ``classlab export`` (run in onnxruntime); a LoadedRun as it is.

    ``calibrated``: probabilities calibrated by the temperature ``classlab eval RUN --calibrate`` fitted for the
    checkpoint, where there is one (``LoadedRun.calibration_note`` says so); False: the plain softmax."""
    if isinstance(run, LoadedRun):
        return run
    if isinstance(run, (str, Path)) and is_exported_file(run):
        if checkpoint not in (None, "best"):
            raise ClassLabError(
                f"{run} is one exported model: drop {option('checkpoint', checkpoint)}, "
                "or give the run folder to pick its checkpoint"
            )
        return ExportedRun(run, calibrated)
    if isinstance(run, (list, tuple)):
        if any(isinstance(r, (str, Path)) and is_exported_file(r) for r in run):
            raise ClassLabError("an ensemble averages run folders; give the runs, not their exported files")
        return load_ensemble(run, checkpoint, device, calibrated)
    check_run_given(run)
    if not isinstance(run, RunFolder) and is_fold_group(run):
        return load_ensemble([run], checkpoint, device, calibrated)
    return load(run, checkpoint, device, calibrated)
