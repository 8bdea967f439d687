"""A demanding new user of compare, report and the loggers: odd run names, damaged files, the shell's globs,
multi-stage runs, resumed runs' tracker logs, an MLflow store given as a path."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import classlab
import classlab.compare as compare_module
from classlab.compare import _labels, compare
from classlab.report import write_html_report
from tests.conftest import run_cli, tiny_config
from tests.test_compare import _fake_run


def test_a_dollar_or_a_leading_underscore_in_a_run_name_is_drawn_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run named `cost$\\frac$` stopped compare and report with mathtext's parser error (`unexpected
    ParseSyntaxException`, three lines); `lr$0.1$` lost its dollars; `_baseline` was missing from the legend."""
    root = tmp_path / "runs"
    for name in ("cost$\\frac$", "lr$0.1$", "_baseline"):
        _fake_run(root, name, 10, None, 0.3)
    figures: list[Any] = []
    real_save = compare_module._save

    def keep(fig: Any, path: Path) -> Path:
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(compare_module, "_save", keep)
    table = compare([str(root)], out=tmp_path / "cmp")
    assert (tmp_path / "cmp" / "curves.png") in table.files
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == ["_baseline", "cost\\$\\frac\\$", "lr\\$0.1\\$"]  # '\$': a dollar sign, drawn as one
    page = write_html_report([str(root)], tmp_path / "r.html")
    assert "_baseline" in page.read_text()


def test_a_metrics_row_cut_short_or_padded_with_nul_bytes_is_passed_over(tmp_path: Path) -> None:
    """A machine that lost power leaves a file's last block as NUL bytes: compare and report of every run stopped
    with `unexpected ValueError: could not convert string to float: '0.1\\x00\\x00'`."""
    root = tmp_path / "runs"
    damaged = _fake_run(root, "damaged", 10, None, 0.3)
    _fake_run(root, "fine", 10, None, 0.3)
    text = (damaged / "metrics.csv").read_text().rsplit("\n", 2)[0]  # the header and epochs 1 and 2
    (damaged / "metrics.csv").write_bytes(text.encode() + b"\n3,30,0.1,1.0,0.5,1.0,0.3\x00\x00\x00")
    assert (tmp_path / "cmp" / "curves.png") in compare([str(root)], out=tmp_path / "cmp").files
    assert write_html_report([str(root)], tmp_path / "r.html").is_file()
    rows = list(csv.DictReader((damaged / "metrics.csv").open()))
    assert [epoch for epoch, _ in compare_module._points(rows, "val/acc")] == [1, 2]


def test_compare_out_naming_a_file_or_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    """`--out results.csv` (a file there) was `error: unexpected FileExistsError: [Errno 17] File exists`."""
    run = _fake_run(tmp_path / "runs", "a", 10, None, 0.3)
    taken = tmp_path / "results.csv"
    taken.write_text("mine")
    result = run_cli("compare", str(run), "--out", str(taken))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr == (
        f"error: cannot write {taken}/compare.csv: '{taken}' is a file, not a folder; nothing was written there: "
        "give --out a place you can write to\n"
    )
    assert taken.read_text() == "mine"
    result = run_cli("compare", str(run), "--out", "/proc/classlab-compare")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "unexpected" not in result.stderr


def test_the_shells_expansion_of_a_sweep_folder_compares_its_runs(tmp_path: Path) -> None:
    """`classlab compare runs/sweep/*` unquoted (the shell's glob) listed sweep.json, and `runs/*` the MLflow store
    runs/mlflow.db: both stopped with "'.../sweep.json' is a file, not a run folder"."""
    sweep = tmp_path / "runs" / "sweep"
    for lr in ("0.1", "0.01"):
        _fake_run(sweep, f"lr={lr}", 10, None, 0.3)
    (sweep / "sweep.json").write_text("{}")
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    listed = sorted(str(p) for p in sweep.iterdir())
    assert [r["run"] for r in compare(listed, out=tmp_path / "cmp", plots=False).rows] == ["lr=0.01", "lr=0.1"]
    listed = sorted(str(p) for p in (tmp_path / "runs").iterdir())
    assert len(compare(listed, out=tmp_path / "cmp", plots=False).rows) == 2
    result = run_cli("report", *sorted(str(p) for p in sweep.iterdir()), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr


def test_runs_sharing_their_name_and_their_parents_name_are_told_apart() -> None:
    """Two sweeps named alike in two projects (a/sweep/lr=0.1, b/sweep/lr=0.1) were both rows 'sweep/lr=0.1'."""
    paths = [Path("/p/a/sweep/lr=0.1"), Path("/p/b/sweep/lr=0.1"), Path("/p/a/sweep/lr=1"), Path("/p/c/lr=1")]
    assert _labels(paths) == ["a/sweep/lr=0.1", "b/sweep/lr=0.1", "sweep/lr=1", "c/lr=1"]
    assert _labels([Path("/p/x/a"), Path("/p/y/a")]) == ["x/a", "y/a"]


def test_the_report_of_a_multi_stage_run_is_its_last_stages(tiny_trained: Path, tmp_path: Path) -> None:
    """`classlab report runs/staged` stopped with `unexpected FileNotFoundError: runs/staged/eval/test/report.json`:
    eval writes a staged run's analysis in its last stage's folder."""
    staged = tmp_path / "runs" / "staged"
    for stage in ("stage1", "stage2"):
        shutil.copytree(tiny_trained, staged / stage, ignore=shutil.ignore_patterns("eval", "run.lock"))
    config = yaml.safe_load((tiny_trained / "config.yaml").read_text())
    (staged / "config.yaml").write_text(yaml.safe_dump({**config, "stages": [{"epochs": 1}, {"epochs": 1}]}))
    shutil.copy(tiny_trained / "classes.json", staged / "classes.json")
    (staged / "summary.json").write_text(json.dumps({"status": "finished", "test_acc": 0.2, "best_val_acc": 0.2}))
    result = run_cli("report", str(staged), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stderr
    assert "Error analysis: test split" in (tmp_path / "r.html").read_text()
    assert (staged / "stage2" / "eval" / "test" / "report.json").is_file()


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.startswith("final/")  # the test figures: logged at the end, with the wall time
    }


def _csv_logger_rows(path: Path) -> list[dict[str, float]]:
    rows = csv.DictReader(path.open(newline=""))
    return [{k: round(float(v), 4) for k, v in r.items() if v and k != "final/wall_time_s"} for r in rows]


def test_a_resumed_runs_tensorboard_and_csv_logs_hold_each_step_once(tmp_path: Path) -> None:
    """A run killed after its epoch-1 checkpoint trains epoch 2 again on --resume. TensorBoard then held epoch 2's
    steps twice (its curves ran back on themselves), and Lightning's CSVLogger deleted RUN/csv/metrics.csv, so
    after the resume it held epoch 2 alone. Now both read as those of a run never stopped, as metrics.csv does."""
    extra = {
        "data.images_per_class": 10,
        "trainer.loggers": "[tensorboard,csv]",
        "trainer.log_every": 1,
        "trainer.keep_every": 1,
        "trainer.checkpoint_every_s": 0,
    }
    overrides = tiny_config(tmp_path, exp_name="tracked", epochs=2, **extra)
    run = classlab.train(None, overrides, quiet=True).path
    whole = run.with_name("whole")
    shutil.copytree(run, whole)
    # The kill: last.ckpt is epoch 1's, summary.json still says running.
    shutil.copy(run / "checkpoints" / "epoch1.ckpt", run / "checkpoints" / "last.ckpt")
    for name in ("previous.ckpt", "epoch2.ckpt"):
        (run / "checkpoints" / name).unlink(missing_ok=True)
    (run / "summary.json").write_text(json.dumps({"status": "running"}))
    classlab.train(None, overrides, resume=True, quiet=True)
    assert _tensorboard_scalars(run / "tb") == _tensorboard_scalars(whole / "tb")
    assert _csv_logger_rows(run / "csv" / "metrics.csv") == _csv_logger_rows(whole / "csv" / "metrics.csv")


def test_an_mlflow_store_given_as_a_path_says_what_to_write(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trainer.tracking_uri=mlruns` (a folder, as MLflow 2's docs wrote it) stopped with MLflow 3's own words cut at
    'See htt'; a file (the SQLite database named without sqlite:///) with '[Errno 20] Not a directory: .../.trash'."""
    pytest.importorskip("mlflow")
    from classlab.cli import main

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    base = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": 10, "trainer.loggers": "[mlflow]"})
    store = tmp_path / "mlruns"
    assert main(["train", *base, "exp_name=folder", f"trainer.tracking_uri={store}"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.loggers: mlflow could not start: trainer.tracking_uri '{store}' is a folder store, which "
        f"MLflow 3 refuses; use a database (trainer.tracking_uri=sqlite:///{store}.db) or set "
        "MLFLOW_ALLOW_FILE_STORE=true"
    )
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["train", *base, "exp_name=file", f"trainer.tracking_uri={database}"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.loggers: mlflow could not start: trainer.tracking_uri '{database}' is a file, not a store "
        f"folder; an SQLite store is written trainer.tracking_uri=sqlite:///{database}"
    )
