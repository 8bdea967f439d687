"""Experiment trackers through Lightning's loggers: TensorBoard, CSV, MLflow, Weights & Biases.

``trainer.loggers`` names them; the run folder's own ``metrics.csv`` is written whatever the list
says (it is part of the run-folder contract, read by ``compare`` and ``report``). Each logger gets
the same things:

- the learning rate of every optimizer step (Lightning's ``LearningRateMonitor``);
- the training loss of every logged step, train and validation metrics of every epoch;
- the resolved config, flattened to ``section.key``, as hyperparameters;
- the final test metrics (for TensorBoard written with the hyperparameters, so its HParams view puts
  the runs of a sweep side by side).

Where each one writes: TensorBoard ``RUN/tb/``, CSV ``RUN/csv/metrics.csv``, MLflow
``trainer.tracking_uri`` (default ``$MLFLOW_TRACKING_URI``, else the SQLite store ``<run.root>/mlflow.db``
that ``mlflow ui --backend-store-uri sqlite:///<run.root>/mlflow.db`` opens), W&B ``RUN/wandb/`` (``WANDB_MODE=offline``
keeps it on disk until ``wandb sync``). A resumed run continues the same MLflow / W&B run: their ids
are kept in summary.json.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

import lightning as L

from classlab.config import Config
from classlab.engine.library_logs import mlflow_kept_back
from classlab.errors import ClassLabError, ConfigError, first_line
from classlab.run import METRICS, RunFolder

LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")
# The package each logger imports, and what installs it.
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install 'classlab[mlflow]'"),
    "wandb": ("wandb", "pip install 'classlab[wandb]'"),
}
FINAL_KEYS = ("test_acc", "test_acc5", "test_acc_tta", "best_val_acc", "best_epoch", "epochs_done", "wall_time_s")


def check_loggers(names: list[str]) -> None:
    """Fail before the run folder exists when a logger's package is missing: one line naming the extra."""
    for name in names:
        package, install = PACKAGES.get(name, (None, None))
        if package is None:
            continue
        try:
            importlib.import_module(package)  # imported for real: a broken install counts as missing too
        except ImportError:
            raise ConfigError(f"trainer.loggers: '{name}' needs the {package} package: {install}") from None


def flat_config(cfg: Config) -> dict[str, Any]:
    """{'optim.lr': 0.05, ...}: scalars as they are, lists and mappings as their text (what trackers store)."""

    def walk(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict) and tree:
            return {k: v for key, value in tree.items() for k, v in walk(value, f"{prefix}{key}.").items()}
        value = tree if tree is None or isinstance(tree, bool | int | float | str) else str(tree)
        return {prefix.rstrip("."): "null" if value is None else value}

    return walk(cfg.to_dict(), "")


def _mlflow_uri(cfg: Config) -> str:
    if cfg.trainer.tracking_uri:
        return cfg.trainer.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # MLflow 3 keeps the plain-folder store for those who opt in (MLFLOW_ALLOW_FILE_STORE); SQLite is its default.
    return f"sqlite:///{Path(cfg.run.root).resolve() / 'mlflow.db'}"


def build_loggers(cfg: Config, run: RunFolder) -> list[Any]:
    """The Lightning loggers ``trainer.loggers`` asks for, writing where the module docstring says.

    One that cannot even be made (an MLflow store that cannot be opened) is the one line of ``start``.
    """
    check_loggers(cfg.trainer.loggers)
    ids = run.summary(default={}).get("logger_ids", {})
    out: list[Any] = []
    for name in cfg.trainer.loggers:
        try:
            with mlflow_kept_back() if name == "mlflow" else contextlib.nullcontext():
                out.append(_build(name, cfg, run, ids))
        except Exception as exc:  # noqa: BLE001 - any tracker failure becomes the user's one line
            _failed(run, name, exc)
    return out


# The name trainer.loggers gives each logger class: the one line names the tracker as the user wrote it.
CONFIG_NAMES = {
    "TensorBoardLogger": "tensorboard",
    "CSVLogger": "csv",
    "MLFlowLogger": "mlflow",
    "WandbLogger": "wandb",
}


def _failed(run: RunFolder, kind: str, exc: BaseException) -> None:
    """A tracker that cannot start: the run marked failed, one line naming the tracker (as trainer.loggers names
    it) and why."""
    kind = CONFIG_NAMES.get(kind, kind)
    first = first_line(exc, 300)
    run.update_summary(status="failed", error=f"{kind}: {first}")
    raise ClassLabError(f"trainer.loggers: {kind} could not start: {first}") from None


def _check_sqlite(uri: str) -> None:
    """A SQLite store that cannot be opened fails at once: MLflow retries it for 100 s, a warning a try."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///")
    try:
        sqlite3.connect(path).close()
    except sqlite3.Error as exc:
        raise ClassLabError(f"cannot open the SQLite store {path} ({exc}); set trainer.tracking_uri") from None


def _check_folder_store(uri: str) -> None:
    """A path as the tracking URI is MLflow's folder store, which MLflow 3 refuses without MLFLOW_ALLOW_FILE_STORE: its
    own words, cut to one line, stopped at 'See htt' and named neither trainer.tracking_uri nor a store to use."""
    if "://" in uri and not uri.startswith("file:"):
        return  # a server or a database
    path = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
    if path.is_file():
        raise ClassLabError(
            f"trainer.tracking_uri '{uri}' is a file, not a store folder; an SQLite store is written "
            f"trainer.tracking_uri=sqlite:///{path}"
        )
    allowed = getattr(importlib.import_module("mlflow.environment_variables"), "MLFLOW_ALLOW_FILE_STORE", None)
    if allowed is not None and not allowed.get():
        raise ClassLabError(
            f"trainer.tracking_uri '{uri}' is a folder store, which MLflow 3 refuses; use a database "
            f"(trainer.tracking_uri=sqlite:///{path.with_suffix('.db')}) or set MLFLOW_ALLOW_FILE_STORE=true"
        )


def _build(name: str, cfg: Config, run: RunFolder, ids: dict[str, str]) -> Any:
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run.path), name="csv", version="")
        # Lightning's CSVLogger names its file as the run's own (RUN/csv/metrics.csv): read before it deletes it.
        setattr(logger, EARLIER_ROWS, _csv_rows(Path(logger.log_dir) / METRICS))
        return logger
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = _mlflow_uri(cfg)
        _check_sqlite(uri)
        _check_folder_store(uri)
        return MLFlowLogger(
            experiment_name=cfg.trainer.project,
            run_name=run.path.name,
            tracking_uri=uri,
            run_id=ids.get("mlflow"),
            tags={"classlab.run": str(run.path.resolve())},
        )
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(
        project=cfg.trainer.project, name=run.path.name, save_dir=str(run.path), id=ids.get("wandb"), resume="allow"
    )


def logger_callbacks(loggers: list[Any]) -> list[L.Callback]:
    """The learning rate of every step, for every logger (LearningRateMonitor needs at least one); a resumed run's
    TensorBoard and CSV logs going on from the step it resumed at."""
    if not loggers:
        return []
    from lightning.pytorch.callbacks import LearningRateMonitor

    return [LearningRateMonitor(logging_interval="step"), ResumedLogs()]


# The rows RUN/csv/metrics.csv held when the run was resumed: Lightning's CSVLogger deletes the file as it starts.
EARLIER_ROWS = "classlab_earlier_rows"


def _csv_rows(path: Path) -> list[dict[str, float]]:
    """A CSV logger's file as numbers, a row each (its empty cells left out); none when it is missing or damaged."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    out = []
    for row in rows:
        try:
            out.append({k: int(float(v)) if k == "step" else float(v) for k, v in row.items() if k and v})
        except (TypeError, ValueError):
            continue  # a row cut short: the steps it logged are logged again after the resume
    return [r for r in out if "step" in r]


class ResumedLogs(L.Callback):
    """A resumed run's tracker logs read as one run's, as its metrics.csv does (``--resume`` ends with the
    metrics.csv of a run never stopped).

    The steps after the checkpoint resumed from are trained again: TensorBoard showed each of them twice (two
    values at one step, its curves zigzagged back), and Lightning's CSVLogger deleted ``RUN/csv/metrics.csv``,
    so after a resume it held only the steps trained since. TensorBoard is told to drop every value at the
    resumed step and after (``SummaryWriter(purge_step=...)``'s marker), and the epoch-end train metrics logged at
    that step are logged again; the CSV logger starts from its earlier rows of the steps before it.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        if not step or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if kind == "CSVLogger":
                # An epoch's train metrics are logged at the step its last batch made, where the next epoch begins.
                kept = [
                    r for r in getattr(logger, EARLIER_ROWS, []) if (r["step"], r.get("epoch", epoch)) < (step, epoch)
                ]
                logger.experiment.metrics[:0] = kept
            elif kind == "TensorBoardLogger":
                _purge_tensorboard(logger.experiment, step)
                ended = [r for r in _run_rows(trainer.default_root_dir) if r.get("step") == str(step)]
                if ended:
                    _log_train_row([logger], ended[-1], step)


def _run_rows(folder: str) -> list[dict[str, str]]:
    """The run's own metrics.csv rows (as resumed: the epochs the checkpoint holds), none where it cannot be read."""
    try:
        return RunFolder(folder).read_metrics()
    except (OSError, csv.Error, UnicodeDecodeError, ClassLabError):
        return []


def _purge_tensorboard(writer: Any, step: int) -> None:
    """What ``SummaryWriter(purge_step=step)`` writes first: TensorBoard's reader drops the values logged at ``step``
    and after by the run before (a restart marker), so the steps trained again are shown once."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    file_writer = writer._get_file_writer()
    file_writer.add_event(Event(step=step, file_version="brain.Event:2"))
    file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


def start(loggers: list[Any], cfg: Config, run: RunFolder) -> None:
    """Hyperparameters to every logger; the MLflow / W&B run ids into summary.json (so --resume continues them).

    A tracker that cannot start (a server not reachable, a store refused) ends the run as one line,
    the run marked failed, before any training time is spent.
    """
    params = flat_config(cfg)
    ids: dict[str, str] = {}
    for logger in loggers:
        kind = type(logger).__name__
        try:
            if kind == "MLFlowLogger":
                with mlflow_kept_back():  # its store's tables made, its run made: lines of MLflow's own
                    _mlflow_params(logger, params)
                    ids["mlflow"] = logger.run_id
            elif kind == "TensorBoardLogger":  # its hyperparameters go with the final metrics (HParams)
                _ = logger.experiment  # its folder and writer now: a RUN/tb it cannot make was an unexpected error
            else:
                logger.log_hyperparams(params)
            if kind == "WandbLogger":
                ids["wandb"] = logger.experiment.id
        except Exception as exc:  # noqa: BLE001 - any tracker failure becomes the user's one line
            _failed(run, kind, exc)
    if ids:
        run.update_summary(logger_ids=ids)


def _mlflow_params(logger: Any, params: dict[str, Any]) -> None:
    """The config as MLflow params. Those are written once: a run resumed with ``epochs=300`` (or any override)
    keeps the value it started with, and the new one goes to the tag ``resumed.<key>`` (summary.json's
    ``resumed_with`` says when), where logging it again stopped the resumed run."""
    logged = logger.experiment.get_run(logger.run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged}
    if new:
        logger.log_hyperparams(new)
    for key, value in params.items():
        if key in logged and logged[key] != str(value)[:250]:  # Lightning's MLFlowLogger keeps 250 characters
            logger.experiment.set_tag(logger.run_id, f"resumed.{key}", str(value)[:250])


def log_epoch(trainer: L.Trainer, row: dict[str, Any]) -> None:
    """Train metrics of an epoch (validation metrics reach the loggers through ``LightningModule.log``).

    Their ``epoch`` is Lightning's count from 0, the one ``LightningModule.log`` gives that epoch's validation
    metrics: metrics.csv's 1-based number here made one epoch read 0 on its val rows and 1 on its train row.
    """
    _log_train_row(trainer.loggers, row, trainer.global_step)


def _log_train_row(loggers: list[Any], row: dict[str, Any], step: int) -> None:
    """A metrics.csv row's train metrics (numbers, or the file's text of them) to ``loggers`` at ``step``."""
    metrics = {}
    for key, value in row.items():
        try:
            if key.startswith("train/") and value not in (None, "") and not isinstance(value, bool):
                metrics[key] = float(value)
        except (TypeError, ValueError):
            continue
    if metrics:
        metrics["epoch"] = float(row["epoch"]) - 1
        for logger in loggers:
            logger.log_metrics(metrics, step=step)


def finish(loggers: list[Any], cfg: Config, summary: dict[str, Any], step: int) -> None:
    """Final test metrics at the run's last step: TensorBoard writes them with the hyperparameters (its HParams
    view); all flush. Not at step 0: a finished run resumed with more epochs drops what was logged from its resumed
    step on (``ResumedLogs``), this run's final values among them, and keeps the new ones alone."""
    final = {
        f"final/{k}": float(summary[k])
        for k in FINAL_KEYS
        if isinstance(summary.get(k), int | float) and math.isfinite(summary[k])
    }
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(flat_config(cfg), final or {"final/epochs_done": 0.0}, step=step)
        elif final:
            logger.log_metrics(final, step=step)
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # else the next run in this process would join this one
