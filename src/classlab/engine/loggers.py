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

import importlib
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

import lightning as L

from classlab.config import Config
from classlab.errors import ClassLabError, ConfigError, first_line
from classlab.run import RunFolder

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


def _build(name: str, cfg: Config, run: RunFolder, ids: dict[str, str]) -> Any:
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run.path), name="csv", version="")
    if name == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = _mlflow_uri(cfg)
        _check_sqlite(uri)
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
    """The learning rate of every step, for every logger (LearningRateMonitor needs at least one)."""
    if not loggers:
        return []
    from lightning.pytorch.callbacks import LearningRateMonitor

    return [LearningRateMonitor(logging_interval="step")]


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
    metrics = {k: float(v) for k, v in row.items() if k.startswith("train/") and isinstance(v, int | float)}
    if metrics:
        metrics["epoch"] = float(row["epoch"]) - 1
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def finish(loggers: list[Any], cfg: Config, summary: dict[str, Any], step: int) -> None:
    """Final test metrics: TensorBoard writes them with the hyperparameters (its HParams view); all flush."""
    final = {
        f"final/{k}": float(summary[k])
        for k in FINAL_KEYS
        if isinstance(summary.get(k), int | float) and math.isfinite(summary[k])
    }
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger":
            logger.log_hyperparams(flat_config(cfg), final or {"final/epochs_done": 0.0})
        elif final:
            logger.log_metrics(final, step=step)
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # else the next run in this process would join this one
