"""A new user's competition and research habits: submission templates as organisers write them, k-fold folders
given to predict while a fold is unfinished, ensembles of runs whose classes are in another order, weights files
that are not what they seem, sweeps continued with another grid, and compare's k-fold mean over some folds."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import class_folder, tiny_config
from test_competition import COLORS, cli
from test_competition import _args as competition_args
from test_sweep import _finished_point

from classlab.config import Config
from classlab.errors import ClassLabError, ConfigError
from classlab.run import RunFolder
from classlab.sweep import _record, plan


def _args(tmp: Path, root: Path, *extra: str) -> list[str]:
    """test_competition's settings at one epoch (a later override wins)."""
    return competition_args(tmp, root, "epochs=1", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-fold run of three colours, and one run of the same classes listed in another order."""
    from classlab.train import train

    tmp = tmp_path_factory.mktemp("newuser")
    root = class_folder(tmp / "colors", COLORS, 12, size=16)
    train(None, _args(tmp, root, "exp_name=cv", "data.folds=3"), quiet=True)
    train(None, _args(tmp, root, "exp_name=other_order", "data.classes=[red,blue,green]"), quiet=True)
    return tmp, root


# ---------------------------------------------------------------------------------------------
# Submission templates
# ---------------------------------------------------------------------------------------------


def test_template_rows_of_another_length_are_one_line_not_a_traceback(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """Before: a row with an unquoted comma in a value gave 'unexpected ValueError', a row too short to reach its id
    'unexpected AttributeError'. A row that stops before its empty label column is filled as before."""
    tmp, root = trained
    run, out = str(tmp / "runs" / "cv"), tmp / "sub.csv"
    longer = tmp / "longer.csv"
    longer.write_text("ImageID,ans\nred1,\nblue2,,Smith, J.\n")
    code, err = cli(
        capsys, "predict", run, str(root), "--ensemble", "mean", "--template", str(longer), "--out", str(out)
    )
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {longer}: row 2 after the header has 4 field(s) where the header has 2;"), err
    assert "goes in double quotes" in err and not out.exists()
    shorter = tmp / "shorter.csv"
    shorter.write_text("ans,ImageID\n,red1\n5\n")
    code, err = cli(capsys, "predict", run, str(root), "--ensemble", "mean", "--template", str(shorter))
    assert code == 1 and "row 2 after the header has 1 field(s) where the header has 2" in err, err
    fine = tmp / "fine.csv"
    fine.write_text("ImageID,ans,note\nred1\nblue2,,x\n")
    code, err = cli(capsys, "predict", run, str(root), "--ensemble", "mean", "--template", str(fine), "--out", str(out))
    assert code == 0, err
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["ImageID"] for r in rows] == ["red1", "blue2"] and all(r["ans"] for r in rows)
    assert [r["note"] for r in rows] == ["", "x"]


def test_a_label_column_that_is_the_id_column_is_refused(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """Before: --label-column ImageID wrote the predicted classes over the ids, exit 0."""
    tmp, root = trained
    template, out = tmp / "ids.csv", tmp / "ids_sub.csv"
    template.write_text("ImageID\nred1\n")
    run = str(tmp / "runs" / "other_order")
    code, err = cli(capsys, "predict", run, str(root), "--template", str(template), "--label-column", "ImageID",
                    "--out", str(out))  # fmt: skip
    assert code == 1 and err.startswith("error: --label-column ImageID is also the --id-column"), err
    assert not out.exists()


def test_write_submission_called_from_python_names_its_keywords(trained: tuple[Path, Path]) -> None:
    """Before: classlab.predict.write_submission(...) told a Python caller to add --allow-missing and to give
    --label-column 'ans', flags of a command it never typed."""
    import classlab

    tmp, root = trained
    run, out = tmp / "runs" / "other_order", tmp / "py_sub.csv"
    template = tmp / "py_template.csv"
    template.write_text("ImageID,Ans\nred0.png,\nnot_there.png,\n")
    with pytest.raises(ClassLabError) as near:
        classlab.predict.write_submission(run, [root], template, out)
    assert str(near.value).endswith("no column 'ans' (label_column); did you mean label_column='Ans'?")
    with pytest.raises(ClassLabError) as missing:
        classlab.predict.write_submission(run, [root], template, out, label_column="Ans")
    assert "nothing written (add allow_missing=True to leave their label empty)" in str(missing.value)
    with pytest.raises(ClassLabError, match=r"^label_format 'number': choose 'index' or 'name'$"):
        classlab.predict.write_submission(run, [root], template, out, label_format="number")
    assert not out.exists()
    done = classlab.predict.write_submission(run, [root], template, out, label_column="Ans", allow_missing=True)
    assert done.rows == 2 and done.missing == ["not_there.png: no such image among the given paths"]


# ---------------------------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------------------------


def test_an_unfinished_k_fold_folder_is_not_an_ensemble(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """Before: a k-fold run stopped in fold 2 of 3 stood for fold0 and the half-trained fold1, and predict wrote its
    CSV (or submission) from them without a word."""
    tmp, root = trained
    partial = tmp / "runs" / "partial"
    shutil.copytree(tmp / "runs" / "cv", partial)
    shutil.rmtree(partial / "fold2")
    RunFolder(partial / "fold1").update_summary(status="interrupted")
    out = tmp / "partial.csv"
    code, err = cli(capsys, "predict", str(partial), str(root), "--ensemble", "mean", "--out", str(out))
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(
        f"error: k-fold folder '{partial}' has 1 of 3 folds finished (fold1 interrupted, fold2 not started); "
        "finish it by running the same `classlab train ... --folds 3` again (it continues)"
    ), err
    assert f"or give its finished fold run ({partial / 'fold0'}) alone" in err
    assert not out.exists()


def test_runs_with_their_classes_in_another_order_are_averaged_by_name(trained: tuple[Path, Path]) -> None:
    """Before: refused as 'different class maps ... an ensemble averages runs trained on the same classes', though
    they were; a permutation of the same classes is averaged class by class."""
    from classlab.predict import load_runs, predict

    tmp, root = trained
    a, b = tmp / "runs" / "cv" / "fold0", tmp / "runs" / "other_order"
    images = [root / "red" / "red1.png", root / "green" / "green2.png", root / "blue" / "blue3.png"]
    ensemble = load_runs([a, b])
    assert ensemble.classes == load_runs(a).classes
    batch = torch.stack([torch.full((3, 16, 16), v, dtype=torch.uint8) for v in (0, 128, 255)])
    pa, pb = load_runs(a).probabilities(batch), load_runs(b).probabilities(batch)
    by_name = pb[:, [load_runs(b).classes.index(c) for c in ensemble.classes]]
    assert torch.allclose(ensemble.probabilities(batch), (pa + by_name) / 2, atol=1e-5)
    rows = predict([a, b], images, top=3)
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


class _Trap:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch TRAP_RAN",))


def test_weights_files_that_are_not_state_dicts_are_named_for_what_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a file torch.save never wrote read 'holds pickled objects that need code to load', and a damaged
    .safetensors file 'unexpected SafetensorError'."""
    from classlab.models.surgery import read_weights

    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ClassLabError, match="not a file torch.save wrote.*cut short or of another format"):
        read_weights(junk)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(ClassLabError, match="cannot read weights file .*broken.safetensors.*of another format"):
        read_weights(broken)
    trap = tmp_path / "trap.pth"
    torch.save({"x": _Trap()}, trap)
    with pytest.raises(ClassLabError, match="holds pickled objects that need code to load, which classlab never"):
        read_weights(trap)
    assert not (tmp_path / "TRAP_RAN").exists()


# ---------------------------------------------------------------------------------------------
# Sweeps continued with another grid
# ---------------------------------------------------------------------------------------------


def test_new_grid_values_must_train_what_the_runs_there_trained(tmp_path: Path) -> None:
    """Before: a second call with another grid value and epochs=2 trained the new point for 2 epochs beside the
    1-epoch runs, in one table, without a word."""
    base = [*tiny_config(tmp_path), "exp_name=sw", "epochs=1"]
    root, points = plan(None, base, ["seed=0,1"])
    for point in points:
        _finished_point(root, point)
    with pytest.raises(ConfigError, match="its run seed=0 has epochs=1, this call 2"):
        plan(None, [*base, "epochs=2"], ["seed=2"])
    # An override forgotten: the new point would train with the key's default (a key left at its default is
    # compared for a new point, which trains with it, not only for the runs already there).
    decayed = [*tiny_config(tmp_path), "exp_name=sw2", "optim.weight_decay=0.001"]
    root2, points2 = plan(None, decayed, ["seed=0"])
    _finished_point(root2, points2[0])
    with pytest.raises(ConfigError, match=f"has optim.weight_decay=0.001, this call {Config().optim.weight_decay}"):
        plan(None, decayed[:-1], ["seed=1"])
    # A new value, or a new axis (the earlier one's runs are found by their values), with the same settings: fine.
    _, more = plan(None, base, ["seed=1,2"])
    assert [p.status for p in more] == ["finished", "new"]
    _, axis = plan(None, base, ["seed=0,1", "optim.lr=0.05,0.1"])
    assert [p.status for p in axis] == ["finished", "new", "finished", "new"]


def test_raising_max_params_after_a_refused_point_continues_the_sweep(tmp_path: Path) -> None:
    """Before: the failed point's line said 'raise model.max_params' and 'run the same command again'; doing both was
    refused as 'was run with other settings' by the points that had finished."""
    base = [*tiny_config(tmp_path), "exp_name=sw", "model.max_params=300000"]
    root, points = plan(None, base, ["seed=0,1"])
    _finished_point(root, points[0])
    _, again = plan(None, [*base, "model.max_params=3000000"], ["seed=0,1"])
    assert [p.status for p in again] == ["finished", "new"]


def test_sweep_json_keeps_every_call_and_run(tmp_path: Path) -> None:
    """Before: the second call's sweep.json listed its own points alone; the call that made the others was gone."""
    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, first = plan(None, base, ["seed=0,1"])
    for point in first:
        _finished_point(root, point)
    _record(root, None, base, ["seed=0,1"], first)
    _, second = plan(None, base, ["seed=2"])
    _record(root, None, base, ["seed=2"], second)
    _record(root, None, base, ["seed=2"], second)  # the end of the same call
    saved = json.loads((root / "sweep.json").read_text())
    assert saved["grid"] == ["seed=2"] and [c["grid"] for c in saved["calls"]] == [["seed=0,1"], ["seed=2"]]
    assert [r["name"] for r in saved["runs"]] == ["seed=0", "seed=1", "seed=2"]


# ---------------------------------------------------------------------------------------------
# compare over some of a k-fold folder's folds
# ---------------------------------------------------------------------------------------------


def test_a_k_fold_mean_row_says_how_many_of_the_k_folds_it_is_over(trained: tuple[Path, Path]) -> None:
    """Before: `classlab report runs/cv/fold0` had a row 'cv mean ± std (1 folds)' at ± 0.0000, and two folds of
    three read '(2 folds)', as the k-fold result."""
    from classlab.compare import compare

    tmp, _ = trained
    group = tmp / "runs" / "cv"
    one = compare([str(group / "fold0")], metrics=["best_val_acc"], plots=False, out=tmp / "c1")
    assert [r["run"] for r in one.rows] == ["fold0"]
    two = compare([str(group / "fold0"), str(group / "fold1")], metrics=["best_val_acc"], plots=False, out=tmp / "c2")
    assert two.rows[-1]["run"] == "cv mean ± std (2 of 3 folds)"
    every = compare([str(group)], metrics=["best_val_acc"], plots=False, out=tmp / "c3")
    assert every.rows[-2]["run"] == "cv mean ± std (3 folds)"  # then the out-of-fold row
    assert every.rows[-1]["run"].startswith("cv out-of-fold (all ")
