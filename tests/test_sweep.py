"""Sweeps: grid parsing and naming, skip finished runs, resume unfinished ones, parallel and Ray runners."""

from __future__ import annotations

import contextvars
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from conftest import make_image, run_cli, tiny_config

from classlab.compare import compare
from classlab.errors import ClassLabError, ConfigError
from classlab.run import RunFolder
from classlab.sweep import (
    Point,
    expand,
    name_value,
    overridden_by_grid,
    parse_axis,
    plan,
    split_top_level,
    sweep,
)
from classlab.train import coerce_config


def test_grid_values_are_yaml_and_brackets_do_not_split() -> None:
    assert split_top_level("10,20,[16,p,32],{a: 1, b: 2},'x,y'") == ["10", "20", "[16,p,32]", "{a: 1, b: 2}", "'x,y'"]
    axis = parse_axis("model.layers=[16,p],[32,p,64]")
    assert axis.values == (([16, "p"],), ([32, "p", 64],))
    assert parse_axis("optim.lr=0.1,0.01,null").values == ((0.1,), (0.01,), (None,))
    linked = parse_axis("data.images_per_class,epochs=[10,800],[500,16]")
    assert linked.keys == ("data.images_per_class", "epochs") and linked.values == ((10, 800), (500, 16))
    points = expand([linked, parse_axis("seed=0,1")])
    assert len(points) == 4 and points[0] == {"data.images_per_class": 10, "epochs": 800, "seed": 0}


@pytest.mark.parametrize(
    "text",
    ["no_equals", "a,b=[1],[2,3]", "lr=0.1,0.1", "layers=[16,p"],
)
def test_bad_grids_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_axis(text)
    assert "\n" not in str(err.value)


def test_run_names_are_readable_and_safe(tmp_path: Path) -> None:
    assert name_value("runs/study/rotation:epoch4") == "rotation@epoch4"
    assert name_value(None) == "none" and name_value([16, "p", 32]) == "16-p-32" and name_value(0.05) == "0.05"
    assert name_value("a b/c?") == "c-"
    _, points = plan(
        None,
        tiny_config(tmp_path),
        ["data.images_per_class=10,20", "model.init_from=null,runs/x/rot:epoch5", "optim.lr=0.1"],
    )
    assert [p.name for p in points][:2] == [
        "images_per_class=10,init_from=none,lr=0.1",
        "images_per_class=10,init_from=rot@epoch5,lr=0.1",
    ]
    assert all(p.path.parent == (tmp_path / "runs" / "sample_cnn").resolve() for p in points)


def test_a_bad_grid_point_stops_the_sweep_before_anything_runs(tmp_path: Path) -> None:
    result = run_cli("sweep", *tiny_config(tmp_path), "--grid", "optim.lr=0.1,-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "grid point lr=-1" in result.stderr and "optim.lr" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_one_value_spelt_two_ways_in_a_grid_is_refused(tmp_path: Path) -> None:
    """Before: --grid optim.lr=1e-2,0.01 trained the same run twice, in two folders."""
    from classlab.sweep import plan

    with pytest.raises(ConfigError) as info:
        plan(None, tiny_config(tmp_path), ["optim.lr=1e-2,0.01"])
    assert str(info.value) == (
        "--grid: points lr=1e-2 and lr=0.01 are the same run once their values are read (optim.lr=0.01); "
        "list each value once"
    )
    assert not (tmp_path / "runs").exists()


def test_sweep_skips_finished_runs_and_resumes_unfinished_ones(tmp_path: Path) -> None:
    overrides = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": 20, "model.layers": "[8,p,16,p]"})
    grid = ["optim.lr=0.05", "model.init_from=null,/nonexistent/run"]
    said: list[str] = []
    points = sweep(None, grid, [*overrides, "exp_name=sw"], quiet=True, say=said.append)
    status = {p.name: p.status for p in points}
    assert status == {"lr=0.05,init_from=none": "finished", "lr=0.05,init_from=run": "failed"}
    failed = next(p for p in points if p.status == "failed")
    assert "not found" in failed.error
    root = tmp_path / "runs" / "sw"
    manifest = json.loads((root / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == [p.status for p in points]

    # Second call: the finished runs are skipped (their files untouched), the failed ones tried again.
    finished = root / "lr=0.05,init_from=none"
    stamp = (finished / "summary.json").stat().st_mtime_ns
    said.clear()
    sweep(None, grid[:1] + ["model.init_from=null"], [*overrides, "exp_name=sw"], quiet=True, say=said.append)
    assert said[0].endswith("1 runs, 1 finished (skipped), 0 to resume, 0 to start")
    assert (finished / "summary.json").stat().st_mtime_ns == stamp

    # An interrupted run (as Ctrl-C or a killed session leaves it) is resumed in its own folder.
    summary = json.loads((finished / "summary.json").read_text())
    (finished / "summary.json").write_text(json.dumps(dict(summary, status="interrupted")))
    said.clear()
    points = sweep(None, grid[:1] + ["model.init_from=null"], [*overrides, "exp_name=sw"], quiet=True, say=said.append)
    assert "1 to resume" in said[0] and all(p.status == "finished" for p in points)
    assert json.loads((finished / "summary.json").read_text())["status"] == "finished"
    assert not list(root.glob("*.old-*"))  # resumed, not moved aside

    # compare reads the same folders: its table holds each run's summary values.
    table = compare([str(root)], metrics=["test_acc", "best_val_acc"], out=tmp_path / "cmp", plots=False)
    finished_rows = [r for r in table.rows if r["status"] == "finished"]
    assert len(finished_rows) == 1
    for row in finished_rows:
        summary = json.loads((root / row["run"] / "summary.json").read_text())
        assert row["test_acc"] == summary["test_acc"] and row["best_val_acc"] == summary["best_val_acc"]


@pytest.mark.slow
def test_parallel_jobs_run_as_subprocesses(tmp_path: Path) -> None:
    overrides = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": 10, "model.layers": "[8,p]"})
    result = run_cli("sweep", *overrides, "exp_name=par", "--grid", "seed=0,1", "--jobs", "2", "--quiet", "-v")
    assert result.returncode == 0, result.stderr[-2000:]
    root = tmp_path / "runs" / "par"
    for name in ("seed=0", "seed=1"):
        assert json.loads((root / name / "summary.json").read_text())["status"] == "finished"
        log = (root / "sweep-logs" / f"{name}.log").read_text()
        assert "`Trainer.fit` stopped" in log  # -v reaches the points' own processes: Lightning's lines in the log
    cfg = (root / "seed=0" / "config.yaml").read_text()
    assert "threads: 1" in cfg  # two jobs on two cores: one thread each


def test_ray_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ClassLabError, match="--ray needs Ray"):
        sweep(None, ["seed=0"], tiny_config(tmp_path), ray_address="local", say=lambda _: None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_sweep_on_a_local_ray_instance(tmp_path: Path) -> None:
    import ray

    overrides = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": 10, "model.layers": "[8,p]"})
    try:
        points = sweep(None, ["seed=0,1"], [*overrides, "exp_name=ray"], ray_address="local", say=lambda _: None)
    finally:
        ray.shutdown()
    assert [p.status for p in points] == ["finished", "finished"]
    assert json.loads((tmp_path / "runs" / "ray" / "seed=1" / "summary.json").read_text())["status"] == "finished"


def test_public_api_names_stay_functions_after_every_module_is_imported() -> None:
    """``classlab.sweep`` once resolved to the submodule after anything imported it; it must be the function."""
    import importlib
    import pkgutil

    import classlab

    for module in pkgutil.walk_packages(classlab.__path__, "classlab."):
        importlib.import_module(module.name)
    for name in classlab.__all__:
        if name != "__version__":
            assert callable(getattr(classlab, name)), f"classlab.{name} is {getattr(classlab, name)!r}"


def test_an_override_the_grid_replaces_is_said_and_a_swept_folder_name_refused(tmp_path: Path) -> None:
    # Before: the grid's value silently replaced epochs=5 at every point, and the user read a table of
    # runs that were not trained as they had typed.
    base = tiny_config(tmp_path)  # optim.lr=0.05 among them
    assert overridden_by_grid(["epochs=1,2", "seed=0"], [*base, "epochs=5", "seed=0"]) == [
        "note: epochs=3 does not apply: --grid epochs sets epochs for every run",
        "note: epochs=5 does not apply: --grid epochs sets epochs for every run",
    ]
    assert overridden_by_grid(["optim.lr=0.05"], base) == []  # the same value: nothing replaced
    assert overridden_by_grid(["data.images_per_class,optim.lr=[10,0.1]"], ["optim={name: adamw, lr: 0.01}"]) == [
        "note: optim={name: adamw, lr: 0.01} does not apply: --grid data.images_per_class,optim.lr sets optim.lr "
        "for every run"
    ]
    result = run_cli("sweep", *base, "--grid", "exp_name=a,b")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --grid exp_name: the sweep names each run's folder itself")
    assert not (tmp_path / "runs").exists()


def _finished_point(root: Path, point: Point) -> None:
    """A grid point's folder as a finished run leaves it (the sweep reads only config.yaml and summary.json)."""
    cfg = coerce_config(None, point.overrides)
    folder = RunFolder(root / point.name)
    folder.path.mkdir(parents=True)
    folder.write_config(cfg.to_dict())
    folder.update_summary(status="finished", test_acc=0.5)


def test_a_second_call_with_other_settings_is_refused(tmp_path: Path) -> None:
    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, points = plan(None, base, ["seed=0,1"])
    _finished_point(root, points[0])
    # The same sweep again, on more cores: the finished point is skipped.
    _, again = plan(None, [*base, "trainer.threads=2"], ["seed=0,1"])
    assert [p.status for p in again] == ["finished", "new"]
    # Before: another learning rate skipped the finished run and reported it as a result of the new setting.
    result = run_cli("sweep", *base, "optim.lr=0.5", "--grid", "seed=0,1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"sweep '{root}' was run with other settings: its run seed=0 has optim.lr=0.05, this call 0.5" in (
        result.stderr
    )
    assert "or another exp_name for a new sweep" in result.stderr
    assert not (root / "seed=1").exists()


def test_the_same_grid_in_another_order_or_spelling_finds_its_runs(tmp_path: Path) -> None:
    """Before: --grid seed=0,1 --grid optim.lr=... after --grid optim.lr=... --grid seed=0,1 (or 1e-2 for 0.01)
    named every point anew (seed=0,lr=0.01 beside lr=0.01,seed=0) and trained the whole grid again."""
    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, points = plan(None, base, ["optim.lr=0.01,0.1", "seed=0,1"])
    for point in points[:3]:
        _finished_point(root, point)
    _, again = plan(None, base, ["seed=0,1", "optim.lr=1e-2,0.1,0.5"])
    assert [(p.name, p.status) for p in again] == [
        ("lr=0.01,seed=0", "finished"),
        ("lr=0.1,seed=0", "finished"),
        ("seed=0,lr=0.5", "new"),
        ("lr=0.01,seed=1", "finished"),
        ("seed=1,lr=0.1", "new"),  # lr=0.1,seed=1 was never run: a new point takes the name this call gives
        ("seed=1,lr=0.5", "new"),
    ]
    assert all(f"exp_name={p.name}" in p.overrides for p in again)
    # Found by its values, a run still has to have the settings of this call.
    with pytest.raises(ConfigError, match=r"its run lr=0.01,seed=0 has optim.weight_decay=0.0005, this call 0.01"):
        plan(None, [*base, "optim.weight_decay=0.01"], ["seed=0", "optim.lr=0.01"])


def test_a_k_fold_point_is_skipped_once_finished_and_compared_fold_by_fold(tmp_path: Path) -> None:
    for name, color in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(6):
            make_image(tmp_path / "data" / name / f"{i}.png", color, size=16)
    overrides = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": "null", "model.layers": "[8,p]"})
    overrides += [f"data.root={tmp_path / 'data'}", "data.folds=2", "exp_name=kf"]
    points = sweep(None, ["seed=0,1"], overrides, quiet=True, say=lambda _: None)
    # Before: the k-fold folder (folds.json, no config.yaml) read as broken: "failed" here, then moved
    # aside and trained again on every later call.
    assert [p.status for p in points] == ["finished", "finished"]
    root = tmp_path / "runs" / "kf"
    said: list[str] = []
    sweep(None, ["seed=0,1"], [*overrides, "seed=7"], quiet=True, say=said.append)
    assert said[0].endswith("2 runs, 2 finished (skipped), 0 to resume, 0 to start")
    assert said[1] == "note: seed=7 does not apply: --grid seed sets seed for every run"
    assert not list(root.glob("*.old-*"))
    # Before: "'runs/kf' is not a run folder and holds none"; now a row a fold and a mean a k-fold point.
    table = compare([str(root)], metrics=["best_val_acc"], plots=False, out=tmp_path / "cmp")
    names = [r["run"] for r in table.rows]
    assert names[:5] + names[6:7] == [
        "seed=0/fold0",
        "seed=0/fold1",
        "seed=1/fold0",
        "seed=1/fold1",
        "seed=0 mean ± std (2 folds)",
        "seed=1 mean ± std (2 folds)",
    ]
    assert len(names) == 8  # each k-fold point's out-of-fold row below its mean
    for row, point in ((5, "seed=0"), (7, "seed=1")):
        assert names[row].startswith(f"{point} out-of-fold (all 12 training images): acc ")


def test_a_failed_point_is_not_called_resumable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A point that failed on its settings fails again on the same command; the last line said only 'run the same
    command again to resume them'."""
    from tests.faults import cli

    overrides = tiny_config(tmp_path, epochs=1, **{"data.images_per_class": 20, "model.layers": "[8,p]"})
    code, out, err = cli(capsys, "sweep", *overrides, "exp_name=f", "--grid", "model.init_from=/nonexistent/run", "-q")
    assert code == 1
    assert "0/1 runs finished in" in out
    assert err.splitlines()[-1] == (
        "1 failed: fix what its 'failed' line says (or leave those values out of --grid), then run the same command "
        "again; finished runs are kept"
    )


def test_a_point_that_force_moved_aside_is_not_taken_for_the_point(tmp_path: Path) -> None:
    """NAME.old-<time> holds the grid values of NAME: with NAME gone, a later call given the flags in another
    order took the old run for its point (skipped it as finished, or resumed into it)."""
    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, points = plan(None, base, ["optim.lr=0.01", "seed=0"])
    _finished_point(root, points[0])
    (root / points[0].name).rename(root / f"{points[0].name}.old-20261205-093000")
    _, again = plan(None, base, ["seed=0", "optim.lr=0.01"])
    assert [(p.name, p.status) for p in again] == [("seed=0,lr=0.01", "new")]


def test_a_parallel_points_error_is_in_the_words_of_whoever_started_the_sweep(tmp_path: Path) -> None:
    """A point of classlab.sweep(..., jobs=2) runs as `classlab train` in a process of its own, and its 'failed'
    line read '--resume: ... --force' to a Python caller, where a point run in the sweep's own process said
    'resume=True: ... force=True'. The command line's sweep keeps the flags."""
    import classlab

    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, points = plan(None, base, ["seed=0"])
    folder = RunFolder(root / points[0].name)
    folder.path.mkdir(parents=True)
    folder.write_config(coerce_config(None, points[0].overrides).to_dict())
    folder.update_summary(status="interrupted")
    folder.checkpoint_path("last").parent.mkdir()
    folder.checkpoint_path("last").write_bytes(b"not a checkpoint")  # resumed, it fails: no checkpoint loads
    said: list[str] = []
    (point,) = classlab.sweep(None, ["seed=0"], base, jobs=2, say=said.append)
    assert point.status == "failed" and point.error.startswith(f"resume=True: no checkpoint of '{folder.path}' loads")
    assert point.error.endswith("; start the run again with force=True (the old folder is moved aside)"), said
    (point,) = sweep(None, ["seed=0"], base, jobs=2, say=said.append)
    assert point.status == "failed" and point.error.startswith(f"--resume: no checkpoint of '{folder.path}' loads")
    assert point.error.endswith("; start the run again with --force (the old folder is moved aside)"), said
    said.clear()

    class FakeRef:  # hashable, as Ray's ObjectRef is
        def __init__(self, result: dict) -> None:
            self.result = result

    class FakeRay(types.ModuleType):
        """Runs each task at once, as a Ray worker does: in a context of its own (a process, there)."""

        def init(self, **_: object) -> None:
            pass

        def remote(self, **_: object) -> object:
            return lambda function: types.SimpleNamespace(
                remote=lambda *args: FakeRef(contextvars.Context().run(function, *args))
            )

        def wait(self, pending: list, num_returns: int) -> tuple[list, list]:
            return pending[:num_returns], pending[num_returns:]

        def get(self, ref: FakeRef) -> dict:
            return ref.result

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "ray", FakeRay("ray"))
        (point,) = classlab.sweep(None, ["seed=0"], base, ray_address="local", say=said.append)
        assert point.status == "failed" and "resume=True: no checkpoint of" in point.error, said
        (point,) = sweep(None, ["seed=0"], base, ray_address="local", say=said.append)
        assert point.status == "failed" and "--resume: no checkpoint of" in point.error, said
