"""compare: the table holds the runs' own summary values and config keys; plots and CSV are written."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from classlab.compare import compare, flatten
from classlab.errors import ClassLabError

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(root: Path, name: str, ipc: int, init: str | None, test_acc: float, status: str = "finished") -> Path:
    """A run folder as training leaves it (compare reads only these files)."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = {
        "exp_name": name,
        "run": {"root": str(root)},
        "data": {"dataset": "cifar10", "images_per_class": ipc},
        "model": {"name": "cnn", "layers": [16, "p"], "init_from": init},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": status, "test_acc": test_acc, "best_val_acc": test_acc + 0.01, "epochs_done": 3}
    summary["wall_time_s"] = 12.3456
    (run / "summary.json").write_text(json.dumps(summary))
    rows = ["epoch,step,lr,train/loss,train/acc,val/loss,val/acc,val/acc5,time"]
    rows += [f"{e},{e * 10},0.1,1.0,0.5,1.0,{test_acc * e / 3:.4f},0.9,{e}" for e in (1, 2, 3)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs" / "study"
    for ipc, acc_s, acc_r in ((10, 0.20, 0.28), (50, 0.35, 0.40), (500, 0.60, 0.62)):
        _fake_run(root, f"images_per_class={ipc},init_from=none", ipc, None, acc_s)
        _fake_run(root, f"images_per_class={ipc},init_from=rot", ipc, "runs/rot", acc_r)
    _fake_run(root, "unfinished", 10, None, 0.1, status="interrupted")
    (root / "sweep-logs").mkdir()  # not a run: skipped
    return root


def test_table_matches_the_summaries_and_configs(runs: Path, tmp_path: Path) -> None:
    table = compare([str(runs)], out=tmp_path / "out")
    assert table.by == ["data.images_per_class", "model.init_from"]  # the keys that differ
    assert len(table.rows) == 7
    with open(tmp_path / "out" / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        run = runs / row["run"]
        summary = json.loads((run / "summary.json").read_text())
        config = flatten(yaml.safe_load((run / "config.yaml").read_text()))
        assert row["status"] == summary["status"]
        assert float(row["test_acc"]) == summary["test_acc"]
        assert float(row["best_val_acc"]) == summary["best_val_acc"]
        assert row["data.images_per_class"] == str(config["data.images_per_class"])
        assert row["model.init_from"] == (config["model.init_from"] or "")
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert markdown.splitlines()[0].startswith("| run | status | data.images_per_class | model.init_from | test_acc")
    assert "| images_per_class=500,init_from=rot | finished | 500 | runs/rot | 0.6200 |" in markdown
    assert "| 12.3 |" in markdown and "12.3456" not in markdown  # seconds to a tenth, accuracies to 4 places
    for png in ("curves.png", "test_acc_vs_data_images_per_class.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG)


def test_cli_globs_by_and_metric(runs: Path, tmp_path: Path) -> None:
    result = run_cli(
        "compare",
        str(runs / "images_per_class=*"),
        "--by",
        "model.init_from",
        "--metric",
        "test_acc",
        "--x",
        "data.images_per_class",
        "--out",
        str(tmp_path / "cli"),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| run | status | model.init_from | test_acc |" and len(lines) == 2 + 6 + 1
    assert (tmp_path / "cli" / "test_acc_vs_data_images_per_class.png").is_file()
    assert result.stderr == ""
    # A metric no run has: the table still comes, with a note naming the near spelling (was an empty column alone).
    table = compare([str(runs)], metrics=["tset_acc", "test_acc"], plots=False, out=tmp_path / "typo")
    assert table.notes == ["no run has metric 'tset_acc' (yet) (did you mean 'test_acc'?): its column is empty"]


def test_errors_are_one_line(runs: Path, tmp_path: Path) -> None:
    with pytest.raises(ClassLabError, match="matches nothing"):
        compare([str(tmp_path / "nope*")])
    with pytest.raises(ClassLabError, match="in none of the runs.*did you mean 'model.init_from'"):
        compare([str(runs)], by=["model.init_frm"], plots=False)
    # `classlab compare runs/*` unquoted: the shell also lists runs/compare/, compare's own output, which stopped it
    compare([str(runs)], out=runs / "compare", plots=False)
    listed = sorted(str(p) for p in runs.iterdir())
    assert len(compare(listed, out=tmp_path / "shell", plots=False).rows) == 7
    with pytest.raises(ClassLabError, match="is not a run folder and holds none"):
        compare([str(runs / "compare")], plots=False)
    result = run_cli("compare", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_a_killed_run_reads_cut_off_not_running(tmp_path: Path) -> None:
    """kill -9 or a machine's end leaves summary.json at "running" (and a lock of a dead process) for ever."""
    root = tmp_path / "runs"
    killed = _fake_run(root, "killed", 10, None, 0.1, status="running")
    (killed / "run.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "owner": "x"}))
    live = _fake_run(root, "live", 10, None, 0.1, status="running")
    (live / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": "y"}))
    rows = {r["run"]: r for r in compare([str(root)], out=tmp_path / "out", plots=False).rows}
    assert {name: r["status"] for name, r in rows.items()} == {"killed": "cut off", "live": "running"}
    # Their figures so far come from metrics.csv (the summary has none before the end): epoch 3, val 0.1 at best
    for folder in (killed, live):
        (folder / "summary.json").write_text(json.dumps({"status": "running"}))
    rows = {r["run"]: r for r in compare([str(root)], out=tmp_path / "out", plots=False).rows}
    assert [(r["epochs_done"], r["best_val_acc"], r.get("test_acc")) for r in rows.values()] == [(3, 0.1, None)] * 2


def test_a_damaged_run_among_several_is_left_out_with_a_note(runs: Path, tmp_path: Path) -> None:
    """One summary.json cut short by a copy (or not UTF-8) stopped compare and report of the whole sweep."""
    (runs / "images_per_class=10,init_from=rot" / "summary.json").write_text('{"status": "fin\n')
    (runs / "unfinished" / "summary.json").write_bytes(b"\xff\xfe{}")
    table = compare([str(runs)], out=tmp_path / "out", plots=False)
    assert len(table.rows) == 5
    assert table.notes == [
        f"left out {runs / 'images_per_class=10,init_from=rot'}: "
        f"{runs / 'images_per_class=10,init_from=rot' / 'summary.json'} is damaged "
        "(not valid JSON: Invalid control character at line 1)",
        f"left out {runs / 'unfinished'}: {runs / 'unfinished' / 'summary.json'} is damaged "
        "(not UTF-8 text: byte 0xff)",
    ]
    result = run_cli("report", str(runs), "--out", str(tmp_path / "r.html"))
    assert result.returncode == 0 and (tmp_path / "r.html").is_file()
    assert result.stderr.splitlines() == [f"note: {note}" for note in table.notes]
    # One run alone is the error, in one line.
    result = run_cli("compare", str(runs / "unfinished"))
    assert result.returncode == 1
    assert result.stderr == f"error: {runs / 'unfinished' / 'summary.json'} is damaged (not UTF-8 text: byte 0xff)\n"


def test_rows_sort_naturally_and_legends_name_runs_by_folder() -> None:
    from classlab.compare import _legend_value, _sort_key

    values = ["runs/rot:epoch12", None, "runs/rot:epoch4", "runs/rot:epoch20", "runs/rot:epoch8"]
    assert sorted(values, key=_sort_key) == [
        None,
        "runs/rot:epoch4",
        "runs/rot:epoch8",
        "runs/rot:epoch12",
        "runs/rot:epoch20",
    ]
    assert sorted([10, 2.5, None, 100], key=_sort_key) == [None, 2.5, 10, 100]
    assert _legend_value("runs/study/rotation:epoch5") == "rotation:epoch5"
    assert _legend_value(None) == "none" and _legend_value("conv_fc") == "conv_fc"


def test_a_file_is_named_as_a_file_and_a_runs_own_file_stands_for_it(runs: Path, tmp_path: Path) -> None:
    note = tmp_path / "notes.txt"
    note.write_text("not a run")
    # Before: "run folder 'notes.txt' not found" about a file that is right there.
    result = run_cli("compare", str(note))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr == f"error: '{note}' is a file, not a run folder; give the folder that holds config.yaml\n"
    run = runs / "images_per_class=10,init_from=rot"
    table = compare([str(run / "summary.json")], plots=False, out=tmp_path / "cmp")
    assert [r["run"] for r in table.rows] == [run.name] and table.rows[0]["test_acc"] == 0.28


def test_a_rotation_run_is_never_shown_as_a_classifier(tmp_path: Path) -> None:
    """Its accuracy is over four angles: beside a classifier's with no task column it reads as the better model."""
    root = tmp_path / "runs"
    _fake_run(root, "cls", 10, None, 0.30)
    rot = _fake_run(root, "rot", 10, None, 0.52)
    tree = yaml.safe_load((rot / "config.yaml").read_text())
    (rot / "config.yaml").write_text(yaml.safe_dump({**tree, "task": "rotation"}))
    table = compare([str(root)], by=["model.name"], out=tmp_path / "out", plots=False)
    assert table.by == ["model.name", "task"]
    assert {r["run"]: r["task"] for r in table.rows} == {"cls": None, "rot": "rotation"}


def test_the_run_folders_train_returns_are_taken_as_they_are(runs: Path, tmp_path: Path) -> None:
    """``classlab.train`` returns a RunFolder, its str() its repr: report([run]) said "RunFolder(...) not found"."""
    import classlab
    from classlab.run import RunFolder

    one = RunFolder(runs / "images_per_class=10,init_from=none")
    assert [r["run"] for r in compare(one, out=tmp_path / "a", plots=False).rows] == [one.path.name]
    two = [one, runs / "images_per_class=50,init_from=none"]
    assert len(compare(two, out=tmp_path / "b", plots=False).rows) == 2
    page = classlab.report([one], tmp_path / "report.html")
    assert page.is_file() and one.path.name in page.read_text(encoding="utf-8")


def test_an_x_that_cannot_be_plotted_is_said(runs: Path, tmp_path: Path) -> None:
    """--x model.name (text) drew no metric plot, and nothing said why."""
    table = compare([str(runs)], x="model.name", out=tmp_path / "out")
    assert table.notes == [
        "no plot of test_acc against --x model.name: it needs runs with a number for model.name and for test_acc"
    ]
    assert not list((tmp_path / "out").glob("*_vs_*.png"))
    assert compare([str(runs)], x="data.images_per_class", out=tmp_path / "ok").notes == []


def test_a_k_fold_mean_counts_only_the_folds_that_finished(tmp_path: Path) -> None:
    """A fold cut off by kill -9 has no figures; the row read 'mean ± std (3 folds)' over the two that had."""
    group = tmp_path / "cv"
    for fold, (acc, status) in enumerate(((0.5, "finished"), (0.7, "finished"), (0.1, "interrupted"))):
        run = _fake_run(group, f"fold{fold}", 10, None, acc, status=status)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"].update(folds=3, fold=fold)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    (group / "folds.json").write_text(json.dumps({"folds": 3}))
    table = compare([str(group)], metrics=["test_acc"], plots=False, out=tmp_path / "out")
    assert table.rows[-1] == {"run": "cv mean ± std (2 of 3 folds done)", "status": "", "test_acc": "0.6000 ± 0.1414"}


def test_runs_that_force_moved_aside_are_compared_only_when_named(runs: Path, tmp_path: Path) -> None:
    """`train --force` keeps the replaced run as NAME.old-<time>: a sweep folder listed it as a run of its own."""
    old = runs / "images_per_class=10,init_from=none.old-20261205-093000"
    _fake_run(runs, old.name, 10, None, 0.05)
    table = compare([str(runs)], metrics=["test_acc"], plots=False, out=tmp_path / "out")
    assert old.name not in [row["run"] for row in table.rows] and len(table.rows) == 7
    assert table.notes == [f"left out 1 run that --force moved aside ({old.name}): name a run folder to compare it"]
    globbed = compare([str(runs / "images_per_class=10*")], metrics=["test_acc"], plots=False, out=tmp_path / "g")
    assert len(globbed.rows) == 2 and len(globbed.notes) == 1
    named = compare([str(runs / "images_per_class=10,init_from=none"), str(old)], plots=False, out=tmp_path / "n")
    assert [row["test_acc"] for row in named.rows] == [0.2, 0.05] and named.notes == []


def _fake_k_fold(tmp_path: Path, epochs: tuple[int, ...] = (3, 3, 3), finished: bool = True) -> Path:
    """A k-fold folder as ``train --folds 3`` leaves it: fold runs, folds.json and the out-of-fold summary."""
    group = tmp_path / "runs" / "kf"
    for fold, (acc, done) in enumerate(zip((0.5, 0.7, 0.6), epochs, strict=True)):
        run = _fake_run(group, f"fold{fold}", 10, None, acc, status="finished" if finished or fold else "running")
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"].update(folds=3, fold=fold)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "epochs_done": done}))
    (group / "folds.json").write_text(json.dumps({"folds": 3}))
    summary = {"status": "finished" if finished else "running", "folds": 3, "images": 120}
    (group / "summary.json").write_text(json.dumps({**summary, "oof_acc": 0.575, "oof_f1": 0.5612345}))
    return group


def test_a_k_fold_table_shows_the_out_of_fold_figures(tmp_path: Path) -> None:
    """Before: the folds and their mean ± std only; the honest k-fold figure (oof_acc, oof_f1) was in summary.json."""
    from classlab.report import write_html_report

    group = _fake_k_fold(tmp_path)
    line = "kf out-of-fold (all 120 training images): acc 0.5750, macro-F1 0.5612"
    table = compare([str(group)], plots=False, out=tmp_path / "out")
    assert [r["run"] for r in table.rows[-2:]] == ["kf mean ± std (3 folds)", line] and table.summary_rows == 2
    assert f"| {line} |" in (tmp_path / "out" / "compare.md").read_text()
    assert list(csv.DictReader((tmp_path / "out" / "compare.csv").open()))[-1]["run"] == line
    page = write_html_report([str(group)], tmp_path / "r.html").read_text()
    assert f'<td data-sort="{line}">{line}</td>' in page.split("<tfoot>")[1]
    # A fold not finished (the k-fold summary says running, its oof figures of an earlier call): no such row.
    unfinished = _fake_k_fold(tmp_path / "again", finished=False)
    rows = compare([str(unfinished)], plots=False, out=tmp_path / "out2").rows
    assert not any("out-of-fold" in r["run"] for r in rows)


def test_a_k_fold_mean_shows_counts_as_whole_numbers(tmp_path: Path) -> None:
    """Before: epochs_done read '3.0000 ± 0.0000'."""
    table = compare([str(_fake_k_fold(tmp_path))], plots=False, out=tmp_path / "out")
    mean = table.rows[-2]
    assert mean["epochs_done"] == "3" and mean["best_val_acc"] == "0.6100 ± 0.1000"
    assert mean["wall_time_s"] == "12.3 ± 0.0"  # seconds to a tenth, as the fold rows show them
    table = compare([str(_fake_k_fold(tmp_path / "b", epochs=(30, 29, 30)))], plots=False, out=tmp_path / "b" / "out")
    assert table.rows[-2]["epochs_done"] == "29.7 ± 0.6"
    table = compare([str(_fake_k_fold(tmp_path / "c", epochs=(30, 28, 32)))], plots=False, out=tmp_path / "c" / "out")
    assert table.rows[-2]["epochs_done"] == "30 ± 2"


def test_no_metric_is_plotted_against_the_fold_index(tmp_path: Path) -> None:
    """Before: compare of a k-fold folder drew best_val_acc_vs_data_fold.png, a plot of nothing."""
    group = _fake_k_fold(tmp_path)
    table = compare([str(group)], out=tmp_path / "out")
    assert (tmp_path / "out" / "curves.png").is_file() and not list((tmp_path / "out").glob("*_vs_*.png"))
    assert table.notes == []
    asked = compare([str(group)], x="data.fold", out=tmp_path / "asked")
    assert not list((tmp_path / "asked").glob("*_vs_*.png"))
    assert asked.notes == ["no plot against --x data.fold: the fold index is no axis (see the mean ± std row)"]


def test_the_out_of_fold_figures_are_written_rounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: summary.json held oof_acc 0.3499999940395355 (a float32 read as a double)."""
    import torch

    import classlab.train as train

    top = tmp_path / "kf"
    labels = torch.tensor([0] * 10 + [1] * 10)
    right = torch.tensor([1] * 7 + [0] * 13, dtype=torch.bool)  # 7 of 20 right: 0.35, not exact in float32
    predicted = torch.where(right, labels, 1 - labels)
    probs = torch.nn.functional.one_hot(predicted, 2).float() * 0.8 + 0.1
    for i in range(2):
        (top / f"fold{i}").mkdir(parents=True)
        (top / f"fold{i}" / "summary.json").write_text(json.dumps({"status": "finished", "wall_time_s": 1.0}))
    (top / "folds.json").write_text(json.dumps({"folds": 2}))
    (top / "fold0" / "split.json").write_text(json.dumps({"train": list(range(10)), "val": list(range(10, 20))}))

    def fake_predict(run: Path) -> dict:
        part = slice(0, 10) if run.name == "fold0" else slice(10, 20)
        index = list(range(20))[part]
        fold = {"index": index, "files": [], "probs": probs[part], "labels": labels[part], "task_probs": []}
        return {**fold, "classes": ["a", "b"], "layout": None}

    monkeypatch.setattr(train, "_predict_fold", fake_predict)
    train.write_out_of_fold(train.RunFolder(top))
    text = (top / "summary.json").read_text()
    summary = json.loads(text)
    assert summary["oof_acc"] == 0.35 and '"oof_acc": 0.35,' in text
    assert summary["oof_f1"] == round(summary["oof_f1"], 6)
