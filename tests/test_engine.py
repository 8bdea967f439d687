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


def test_bf16_on_a_cpu_without_bf16_instructions_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recipe written on a bf16 CPU and run on an AVX2-only one: one line says the run is emulated and slow."""
    import platform

    import torch

    from classlab.config import validate
    from classlab.engine.trainer import precision_notice

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    overrides = [*tiny_config(tmp_path, exp_name="bf16", epochs=1), "trainer.precision=bf16-mixed"]
    overrides += ["data.images_per_class=10"]
    run = classlab.train(None, overrides)
    out = capsys.readouterr().out
    assert "note: trainer.precision=bf16-mixed on a CPU without bf16 instructions (no AVX512-BF16 or AMX)" in out
    assert "use trainer.precision=32-true on this machine" in out
    assert json.loads((run.path / "summary.json").read_text())["status"] == "finished"  # a note, not a refusal

    def notice(precision: str) -> str | None:
        return precision_notice(validate({"trainer": {"precision": precision, "accelerator": "cpu"}}))

    assert notice("32-true") is None
    assert "float16 has no fast CPU kernels" in (notice("16-mixed") or "")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert notice("bf16-mixed") is None  # the CPU has the instructions: bf16 is the fast choice there
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert notice("bf16-mixed") is None  # torch does not say what an ARM CPU has: no claim
