"""What classlab promises when things go wrong (README section of the same name): one test a promise.

Each test makes one thing go wrong as it does for users and asserts the line they see, the
exit code, and what the run folder holds afterwards. The faults come from tests/faults.py.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import classlab
from classlab.config import load_config
from classlab.data.loaders import decode
from classlab.data.pipeline import load_data
from classlab.data.sources import open_dataset
from classlab.errors import ClassLabError
from classlab.run import LOCK, LOCK_OWNER_ENV, RunFolder, RunLock
from tests.conftest import class_folder, make_image
from tests.faults import EACCES, ENOSPC, cli, error_lines, fail_writes, nan_loss_at, small_run, write_png_bomb

PIL_LIMIT = 89_478_485


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _epochs_in(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["classlab"]["epochs_done"])


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-epoch run; tests work on copies of it."""
    tmp = tmp_path_factory.mktemp("two_epochs")
    run = classlab.train(None, small_run(tmp, exp_name="base"), quiet=True)
    return run.path


def _copy(run: Path, tmp_path: Path) -> Path:
    """The run under tmp_path/runs/base, so that small_run(tmp_path, exp_name='base') --resume continues it."""
    target = tmp_path / "runs" / "base"
    shutil.copytree(run, target)
    return target


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------
# 1. Cut or corrupt checkpoints
# ---------------------------------------------------------------------------------------------


def test_run_keeps_the_previous_epochs_checkpoint(two_epochs: Path) -> None:
    ckpts = two_epochs / "checkpoints"
    assert _epochs_in(ckpts / "last.ckpt") == 2
    assert _epochs_in(ckpts / "previous.ckpt") == 1
    assert not (two_epochs / LOCK).exists()


def test_cut_last_checkpoint_resumes_from_previous(
    two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(two_epochs, tmp_path)
    _cut(run / "checkpoints" / "last.ckpt")
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base"), "--resume", "--quiet")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:") and "last.ckpt" in line]
    assert len(warning) == 1, err
    assert "cannot be read safely" in warning[0]
    assert "resuming from previous.ckpt (epoch 1) instead (last.ckpt kept as last.ckpt.damaged)" in warning[0]
    assert (run / "checkpoints" / "last.ckpt.damaged").is_file()
    assert _epochs_in(run / "checkpoints" / "last.ckpt") == 2
    # Epoch 2 ran again from epoch 1's state: the same rows as the run that was never damaged.
    assert _rows(run / "metrics.csv") == _rows(two_epochs / "metrics.csv")
    assert _summary(run)["status"] == "finished"


def test_no_checkpoint_loads_stops_and_touches_nothing(
    two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(two_epochs, tmp_path)
    for name in ("last.ckpt", "previous.ckpt"):
        _cut(run / "checkpoints" / name)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base"), "--resume", "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith(f"error: --resume: no checkpoint of '{run}' loads (")
    assert "last.ckpt" in line and "previous.ckpt" in line and "--force" in line
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # best.ckpt, metrics.csv, summary.json: byte for byte; no lock left behind


# ---------------------------------------------------------------------------------------------
# 2. One writer per run folder
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, pid: int, host: str | None = None, owner: str = "other") -> None:
    record = {"pid": pid, "host": host or socket.gethostname(), "owner": owner, "command": "train", "since": "then"}
    (folder / LOCK).write_text(json.dumps(record))


def test_second_train_on_a_folder_in_use_stops_at_once(
    two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(two_epochs, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live process of this host
    try:
        _write_lock(run, holder.pid)
        before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        for flag in ("--resume", "--force", "--quiet"):
            started = time.perf_counter()
            code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base"), flag)
            assert code == 1
            assert error_lines(err) == [
                f"error: run folder '{run}' is in use by `classlab train` (pid {holder.pid} on "
                f"{socket.gethostname()}, since then); wait for it to finish, or train under another exp_name"
            ]
            assert time.perf_counter() - started < 5  # at once: before any data is read
        assert not list(run.parent.glob("base.old-*"))  # --force moved nothing aside
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(
    two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(two_epochs, tmp_path)
    pid = _dead_pid()
    _write_lock(run, pid)
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="base"), "--resume", "--quiet")
    assert code == 0, err
    assert f"took over the lock of pid {pid} on {socket.gethostname()}, which is no longer running" in err
    assert not (run / LOCK).exists()
    assert _summary(run)["status"] == "finished"


def test_lock_from_another_host_is_respected_and_says_how_to_clear_it(tmp_path: Path) -> None:
    _write_lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(ClassLabError, match=rf"pid 1 on elsewhere.*if that process is gone, delete {tmp_path}"):
        RunLock(tmp_path).acquire()


def test_children_of_the_owner_join_and_a_stranger_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOCK_OWNER_ENV, raising=False)
    parent = RunLock(tmp_path, "sweep").acquire()
    assert parent.held and os.environ[LOCK_OWNER_ENV] == parent.token
    child = RunLock(tmp_path).acquire()  # a sweep job or DDP worker: same owner through the environment
    assert not child.held
    child.release()
    assert (tmp_path / LOCK).exists()  # the child's release leaves the owner's lock alone
    monkeypatch.setenv(LOCK_OWNER_ENV, "a stranger")
    with pytest.raises(ClassLabError, match=r"in use by `classlab sweep`"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv(LOCK_OWNER_ENV, parent.token)
    parent.release()
    assert not (tmp_path / LOCK).exists()


def test_second_sweep_on_the_same_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs" / "sw"
    root.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_lock(root, holder.pid)
        code, _, err = cli(capsys, "sweep", *small_run(tmp_path, exp_name="sw"), "--grid", "seed=0,1")
        assert code == 1
        assert error_lines(err) == [
            f"error: run folder '{root}' is in use by `classlab train` (pid {holder.pid} on {socket.gethostname()}, "
            "since then); wait for it to finish, or train under another exp_name"
        ]
        assert sorted(p.name for p in root.iterdir()) == [LOCK]  # no run started
    finally:
        holder.kill()
        holder.wait()


def _classlab(*args: str) -> subprocess.Popen[str]:
    """``classlab ARGS`` in a terminal of its own: none of this process's run environment (lock owner, run folder)."""
    env = {k: v for k, v in os.environ.items() if k not in (LOCK_OWNER_ENV, "CLASSLAB_RUN_DIR")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "classlab", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _holds_lock_in(root: Path, pid: int) -> Path | None:
    for lock in root.glob(f"*/{LOCK}"):
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                return lock.parent
        except (OSError, json.JSONDecodeError):
            pass
    return None


def _while_loading(monkeypatch: pytest.MonkeyPatch, then) -> None:
    """Run ``then()`` while this process's run loads its data (after it, before the run writes anything)."""
    train_module = importlib.import_module("classlab.train")
    real = train_module.load_data

    def load_data(*args, **kwargs):
        data = real(*args, **kwargs)
        then()
        return data

    monkeypatch.setattr(train_module, "load_data", load_data)


def test_two_runs_started_at_once_without_exp_name_take_two_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `classlab train` in two terminals a few seconds apart: the second starts while the first loads its data.
    args = small_run(tmp_path, epochs=1)
    root = tmp_path / "runs"
    other: dict[str, object] = {}

    def second_terminal() -> None:
        proc = other["proc"] = _classlab("train", *args, "--quiet")
        deadline = time.monotonic() + 300
        while _holds_lock_in(root, proc.pid) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        other["folder"] = _holds_lock_in(root, proc.pid)

    _while_loading(monkeypatch, second_terminal)
    code, out, err = cli(capsys, "train", *args)
    proc = other["proc"]
    _, proc_err = proc.communicate(timeout=300)
    assert code == 0, err
    assert proc.returncode == 0, proc_err
    assert out.splitlines()[-1] == f"run folder: {root / 'sample_cnn'}"
    assert other["folder"] == root / "sample_cnn-2"  # taken at its start, while this run still loaded its data
    assert sorted(p.name for p in root.iterdir()) == ["sample_cnn", "sample_cnn-2"]
    assert _summary(root / "sample_cnn")["status"] == _summary(root / "sample_cnn-2")["status"] == "finished"


def test_two_runs_started_at_once_under_one_exp_name_the_second_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = small_run(tmp_path, exp_name="mine", epochs=1)
    run = tmp_path / "runs" / "mine"
    other: dict[str, object] = {}

    def second_terminal() -> None:
        proc = _classlab("train", *args, "--quiet")
        other["out"] = proc.communicate(timeout=300)
        other["code"] = proc.returncode

    _while_loading(monkeypatch, second_terminal)
    code, _, err = cli(capsys, "train", *args, "--quiet")
    assert code == 0, err
    assert other["code"] == 1
    lines = error_lines(other["out"][1])
    assert len(lines) == 1 and lines[0].startswith(f"error: run folder '{run}' is in use by `classlab train` (pid ")
    assert lines[0].endswith("; wait for it to finish, or train under another exp_name")
    assert _summary(run)["status"] == "finished"
    assert sorted(p.name for p in run.parent.iterdir()) == ["mine"]


def _kfold_args(tmp_path: Path, **extra: object) -> list[str]:
    """A 2-fold run on 24 tiny images of three colours (k-fold covers every image: no data.images_per_class)."""
    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    root = class_folder(tmp_path / "colors", colors, 8, size=8)
    data = {"data.images_per_class": "null", "data.dataset": "folder", "data.root": root}
    return [*small_run(tmp_path, epochs=1, **data, **extra), "--folds", "2"]


def _locks_of(root: Path, pid: int) -> list[Path]:
    """The folders under ``root``, at any depth, whose run.lock process ``pid`` holds, the outermost first."""
    held = []
    for lock in root.rglob(LOCK):
        try:
            if json.loads(lock.read_text()).get("pid") == pid:
                held.append(lock.parent)
        except (OSError, json.JSONDecodeError):
            pass
    return sorted(held, key=lambda folder: len(folder.parts))


def test_two_kfold_runs_started_at_once_without_exp_name_take_two_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a k-fold run picked its folder's name and made the folder later, taking no lock on it; a k-fold run
    started in between picked the same name, and of the two the second stopped at fold 0 with the 'in use' line."""
    args = _kfold_args(tmp_path)
    root, name = tmp_path / "runs", "folder_cnn_2fold"
    other: dict[str, object] = {}
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *rest, **kwargs) -> None:
        if self.name == name and "proc" not in other:
            # The second terminal's k-fold run starts in the very moment this one has picked the name: it is first.
            proc = other["proc"] = _classlab("train", *args, "--quiet")
            deadline = time.monotonic() + 300
            while not _locks_of(root, proc.pid) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            other["held"] = _locks_of(root, proc.pid)
        real_mkdir(self, *rest, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, out, err = cli(capsys, "train", *args)
    monkeypatch.undo()
    proc = other["proc"]
    _, proc_err = proc.communicate(timeout=300)
    assert code == 0, err
    assert proc.returncode == 0, proc_err
    assert other["held"][0] == root / name  # the other run's first lock: its k-fold folder, before its data load
    assert out.splitlines()[-1] == f"k-fold folder: {root / f'{name}-2'} (oof.csv: each image's out-of-fold prediction)"
    assert sorted(p.name for p in root.iterdir()) == [name, f"{name}-2"]
    for top in root.iterdir():
        assert [_summary(top / f)["status"] for f in ("", "fold0", "fold1")] == ["finished"] * 3


def test_a_second_kfold_run_under_one_exp_name_stops_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the second run went on into the k-fold folder the first was training, wrote its folds.json and
    summary over the first's, and stopped only at fold 0, with an 'in use' line naming the fold."""
    args = _kfold_args(tmp_path, exp_name="cv")
    top = tmp_path / "runs" / "cv"
    other: dict[str, object] = {}

    def second_terminal() -> None:
        if "code" in other:  # the first's later folds, and its out-of-fold predictions
            return
        files = {p.name: p.read_bytes() for p in top.iterdir() if p.is_file()}
        proc = _classlab("train", *args, "--quiet")
        other["out"] = proc.communicate(timeout=300)
        other["code"] = proc.returncode
        other["untouched"] = files == {p.name: p.read_bytes() for p in top.iterdir() if p.is_file()}
        other["since"] = json.loads((top / LOCK).read_text())["since"] if (top / LOCK).is_file() else None

    _while_loading(monkeypatch, second_terminal)
    code, _, err = cli(capsys, "train", *args, "--quiet")
    assert code == 0, err
    assert other["code"] == 1 and other["untouched"]
    assert error_lines(other["out"][1]) == [
        f"error: run folder '{top}' is in use by `classlab train` (pid {os.getpid()} on {socket.gethostname()}, "
        f"since {other['since']}); wait for it to finish, or train under another exp_name"
    ]
    assert [_summary(top / f)["status"] for f in ("", "fold0", "fold1")] == ["finished"] * 3
    assert sorted(p.name for p in top.parent.iterdir()) == ["cv"] and not list(top.rglob(LOCK))


def test_a_run_killed_before_it_began_leaves_a_folder_the_next_run_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    killed = root / "killed"
    real = RunFolder.write_config

    def kill_now(self: RunFolder, cfg_dict) -> None:
        # What kill -9 leaves at the moment config.yaml is about to be written: the folder as it is, its lock's
        # process gone, and the temporary file of the write under way.
        if self.path.name == "first" and not killed.exists():
            shutil.copytree(self.path, killed)
            _write_lock(killed, _dead_pid())
            (killed / ".config.yaml.x1y2.tmp").write_text("exp_name: fir")
        real(self, cfg_dict)

    monkeypatch.setattr(RunFolder, "write_config", kill_now)
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="first", epochs=1), "--quiet")
    assert code == 0, err
    assert {"classes.json", "split.json"} <= {p.name for p in killed.iterdir()}  # config.yaml goes last
    monkeypatch.undo()

    args = small_run(tmp_path, exp_name="killed", epochs=1)
    code, _, err = cli(capsys, "train", *args, "--resume")
    assert code == 1
    assert error_lines(err) == [
        f"error: --resume: the run in '{killed}' was stopped before it began (no config.yaml yet, nothing trained); "
        "start it again without --resume: the folder is reused"
    ]
    code, _, err = cli(capsys, "train", *args, "--quiet")
    assert code == 0, err
    assert "took over the lock of pid" in err
    assert _summary(killed)["status"] == "finished" and not list(killed.glob(".*.tmp"))
    assert sorted(p.name for p in root.iterdir()) == ["first", "killed"]  # no killed-2, nothing moved aside

    # Without an exp_name: the first name is taken again, not left behind for sample_cnn-2.
    (root / "sample_cnn").mkdir()
    _write_lock(root / "sample_cnn", _dead_pid())
    code, out, err = cli(capsys, "train", *small_run(tmp_path, epochs=1))
    assert code == 0, err
    assert out.splitlines()[-1] == f"run folder: {root / 'sample_cnn'}"
    assert not (root / "sample_cnn-2").exists()


def test_a_folder_that_never_began_or_holds_no_run_names_the_way_out(
    two_epochs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run of an earlier version killed between config.yaml and split.json: config.yaml alone.
    run = tmp_path / "runs" / "base"
    run.mkdir(parents=True)
    shutil.copy(two_epochs / "config.yaml", run)
    args = small_run(tmp_path, exp_name="base")
    code, _, err = cli(capsys, "train", *args)
    assert code == 1
    assert error_lines(err) == [
        f"error: run folder '{run}' already exists but its run never began (no split.json); use --force to move it "
        "aside, or choose another exp_name"
    ]
    code, _, err = cli(capsys, "train", *args, "--resume")
    assert code == 1
    assert error_lines(err) == [
        f"error: --resume: the run in '{run}' never began (it has config.yaml but no split.json; nothing trained); "
        "start it again with --force (the folder is moved aside)"
    ]
    other = tmp_path / "runs" / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("try a wider net\n")
    args = small_run(tmp_path, exp_name="notes")
    code, _, err = cli(capsys, "train", *args)
    assert error_lines(err) == [
        f"error: '{other}' already exists and holds no run (no config.yaml); use --force to move it aside, or "
        "choose another exp_name"
    ]
    code, _, err = cli(capsys, "train", *args, "--resume")
    assert error_lines(err) == [
        f"error: --resume: '{other}' is not a run folder (no config.yaml); start a new run without --resume: under "
        "another exp_name, or with --force to move this folder aside"
    ]
    assert sorted(p.name for p in other.iterdir()) == ["todo.txt"]
    # A staged run's own folder has config.yaml and summary.json but no split.json (its stages have theirs): it
    # has finished, not 'never began'.
    staged = tmp_path / "runs" / "staged"
    staged.mkdir()
    shutil.copy(two_epochs / "config.yaml", staged)
    (staged / "summary.json").write_text('{"status": "finished", "stages": []}')
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="staged"))
    assert error_lines(err) == [
        f"error: run folder '{staged}' already exists and has finished; use --resume with more epochs to train it "
        "on, --force to move it aside, or choose another exp_name"
    ]
    # An empty folder made by hand is taken by a run; a run refused for its data leaves it, empty, where it was.
    mine = tmp_path / "runs" / "mine"
    mine.mkdir()
    for name in ("a", "b"):
        (tmp_path / "empty_classes" / name).mkdir(parents=True)
    data = ["data.dataset=folder", f"data.root={tmp_path / 'empty_classes'}"]
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="mine"), *data)
    assert code != 0 and "class folder with no images" in err
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_closed_stdout_stops_the_run_interrupted_and_resumable(two_epochs: Path, tmp_path: Path, capsys) -> None:
    # `classlab train | head -1`: the reader leaves after the first line.
    args = small_run(tmp_path, exp_name="base")
    proc = _classlab("train", *args)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=300)
    run = tmp_path / "runs" / "base"
    assert first.endswith(f"-> {run}\n")
    assert proc.returncode == 141, err  # 128 + SIGPIPE, as a Unix tool the pipe's reader left
    assert err.strip().splitlines()[-1] == (
        "interrupted: standard output was closed; stopped after batch 1 of epoch 2; last.ckpt holds that point; "
        "continue with --resume"
    )
    summary = _summary(run)
    assert summary["status"] == "interrupted" and summary.get("error") is None
    assert not (run / LOCK).exists()
    code, _, err = cli(capsys, "train", *args, "--resume", "--quiet")
    assert code == 0, err
    assert _rows(run / "metrics.csv") == _rows(two_epochs / "metrics.csv")


# ---------------------------------------------------------------------------------------------
# 3. Non-finite loss
# ---------------------------------------------------------------------------------------------


def test_nan_loss_stops_at_that_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # 20 training images a class, batches of 32 (ragged last dropped): 6 steps an epoch; step 8 is in epoch 2.
    # The learning rate then is the cosine schedule's (0.05 at step 1).
    nan_loss_at(monkeypatch, {7})
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="nan", epochs=3), "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    assert line == (
        "error: the loss became NaN at epoch 2, step 8 (batch 2 of 6) with learning rate 0.03355: training stopped "
        "and checkpoints/last.ckpt keeps epoch 1, the last good one; lower optim.lr, set trainer.clip_grad, "
        "or set trainer.on_nonfinite=skip_batch to skip such batches"
    )
    run = tmp_path / "runs" / "nan"
    summary = _summary(run)
    assert summary["status"] == "diverged" and summary["error"] == line.removeprefix("error: ")
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["classlab"]["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1"]


def test_a_run_folder_removed_while_training_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before: a clean-up that removed the run folder mid-run ended in 'unexpected FileNotFoundError' naming a
    TensorBoard event file deep inside it."""
    from classlab.engine.task import ClassifyTask

    original = ClassifyTask.training_step
    run = tmp_path / "runs" / "gone"

    def training_step(self: ClassifyTask, batch: object, batch_idx: int) -> object:
        if self.trainer.global_step == 7 and run.is_dir():  # in epoch 2, after epoch 1's files were written
            shutil.rmtree(run)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ClassifyTask, "training_step", training_step)
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="gone", epochs=3), "--quiet")
    assert code == 1
    assert error_lines(err) == [
        f"error: the run folder {run} was removed or moved while the run trained, so nothing more can be written to "
        "it; start the run again (or put run.root where nothing cleans up)"
    ]


def test_nan_loss_names_the_epoch_an_interval_checkpoint_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # last.ckpt written on an interval (trainer.checkpoint_every_s): here only after epoch 1; the loss
    # goes NaN at step 14, in epoch 3, so the file holds one epoch fewer than metrics.csv.
    from classlab.engine.callbacks import RunRecorder

    monkeypatch.setattr(RunRecorder, "_last_due", lambda self, trainer: trainer.current_epoch == 0)
    nan_loss_at(monkeypatch, {13})
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="nan", epochs=4), "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    assert "at epoch 3, step 14 (batch 2 of 6)" in line
    assert "checkpoints/last.ckpt keeps epoch 1 (written every trainer.checkpoint_every_s), a good one" in line
    run = tmp_path / "runs" / "nan"
    assert _epochs_in(run / "checkpoints" / "last.ckpt") == 1 and len(_rows(run / "metrics.csv")) == 2
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="nan", epochs=4), "--resume", "--quiet")
    assert code == 0, err
    assert [r["epoch"] for r in _rows(run / "metrics.csv")] == ["1", "2", "3", "4"]


def test_skip_batch_skips_counts_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    nan_loss_at(monkeypatch, {2, 6})
    args = small_run(tmp_path, exp_name="skip", **{"trainer.on_nonfinite": "skip_batch"})
    code, out, err = cli(capsys, "train", *args)
    assert code == 0, err
    assert "epoch 1: skipped 1 of 6 batches with a non-finite loss (trainer.on_nonfinite=skip_batch)" in out
    assert "epoch 2: skipped 1 of 6 batches" in out
    run = tmp_path / "runs" / "skip"
    summary = _summary(run)
    assert summary["status"] == "finished" and summary["nonfinite_batches_skipped"] == 2
    rows = _rows(run / "metrics.csv")
    assert all(np.isfinite(float(r["train/loss"])) for r in rows)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_skip_batch_count_survives_a_stop_in_the_middle_of_the_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A batch skipped before a SIGTERM in epoch 1 is still counted in epoch 1's line after --resume."""
    import signal

    from classlab.engine.callbacks import GracefulStop
    from classlab.engine.task import ClassifyTask

    nan_loss_at(monkeypatch, {2, 6})
    skipping = ClassifyTask.training_step

    def training_step(self: ClassifyTask, batch: object, batch_idx: int) -> object:
        if self.trainer.global_step == 4:  # epoch 1, batch 5 of 6: as if a scheduler sent SIGTERM here
            stop = next(c for c in self.trainer.callbacks if isinstance(c, GracefulStop))
            if stop.requested is None:
                stop._ask(signal.SIGTERM, None)
        return skipping(self, batch, batch_idx)

    monkeypatch.setattr(ClassifyTask, "training_step", training_step)
    args = small_run(tmp_path, exp_name="skip", **{"trainer.on_nonfinite": "skip_batch"})
    code, out, err = cli(capsys, "train", *args)
    assert code == 143, err
    assert "stopped after batch 5 of epoch 1" in err and "skipped" not in out
    code, out, err = cli(capsys, "train", *args, "--resume")
    assert code == 0, err
    assert "epoch 1: skipped 1 of 6 batches" in out and "epoch 2: skipped 1 of 6 batches" in out
    assert _summary(tmp_path / "runs" / "skip")["nonfinite_batches_skipped"] == 2


def test_a_real_divergence_stops_diverged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The user's case: plain SGD far too fast (lr 100, momentum 0.99) on an MLP without BatchNorm."""
    args = small_run(
        tmp_path,
        exp_name="div",
        epochs=5,
        **{"model.name": "mlp", "model.layers": "[64]", "optim.lr": 100, "optim.momentum": 0.99},
        **{"sched.name": "constant"},
    )
    code, _, err = cli(capsys, "train", *args, "--quiet")
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith("error: the loss became ") and "with learning rate 100: training stopped" in line
    run = tmp_path / "runs" / "div"
    assert _summary(run)["status"] == "diverged"
    done = _epochs_in(run / "checkpoints" / "last.ckpt")
    assert f"keeps epoch {done}, the last good one" in line and len(_rows(run / "metrics.csv")) == done


# ---------------------------------------------------------------------------------------------
# 4. Decompression bombs and huge images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two PNGs of a few hundred kB: 400 megapixels (over twice PIL's limit, PIL refuses to open it)
    and 144 megapixels RGB (between one and two limits, PIL only warns: 432 MB if decoded)."""
    folder = tmp_path_factory.mktemp("bombs")
    return {
        "huge": write_png_bomb(folder / "huge.png", 20_000, 20_000, channels=1),
        "big": write_png_bomb(folder / "big.png", 12_000, 12_000, channels=3),
    }


def _colours_with(root: Path, extra: dict[str, Path]) -> Path:
    for cls, colour in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
        for i in range(12):
            make_image(root / cls / f"{i}.png", colour)
    for name, source in extra.items():
        shutil.copy(source, root / "red" / name)
    return root


def test_decompression_bombs_are_bad_files_in_training(
    bombs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _colours_with(tmp_path / "colours", {"huge.png": bombs["huge"], "big.png": bombs["big"]})
    base = [
        "data.dataset=folder",
        f"data.root={root}",
        f"run.root={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.layers=[8,p]",
        "epochs=1",
        "trainer.progress=false",
    ]
    code, _, err = cli(capsys, "train", *base, "exp_name=strict")
    assert code == 1, err[-2000:]
    assert err.splitlines()[0] == (
        "error: 2 problem(s) in the data; fix them, or set data.skip_bad_images=true to skip these files:"
    )
    listed = err.splitlines()[1:3]
    assert (
        f"  {root / 'red' / 'big.png'}: declares 12000x12000 = 144,000,000 pixels, more than "
        "data.max_image_pixels (89,478,485); not decoded (decompression bomb guard)"
    ) in listed
    assert any(
        line.startswith(f"  {root / 'red' / 'huge.png'}: declares 400,000,000 pixels, more than data.max_image_pixels")
        for line in listed
    ), listed
    assert len(err.splitlines()) == 3 and "exceeds limit" not in err  # PIL's own warning is not repeated
    assert not (tmp_path / "runs" / "strict").exists()
    code, _, err = cli(capsys, "train", *base, "exp_name=skip", "data.skip_bad_images=true", "--quiet")
    assert code == 0, err[-2000:]
    skipped = (tmp_path / "runs" / "skip" / "skipped_images.txt").read_text().splitlines()
    assert sorted(Path(line.split(":")[0]).name for line in skipped) == ["big.png", "huge.png"]
    assert _summary(tmp_path / "runs" / "skip")["skipped_images"] == 2


def test_max_image_pixels_is_the_limit(tmp_path: Path) -> None:
    root = _colours_with(tmp_path / "colours", {})
    make_image(root / "blue" / "wide.png", (40, 60, 220), size=30)  # 900 pixels
    cfg = load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={root}",
            "data.max_image_pixels=800",
            "data.skip_bad_images=true",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    data = load_data(cfg)
    assert data.bad == [
        f"{root / 'blue' / 'wide.png'}: declares 30x30 = 900 pixels, more than data.max_image_pixels (800); "
        "not decoded (decompression bomb guard)"
    ]
    assert len(data.train) + len(data.val) == 24


def test_decompression_bomb_is_an_error_row_in_predict(
    two_epochs: Path, bombs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fine = make_image(tmp_path / "fine.png", (200, 30, 30), size=32)
    out = tmp_path / "pred.csv"
    code, stdout, err = cli(capsys, "predict", str(two_epochs), str(bombs["big"]), str(fine), "--out", str(out))
    assert code == 0, err
    assert "wrote 2 predictions" in stdout
    assert "1 file(s) could not be read (see the error column):" in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out, newline=""))}
    assert rows["big.png"]["error"].startswith("declares 12000x12000 = 144,000,000 pixels")
    assert rows["big.png"]["class"] == "" and rows["fine.png"]["error"] == "" and rows["fine.png"]["class"]


MEASURE = """
import resource, sys
from pathlib import Path
from classlab.config import load_config
from classlab.data.loaders import decode
from classlab.data.preprocess import BadImage, image_to_tensor, open_image
from classlab.data.sources import open_dataset

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

root, bomb, cache = sys.argv[1:4]
cfg = load_config(None, ["data.dataset=folder", f"data.root={root}"])
source = open_dataset(cfg.data).train
image_to_tensor(open_image(source.files[0], 16), 16)  # every library loaded and warm before the baseline
before = peak_mb()
try:
    image_to_tensor(open_image(bomb, 16), 16)
except BadImage:
    pass
decoded = decode(source, 16, cache, threads=2)
print(len(decoded.bad), before, peak_mb())
"""


def test_decompression_bomb_memory_stays_bounded(bombs: dict[str, Path], tmp_path: Path) -> None:
    root = _colours_with(tmp_path / "colours", {"big.png": bombs["big"]})
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root), str(bombs["big"]), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    bad, before, after = result.stdout.split()
    assert int(bad) == 1
    # Decoded, the bomb alone is 432 MB; refused from its header, the peak barely moves.
    assert float(after) - float(before) < 50, (before, after)


# ---------------------------------------------------------------------------------------------
# 5. Full disk and read-only places
# ---------------------------------------------------------------------------------------------


def test_full_disk_at_a_checkpoint_then_resume(
    two_epochs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = fail_writes(monkeypatch, "last.ckpt", ENOSPC, after=1)  # epoch 1's last.ckpt is written, epoch 2's not
    args = small_run(tmp_path, exp_name="base")
    code, _, err = cli(capsys, "train", *args, "--quiet")
    run = tmp_path / "runs" / "base"
    last = run / "checkpoints" / "last.ckpt"
    assert code == 1 and failed
    assert error_lines(err) == [
        f"error: cannot write {last}: No space left on device; the files written before are intact: "
        "free some space, then continue the run with --resume"
    ]
    assert _epochs_in(last) == 1 and not list(run.rglob("*.tmp")) and not (run / LOCK).exists()
    assert _summary(run)["status"] == "failed"
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", *args, "--resume", "--quiet")
    assert code == 0, err
    assert _summary(run)["status"] == "finished"
    assert _rows(run / "metrics.csv") == _rows(two_epochs / "metrics.csv")


def test_read_only_metrics_then_resume(
    two_epochs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = fail_writes(monkeypatch, "metrics.csv", EACCES, at="open")
    args = small_run(tmp_path, exp_name="base")
    code, _, err = cli(capsys, "train", *args, "--quiet")
    run = tmp_path / "runs" / "base"
    assert code == 1 and failed
    assert error_lines(err) == [
        f"error: cannot write {run / 'metrics.csv'}: Permission denied; the files written before are intact: "
        "make it writable, then continue the run with --resume"
    ]
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints" / "last.ckpt").exists()
    assert _summary(run)["status"] == "failed"
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", *args, "--resume", "--quiet")
    assert code == 0, err
    assert _rows(run / "metrics.csv") == _rows(two_epochs / "metrics.csv")


def test_metrics_row_is_never_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from classlab.run import RunFolder

    run = RunFolder(tmp_path)
    run.append_metrics({"epoch": 1, "step": 5}, ["epoch", "step"])
    before = run.metrics_path.read_bytes()
    fail_writes(monkeypatch, "metrics.csv", ENOSPC)
    with pytest.raises(ClassLabError, match=r"cannot write .*metrics.csv: No space left on device"):
        run.append_metrics({"epoch": 2, "step": 10}, ["epoch", "step"])
    assert run.metrics_path.read_bytes() == before


def test_read_only_run_root_leaves_no_half_made_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = fail_writes(monkeypatch, "split.json", EACCES, at="open")
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="ro"), "--quiet")
    run = tmp_path / "runs" / "ro"
    assert code == 1 and failed
    assert error_lines(err) == [
        f"error: cannot write {run / 'split.json'}: Permission denied; the files written before are intact: "
        "make it writable, then continue the run with --resume"
    ]
    assert not run.exists()  # config.yaml and classes.json were written, then taken away with the folder


# ---------------------------------------------------------------------------------------------
# 6. The decode cache
# ---------------------------------------------------------------------------------------------


def _folder_source(root: Path):
    return open_dataset(load_config(None, ["data.dataset=folder", f"data.root={root}"]).data).train


def test_cut_cache_entry_is_detected_and_rebuilt(color_folder: Path, tmp_path: Path) -> None:
    source = _folder_source(color_folder)
    fresh = decode(source, 16, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    _cut(entry)
    with pytest.warns(UserWarning, match=rf"decode cache {entry} does not load .*; decoding the images again"):
        again = decode(source, 16, tmp_path / "cache")
    assert torch.equal(again.images, fresh.images)
    assert torch.equal(decode(source, 16, tmp_path / "cache").images, fresh.images)  # rebuilt entry is whole


def test_cache_entry_with_changed_pixels_fails_its_checksum(color_folder: Path, tmp_path: Path) -> None:
    source = _folder_source(color_folder)
    fresh = decode(source, 16, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    blob = torch.load(entry, weights_only=True)
    blob["images"][0, 0, 0, 0] ^= 0xFF  # one pixel overwritten, the file still loads
    torch.save(blob, entry)
    with pytest.warns(UserWarning, match="fail their checksum"):
        again = decode(source, 16, tmp_path / "cache")
    assert torch.equal(again.images, fresh.images)


def test_cache_entry_not_matching_its_index_is_rebuilt(color_folder: Path, tmp_path: Path) -> None:
    source = _folder_source(color_folder)
    fresh = decode(source, 16, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.pt")
    other = decode(source, 8, tmp_path / "cache8")
    shutil.copy(next((tmp_path / "cache8").glob("*.pt")), entry)  # an entry of another size under this name
    with pytest.warns(UserWarning, match="does not match its index"):
        again = decode(source, 16, tmp_path / "cache")
    assert torch.equal(again.images, fresh.images) and other.images.shape[-1] == 8


def test_cache_verify_catches_a_file_changed_in_place(tmp_path: Path) -> None:
    root = tmp_path / "bmp"
    for cls, colour in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
        for i in range(4):
            make_image(root / cls / f"{i}.bmp", colour, noise=0)
    image = root / "blue" / "0.bmp"  # blue sorts first: image 0 of the source
    stat = image.stat()
    cached = decode(_folder_source(root), 16, tmp_path / "plain")
    decode(_folder_source(root), 16, tmp_path / "verified", verify=True)
    make_image(image, (40, 200, 60), noise=0)  # green now: same size (BMP), same modification time
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    # Names, sizes and times cannot tell: the plain cache serves the old pixels, as documented.
    assert torch.equal(decode(_folder_source(root), 16, tmp_path / "plain").images, cached.images)
    verified = decode(_folder_source(root), 16, tmp_path / "verified", verify=True)
    assert verified.images[0, 1].float().mean() > 150 and verified.images[0, 2].float().mean() < 100


def test_cache_verify_also_covers_the_source_size_copy(tmp_path: Path) -> None:
    """data.train_source_size decodes the training images a second time: cache_verify must reach that copy too."""
    from classlab.config import load_config
    from classlab.data.pipeline import load_data

    root = tmp_path / "bmp"
    for cls, colour in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
        for i in range(6):
            make_image(root / cls / f"{i}.bmp", colour, noise=0)
    overrides = [
        "data.dataset=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.train_source_size=24",
        "aug.random_resized_crop=[0.5,1.0]",
        "data.val_fraction=0",
        "data.cache_verify=true",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = load_config(None, overrides)
    assert load_data(cfg, with_test=False).train.images[:, 1].float().mean() < 100  # no green anywhere
    for image in (root / "blue").iterdir():  # green now, same size and modification time
        stat = image.stat()
        make_image(image, (40, 200, 60), noise=0)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    train = load_data(cfg, with_test=False).train
    assert train.images.shape[-1] == 24
    assert (train.images[:, 1].float().mean(dim=(1, 2)) > 150).sum() == 6  # the six changed photos, at 24 px


# ---------------------------------------------------------------------------------------------
# 7. CSV manifests
# ---------------------------------------------------------------------------------------------


def _manifest_case(tmp_path: Path, text: str) -> tuple[Path, Path, list[str]]:
    root = tmp_path / "img"
    for i, name in enumerate("abcdef"):
        make_image(root / f"{name}.png", (200, 40, 40) if i % 2 else (40, 40, 200))
    (root / "train.csv").write_text(text)
    args = [
        "data.dataset=csv",
        f"data.root={root}",
        "data.csv_file=train.csv",
        f"run.root={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.layers=[8,p]",
        "epochs=1",
        "exp_name=m",
        "--quiet",
    ]
    return root, root / "train.csv", args


GOOD_ROWS = "a.png,blue\nb.png,red\nc.png,blue\nd.png,red\n"
PROBLEMS = "error: {n} problem(s) in the data; fix them, or set data.skip_bad_images=true to skip these files:"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "path,kind\na.png,blue\n",
            [
                "error: {csv}: no column 'label' (data.label_column); did you mean data.label_column=kind? "
                "(its columns are: path, kind)"
            ],
        ),
        (
            "path,label\n" + GOOD_ROWS + "../outside.png,red\n",
            ["error: {csv}, line 6: path '../outside.png' is outside data.root {root}; paths must stay inside it"],
        ),
        ("path,label\n" + GOOD_ROWS + "e.png,\n", [PROBLEMS.format(n=1), "  {csv}, line 6: empty label"]),
        (
            "path,label\n" + GOOD_ROWS + "a.png,red\n",
            [PROBLEMS.format(n=1), "  {csv}, line 6: path 'a.png' is listed twice (first on line 2)"],
        ),
        (
            "path,label\n" + GOOD_ROWS + "gone.png,red\n",
            [PROBLEMS.format(n=1), "  {root}/gone.png: file listed in train.csv (line 6) does not exist"],
        ),
        (
            "path,label\n" + GOOD_ROWS + "e.png,\na.png,blue\ngone.png,red\n",
            [
                PROBLEMS.format(n=3),
                "  {csv}, line 6: empty label",
                "  {csv}, line 7: path 'a.png' is listed twice (first on line 2)",
                "  {root}/gone.png: file listed in train.csv (line 8) does not exist",
            ],
        ),
    ],
    ids=["no-label-column", "escapes-root", "empty-label", "duplicate-path", "missing-file", "all-at-once"],
)
def test_broken_manifest_one_line_each_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: list[str]
) -> None:
    root, manifest, args = _manifest_case(tmp_path, text)
    code, _, err = cli(capsys, "train", *args)
    assert code == 1
    assert err.splitlines() == [line.format(csv=manifest, root=root) for line in expected]
    assert not (tmp_path / "runs").exists()
