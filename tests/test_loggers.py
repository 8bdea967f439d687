"""trainer.loggers: TensorBoard, CSV, MLflow and W&B get the learning rate, epoch metrics, config and test figures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import classlab
from classlab.config import load_config
from classlab.engine.loggers import _mlflow_uri, flat_config
from tests.conftest import tiny_config

EPOCHS, STEPS_PER_EPOCH = 2, 4  # 300 training images (30 a class) in full batches of 64


def _train(tmp: Path, name: str, loggers: str) -> Path:
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        overrides = tiny_config(
            tmp,
            exp_name=name,
            epochs=EPOCHS,
            **{
                "data.images_per_class": 30,
                "trainer.loggers": loggers,
                "trainer.tracking_uri": (tmp / "mlruns").as_uri(),
                "trainer.log_every": 1,
            },
        )
        return classlab.train(None, overrides, quiet=True).path
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlflow")
    return _train(tmp_path_factory.mktemp("loggers"), "tracked", "[tensorboard,csv,mlflow]")


def test_tensorboard_has_lr_per_step_epoch_metrics_and_hparams(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    lr_tags = [t for t in scalars if t.startswith("lr-")]
    assert lr_tags, scalars
    assert len(events.Scalars(lr_tags[0])) == EPOCHS * STEPS_PER_EPOCH  # every optimizer step
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc5"):
        assert len(events.Scalars(tag)) == EPOCHS, tag
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert events.Scalars("final/test_acc")[0].value == pytest.approx(summary["test_acc"], abs=1e-6)
    # The HParams plugin's experiment, with the config keys as hyperparameters.
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and b"optim.lr" in hparams["_hparams_/session_start_info"]
    rows = list(csv.DictReader((tracked_run / "metrics.csv").open()))
    assert len(rows) == EPOCHS  # the run's own metrics.csv is written whatever the loggers
    assert float(rows[-1]["val/acc"]) == pytest.approx(events.Scalars("val/acc")[-1].value, abs=1e-6)


def test_csv_logger_writes_its_own_file(tracked_run: Path) -> None:
    rows = list(csv.DictReader((tracked_run / "csv" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("val/acc")) == EPOCHS
    assert (tracked_run / "csv" / "hparams.yaml").is_file()
    # An epoch's train row and val row carry one epoch number (Lightning's, from 0): the train row said 1 for 0.
    train_epochs = [float(r["epoch"]) for r in rows if r.get("train/acc")]
    assert train_epochs == [float(r["epoch"]) for r in rows if r.get("val/acc")] == list(range(EPOCHS))


def test_mlflow_store_is_readable_by_mlflow(tracked_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    summary = json.loads((tracked_run / "summary.json").read_text())
    client = MlflowClient((tracked_run.parent.parent / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("classlab").experiment_id])
    assert run.info.run_name == "tracked" and run.info.run_id == summary["logger_ids"]["mlflow"]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.name"] == "cnn"
    assert run.data.metrics["final/test_acc"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == EPOCHS
    assert len(client.get_metric_history(run.info.run_id, "train/acc")) == EPOCHS


@pytest.mark.slow  # W&B starts a service process: ~20 s more
def test_wandb_offline_run_on_disk(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    run = _train(tmp_path, "wb", "[wandb]")
    summary = json.loads((run / "summary.json").read_text())
    run_id = summary["logger_ids"]["wandb"]
    (folder,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    assert (folder / f"run-{run_id}.wandb").stat().st_size > 1000  # `wandb sync` uploads this file
    assert not (run / "tb").exists()  # only the loggers asked for


def test_missing_logger_package_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from classlab.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now fails as if it were not installed
    code = main(["train", *tiny_config(tmp_path), "trainer.loggers=[tensorboard,mlflow]"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: trainer.loggers: 'mlflow' needs the mlflow package: pip install 'classlab[mlflow]'"
    )
    assert not (tmp_path / "runs").exists()  # checked before the run folder is made


def test_unknown_logger_refused_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from classlab.errors import ConfigError

    with pytest.raises(ConfigError, match="trainer.loggers"):
        load_config(None, ["trainer.loggers=[neptune]"])
    cfg = load_config(None, [f"run.root={tmp_path}"])
    assert cfg.trainer.loggers == ["tensorboard"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _mlflow_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert _mlflow_uri(cfg) == "http://tracking:5000"
    flat = flat_config(cfg)
    assert flat["optim.lr"] == 0.05 and flat["exp_name"] == "null" and flat["sched.milestones"] == "[]"


def test_mlflow_store_that_cannot_be_opened_is_one_line_at_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An SQLite store in a folder that cannot hold it: MLflow retried for 100 s, then classlab said
    `error: unexpected OperationalError` and left the run `running`."""
    pytest.importorskip("mlflow")
    from classlab.cli import main

    store = tmp_path / "not_a_folder"
    store.write_text("a file where the store's folder should be")
    overrides = tiny_config(tmp_path, exp_name="ro", epochs=1, **{"data.images_per_class": 10})
    uri = f"sqlite:///{store}/mlflow.db"
    code = main(["train", *overrides, "trainer.loggers=[mlflow]", f"trainer.tracking_uri={uri}"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.loggers: mlflow could not start: cannot open the SQLite store {store}/mlflow.db "
        "(unable to open database file); set trainer.tracking_uri"
    )
    assert json.loads((tmp_path / "runs" / "ro" / "summary.json").read_text())["status"] == "failed"


def test_resume_with_a_changed_override_continues_the_mlflow_run(tmp_path: Path) -> None:
    """`--resume epochs=2` stopped with `MLFlowLogger could not start: Changing param values is not allowed`
    and marked the finished run failed; MLflow params are written once, so the new value is a tag."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    extra = {
        "data.images_per_class": 10,
        "trainer.loggers": "[mlflow]",
        "trainer.tracking_uri": f"sqlite:///{tmp_path}/m.db",
    }
    classlab.train(None, tiny_config(tmp_path, exp_name="ml", epochs=1, **extra), quiet=True)
    run = classlab.train(None, tiny_config(tmp_path, exp_name="ml", epochs=2, **extra), resume=True, quiet=True).path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    mlflow_run = client.get_run(summary["logger_ids"]["mlflow"])
    assert mlflow_run.data.params["epochs"] == "1" and mlflow_run.data.tags["resumed.epochs"] == "2"
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val/acc")) == 2


def test_tensorboard_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """RUN/tb a file (a copy gone wrong) on --resume: `error: unexpected FileExistsError` from inside fit."""
    from classlab.cli import main

    overrides = tiny_config(tmp_path, exp_name="tb", epochs=1, **{"data.images_per_class": 10})
    assert main(["train", *overrides]) == 0
    tb = tmp_path / "runs" / "tb" / "tb"
    shutil.rmtree(tb)
    tb.write_text("not a folder")
    capsys.readouterr()
    assert main(["train", *overrides, "epochs=2", "--resume"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.loggers: tensorboard could not start: [Errno 17] File exists: '{tb}'"
    )
