"""The run folder: the one place that knows its file names, atomic writes, and folders of older versions."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest

import classlab
from classlab import run as runmod
from classlab.errors import ClassLabError
from classlab.run import AtomicCsvWriter, RunFolder, atomic_write_bytes, atomic_write_figure, new_figure

SRC = Path(__file__).resolve().parents[1] / "src" / "classlab"
OLD = Path(__file__).resolve().parent / "data" / "run_v0_1_0"
SAMPLE = SRC / "data" / "sample" / "cifar10_sample.zip"


def test_only_run_py_spells_run_file_names() -> None:
    names = [runmod.CONFIG, runmod.CLASSES, runmod.SPLIT, runmod.SUMMARY, runmod.METRICS, runmod.TASKS, runmod.SKIPPED]
    pattern = re.compile("|".join(re.escape(f'"{n}"') for n in [*names, "last.ckpt", "best.ckpt"]))
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        if p.name != "run.py"
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, f"run-folder file names spelled outside run.py: {found}"


def test_atomic_write_keeps_the_old_file_when_the_rename_fails(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_bytes(target, b"old")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runmod.os, "replace", fail)
    with pytest.raises(ClassLabError, match=f"cannot write {target}: No space left on device"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_atomic_files_get_the_users_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        writer = AtomicCsvWriter(tmp_path / "p.csv", ["path", "class"])
        writer.write([{"path": "a.jpg", "class": "cat"}])
        writer.commit()
    finally:
        os.umask(mask)
    for name in ("a.bin", "p.csv"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode & 0o044 == 0o044, f"{name} is {oct(mode)}: not readable by the group"  # mkstemp alone gives 0600
    assert (tmp_path / "p.csv").read_text() == "path,class\na.jpg,cat\n"


def test_csv_writer_discarded_leaves_nothing(tmp_path: Path) -> None:
    writer = AtomicCsvWriter(tmp_path / "p.csv", ["path"])
    writer.write([{"path": "a"}])
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_metrics_keep_one_line_ending_through_a_resume(tmp_path: Path) -> None:
    """Rows appended after a resume's cut end like the rows the cut rewrote: no mixed line endings."""
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    for epoch in range(3):
        run.append_metrics({"epoch": epoch, "step": 10 * epoch}, ["epoch", "step"])
    run.truncate_metrics(keep_epochs_below=2)
    run.append_metrics({"epoch": 2, "step": 21}, ["epoch", "step"])
    assert run.metrics_path.read_bytes() == b"epoch,step\n0,0\n1,10\n2,21\n"


def test_figure_written_as_png_and_never_held_by_pyplot(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figures = plt.get_fignums()
    fig, ax = new_figure()
    ax.plot([0, 1], [1, 0])
    atomic_write_figure(tmp_path / "f.png", fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.get_fignums() == figures


def test_run_folder_paths_and_defaults(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "r")
    assert run.checkpoint_path("epoch5") == tmp_path / "r" / "checkpoints" / "epoch5.ckpt"
    assert run.summary(default={"status": "unknown"}) == {"status": "unknown"}
    with pytest.raises(ClassLabError, match="has no summary.json"):
        run.summary()
    run.write_split({"val": [1, 2]})
    run.write_skipped(["a.jpg", "b.jpg"])
    assert run.read_split() == {"val": [1, 2]}
    assert (run.path / runmod.SKIPPED).read_text() == "a.jpg\nb.jpg\n"
    with pytest.raises(ClassLabError, match="no checkpoint 'best'; it has none yet"):
        run.checkpoint("best")


def test_a_damaged_config_or_class_map_is_one_line(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """Before: a config.yaml cut mid-write by a copy tool, or a hand-edited classes.json, ended in
    'unexpected ScannerError' / 'unexpected KeyError'."""
    from tests.faults import cli, error_lines

    run = Path(shutil.copytree(tiny_run, tmp_path / "r"))
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config + "data: [unclosed\n")
    code, _, err = cli(capsys, "eval", str(run))
    assert code == 1 and error_lines(err) == [
        f"error: {run / 'config.yaml'} is damaged (not valid YAML: while parsing a flow sequence)"
    ], err
    (run / "config.yaml").write_text(config)
    (run / "classes.json").write_text('{"0": "cat", "2": "dog"}')
    code, _, err = cli(capsys, "predict", str(run), str(tmp_path))
    assert code == 1 and error_lines(err) == [
        f"error: {run / 'classes.json'} is damaged (it maps the class numbers 0, 1, ... to names, as classlab wrote it)"
    ], err


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(OLD / "run", tmp_path / "v010_run"))


def test_a_run_of_the_previous_version_evaluates_the_same(old_run: Path) -> None:
    expected = json.loads((OLD / "expected" / "eval_test_metrics.json").read_text())
    metrics = classlab.evaluate(old_run)
    assert metrics["images"] == expected["images"]
    assert metrics["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert metrics["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert metrics["per_class"] == pytest.approx(expected["per_class"])


def test_a_saved_key_an_earlier_version_never_read_does_not_stop_the_run_loading(old_run: Path) -> None:
    """data.csv_file beside data.dataset=sample was saved unread before it was refused; such a run still loads."""
    import yaml

    tree = yaml.safe_load((old_run / "config.yaml").read_text())
    tree["data"]["csv_file"] = "train.csv"
    (old_run / "config.yaml").write_text(yaml.safe_dump(tree))
    assert classlab.load(old_run).cfg.data.csv_file is None


def test_a_run_of_the_previous_version_predicts_the_same(old_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(SAMPLE) as zf:
        for i, cls in enumerate(["airplane", "automobile", "bird", "cat", "deer"]):
            (images / f"{i}.jpg").write_bytes(zf.read(f"test/{cls}/0000.jpg"))
    with open(OLD / "expected" / "predictions.csv", newline="") as handle:
        expected = {row["path"]: row for row in csv.DictReader(handle)}
    rows = classlab.predict(old_run, [images])
    assert len(rows) == 5
    for row in rows:
        want = expected[Path(row["path"]).name]
        assert row["class"] == want["class"] and row["top2_class"] == want["top2_class"]
        assert row["prob"] == pytest.approx(float(want["prob"]), abs=2e-6)


def test_a_folder_of_runs_given_as_a_run_names_one_of_them(tmp_path: Path, capsys) -> None:
    """`classlab eval runs/sweep` (the folder the sweep printed) said only 'not a run folder (no config.yaml)'."""
    from tests.faults import cli, error_lines

    sweep = tmp_path / "sweep"
    for name in ("lr=0.1", "lr=0.01"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "config.yaml").write_text("exp_name: x\n")
    hint = (
        f"it holds 2 run(s) (a sweep's or run.root's folder): give one of them ({sweep / 'lr=0.01'}), or for "
        "predict/eval several of them with --ensemble mean"
    )
    with pytest.raises(ClassLabError) as err:
        runmod.open_run(sweep)
    assert str(err.value) == f"'{sweep}' is not a run folder (no config.yaml); {hint}"
    code, _, stderr = cli(capsys, "predict", str(sweep), str(tmp_path))
    assert code == 2 and error_lines(stderr) == [
        f"error: '{sweep}' is not a run folder (no config.yaml) nor an exported .onnx file; {hint}"
    ]
    with pytest.raises(ClassLabError, match=r"no config.yaml\); give the folder `classlab train` printed$"):
        runmod.open_run(sweep / "lr=0.1" / ".." / "..")


def test_a_run_that_trains_again_sheds_its_earlier_finish(tmp_path: Path) -> None:
    """`--resume epochs=60` of a finished 30-epoch run: compare showed the 30-epoch test_acc beside 'running'."""
    run = RunFolder(tmp_path / "r")
    run.path.mkdir()
    finished = {"status": "finished", "model": "cnn", "params": 10, "epochs_done": 30, "best_val_acc": 0.8}
    finished |= {
        "best_epoch": 29,
        "test_acc": 0.79,
        "test/age/acc": 0.7,
        "val/age/acc": 0.71,
        "test_checkpoint": "best",
    }
    run.update_summary(**finished, wall_time_s=12.0, finished_at="2026-12-05T10:00:00", resumed_with=[{"x": 1}])
    assert run.update_summary(status="running", epochs=60) == {
        "status": "running",
        "model": "cnn",
        "params": 10,
        "resumed_with": [{"x": 1}],
        "epochs": 60,
    }
    run.update_summary(logger_ids={"mlflow": "a"}, test_acc=0.8)  # no status: nothing is shed
    assert run.summary()["test_acc"] == 0.8


def test_text_the_default_font_lacks_gets_an_installed_font_or_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Korean class names drew boxes in confusion.png, with matplotlib's warning line for each glyph."""
    import warnings

    import classlab.run as run_module

    def figure() -> tuple[Any, list[str]]:
        fig, ax = new_figure()
        ax.set_xticks([0, 1], ["a⤸b", "고양이"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            atomic_write_figure(tmp_path / "f.png", fig)
        return ax, [str(w.message) for w in caught]

    installed = run_module._installed_fonts()
    ax, said = figure()
    arrow, hangul = ax.get_xticklabels()
    assert len(arrow.get_fontfamily()) == 2  # DejaVu Sans lacks ⤸; a font matplotlib ships has it
    if any(ord("고") in chars for _, chars in installed):  # a CJK font on this machine: drawn with it
        assert said == [] and len(hangul.get_fontfamily()) == 2
    monkeypatch.setattr(run_module, "_installed_fonts", lambda: [f for f in installed if ord("고") not in f[1]])
    ax, said = figure()
    assert said == [
        "f.png: no installed font draws 고 양 이, so they show as boxes; install a font that has them (Debian/Ubuntu: "
        "apt-get install fonts-noto-cjk), remove matplotlib's font cache (rm -r ~/.cache/matplotlib) and write the "
        "figure again"
    ]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
