"""Progressive resizing (aug.size_schedule): smaller training images early in one run, full size at the end."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import PropertyMock, patch

import pytest
import torch

from classlab.config import load_config
from classlab.data.augment import resize_batch, scheduled_size
from classlab.errors import ConfigError
from tests.conftest import REPO, run_cli, tiny_config
from tests.test_train import kill_and_resume


def test_scheduled_size_follows_the_last_stage_begun() -> None:
    schedule = [(0, 16), (2, 24), (5, 32)]
    assert [scheduled_size(schedule, e) for e in range(7)] == [16, 16, 24, 24, 24, 32, 32]
    assert scheduled_size(None, 3) is None


def test_resize_batch_is_antialiased_uint8_and_leaves_full_size_alone() -> None:
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert resize_batch(x, 32) is x
    y = resize_batch(x, 16)
    assert y.dtype == torch.uint8 and y.shape == (4, 3, 16, 16)
    # A 2x antialiased shrink of a checkerboard is flat grey, where plain sampling would keep one colour.
    board = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255
    flat = resize_batch(board.to(torch.uint8).expand(1, 3, 32, 32).contiguous(), 16)
    assert (flat[..., 1:-1, 1:-1].float() - 127.5).abs().max() <= 1.0  # corners see the border


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[1,16],[3,32]]", "must start at epoch 0"),
        ("[[0,16],[0,32]]", "epochs must increase"),
        ("[[0,4]]", "sizes run from 8"),
    ],
)
def test_bad_schedules_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.image_size=32", f"aug.size_schedule={value}"])


def test_a_schedule_above_the_image_size_gets_one_line(tmp_path: Path) -> None:
    result = run_cli("train", *tiny_config(tmp_path), "data.image_size=32", "aug.size_schedule=[[0,64]]")
    assert result.returncode == 2
    assert "sizes run from 8 up to data.image_size=32" in result.stderr and "Traceback" not in result.stderr
    assert not any((tmp_path / "runs").rglob("*.ckpt"))


def test_a_model_that_needs_its_size_is_refused_before_training(tmp_path: Path) -> None:
    import classlab

    with pytest.raises(ConfigError, match="cannot take 16 px inputs"):
        classlab.train(
            None,
            [*tiny_config(tmp_path), "model.name=mlp", "model.layers=[32]", "aug.size_schedule=[[0,16],[1,32]]"],
            quiet=True,
        )


def test_training_batches_take_the_epochs_size() -> None:
    from classlab.engine.task import ClassifyTask

    cfg = load_config(REPO / "configs" / "cifar10_fast.yaml", ["aug.size_schedule=[[0,24],[2,32]]"])
    task = ClassifyTask(torch.nn.Identity(), cfg, 10, 32, steps_per_epoch=1)
    task._generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    trainer = type("T", (), {"training": True})()
    sizes = []
    for epoch in range(4):
        with (
            patch.object(ClassifyTask, "current_epoch", new_callable=PropertyMock, return_value=epoch),
            patch.object(ClassifyTask, "trainer", new_callable=PropertyMock, return_value=trainer),
        ):
            sizes.append(task.on_after_batch_transfer(batch, 0)[0].shape[-1])
    assert sizes == [24, 24, 32, 32]


def test_progressive_run_learns_and_resumes_exactly(tmp_path: Path) -> None:
    """Small first, full size last: above chance, and a run killed in a small epoch resumes to the same numbers."""
    args = tiny_config(tmp_path, epochs=3, **{"data.image_size": 32, "aug.size_schedule": "[[0,16],[2,32]]"})
    straight = run_cli("train", *args, "exp_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "straight" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test_acc"] > 0.2  # ten classes, chance 0.1

    kill_and_resume(args, tmp_path / "runs", after_rows=1, epochs=3)
