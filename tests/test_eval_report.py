"""Error analysis: per-class precision/recall/F1, calibration error, and the files ``eval --report`` writes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import classlab
from classlab.engine.metrics import calibration, per_class_scores
from tests.conftest import make_image, run_cli


def test_per_class_scores_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 0])
    rows = {r["class"]: r for r in per_class_scores(pred, labels, ["a", "b", "c"])}
    assert rows["a"]["precision"] == pytest.approx(2 / 4) and rows["a"]["recall"] == pytest.approx(2 / 3)
    assert rows["a"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert rows["b"]["precision"] == pytest.approx(1 / 2) and rows["b"]["recall"] == pytest.approx(1 / 2)
    assert rows["c"] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}


def test_ece_by_hand() -> None:
    # Two confident predictions (0.9), one right one wrong -> |0.5 - 0.9| on half the data;
    # two at 0.6, both right -> |1.0 - 0.6| on the other half. ECE = 0.5 * 0.4 + 0.5 * 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    cal = calibration(probs, labels)
    assert cal["ece"] == pytest.approx(0.4) and len(cal["bins"]) == 15
    assert sum(b["count"] for b in cal["bins"]) == 4
    perfect = calibration(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-7)  # 6e-8: the 1.0 confidences counted just under 1


def test_the_reliability_bars_add_up_to_the_ece() -> None:
    """Saturated softmaxes (exactly 1.0) sat in a bin of their own in torchmetrics' ECE but in the diagram's
    last bar: a confident model's bars gave another figure than the ECE printed above them."""
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, 0.05], [0.97, 0.03], [0.7, 0.3], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 0, 1, 1])
    cal = calibration(probs, labels)
    from_bars = sum(b["count"] / len(labels) * abs(b["accuracy"] - b["confidence"]) for b in cal["bins"] if b["count"])
    assert cal["ece"] == pytest.approx(from_bars, abs=1e-6)
    assert cal["ece"] == pytest.approx(numpy_ece(probs.numpy(), labels.numpy()), abs=1e-6)
    assert cal["bins"][-1]["count"] == 4


def numpy_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s ECE in plain numpy: equal-width bins of the top confidence, a confidence of 1.0 in the last."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    index = np.minimum((conf * bins).astype(int), bins - 1)
    return sum(
        (index == b).mean() * abs(correct[index == b].mean() - conf[index == b].mean())
        for b in range(bins)
        if (index == b).any()
    )


def test_ece_of_tta_probabilities_that_round_above_one() -> None:
    """flip,translate averages ten saturated softmaxes at 0.1 each, which sums to 1.0000001 in float32;
    torchmetrics took that for logits and softmaxed every row again: eval --report printed an ECE of 0.44
    for a model right and sure on every image. The figure must be the one computed from the probabilities."""
    from classlab.engine.tta import mode_softmax

    sure = torch.full((10, 3, 8, 8), 255, dtype=torch.uint8)  # logits (40, 0, 0): softmax exactly 1.0
    unsure = torch.zeros((10, 3, 8, 8), dtype=torch.uint8)  # softmax (0.7, 0.15, 0.15)
    x = torch.cat([sure, unsure])

    def model(v: torch.Tensor) -> torch.Tensor:
        bright = (v[:, 0, 0, 0] > 0).float()[:, None]
        return bright * torch.tensor([40.0, 0.0, 0.0]) + (1 - bright) * torch.tensor([0.7, 0.15, 0.15]).log()

    probs = mode_softmax(model, x, ("flip", "translate"), 8)
    assert probs.max() > 1.0  # the float32 sum this test is about
    labels = torch.zeros(20, dtype=torch.long)  # every image is class 0: sure ones right at 1.0, unsure at 0.7
    expected = numpy_ece(np.clip(probs.double().numpy(), 0, 1), labels.numpy())
    assert expected == pytest.approx(0.5 * 0.3, abs=1e-6)
    assert calibration(probs, labels)["ece"] == pytest.approx(expected, abs=1e-6)


def test_eval_report_writes_files_and_table(tiny_run: Path) -> None:
    result = run_cli("eval", str(tiny_run), "--report")
    assert result.returncode == 0, result.stderr
    assert (
        "precision" in result.stdout and "macro avg" in result.stdout and "expected calibration error" in result.stdout
    )
    out = tiny_run / "eval" / "test"
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["class"] for r in rows][:2] == ["airplane", "automobile"] and sum(int(r["support"]) for r in rows) == 1000
    for name in ("confident_errors.png", "reliability.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 5000
    report = json.loads((out / "report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= report["ece"] <= 1 and metrics["report"]["ece"] == pytest.approx(report["ece"])
    errors = report["confident_errors"]
    assert errors and all(e["true"] != e["predicted"] for e in errors)
    assert [e["confidence"] for e in errors] == sorted((e["confidence"] for e in errors), reverse=True)
    # Recall of each class is the per-class accuracy eval already printed.
    for r in rows:
        assert float(r["recall"]) == pytest.approx(metrics["per_class"][r["class"]], abs=1e-6)


def test_report_with_tta_uses_tta_predictions(tiny_run: Path) -> None:
    metrics = classlab.evaluate(tiny_run, split="val", tta="flip", report=True)
    report = json.loads((tiny_run / "eval" / "val" / "report.json").read_text())
    assert report["predictions"] == "tta:flip" and "tta" in metrics


def test_a_runs_own_files_stand_for_the_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Tab completion ends at checkpoints/last.ckpt or config.yaml: eval, predict and export take them as the run
    (a checkpoint as --checkpoint), where they said "is not a run folder"."""
    from classlab.cli import main

    last = tiny_run / "checkpoints" / "last.ckpt"
    assert main(["eval", str(last), "--split", "val"]) == 0
    assert "last.ckpt" in capsys.readouterr().out
    image = make_image(tmp_path / "one.png", (200, 30, 30))
    assert main(["predict", str(tiny_run / "config.yaml"), str(image), "--out", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "predictions.csv").read_text().count("\n") == 2
    assert main(["predict", str(last), str(image), "--checkpoint", "last", "--out", str(tmp_path)]) == 0
    assert main(["predict", str(last), str(image), "--checkpoint", "epoch1", "--out", str(tmp_path)]) == 2
    assert "last.ckpt given with --checkpoint epoch1: keep one of the two" in capsys.readouterr().err
    # An explicit --checkpoint best is not the default: it contradicts the file given, as any other name does.
    assert main(["predict", str(last), str(image), "--checkpoint", "best", "--out", str(tmp_path)]) == 2
    assert "last.ckpt given with --checkpoint best: keep one of the two" in capsys.readouterr().err


def test_checkpoint_given_as_a_path(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--checkpoint takes a name; a path to the run's own file means that file, another run's file is named."""
    import shutil

    from classlab.cli import main

    assert main(["eval", str(tiny_run), "--split", "val", "--checkpoint", str(tiny_run / "checkpoints/last.ckpt")]) == 0
    assert "last.ckpt" in capsys.readouterr().out
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    given = str(other / "checkpoints" / "last.ckpt")
    assert main(["eval", str(tiny_run), "--checkpoint", given]) == 2
    assert capsys.readouterr().err == (
        f"error: --checkpoint {given}: that file belongs to run '{other}'; give that folder as the run, "
        "or a checkpoint name of this run (best, last, epochN)\n"
    )
    loose = tmp_path / "model.ckpt"
    loose.write_bytes(b"x")
    assert main(["export", str(tiny_run), "--checkpoint", str(loose)]) == 2
    assert "give a checkpoint's name in the run (best, last, epochN), not a file path" in capsys.readouterr().err


def test_tables_align_korean_class_names() -> None:
    """A Hangul character takes two terminal columns; padding by characters pushed the figures out of line."""
    from classlab.evaluate import display_width, format_table

    rows = [
        {"class": name, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3}
        for name in ("고양이", "dog house", "Ünïcode")
    ]
    lines = format_table(rows).splitlines()
    assert display_width("고양이") == 6
    assert len({display_width(line) for line in lines}) == 1, lines  # every row ends in the same column


def test_table_macro_row_lines_up_with_short_class_names() -> None:
    """Class names shorter than 'macro avg' (red, green, blue) pushed the macro row's figures out of line."""
    from classlab.evaluate import display_width, format_table

    rows = [
        {"class": name, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4} for name in ("red", "tan", "ox")
    ]
    lines = format_table(rows).splitlines()
    assert lines[-2].startswith("  macro avg") and lines[-1].startswith("  weighted avg") and len(lines) == 6
    assert len({display_width(line) for line in lines}) == 1, lines
    assert lines[-2].split()[2:] == ["1.0000", "0.5000", "0.6667", "12"]


def test_table_averages_are_scikit_learns() -> None:
    """The macro and the support-weighted averages of eval --report's table, against classification_report."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    from classlab.evaluate import format_table

    rng = np.random.default_rng(0)
    labels = rng.choice(4, 60, p=[0.55, 0.25, 0.15, 0.05])
    pred = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 4, 60))
    rows = per_class_scores(torch.from_numpy(pred), torch.from_numpy(labels), ["a", "b", "c", "d"])
    report = sklearn_metrics.classification_report(labels, pred, output_dict=True, zero_division=0)
    for line, name in zip(format_table(rows).splitlines()[-2:], ("macro avg", "weighted avg"), strict=True):
        figures = [float(v) for v in line.split()[2:5]]
        expected = [report[name][k] for k in ("precision", "recall", "f1-score")]
        assert figures == pytest.approx(expected, abs=5e-5), name


def test_confusion_figure_counts_on_row_shares() -> None:
    """The PNG's cells are coloured by each true class's (row's) share and labelled with the counts of confusion.csv;
    its title says so (it said "rows sum to 1" over numbers that were counts)."""
    from classlab.evaluate import _confusion_figure

    cm = torch.tensor([[6, 2, 0], [1, 1, 0], [0, 0, 0]])  # rows true, columns predicted; class c absent
    fig = _confusion_figure(cm, ["a", "b", "c"], 7 / 10)
    ax = fig.axes[0]
    shares = np.asarray(ax.images[0].get_array())
    expected = cm.numpy() / np.maximum(cm.numpy().sum(1, keepdims=True), 1)
    np.testing.assert_allclose(shares, expected, atol=1e-6)
    written = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    assert written == {(0, 0): 6, (0, 1): 2, (1, 0): 1, (1, 1): 1}  # (row, column): the counts
    assert "counts" in ax.get_title() and "0.7000" in ax.get_title()
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("true", "predicted")


def _sample_folder(root: Path, per_class: dict[str, int]) -> Path:
    """The embedded sample's test photos of some classes, as a user's labelled folder (class folders)."""
    import zipfile

    from classlab.data.sources import SAMPLE_ZIP

    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        for name, count in per_class.items():
            for member in sorted(n for n in archive.namelist() if n.startswith(f"test/{name}/"))[:count]:
                target = root / name / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))
    return root


def test_eval_on_a_labelled_folder_the_run_never_saw(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """eval --data scores a folder of class folders (a subset of the run's classes) against the run's class
    map: the figures agree with predict's classes for the same files, and the report's macro average leaves
    out the classes that are in neither the labels nor the predictions, as macro-F1 does."""
    from tests.faults import cli, error_lines

    folder = _sample_folder(tmp_path / "new_photos", {"cat": 12, "ship": 10, "truck": 8})
    (folder / "ship" / "broken.jpg").write_bytes(b"not a jpeg")
    code, out, err = cli(capsys, "eval", str(tiny_run), "--data", str(folder), "--report", "--tta", "flip")
    assert code == 0, err
    assert out.startswith(f"{tiny_run} [{folder}, best.ckpt, 30 images]")
    assert "1 file(s) could not be read and are left out:" in err and "broken.jpg: " in err
    metrics = json.loads((tiny_run / "eval" / "data-new_photos" / "metrics.json").read_text())
    rows = classlab.predict(tiny_run, [folder])
    truth = {"cat": "cat", "ship": "ship", "truck": "truck"}
    right = [r["class"] == truth[Path(r["path"]).parent.name] for r in rows if not r["error"]]
    assert len(right) == 30 and metrics["top1"] == pytest.approx(sum(right) / 30, abs=1e-6)
    for name in truth:  # each folder's images scored as that class of the run (not the folder's own order)
        mine = [r["class"] == name for r in rows if Path(r["path"]).parent.name == name and not r["error"]]
        assert metrics["per_class"][name] == pytest.approx(sum(mine) / len(mine), abs=1e-6)
    assert metrics["per_class"]["airplane"] is None and metrics["per_class"]["cat"] is not None
    assert metrics["tta"]["modes"] == "flip" and metrics["tta"]["views"] == 2
    confusion = list(csv.reader(open(tiny_run / "eval" / "data-new_photos" / "confusion.csv")))[1:]
    diagonal = sum(int(row[i + 1]) for i, row in enumerate(confusion))
    # The matrix holds the predictions the report reads, the TTA ones: it held the plain ones beside a per_class.csv
    # of the TTA ones (the automobile row's recall 0.16 in one, 0.19 in the other).
    assert diagonal / 30 == pytest.approx(metrics["tta"]["top1"], abs=1e-6)
    report = json.loads((tiny_run / "eval" / "data-new_photos" / "report.json").read_text())
    names = [row[0] for row in confusion]
    for row in report["per_class"]:
        counts = [int(v) for v in confusion[names.index(row["class"])][1:]]
        assert row["support"] == sum(counts)
        if row["support"]:
            assert row["recall"] == pytest.approx(counts[names.index(row["class"])] / sum(counts), abs=1e-6)
    occurring = [r for r in report["per_class"] if r["support"] or r["predicted"]]
    assert len(occurring) < 10 and report["macro_f1"] == pytest.approx(
        sum(r["f1"] for r in occurring) / len(occurring), abs=1e-6
    )

    page = classlab.report(tiny_run, tmp_path / "page.html", labelled=folder).read_text()
    assert f"Error analysis: {folder}, 30 images, best.ckpt" in page  # classlab report RUN --data FOLDER

    manifest = tmp_path / "new.csv"  # the same photos as a manifest with the run's columns
    manifest.write_text("path,label\n" + "".join(f"new_photos/cat/{p.name},cat\n" for p in (folder / "cat").iterdir()))
    assert classlab.evaluate(tiny_run, data=manifest)["images"] == 12

    _sample_folder(tmp_path / "odd", {"cat": 2})
    (tmp_path / "odd" / "unicorn").mkdir()
    (tmp_path / "odd" / "unicorn" / "u.png").write_bytes((folder / "cat" / "0000.jpg").read_bytes())
    _sample_folder(tmp_path / "flat" / "x", {"cat": 2})
    for image in (tmp_path / "flat" / "x" / "cat").iterdir():
        image.rename(tmp_path / "flat" / image.name)
    (tmp_path / "flat" / "x" / "cat").rmdir()
    (tmp_path / "flat" / "x").rmdir()
    (tmp_path / "cols.csv").write_text("filename,class\nnew_photos/cat/0000.jpg,cat\n")
    (tmp_path / "labels.csv").write_text("path,label\nodd/unicorn/u.png,unicorn\n")  # a label, not a folder name
    for args, expected in {
        ("--data", str(tmp_path / "cols.csv")): "no column 'path', 'label'; its columns are filename, class: name them",
        ("--data", str(tmp_path / "odd")): "class(es) the run was not trained on: unicorn; the run's classes are",
        ("--data", str(tmp_path / "labels.csv")): "unicorn; the run's classes are airplane, automobile, bird, cat, "
        "deer, dog, frog, horse ... (the manifest's label column holds the class: correct those labels or leave "
        "their rows out)",
        ("--data", str(tmp_path / "flat")): "has images but no class folders: eval needs <folder>/<class>/ images",
        ("--data", str(tmp_path / "nowhere")): "does not exist; give labelled images: FOLDER/<class>/*.jpg or a CSV",
        ("data.root=x",): "data.root=x: eval takes no key=value overrides (it reads the run's own config.yaml)",
    }.items():
        code, _, err = cli(capsys, "eval", str(tiny_run), *args)
        assert code != 0 and len(error_lines(err)) == 1 and expected in err, (args, err)


def test_eval_data_lists_and_leaves_out_stray_files_and_empty_class_folders(
    tiny_run: Path, tmp_path: Path, capsys
) -> None:
    """Before: a notes.txt in a class folder stopped eval --data with 'set data.skip_bad_images=true', an override
    eval refuses ('eval takes no key=value overrides'), so no command could score the folder as it was."""
    from tests.faults import cli, error_lines

    folder = _sample_folder(tmp_path / "new_photos", {"cat": 3, "ship": 2})
    (folder / "cat" / "notes.txt").write_text("taken in March")
    (folder / "truck").mkdir()
    code, out, err = cli(capsys, "eval", str(tiny_run), "--data", str(folder))
    assert code == 0 and not error_lines(err), err
    assert out.startswith(f"{tiny_run} [{folder}, best.ckpt, 5 images]")
    assert f"{folder / 'cat' / 'notes.txt'}: not an image file" in err and f"{folder / 'truck'}: class folder" in err
    # Before: under "2 file(s) could not be read and are left out:", though neither is a file that failed to read.
    assert f"2 file(s) or folder(s) in {folder} are not images to score and are left out:" in err
    assert "could not be read" not in err


def test_eval_data_heads_rows_left_out_apart_from_unreadable_files(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """Before: a manifest's row with an empty label and one listed twice were listed with a broken image under
    "3 file(s) could not be read and are left out:"; neither row names a file that could not be read."""
    from tests.faults import cli, error_lines

    folder = _sample_folder(tmp_path / "new_photos", {"cat": 4})
    (folder / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    names = sorted(p.name for p in (folder / "cat").iterdir() if p.name != "broken.jpg")
    rows = [f"new_photos/cat/{n},cat" for n in names[:3]] + ["new_photos/cat/broken.jpg,cat"]
    rows += [f"new_photos/cat/{names[0]},cat", f"new_photos/cat/{names[3]},"]  # listed twice; an empty label
    (tmp_path / "new.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, out, err = cli(capsys, "eval", str(tiny_run), "--data", str(tmp_path / "new.csv"))
    assert code == 0 and not error_lines(err), err
    lines = err.splitlines()
    at = lines.index("2 row(s) of new.csv are left out:")
    assert lines[at + 1] == f"  {tmp_path / 'new.csv'}, line 6: path 'new_photos/cat/{names[0]}' is listed twice " + (
        "(first on line 2)"
    )
    assert lines[at + 2] == f"  {tmp_path / 'new.csv'}, line 7: empty label"
    assert lines[at + 3] == "1 file(s) could not be read and are left out:"
    assert lines[at + 4].startswith(f"  {folder / 'cat' / 'broken.jpg'}: ")


def test_two_labelled_folders_of_one_name_keep_their_own_figures(tiny_run: Path, tmp_path: Path) -> None:
    """Before: eval --data a/test and then b/test both wrote eval/data-test/, the second over the first."""
    first = _sample_folder(tmp_path / "a" / "test", {"cat": 4})
    second = _sample_folder(tmp_path / "b" / "test", {"ship": 3, "truck": 3})
    one = classlab.evaluate(tiny_run, data=first)
    two = classlab.evaluate(tiny_run, data=second)
    assert Path(one["out"]).name == "data-test" and Path(two["out"]).name.startswith("data-test-")
    assert json.loads((Path(one["out"]) / "metrics.json").read_text())["images"] == 4
    assert json.loads((Path(two["out"]) / "metrics.json").read_text())["images"] == 6
    assert classlab.evaluate(tiny_run, data=second)["out"] == two["out"]  # the same data: the same folder again
    assert classlab.evaluate(tiny_run, data=first)["out"] == one["out"]


def test_eval_data_on_the_runs_own_images_says_so(tmp_path: Path, capsys) -> None:
    """Before: eval --data given the folder the run trained on printed its (training) accuracy as the figure of
    images the run never saw."""
    from tests.conftest import class_folder
    from tests.faults import cli

    colors = {"red": (220, 40, 40), "blue": (40, 60, 220)}
    root = class_folder(tmp_path / "photos", colors, 8, size=16)
    args = [f"data.root={root}", "epochs=1", "model.layers=[4,p]", "exp_name=own", "trainer.progress=false"]
    code, _, err = cli(capsys, "train", *args, f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}")
    assert code == 0, err
    run = tmp_path / "runs" / "own"
    code, _, err = cli(capsys, "eval", str(run), "--data", str(root))
    assert code == 0 and err == (
        f"note: 16 of these 16 images are among the run's own data ({root}: its training and validation images): "
        "these figures are not of images it never saw\n"
    ), err
    new = class_folder(tmp_path / "new", colors, 3, size=16)
    code, _, err = cli(capsys, "eval", str(run), "--data", str(new))
    assert code == 0 and err == "", err


def test_a_checkpoint_from_another_run_is_named_as_such(tiny_run: Path, tmp_path: Path) -> None:
    """Before: 'does not fit the run's model: Error(s) in loading state_dict for ClassifierModel:' and nothing more."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "export"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = ckpt["state_dict"]
    head = next(k for k, v in reversed(state.items()) if v.ndim == 2 and v.shape[0] == 10)
    rotation = dict(ckpt, state_dict={**state, head: state[head][:4], head.replace("weight", "bias"): torch.zeros(4)})
    rotation["classlab"] = dict(ckpt["classlab"], task="rotation", classes=["0", "90", "180", "270"])
    torch.save(rotation, run / "checkpoints" / "epoch7.ckpt")
    result = run_cli("eval", str(run), "--checkpoint", "epoch7")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        f"error: {run / 'checkpoints' / 'epoch7.ckpt'} comes from another run: a rotation run with 4 classes "
        f"(0, 90, 180, 270), while '{run}' is a classify run with 10; give the run folder that wrote it"
    )
    # The same classes but another network: the first tensor that differs, with both shapes.
    first = next(k for k, v in state.items() if v.ndim == 4)
    other = dict(ckpt, state_dict={**state, first: state[first][:1]})
    torch.save(other, run / "checkpoints" / "epoch8.ckpt")
    result = run_cli("predict", str(run / "checkpoints" / "epoch8.ckpt"), str(tmp_path))
    shape = list(state[first].shape)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"does not fit the model of '{run}' ({first.removeprefix('model.')} is [1, {shape[1]}" in result.stderr
    assert f"in it, {shape} in the model)" in result.stderr
    assert not (tmp_path / "predictions.csv").exists()


def test_top5_is_not_shown_for_five_classes_or_fewer(tmp_path: Path, capsys) -> None:
    """With 3 classes every label is among the top 5: eval printed 'top-5 1.0000', a figure that says nothing;
    with --tta it printed no macro-F1 at all."""
    from tests.conftest import class_folder
    from tests.faults import cli

    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    data = class_folder(tmp_path / "colors", colors, 12)
    overrides = [
        "data.dataset=folder", f"data.root={data}", "data.val_fraction=0.34", "epochs=1", "model.layers=[8,p]",
        "trainer.threads=1", "trainer.progress=false", f"run.root={tmp_path / 'runs'}", "exp_name=rgb",
    ]  # fmt: skip
    run = classlab.train(None, overrides, quiet=True)
    code, out, err = cli(capsys, "eval", str(run.path), "--split", "val")
    assert code == 0, err
    metrics = json.loads((run.path / "eval" / "val" / "metrics.json").read_text())
    assert f"\ntop-1 {metrics['top1']:.4f}   macro-F1 {metrics['f1']:.4f}\n" in out and "top-5" not in out
    code, out, err = cli(capsys, "eval", str(run.path), "--split", "val", "--tta", "flip")
    assert code == 0, err
    tta = json.loads((run.path / "eval" / "val" / "metrics.json").read_text())["tta"]
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["top-1", "macro-F1"] and "top-5" not in out
    assert f"\nmacro-F1  {metrics['f1']:.4f}  {tta['f1']:.4f}  (" in out


REPORT_FILES = ("report.json", "per_class.csv", "reliability.png", "confident_errors.png", "errors")


def test_eval_without_report_keeps_the_folder_of_one_evaluation(tiny_run: Path, capsys) -> None:
    """Before: eval without --report left an earlier --report's files of other predictions (another checkpoint, TTA,
    calibration) beside its new metrics.json. They are removed with one note when their inputs differ, kept when
    they are of the same predictions."""
    from tests.faults import cli

    out = tiny_run / "eval" / "val"
    classlab.evaluate(tiny_run, split="val", report=True)
    assert all((out / name).exists() for name in REPORT_FILES)
    code, _, err = cli(capsys, "eval", str(tiny_run), "--split", "val")  # the same predictions: kept
    assert code == 0 and "removed" not in err and all((out / name).exists() for name in REPORT_FILES), err
    code, _, err = cli(capsys, "eval", str(tiny_run), "--split", "val", "--tta", "flip")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: removed the earlier --report files in {out} (report.json,")
    assert "plain predictions, not TTA flip" in notes[0] and "eval --report writes them again" in notes[0]
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert json.loads((out / "metrics.json").read_text())["tta"]["modes"] == "flip"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))

    classlab.evaluate(tiny_run, split="val", checkpoint="last", report=True)  # another checkpoint's report
    metrics = classlab.evaluate(tiny_run, split="val")
    assert any("removed the earlier --report files" in n and "last.ckpt" in n for n in metrics["notes"])
    assert not (out / "report.json").exists() and (out / "confusion.csv").is_file()
