"""Engine behaviour through real (tiny) training runs: early stopping, the basic families, schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import classlab
from tests.conftest import tiny_config


def test_early_stopping_stops_and_tests_best(tmp_path: Path) -> None:
    # With a vanishing learning rate validation accuracy never improves: patience 2 stops after epoch 3.
    run = classlab.train(
        None,
        [*tiny_config(tmp_path, exp_name="es", epochs=10), "optim.lr=1e-12", "trainer.patience=2"],
        quiet=True,
    )
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["status"] == "finished"
    assert summary["test_checkpoint"] == "best" and summary["best_epoch"] == 1


@pytest.mark.parametrize(
    "model",
    [
        ["model.name=mlp", "model.layers=[256]", "optim.name=adam", "optim.lr=0.001"],
        [
            "model.name=resnet_cifar",
            "model.depth=8",
            "model.layers=null",
            "sched.name=multistep",
            "sched.milestones=[1.5]",
            "loss.label_smoothing=0.1",
            "trainer.clip_grad=5.0",
        ],
    ],
    ids=["mlp-adam", "resnet8-multistep-smoothing-clip"],
)
def test_basic_families_learn(tmp_path: Path, model: list[str]) -> None:
    run = classlab.train(None, [*tiny_config(tmp_path, exp_name="m", epochs=2), *model], quiet=True)
    assert run.summary()["test_acc"] > 0.18  # ten classes: chance is 0.10
