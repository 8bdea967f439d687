"""Multi-stage runs: each stage starts from the previous stage's final weights (the FixRes shape)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import classlab
from classlab.config import load_config
from classlab.errors import ConfigError
from tests.conftest import tiny_config


def test_stage_errors_name_the_stage() -> None:
    with pytest.raises(ConfigError, match=r"stages\[1\]: unknown config key 'data.image_sise'"):
        load_config(None, ["stages=[{epochs: 1}, {data.image_sise: 64}]"])


def test_stages_refuse_more_than_one_process() -> None:
    """DDP re-launches the whole command, so a staged run on 2 processes would train stage 1 twice: refused."""
    with pytest.raises(ConfigError, match=r"stages run in one process only.*model.init_from"):
        load_config(None, ["stages=[{}, {epochs: 1}]", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"stages run in one process only"):
        load_config(None, ["stages=[{}, {}]", "trainer.num_nodes=2"])
    with pytest.raises(ConfigError, match=r"stages\[1\]: stages run in one process only"):
        load_config(None, ["stages=[{}, {trainer.devices: [0, 1]}]"])
    assert load_config(None, ["stages=[{}, {}]", "trainer.devices=1"]).stages


def test_two_stages_hand_weights_over(tmp_path: Path) -> None:
    stages = (
        "[{data.image_size: 24, epochs: 2}, {data.image_size: 32, epochs: 1, optim.lr: 1.0e-9, optim.weight_decay: 0}]"
    )
    run = classlab.train(None, [*tiny_config(tmp_path, exp_name="fixres"), f"stages={stages}"], quiet=True)
    top = tmp_path / "runs" / "fixres"
    assert run.path == top
    summary = json.loads((top / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["stages"]) == 2
    assert summary["stages"][0]["image_size"] == 24 and summary["stages"][1]["image_size"] == 32
    assert summary["test_acc"] > 0.2
    one = torch.load(top / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    two = torch.load(top / "stage2" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    convs = [k for k, v in one.items() if k.startswith("model.net.") and v.ndim == 4]
    assert convs
    for key in convs:  # stage 2 trained with lr ~0: it must still hold stage 1's weights
        assert torch.allclose(one[key], two[key], atol=1e-6), key
    # eval on the top folder uses the last stage.
    metrics = classlab.evaluate(top)
    assert metrics["top1"] == pytest.approx(summary["test_acc"], abs=1e-6)


def test_the_run_folder_train_returns_loads_through_its_last_stage(tiny_run: Path, tmp_path: Path) -> None:
    """``classlab.train`` returns a staged run's top folder as a RunFolder; load/evaluate/export take it as they
    take its path (the last stage's weights), where a RunFolder skipped that step and found no checkpoints."""
    import shutil

    import yaml

    from classlab.run import RunFolder

    top = tmp_path / "staged"
    shutil.copytree(tiny_run, top / "stage2")
    tree = yaml.safe_load((tiny_run / "config.yaml").read_text())
    (top / "config.yaml").write_text(yaml.safe_dump({**tree, "stages": [{}, {}]}))
    loaded = classlab.load(RunFolder(top))
    assert loaded.run.path == top / "stage2"
    assert loaded.classes == classlab.load(top).classes


def test_a_stage_killed_between_its_config_and_its_summary_is_continued_by_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: stage 2 killed after its config.yaml and before its summary.json (while its model was built) was
    refused by the staged run's --resume as "run folder '.../stage2' already exists; use --resume to continue it",
    though --resume was given; a single run in that state resumes. It starts over from stage 1's weights."""
    from classlab.run import LOCK
    from tests.faults import Killed, cli, dead_lock, error_lines, killed_before_summary, small_run

    stages = (
        "[{data.image_size: 24, epochs: 1}, {data.image_size: 32, epochs: 1, optim.lr: 1.0e-9, optim.weight_decay: 0}]"
    )
    args = small_run(tmp_path, exp_name="fixres", stages=stages)
    killed_before_summary(monkeypatch, "stage2")
    with pytest.raises(Killed):
        classlab.train(None, args, quiet=True)
    monkeypatch.undo()
    top = tmp_path / "runs" / "fixres"
    stage2 = top / "stage2"
    assert sorted(p.name for p in stage2.iterdir()) == ["classes.json", "config.yaml", "split.json"]
    assert json.loads((top / "summary.json").read_text())["status"] == "running"
    dead_lock(top)
    dead_lock(stage2)

    code, out, err = cli(capsys, "train", *args, "--resume")
    assert code == 0, error_lines(err)
    assert "resuming: no checkpoint was written yet, so the run starts over" in out
    assert err.count("which is no longer running") == 2  # the dead process's locks, of the run and of its stage
    assert json.loads((stage2 / "summary.json").read_text())["status"] == "finished"
    summary = json.loads((top / "summary.json").read_text())
    assert summary["status"] == "finished" and [s["status"] for s in summary["stages"]] == ["finished"] * 2
    assert not (top / LOCK).exists() and not (stage2 / LOCK).exists()
    one = torch.load(top / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    two = torch.load(stage2 / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    convs = [k for k, v in one.items() if k.startswith("model.net.") and v.ndim == 4]
    assert convs and all(torch.allclose(one[k], two[k], atol=1e-6) for k in convs)  # started from stage 1's weights
