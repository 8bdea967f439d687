"""What a new user does that the rest of the suite did not: each test a defect a user hit, fixed.

Every case checks what the user sees (one line naming the problem and the fix, the exit code) and that
nothing in the run folder changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import classlab
from classlab.errors import ClassLabError
from tests.conftest import class_folder
from tests.faults import cli, error_lines, small_run


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run; tests work on copies of it."""
    tmp = tmp_path_factory.mktemp("finished")
    return classlab.train(None, small_run(tmp, exp_name="base"), quiet=True).path


def test_resume_with_fewer_epochs_than_done_is_refused_and_touches_nothing(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume epochs=1` on a run that trained 2: it said '2 of 1 epochs done', suggested `epochs=1` "to train it
    longer" and rewrote config.yaml to 1 epoch beside a metrics.csv of 2."""
    run = tmp_path / "runs" / "base"
    shutil.copytree(finished_run, run)
    before = _files(run)
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base", epochs=1), "--resume", "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    assert line == (
        f"error: --resume: epochs=1 is fewer than the 2 epochs '{run}' has already trained; give epochs=2 or more "
        "(epochs=3 trains it longer), or train a new run (another exp_name, or --force to move this one aside)"
    )
    assert _files(run) == before


def test_resume_of_a_finished_run_suggests_more_epochs_than_it_has(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "base"
    shutil.copytree(finished_run, run)
    code, out, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base"), "--resume")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if "nothing to train" in line]
    assert line == f"{run} already finished its 2 epochs: nothing to train; to train it longer: --resume epochs=3"
    # and that is all: it reloaded the data, reprinted its first lines and 'finished in 0s' under it
    assert out.splitlines()[-1] == line and "classlab classify" not in out and "finished in" not in out, out
    assert json.loads((run / "summary.json").read_text()) == json.loads((finished_run / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# A manifest in its own folder whose paths climb out of it: lists/train.csv with ../images/red/r0.png
# ---------------------------------------------------------------------------------------------


def _lists_beside_images(tmp_path: Path) -> Path:
    """tmp/images/<class>/*.png and tmp/lists/train.csv listing them as ../images/<class>/<file>."""
    images = class_folder(tmp_path / "images", {"red": (200, 40, 40), "blue": (40, 40, 200)}, n=6)
    rows = [f"../images/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(images.rglob("*.png"))]
    manifest = tmp_path / "lists" / "train.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    return manifest


def test_manifest_paths_above_its_folder_name_the_settings_that_read_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal said only 'paths must stay inside it'; the settings that read such a manifest exist."""
    manifest = _lists_beside_images(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "model.layers=[8,p]", "epochs=1"]
    code, _, err = cli(capsys, "train", "data.csv_file=lists/train.csv", *args, "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    fix = "data.root=. data.csv_file=lists/train.csv data.image_dir=lists"
    assert line == (
        f"error: {manifest}, line 2: path '../images/blue/blue0.png' is outside data.root {manifest.parent}; paths "
        f"must stay inside it: to read them from {tmp_path}, set {fix}"
    )
    assert not (tmp_path / "runs").exists()
    code, _, err = cli(capsys, "train", *fix.split(), *args, "--quiet")  # the line's own fix trains
    assert code == 0, err


def test_eval_data_reads_a_manifest_whose_paths_climb_out_of_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`eval --data lists/test.csv` has no data.root to set: paths relative to the manifest's own folder are read."""
    manifest = _lists_beside_images(tmp_path)
    args = [f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "model.layers=[8,p]", "epochs=1"]
    code, _, err = cli(capsys, "train", f"data.root={tmp_path / 'images'}", "exp_name=r", *args, "--quiet")
    assert code == 0, err
    code, out, err = cli(capsys, "eval", str(tmp_path / "runs" / "r"), "--data", str(manifest))
    assert code == 0, err
    assert f"[{manifest}, best.ckpt, 12 images]" in out
    assert error_lines(err) == []


# ---------------------------------------------------------------------------------------------
# Override values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("key", ["optim.lr", "optim.weight_decay", "aug.mixup_alpha", "sched.warmup_epochs"])
def test_a_number_that_is_not_finite_is_named_as_such(key: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """optim.lr=nan said 'Input should be less than or equal to 100' (nan is not above 100), and
    optim.weight_decay=inf, aug.mixup_alpha=inf, sched.warmup_epochs=inf were taken (a NaN loss or no training)."""
    code, out, err = cli(capsys, "train", "--print-config", f"{key}={value}")
    assert code == 2
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"error: config key '{key}' = ")
    assert line.endswith(": Input should be a finite number")


@pytest.mark.parametrize(
    ("override", "fix"),
    [("data=photos", "data.root=photos"), ("optim=0.1", "optim.lr=0.1"), ("optim=adamw", "optim.name=adamw")],
)
def test_a_section_given_one_value_suggests_a_key_that_takes_it(
    override: str, fix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`data=photos` suggested data.dataset=photos and `optim=0.1` optim.name=0.1: each a second error."""
    code, _, err = cli(capsys, "train", "--print-config", override)
    assert code == 2
    (line,) = err.splitlines()
    section = override.split("=")[0]
    assert line.startswith(f"error: '{section}' is a section, not a value: set one of its keys, e.g. {fix} (")
    code, out, err = cli(capsys, "train", "--print-config", fix)  # the suggestion is a value the key takes
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# predict given a pattern: a shell that does not expand it (Windows' cmd and PowerShell), or Python
# ---------------------------------------------------------------------------------------------


def test_predict_expands_a_pattern_as_the_shell_would(tmp_path: Path) -> None:
    """classlab.predict(run, ["photos/*.jpg"]) and a Windows shell pass the pattern itself: it said
    "'photos/*.jpg' does not exist"."""
    from classlab.predict import expand_paths

    root = class_folder(tmp_path / "photos", {"cat": (200, 60, 40), "dog": (40, 60, 200)}, n=3, suffix=".jpg")
    (root / "cat" / "notes.txt").write_text("not an image\n")
    (root / "cat" / "._cat0.jpg").write_bytes(b"\0\5\x16\7")  # macOS's twin: passed over, as in a folder
    assert expand_paths([root / "cat" / "*.jpg"]) == [root / "cat" / f"cat{i}.jpg" for i in range(3)]
    assert expand_paths([str(root / "*" / "*1.jpg")]) == [root / "cat" / "cat1.jpg", root / "dog" / "dog1.jpg"]
    assert expand_paths([root / "*"]) == expand_paths([root])  # a pattern that names folders walks them
    assert expand_paths([f"{root}/**"]) == expand_paths([root])  # the folders and the files in them: each image once
    (root / "dog" / "up").symlink_to("..")  # a link back up: ** follows it, as a folder walk does not
    assert expand_paths([f"{root}/**/*.jpg"]) == expand_paths([root])


def test_predict_pattern_matching_nothing_is_one_line(
    tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.csv"
    code, _, err = cli(capsys, "predict", str(tiny_trained), str(tmp_path / "*.jpg"), "--out", str(out))
    assert code == 1
    assert err.splitlines() == [f"error: '{tmp_path / '*.jpg'}' matches no image file; give image files or folders"]
    assert not out.exists()


def test_a_file_named_with_a_leading_dash_is_told_how_to_give_it(
    tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`classlab predict RUN -photo.jpg` (a camera app's or a script's name) said only 'unrecognized arguments'."""
    class_folder(tmp_path, {"x": (200, 60, 40)}, n=1, suffix=".jpg").joinpath("x", "x0.jpg").rename(
        tmp_path / "-photo.jpg"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli(capsys, "predict", str(tiny_trained), "-photo.jpg", "--out", "p.csv")
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert line.endswith(
        "unrecognized arguments: -photo.jpg ('-photo.jpg' is a file whose name starts with '-': write ./-photo.jpg, "
        "or put -- before the file names)"
    )
    assert not (tmp_path / "p.csv").exists()
    code, _, err = cli(capsys, "predict", str(tiny_trained), "./-photo.jpg", "--out", "p.csv")  # the line's fix
    assert code == 0, err


def test_a_header_written_with_spaces_after_the_commas_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`path, label` (typed by hand) said "did you mean data.label_column= label?": a fix no shell passes as one
    argument and YAML reads as 'label'. Its rows' values were already read without the spaces."""
    images = class_folder(tmp_path / "img", {"red": (200, 40, 40), "blue": (40, 40, 200)}, n=4)
    rows = [f"{p.relative_to(images).as_posix()}, {p.parent.name}" for p in sorted(images.rglob("*.png"))]
    (images / "train.csv").write_text("path, label\n" + "\n".join(rows) + "\n")
    args = [f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", "model.layers=[8,p]", "epochs=1"]
    code, _, err = cli(capsys, "train", f"data.csv_file={images / 'train.csv'}", "exp_name=m", *args, "--quiet")
    assert code == 0, err
    run = tmp_path / "runs" / "m"
    assert json.loads((run / "classes.json").read_text()) == {"0": "blue", "1": "red"}
    code, out, err = cli(capsys, "eval", str(run), "--data", str(images / "train.csv"))
    assert code == 0, err
    assert "8 images]" in out


def test_predict_out_naming_an_image_is_refused_and_the_image_kept(
    tiny_trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`classlab predict RUN --out a.jpg b.jpg` (--out typed before the images) overwrote the photo a.jpg with the
    predictions CSV."""
    folder = class_folder(tmp_path, {"x": (200, 60, 40)}, n=2, suffix=".jpg") / "x"
    before = _files(folder)
    code, _, err = cli(capsys, "predict", str(tiny_trained), "--out", str(folder / "x0.jpg"), str(folder / "x1.jpg"))
    assert code == 2
    assert err.splitlines() == [
        f"error: --out '{folder / 'x0.jpg'}' names an image; --out is the CSV the predictions go to "
        "(e.g. --out predictions.csv), the images come after the run"
    ]
    assert _files(folder) == before
    with pytest.raises(ClassLabError, match=r"^out='.*x0.JPG' names an image; out is the CSV"):
        classlab.predict(tiny_trained, [folder], out=folder / "x0.JPG")
    assert _files(folder) == before
