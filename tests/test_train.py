"""End to end: train, the run folder contract, eval, predict, resume after a kill, determinism, DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import classlab
from classlab.config import validate
from classlab.errors import ClassLabError
from tests.conftest import SHARED_CIFAR, make_image, run_cli, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trained")
    result = run_cli("train", *tiny_config(tmp, exp_name="tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run folder:" in result.stdout
    return tmp / "runs" / "tiny"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(handle)]


def test_run_folder_contract(trained: Path) -> None:
    for name in (
        "config.yaml",
        "classes.json",
        "split.json",
        "metrics.csv",
        "summary.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (trained / name).is_file(), name
    assert list((trained / "tb").rglob("events.out.tfevents.*"))
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["epochs_done"] == 3 and summary["params"] > 1000
    assert summary["test_acc"] > 0.2, summary  # ten classes: chance is 0.1
    assert {"torch", "lightning", "classlab"} <= set(summary["versions"])
    assert json.loads((trained / "classes.json").read_text())["0"] == "airplane"
    assert len(_rows(trained / "metrics.csv")) == 3
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["classlab"]["classes"][9] == "truck"
    assert not list(trained.rglob("*.tmp"))


def test_eval_writes_metrics_and_confusion(trained: Path) -> None:
    result = run_cli("eval", str(trained), "--split", "test")
    assert result.returncode == 0, result.stderr
    assert "top-1" in result.stdout and "airplane" in result.stdout
    metrics = json.loads((trained / "eval" / "test" / "metrics.json").read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert metrics["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert metrics["top5"] >= metrics["top1"] and metrics["images"] == 1000
    confusion = list(csv.reader(open(trained / "eval" / "test" / "confusion.csv")))
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 1000
    assert (trained / "eval" / "test" / "confusion.png").stat().st_size > 1000
    val = run_cli("eval", str(trained), "--split", "val", "--checkpoint", "last")
    assert val.returncode == 0 and "[val, last.ckpt, 500 images]" in val.stdout


def test_predict_csv_and_api(trained: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    make_image(images / "red.png", (230, 20, 20), size=50)
    make_image(images / "sub" / "gray.jpg", (128, 128, 128), size=32, mode="L")
    (images / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "pred.csv"
    result = run_cli("predict", str(trained), str(images), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[:5] == ["path", "class", "prob", "top2_class", "top2_prob"] and list(rows[0])[-1] == "error"
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.png"]["error"] and not by_name["broken.png"]["class"]
    assert by_name["red.png"]["class"] in json.loads((trained / "classes.json").read_text()).values()
    assert float(by_name["red.png"]["prob"]) >= float(by_name["red.png"]["top2_prob"])
    # The API gives the same answer as the CSV, from PIL images, arrays or uint8 tensors.
    from PIL import Image

    model = classlab.load(trained)
    pil = Image.open(images / "red.png")
    name, prob = model(pil)
    assert name == by_name["red.png"]["class"] and prob == pytest.approx(float(by_name["red.png"]["prob"]), abs=1e-5)
    import numpy as np

    assert model(np.asarray(pil))[0] == name
    assert model(torch.from_numpy(np.asarray(pil)).permute(2, 0, 1))[0] == name


def test_existing_run_refused_then_forced(trained: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(trained, root / "tiny")
    old_summary = (root / "tiny" / "summary.json").read_text()
    args = tiny_config(tmp_path, exp_name="tiny", epochs=1)
    result = run_cli("train", *args)
    assert result.returncode == 1
    assert "already exists and has finished; use --resume with more epochs to train it on, --force" in result.stderr
    assert (root / "tiny" / "summary.json").read_text() == old_summary

    result = run_cli("train", *args, "--force")
    assert result.returncode == 0, result.stderr
    assert "moved the old run to" in result.stderr
    moved = [p for p in root.iterdir() if p.name.startswith("tiny.old-")]
    assert len(moved) == 1 and (moved[0] / "summary.json").read_text() == old_summary  # nothing deleted
    fresh = json.loads((root / "tiny" / "summary.json").read_text())
    assert fresh["status"] == "finished" and fresh["epochs_done"] == 1


def test_damaged_checkpoint_one_line(trained: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "checkpoints" / "best.ckpt").write_bytes(b"\x80\x02garbage")
    result = run_cli("eval", str(copy))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot be read safely" in result.stderr
    with pytest.raises(ClassLabError, match="not a run folder"):
        classlab.load(tmp_path)


def test_same_seed_same_metrics(tmp_path: Path) -> None:
    a = classlab.train(None, tiny_config(tmp_path, exp_name="a", epochs=2), quiet=True)
    b = classlab.train(None, tiny_config(tmp_path, exp_name="b", epochs=2), quiet=True)
    assert _rows(a.metrics_path) == _rows(b.metrics_path)


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train_until_rows(args: list[str], metrics: Path, rows: int) -> subprocess.Popen:
    """Start `classlab train` in a process of its own and return once metrics.csv has ``rows`` rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "classlab.cli", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        # As from a terminal: a suite started in the background (`cmd &`) has SIGINT ignored, the child would
        # inherit that, and Python then never raises KeyboardInterrupt for it.
        preexec_fn=None if os.name == "nt" else _sigint_default,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(_rows(metrics)) < rows):
        time.sleep(0.05)
    return proc


def kill_and_resume(args: list[str], runs: Path, after_rows: int, epochs: int, straight: Path | None = None) -> None:
    """Kill a run after ``after_rows`` epochs, resume it, and check it ends as the uninterrupted run
    (``straight``: its metrics.csv, default ``runs/straight``'s) did: the same metrics.csv row for row."""
    metrics = runs / "killed" / "metrics.csv"
    proc = _train_until_rows([*args, "exp_name=killed"], metrics, after_rows)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert len(_rows(metrics)) < epochs
    # as a SIGTERM (a session ending) leaves it: the finished run must not keep that attempt's error
    summary_path = runs / "killed" / "summary.json"
    summary_path.write_text(json.dumps(dict(json.loads(summary_path.read_text()), status="failed", error="SIGTERM")))
    resumed = run_cli("train", *args, "exp_name=killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _rows(metrics) == _rows(straight or runs / "straight" / "metrics.csv")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and "error" not in summary


# A run trained in this process is compared with one trained in a child: both use the same number of threads
# (float sums differ with it), whatever another test module set in this process.
EQUAL_THREADS = {"trainer.threads": 2}


@pytest.fixture(scope="module")
def straight_4_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The metrics.csv of one uninterrupted 4-epoch run, which every kill-and-resume below must end level with."""
    args = tiny_config(tmp_path_factory.mktemp("straight"), epochs=4, **EQUAL_THREADS, **{"data.images_per_class": 150})
    return classlab.train(None, [*args, "exp_name=straight"], quiet=True).path / "metrics.csv"


def test_resume_after_kill_matches_uninterrupted(tmp_path: Path, straight_4_epochs: Path) -> None:
    args = tiny_config(tmp_path, epochs=4, **EQUAL_THREADS, **{"data.images_per_class": 150})
    kill_and_resume(args, tmp_path / "runs", after_rows=2, epochs=4, straight=straight_4_epochs)


def test_last_ckpt_on_an_interval_keeps_the_end_and_resumes_exactly(tmp_path: Path, straight_4_epochs: Path) -> None:
    """trainer.checkpoint_every_s longer than the run: last.ckpt is written once, at the end; a run stopped
    by max_steps mid-schedule is written where it stopped; a kill before any write resumes from nothing."""
    hour = {"trainer.checkpoint_every_s": 3600}
    run = classlab.train(None, tiny_config(tmp_path, exp_name="hourly", **hour), quiet=True)
    ckpts = run.path / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["classlab"]["epochs_done"] == 3
    assert not (ckpts / "previous.ckpt").exists()  # one write: epochs 1 and 2 were not written
    assert len(_rows(run.path / "metrics.csv")) == 3

    stopped = tiny_config(tmp_path, exp_name="steps", **hour, **{"trainer.max_steps": 20})
    steps = classlab.train(None, stopped, quiet=True)
    ckpt = torch.load(steps.path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20 and ckpt["classlab"]["epochs_done"] == 2

    # An early stop is written where it stopped: an MLP (no BatchNorm) at lr 1e-9 never improves val/acc.
    still = {"model.name": "mlp", "model.layers": "[32]", "optim.lr": 1e-9, "trainer.patience": 1, "epochs": 10}
    early = classlab.train(None, tiny_config(tmp_path, exp_name="early", **hour, **still), quiet=True)
    assert len(_rows(early.path / "metrics.csv")) == 2
    ckpt = torch.load(early.path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["classlab"]["epochs_done"] == 2

    args = tiny_config(tmp_path, epochs=4, **{"data.images_per_class": 150}, **hour, **EQUAL_THREADS)
    kill_and_resume(args, tmp_path / "runs", after_rows=2, epochs=4, straight=straight_4_epochs)


@pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
@pytest.mark.parametrize(("sig", "loader", "code"), [("SIGINT", "memory", 130), ("SIGTERM", "stream", 143)])
def test_stop_between_batches_resumes_exactly(tmp_path: Path, sig: str, loader: str, code: int) -> None:
    """Ctrl-C (or a scheduler's SIGTERM) in the middle of an epoch: the run stops after the batch in hand,
    last.ckpt holds that point, and --resume ends with the metrics of a run never stopped, row for row."""
    # 3,000 images in 46 batches an epoch: the signal lands inside epoch 2's training batches.
    args = tiny_config(tmp_path, epochs=2, **EQUAL_THREADS, **{"data.images_per_class": 300, "data.loader": loader})
    torch.set_num_threads(1)
    classlab.train(None, [*args, "exp_name=straight"], quiet=True)  # in this process: one interpreter start less
    assert torch.get_num_threads() == 1  # trainer.threads held for the run only
    run = tmp_path / "runs" / "stopped"
    proc = _train_until_rows([*args, "exp_name=stopped"], run / "metrics.csv", 1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    time.sleep(0.3)
    proc.send_signal(getattr(signal, sig))
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{sig} did not stop the run within 120 s")
    assert proc.returncode == code, err[-2000:]
    assert "stopping after this batch" in err
    line = next(ln for ln in err.splitlines() if ln.startswith("interrupted: "))
    assert line.endswith("last.ckpt holds that point; continue with --resume"), line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["classlab"]["epochs_done"] == len(_rows(run / "metrics.csv")) == 1
    assert 0 < ckpt["classlab"]["batches_done"] < 46, line

    resumed = run_cli("train", *args, "exp_name=stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("finished in") == 1, resumed.stdout[-2000:]
    assert _rows(run / "metrics.csv") == _rows(tmp_path / "runs" / "straight" / "metrics.csv")
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_a_second_ctrl_c_stops_at_once_a_repeat_within_a_second_does_not() -> None:
    """The sweep passes a terminal's Ctrl-C on to runs that got it too: that is one request, not two."""
    from classlab.engine.callbacks import GracefulStop

    stop = GracefulStop()
    stop._ask(signal.SIGINT, None)
    assert stop.requested == "SIGINT"
    stop._ask(signal.SIGINT, None)  # the same Ctrl-C, passed on
    stop._asked_at -= 2 * GracefulStop.SECOND_SIGNAL_AFTER_S
    with pytest.raises(KeyboardInterrupt):
        stop._ask(signal.SIGINT, None)


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    args = tiny_config(tmp_path, epochs=2, exp_name="ddp")
    result = run_cli(
        "train", *args, "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.threads=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test_acc"] > 0.15
    assert len(_rows(run / "metrics.csv")) == 2
    # Two processes each took half the batches of an epoch.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * (1000 // 64 // 2)
    # The test after the fit runs in process 0 alone, on the whole test set: scored on its DDP share of it, the
    # figure was of half the images and did not match the same checkpoint re-evaluated.
    assert summary["images"]["test"] == 1000
    assert classlab.evaluate(run)["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and text in cmd and (entry / "stat").read_text().split()[2] != "Z":
            found.append(cmd)
    return found


def test_an_error_line_from_a_ddp_worker_names_its_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workers share process 0's terminal: two identical error lines told the user nothing about whose they were."""
    from classlab import cli

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", "epochs=x"]) == 2
    assert capsys.readouterr().err.startswith("error: process 1: config key 'epochs'")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(["train", "epochs=x"]) == 2
    assert capsys.readouterr().err.startswith("error: config key 'epochs'")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="lists processes through /proc")
def test_ddp_with_its_port_taken_says_so_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MASTER_PORT pointing at a port another program holds: one line naming the variable and the fix, no run
    folder, and no worker process left behind (one waited half an hour for a process 0 that had exited)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        args = tiny_config(tmp_path, epochs=1, exp_name="ddp", **{"data.images_per_class": 10})
        ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.threads=1"]
        result = run_cli("train", *args, *ddp)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"MASTER_PORT={port} is taken" in errors[0] and "unset MASTER_PORT" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "ddp").exists()
    assert _processes_naming(str(tmp_path)) == []


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
def test_ddp_sigterm_stops_every_process_and_resumes_exactly(tmp_path: Path) -> None:
    """SIGTERM to process 0 of a DDP run: both processes stop after the same batch, one last.ckpt holds that point
    (each process's random streams and metric sums), and --resume ends with the metrics of a run never stopped.
    Lightning's own handler broadcast from inside the signal handler and the two processes waited for ever."""
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.threads=1"]
    args = [*tiny_config(tmp_path, epochs=3, **{"data.images_per_class": 60, "data.batch_size": 8}), *ddp]
    args += ["model.layers=[8,p,16,p]", "trainer.checkpoint_every_s=0"]
    straight = run_cli("train", *args, "exp_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    run = tmp_path / "runs" / "stopped"
    proc = _train_until_rows([*args, "exp_name=stopped"], run / "metrics.csv", 1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("SIGTERM did not stop the DDP run within 120 s")
    assert proc.returncode == 143, err[-2000:]
    assert err.count("interrupted") == 1, err[-2000:]  # process 0 says it for both
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["classlab"]["epochs_done"] == len(_rows(run / "metrics.csv")) == 1
    assert 0 < ckpt["classlab"]["batches_done"] < 37, err[-2000:]
    assert len(ckpt["classlab_mid_epoch"]["by_rank"]) == 2

    resumed = run_cli("train", *args, "exp_name=stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("finished in") == 1, resumed.stdout[-2000:]
    assert _rows(run / "metrics.csv") == _rows(tmp_path / "runs" / "straight" / "metrics.csv")


def _cifar_slice(tmp_path: Path, per_class: int, part: str) -> Path:
    root = tmp_path / "cifar" / part
    for cls_dir in sorted((SHARED_CIFAR / part).iterdir()):
        for f in sorted(cls_dir.iterdir())[:per_class]:
            (root / cls_dir.name).mkdir(parents=True, exist_ok=True)
            os.symlink(f, root / cls_dir.name / f.name)
    return tmp_path / "cifar"


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared cifar10-jpeg not present")
def test_folder_of_real_cifar_jpegs(tmp_path: Path) -> None:
    root = _cifar_slice(tmp_path, 200, "train")
    _cifar_slice(tmp_path, 50, "test")
    run = classlab.train(
        None,
        [
            *tiny_config(tmp_path, exp_name="cifar", epochs=4),
            "data.dataset=folder",
            f"data.root={root}",
            "data.images_per_class=null",
        ],
        quiet=True,
    )
    summary = run.summary()
    assert summary["images"] == {"train": 1800, "val": 200, "test": 500}
    assert summary["test_acc"] > 0.25
    metrics = classlab.evaluate(run)
    assert metrics["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)


def test_deterministic_run_without_the_nan_fill_of_fresh_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic kernels are on while the run trains; torch's NaN fill of every fresh allocation (a 10% cost a
    step) is off; afterwards the caller's settings are back."""
    import lightning as L

    import classlab

    seen: list[tuple[bool, bool]] = []
    fit = L.Trainer.fit

    def watched(self: L.Trainer, *args: object, **kwargs: object) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory))
        fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", watched)
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    run = classlab.train(None, tiny_config(tmp_path, epochs=1, exp_name="det"), quiet=True)
    assert seen == [(True, False)]
    assert run.read_json("summary.json")["status"] == "finished"
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before


def test_resume_refuses_a_different_model_and_records_other_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume with overrides: what shaped the weights or the data (model, data, seed, task) is refused in one
    line with nothing touched; anything else (more epochs, another lr) is said, kept in config.yaml, and
    summary.json records when it changed."""
    from tests.faults import cli

    args = tiny_config(tmp_path, epochs=1, exp_name="r", **{"data.images_per_class": 30})
    assert cli(capsys, "train", *args)[0] == 0
    run = tmp_path / "runs" / "r"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.csv")}
    code, _, err = cli(capsys, "train", *args, "model.batchnorm=false", "epochs=2", "--resume")
    assert code == 1
    assert err.startswith("error: --resume: model.batchnorm was ") and "Traceback" not in err
    assert "drop that override" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ClassLabError, match=r"^resume=True: data.images_per_class was 30 in .*, here 40"):
        classlab.train(None, [*args, "data.images_per_class=40", "epochs=2"], resume=True, quiet=True)
    assert {name: (run / name).read_bytes() for name in before} == before

    monkeypatch.chdir(tmp_path)  # a path given on resume is resolved as on a first run, not kept relative
    code, out, err = cli(capsys, "train", *args, "epochs=2", "optim.lr=0.02", "data.cache_dir=cache", "--resume")
    assert code == 0, err[-2000:]
    assert "resuming with changes: epochs 1 -> 2; optim.lr 0.05 -> 0.02" in out
    assert "resuming from checkpoints/last.ckpt (1 of 2 epochs done)\n" in out  # where it picks up, said
    resumed = validate(yaml.safe_load((run / "config.yaml").read_text()))
    assert resumed.optim.lr == 0.02 and resumed.data.cache_dir == str(tmp_path / "cache")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_with"] == [{"epochs_done": 1, "changes": ["epochs 1 -> 2", "optim.lr 0.05 -> 0.02"]}]
    assert summary["status"] == "finished" and len(_rows(run / "metrics.csv")) == 2
    code, out, err = cli(capsys, "train", *args, "epochs=2", "optim.lr=0.02", "--resume")  # a finished run
    assert code == 0 and "already finished its 2 epochs: nothing to train; to train it longer: --resume epochs=3" in out
    assert len(_rows(run / "metrics.csv")) == 2


def test_resume_says_config_file_edits_it_does_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume reads the run's own config.yaml; an edit to the config file (epochs: 3) looked applied and was not."""
    from tests.faults import cli

    config = tmp_path / "exp.yaml"
    config.write_text("exp_name: e\nepochs: 1\noptim: {lr: 0.05}\n")
    args = [a for a in tiny_config(tmp_path, **{"data.images_per_class": 10}) if not a.startswith(("epochs", "optim"))]
    assert cli(capsys, "train", str(config), *args)[0] == 0
    config.write_text("exp_name: e\nepochs: 3\noptim: {lr: 0.02}\n")
    code, out, err = cli(capsys, "train", str(config), *args, "optim.lr=0.02", "--resume")
    assert code == 0, err
    assert (
        f"note: {config} differs from the run's own config.yaml in epochs (file 3, run 1); --resume goes on with "
        "the run's settings: give a change as an override (epochs=3), as for any resumed run"
    ) in out
    assert "optim.lr" not in out.split("note:")[1]  # given as an override: applied, so not an unapplied edit
    assert len(_rows(tmp_path / "runs" / "e" / "metrics.csv")) == 1


def test_the_returned_run_is_found_after_the_notebook_changes_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a relative run.root gave RunFolder('runs/nb'); after os.chdir, evaluate() said it was not found."""
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    cfg = {
        "exp_name": "nb",
        "epochs": 1,
        "run": {"root": "runs"},
        "data": {"images_per_class": 10, "cache_dir": str(tmp_path / "cache")},
        "model": {"layers": [8, "p"]},
        "trainer": {"progress": False},
    }
    run = classlab.train(cfg, quiet=True)
    assert run.path == tmp_path / "project" / "runs" / "nb"
    monkeypatch.chdir(tmp_path)
    summary = json.loads((Path(run) / "summary.json").read_text())  # Path(run): a RunFolder is a path too
    assert classlab.evaluate(run)["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)
    assert os.fspath(run) == str(tmp_path / "project" / "runs" / "nb")


def test_summary_best_epoch_follows_the_monitor() -> None:
    """best_epoch and its figures are best.ckpt's epoch: under monitor=val/f1 they were picked by val/acc."""
    from classlab.train import best_row

    rows = [
        {"epoch": "1", "val/acc": "0.6", "val/f1": "0.3", "val/loss": "0.9"},
        {"epoch": "2", "val/acc": "0.5", "val/f1": "0.4", "val/loss": "0.8"},
        {"epoch": "3", "val/acc": "0.6", "val/f1": "0.4", "val/loss": "0.7"},
    ]
    assert best_row(rows, "val/acc")["epoch"] == "1"  # the first best, as ModelCheckpoint keeps it
    assert best_row(rows, "val/f1")["epoch"] == "2"
    assert best_row(rows, "val/loss")["epoch"] == "3"  # a loss is best lowest
    assert best_row([{k: v for k, v in r.items() if k != "val/f1"} for r in rows], "val/f1")["epoch"] == "1"
    assert best_row([{"epoch": "1", "train/loss": "1.0"}], "val/acc") is None


def test_a_run_with_nothing_to_score_or_skipped_files_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """data.val_fraction=0 and no test set: the last lines read 'finished in 1s: ' with nothing after the colon;
    data.skip_bad_images=true left files out without a word (only skipped_images.txt in the run folder knew)."""
    from tests.conftest import class_folder
    from tests.faults import cli

    root = class_folder(tmp_path / "photos", {"red": (220, 40, 40), "blue": (40, 60, 220)}, 4, size=16)
    (root / "red" / "broken.jpg").write_bytes(b"")
    args = [f"data.root={root}", "data.val_fraction=0", "epochs=1", "model.layers=[4,p]", "exp_name=nothing"]
    args += [f"run.root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}", "trainer.progress=false"]
    code, out, err = cli(capsys, "train", *args, "data.skip_bad_images=true")
    assert code == 0, err
    skipped = tmp_path / "runs" / "nothing" / "skipped_images.txt"
    assert f"note: 1 bad file(s) or manifest row(s) skipped, listed in {skipped}" in out.splitlines()
    assert skipped.read_text() == f"{root / 'red' / 'broken.jpg'}: an empty file (0 bytes)\n"  # written as b""
    finished = [line for line in out.splitlines() if line.startswith("finished in")]
    assert len(finished) == 1 and finished[0].endswith("s: no validation or test images to score"), out


def test_the_last_epoch_is_validated_whatever_val_every_says(tmp_path: Path) -> None:
    """Before: epochs=3 with trainer.val_every=2 validated epoch 2 only; best.ckpt, summary.json (epochs_done 2)
    and the test figure never saw epoch 3 (a sweep of epochs=267, val_every=27 lost its last 24 epochs)."""
    from tests.conftest import tiny_config

    run = classlab.train(None, tiny_config(tmp_path, exp_name="v", epochs=3, **{"trainer.val_every": 2}), quiet=True)
    with open(run.path / "metrics.csv", newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["2", "3"]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["best_epoch"] in (2, 3)


def test_resume_on_another_number_of_processes_says_what_changes() -> None:
    """A 2-process DDP run resumed with trainer.devices=1 finished without a word, though each step now averages
    half the images and an epoch has twice the steps."""
    from classlab.train import _resume_line

    line = _resume_line(Path("last.ckpt"), 3, 10, ["trainer.devices 2 -> 1", "epochs 5 -> 10"])
    assert line.splitlines()[1:] == [
        "resuming with changes: trainer.devices 2 -> 1; epochs 5 -> 10",
        "note: the number of processes changed: under DDP a step sees data.batch_size images from each process, so "
        "the batch a step averages and the steps an epoch (and the schedule by steps) change with it; the run goes "
        "on, but not as one never stopped would",
    ]
    assert "note:" not in _resume_line(Path("last.ckpt"), 3, 10, ["epochs 5 -> 10"])


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_ddp_validation_counts_each_image_once(tmp_path: Path, loader: str) -> None:
    """25 validation images on two processes: the shares were padded to 13 + 13 and one image counted twice, so
    best_val_acc was not the accuracy `eval --split val` gives the same checkpoint. Now 13 + 12, in 4 and 3 batches
    of 4 (uneven batch counts must not stall the processes)."""
    from tests.conftest import class_folder

    # Five classes of nearly one colour: an accuracy strictly between 0 and 1, where a repeated image moves it.
    data = class_folder(tmp_path / "greys", {f"g{i}": (120 + 4 * i, 128, 128) for i in range(5)}, 20, size=16)
    args = [
        "data.dataset=folder", f"data.root={data}", "data.val_fraction=0.25", "data.batch_size=4", "epochs=2",
        f"data.loader={loader}", "model.layers=[8,p]", "trainer.progress=false", f"run.root={tmp_path / 'runs'}",
        "exp_name=ddp", "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.threads=1",
    ]  # fmt: skip
    result = run_cli("train", *args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["images"]["val"] == 25
    evaluated = classlab.evaluate(tmp_path / "runs" / "ddp", split="val")
    assert 0 < summary["best_val_acc"] < 1
    assert evaluated["images"] == 25 and evaluated["top1"] == pytest.approx(summary["best_val_acc"], abs=1e-6)
