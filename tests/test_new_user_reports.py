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
from tests.browser import Browser
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


def test_a_finished_run_resumed_with_more_epochs_has_one_final_value_per_tag(tmp_path: Path) -> None:
    """The final/* figures were logged at step 0, where the resume's restart marker cannot drop them (that would
    drop every step): a finished run trained on held two values of each, the first run's and the resumed one's.
    Now they are logged at the run's last step, so the resume drops the first run's and keeps its own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {"data.images_per_class": 10, "trainer.loggers": "[tensorboard]"}
    overrides = tiny_config(tmp_path, exp_name="more", epochs=1, **extra)
    classlab.train(None, overrides, quiet=True)
    run = classlab.train(None, [*overrides, "epochs=2"], resume=True, quiet=True).path
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    final = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"] if tag.startswith("final/")}
    last_step = max(e.step for e in events.Scalars("train/loss"))
    assert final and all(len(points) == 1 and points[0].step == last_step for points in final.values()), final
    assert final["final/epochs_done"][0].value == 2


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


def _fake_staged(root: Path, name: str, lr: float, accs: tuple[float, float] = (0.3, 0.45)) -> Path:
    """A two-stage run as ``_run_stages`` leaves it: the top config (its own epochs the default 20, the stages'
    overrides), a run folder per stage (3 epochs each, metrics.csv from epoch 1 each), and the top summary.json
    (the stages' summaries, the last stage's figures, the summed wall time; no epochs_done)."""
    top = root / name
    stages = []
    for k, acc in enumerate(accs, 1):
        stage = _fake_run(top, f"stage{k}", 10, None, acc)
        config = yaml.safe_load((stage / "config.yaml").read_text())
        (stage / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": 3, "optim": {"lr": lr / k}}))
        stages.append(json.loads((stage / "summary.json").read_text()))
    config = yaml.safe_load((top / "stage1" / "config.yaml").read_text())
    config.update(exp_name=name, epochs=20, optim={"lr": lr}, stages=[{"epochs": 3}, {"epochs": 3, "optim.lr": lr / 2}])
    (top / "config.yaml").write_text(yaml.safe_dump(config))
    last = stages[-1]
    summary = {"status": "finished", "exp_name": name, "stages": stages, "test_acc": last["test_acc"]}
    summary.update(best_val_acc=last["best_val_acc"], wall_time_s=round(sum(s["wall_time_s"] for s in stages), 2))
    (top / "summary.json").write_text(json.dumps(summary))
    return top


def test_a_multi_stage_run_reads_as_what_its_stages_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged run's row said `epochs 20` (the base config's default, not what its stages trained) beside an empty
    epochs_done, its stages were not listed, and it had no validation curve (its stages' metrics.csv went unread)."""
    root = tmp_path / "runs"
    staged = _fake_staged(root, "staged", 0.1)
    single = _fake_run(root, "single", 10, None, 0.4)
    tree = yaml.safe_load((single / "config.yaml").read_text())
    (single / "config.yaml").write_text(yaml.safe_dump({**tree, "epochs": 20, "optim": {"lr": 0.1}}))
    figures: list[Any] = []
    real_save = compare_module._save
    monkeypatch.setattr(compare_module, "_save", lambda fig, path: figures.append(fig) or real_save(fig, path))
    table = compare([str(root)], out=tmp_path / "cmp")
    assert table.by == ["epochs", "stages"]
    rows = {r["run"]: r for r in table.rows}
    assert rows["staged"]["epochs"] == 6 and rows["staged"]["epochs_done"] == 6 and rows["single"]["epochs"] == 20
    assert (rows["staged"]["test_acc"], rows["staged"]["best_val_acc"]) == (0.45, 0.46)  # the last stage's
    assert "| staged | finished | 6 | [{epochs: 3}, {epochs: 3, optim.lr: 0.05}] |" in table.markdown()
    lines = {line.get_label(): line for line in figures[0].axes[0].get_lines()}
    curve = figures[0].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in curve] == ["single", "staged"]
    staged_line = [line for line in lines.values() if len(line.get_xdata()) == 6]
    assert [list(line.get_xdata()) for line in staged_line] == [[1, 2, 3, 4, 5, 6]]  # stage 2's epochs numbered on
    assert list(staged_line[0].get_ydata())[3:] == [0.15, 0.3, 0.45]
    page = write_html_report([str(staged)], tmp_path / "r.html", split="val").read_text()
    assert "Validation curves</h2><div" in page

    # A stage stopped by Ctrl-C: the top summary still says running (no process holds it): the run reads as the
    # stage says, with the epochs both stages trained so far.
    (staged / "summary.json").write_text(json.dumps({"status": "running", "exp_name": "staged", "stages": []}))
    (staged / "stage2" / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (staged / "stage2" / "metrics.csv").write_text(
        "\n".join((staged / "stage2" / "metrics.csv").read_text().splitlines()[:3]) + "\n"
    )
    row = compare([str(staged)], out=tmp_path / "cmp2", plots=False).rows[0]
    assert (row["status"], row["epochs_done"], row["best_val_acc"]) == ("interrupted", 5, 0.3)


def test_a_sweep_of_multi_stage_runs_compares_them(tmp_path: Path) -> None:
    """Points of a sweep (``classlab sweep staged.yaml --grid optim.lr=...``) are staged runs: one row each, with the
    figures of their stages; their stage folders are not rows of their own."""
    sweep = tmp_path / "runs" / "sweep"
    for lr, accs in ((0.1, (0.3, 0.45)), (0.05, (0.2, 0.25))):
        _fake_staged(sweep, f"lr={lr}", lr, accs)
    (sweep / "sweep.json").write_text("{}")
    table = compare([str(sweep)], out=tmp_path / "cmp")
    assert [(r["run"], r["optim.lr"], r["epochs_done"], r["test_acc"]) for r in table.rows] == [
        ("lr=0.05", 0.05, 6, 0.25),
        ("lr=0.1", 0.1, 6, 0.45),
    ]
    assert table.by == ["optim.lr", "stages"] and (tmp_path / "cmp" / "curves.png") in table.files
    result = run_cli("compare", str(sweep / "*"), "--out", str(tmp_path / "cli"), "--no-plots")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "| lr=0.1 | finished | 0.1000 | [{epochs: 3}, {epochs: 3, optim.lr: 0.05}] | 0.4500 |" in result.stdout


def test_nan_and_inf_cells_sort_last_both_ways(browser: Browser, tmp_path: Path) -> None:
    """A diverged run's nan (or an inf) was sorted as the text 'nan': first of the column sorted descending, above
    the best run. Now such a cell comes after the numbers either way, and a blank after it; a class named 'nan'
    (text, not a number) sorts as the text it is."""
    from classlab.report import SCRIPT, _table

    values = {"a": 0.5, "diverged": float("nan"), "b": 0.7, "blown": float("inf"), "none": None, "c": 0.1}
    rows = [{"run": name, "test_acc": value} for name, value in values.items()]
    table = _table(["run", "test_acc"], rows, "runs")
    page = tmp_path / "nan.html"
    page.write_text(f"<html><body>{table}<script>{SCRIPT}</script></body></html>")
    browser.open(page)
    order = "Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.cells[0].textContent)"
    browser.click("#runs th:nth-child(2)")
    ascending = browser.js(order)
    assert ascending[:3] == ["c", "a", "b"] and set(ascending[3:5]) == {"diverged", "blown"} and ascending[5] == "none"
    browser.click("#runs th:nth-child(2)")
    descending = browser.js(order)
    assert descending[:3] == ["b", "a", "c"] and set(descending[3:5]) == {"diverged", "blown"}
    assert descending[5] == "none" and browser.errors() == []
    assert '<td data-sort="nan" data-nonfinite>nan</td>' in table and '<td data-sort="nan">nan</td>' not in table
    assert '<td data-sort="nan">nan</td>' in _table(["class"], [{"class": "nan"}], "t")


def test_few_long_class_names_on_the_confusion_plot_do_not_overlap() -> None:
    """Up to 6 classes had their names written level under the matrix whatever their length: five dog breeds were
    one smear of letters. Now they are turned upright when, measured as drawn, two would touch."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from classlab.evaluate import _confusion_figure

    def drawn(classes: list[str]) -> tuple[set[float], list[Any]]:
        fig = _confusion_figure(torch.arange(len(classes) ** 2).reshape(len(classes), -1), classes, 0.5)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # as saved: the ticks and the title are placed where the last layout put the axes
        renderer = canvas.get_renderer()
        labels = fig.axes[0].get_xticklabels()
        inside = fig.bbox.padded(1)
        assert all(inside.contains(*corner) for t in labels for corner in t.get_window_extent(renderer).corners())
        return {t.get_rotation() for t in labels}, [t.get_window_extent(renderer) for t in labels]

    breeds = ["golden_retriever", "labrador_retriever", "german_shepherd", "siberian_husky", "border_collie"]
    rotation, boxes = drawn(breeds)
    assert rotation == {90.0}
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:]))
    assert drawn(["cat", "dog", "bird"])[0] == {0.0}  # short names stay level
    assert drawn(["golden_retriever", "labrador_retriever"])[0] == {0.0}  # two long ones have the room


def test_the_confusion_plots_title_fits_a_narrow_figure() -> None:
    """With 2 or 3 classes (a narrow figure) the title, 'confusion: numbers are counts, colour the share of the
    true class (row)', ran past the right edge and was cut off. Now it is wrapped to fit, measured as drawn."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from classlab.evaluate import _confusion_figure

    cases = [(["a", "b"], ""), (["cat", "dog", "bird"], "tta:hflip"), (list("abcdefghij"), "")]
    cases.append((["golden_retriever", "labrador_retriever", "dog"], ""))  # names turned upright
    for classes, source in cases:
        fig = _confusion_figure(torch.arange(len(classes) ** 2).reshape(len(classes), -1), classes, 0.5, source)
        canvas, title = FigureCanvasAgg(fig), fig.axes[0].title
        canvas.draw()  # as saved: the title is placed over the axes where the last layout put them
        box = title.get_window_extent(canvas.get_renderer())
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), (classes, box, fig.bbox)
        assert "counts" in title.get_text() and "top-1 0.5000" in title.get_text()


def test_a_k_fold_folder_without_a_test_split_says_so_not_yet(tmp_path: Path) -> None:
    """`compare KFOLD --metric test_acc` of folds trained with no test split (a CSV without data.test_csv_file, a
    class folder without test/) said `no run has metric 'test_acc' (yet)`: no test figure will ever come."""
    from tests.test_compare import _fake_k_fold

    group = _fake_k_fold(tmp_path)
    for fold in (group / f"fold{i}" for i in range(3)):
        summary = json.loads((fold / "summary.json").read_text())
        summary = {k: v for k, v in summary.items() if not k.startswith("test")}
        (fold / "summary.json").write_text(json.dumps({**summary, "images": {"train": 80, "val": 40, "test": 0}}))
    table = compare([str(group)], metrics=["test_acc", "best_val_acc"], plots=False, out=tmp_path / "out")
    assert table.notes == ["no run has metric 'test_acc': the runs have no test split, so its column stays empty"]
    one = compare([str(group / "fold0")], metrics=["test_acc"], plots=False, out=tmp_path / "one")
    assert one.notes == ["no run has metric 'test_acc': the run has no test split, so its column stays empty"]
    # A run still training that has a test split: its figure may come yet.
    running = _fake_run(group.parent, "running", 10, None, 0.3, status="running")
    (running / "summary.json").write_text(json.dumps({"status": "running", "images": {"test": 100}}))
    mixed = compare([str(group / "fold0"), str(running)], metrics=["test_acc"], plots=False, out=tmp_path / "mixed")
    assert mixed.notes == ["no run has metric 'test_acc' (yet): its column is empty"]
    # Finished runs with a test split that lack the figure (an older classlab): no '(yet)', nothing is coming.
    (running / "summary.json").write_text(json.dumps({"status": "finished", "images": {"test": 100}}))
    mixed = compare([str(group / "fold0"), str(running)], metrics=["test_acc"], plots=False, out=tmp_path / "mixed")
    assert mixed.notes == ["no run has metric 'test_acc': its column is empty (1 of the 2 runs have no test split)"]


def test_mlflows_own_info_lines_are_kept_back_without_v(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`classlab train -q trainer.loggers=[mlflow]` printed MLflow's `INFO mlflow.store.db.utils: Creating initial
    MLflow database tables...` and `Updating database tables` (its default SQLite store, made new), where the
    README says the libraries' own logs are kept back without -v; its 'View run at: URL' lines (a server's run)
    are not promised either: kept back the same way."""
    pytest.importorskip("mlflow")
    import logging
    import os

    extra = {"data.images_per_class": 10, "model.layers": "[8,p]", "trainer.loggers": "[mlflow]"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store, under run.root, made new
    result = run_cli("train", "-q", *tiny_config(tmp_path, exp_name="tracked", epochs=1, **extra))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (tmp_path / "runs" / "mlflow.db").is_file()

    from classlab.engine.library_logs import LIGHTNING_LOGGERS, MLFLOW_URL_ENV, mlflow_kept_back

    lightning, mlflow = logging.getLogger(LIGHTNING_LOGGERS[1]), logging.getLogger("mlflow")
    levels = (lightning.level, mlflow.level)
    try:
        lightning.setLevel(logging.ERROR)  # library_logs(0): kept back
        mlflow.setLevel(logging.INFO)
        with mlflow_kept_back():
            assert mlflow.level == logging.WARNING and os.environ[MLFLOW_URL_ENV] == "true"
        assert mlflow.level == logging.INFO and MLFLOW_URL_ENV not in os.environ  # given back
        lightning.setLevel(logging.INFO)  # -v: let through
        with mlflow_kept_back():
            assert mlflow.level == logging.INFO and MLFLOW_URL_ENV not in os.environ
    finally:
        lightning.setLevel(levels[0])
        mlflow.setLevel(levels[1])


def test_a_python_call_with_mlflow_leaves_the_tracking_uri_as_it_was(tmp_path: Path) -> None:
    """mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI in the process: after classlab.train(...) with MLflow, a
    notebook's next run (another run.root) logged into the first run's store, and the suite's later tests too."""
    pytest.importorskip("mlflow")
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    extra = {"data.images_per_class": 10, "model.layers": "[8,p]", "trainer.loggers": "[mlflow]"}
    classlab.train(None, tiny_config(tmp_path, exp_name="tracked", epochs=1, **extra), quiet=True)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
