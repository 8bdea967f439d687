"""A new user of the training options (optimizers, schedules, precision, early stopping, augmentation keys): each
test a defect such a user hit, fixed. Runs are the smallest that show it (200 sample images, a two-layer CNN)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import classlab
from classlab.config import SchedSection, unread_settings, validate
from classlab.engine.optim import lr_factor_fn
from classlab.errors import ClassLabError, ConfigError
from tests.conftest import make_image
from tests.faults import cli, error_lines, small_run


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------------------------------------
# Runs that failed or wrote what nothing could read
# ---------------------------------------------------------------------------------------------


def test_a_compiled_run_is_evaluated_predicted_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile=true wrapped the network (torch.compile(net)): every checkpoint's keys read
    'model.net._orig_mod.*', and `classlab eval` / `predict` of the run said its best.ckpt 'was written by another
    run'. (The eager backend keeps the compile cheap; the wrapping is the same as inductor's.)"""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: real(model, backend="eager"))
    args = small_run(tmp_path, exp_name="compiled", epochs=1, **{"trainer.compile": "true"})
    run = classlab.train(None, args, quiet=True).path
    keys = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert not [k for k in keys if "_orig_mod" in k]
    assert classlab.evaluate(run)["top1"] == pytest.approx(_summary(run)["test_acc"], abs=1e-6)
    image = make_image(tmp_path / "red.png", (220, 40, 40), size=32)
    (row,) = classlab.predict(run, [str(image)])
    assert not row["error"] and row["class"]
    again = small_run(tmp_path, exp_name="compiled", epochs=2, **{"trainer.compile": "false"})
    resumed = classlab.train(None, again, resume=True, quiet=True)
    assert len(_rows(resumed.path)) == 2 and _summary(resumed.path)["status"] == "finished"


def test_bf16_true_precision_trains_and_evaluates(tmp_path: Path) -> None:
    """trainer.precision=bf16-true (listed as allowed) failed on the first batch with 'unexpected RuntimeError:
    Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same': the model's Normalize
    turned the uint8 batch into float32 in front of bfloat16 weights."""
    run = classlab.train(None, small_run(tmp_path, exp_name="bf16", **{"trainer.precision": "bf16-true"}), quiet=True)
    summary = _summary(run.path)
    assert summary["status"] == "finished" and summary["test_acc"] > 0
    assert classlab.evaluate(run)["top1"] == pytest.approx(summary["test_acc"], abs=0.02)


def test_plateau_without_a_validation_set_is_refused_before_the_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sched.name=plateau with data.val_fraction=0 ended the run 'failed' after a whole epoch with Lightning's
    'unexpected MisconfigurationException: ReduceLROnPlateau conditioned on metric val/loss which is not
    available. Available metrics are: [...]', its folder left behind."""
    args = small_run(tmp_path, exp_name="plateau", **{"sched.name": "plateau", "data.val_fraction": 0})
    code, _, err = cli(capsys, "train", *args)
    assert code == 1 and "Traceback" not in err
    assert error_lines(err) == [
        "error: sched.name=plateau lowers the lr when val/loss stops falling, so it needs a validation set; set "
        "data.val_fraction above 0, or choose another sched.name (cosine, multistep, ...)"
    ]
    assert not (tmp_path / "runs" / "plateau").exists()


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("aug.randaugment=[2,40]", "config key 'aug.randaugment' = [2, 40]: [num_ops, magnitude]: 1 to 16 "),
        ("aug.randaugment=[-1,9]", "config key 'aug.randaugment' = [-1, 9]: [num_ops, magnitude]"),
        ("aug.random_resized_crop=[0.8,0.2]", "config key 'aug.random_resized_crop' = [0.8, 0.2]: [low, high] with 0"),
        ("optim.betas=[0.9,1.5]", "config key 'optim.betas' = [0.9, 1.5]: [beta1, beta2], each at least 0 and below"),
    ],
)
def test_impossible_augmentation_and_optimizer_values_are_config_errors(
    override: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was accepted, made the run folder and failed it at the first batch or at the optimizer: 'unexpected
    IndexError: index 40 is out of bounds for dimension 0 with size 31', 'unexpected ValueError: Invalid beta
    parameter at index 1: 1.5'. Now the config refuses them, with exit code 2 and nothing written."""
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="bad"), override, "optim.name=adam")
    (line,) = error_lines(err)
    assert code == 2 and line.startswith(f"error: {said}"), err
    assert not (tmp_path / "runs" / "bad").exists()


# ---------------------------------------------------------------------------------------------
# What a run says and records
# ---------------------------------------------------------------------------------------------


def test_early_stopping_says_when_and_why_and_resume_says_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """trainer.patience ended a run after epoch 2 of 6 with 'finished in 1s': nothing said it stopped early or why,
    summary.json had no trace of it, and --resume trained on without a word."""
    still = {"model.name": "mlp", "model.layers": "[32]", "optim.lr": 1e-9, "trainer.patience": 1, "epochs": 6}
    args = small_run(tmp_path, exp_name="early", **still)
    code, out, err = cli(capsys, "train", *args)
    assert code == 0, err
    run = tmp_path / "runs" / "early"
    early = _summary(run)["stopped_early"]
    assert early["epoch"] == 2 == len(_rows(run)) and early["monitor"] == "val/acc" and early["patience"] == 1
    assert (
        f"stopped early after epoch 2 of 6: val/acc did not improve on {early['best']:.4f} for 1 validation(s) "
        "(trainer.patience=1)"
    ) in out.splitlines()
    code, out, err = cli(capsys, "train", *args, "--resume")
    assert code == 0, err
    assert f"note: {run} stopped early after epoch 2 (trainer.patience); it trains on" in out
    assert _summary(run)["stopped_early"]["epoch"] == len(_rows(run)) == 3  # the new stop, not the old one


def test_the_lr_column_follows_optim_lr_and_the_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """metrics.csv's lr was the first parameter group's: the backbone's under optim.backbone_lr_scale=0.1 (0.005
    where optim.lr=0.05), Muon's under optim.name=muon (its muon_lr). It is optim.lr's curve: the head's lr."""
    sched = {"sched.warmup_epochs": 1, "optim.backbone_lr_scale": 0.1, "epochs": 3}
    run = classlab.train(None, small_run(tmp_path, exp_name="scaled", **sched), quiet=True).path
    rows = _rows(run)
    steps = int(rows[0]["step"])
    factor = lr_factor_fn(SchedSection(warmup_epochs=1), epochs=3, steps_per_epoch=steps, min_ratio=0.0)
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05 * factor(int(r["step"])) for r in rows], abs=1e-6)
    muon = classlab.train(
        None,
        small_run(tmp_path, exp_name="muon", epochs=1, **{"optim.name": "muon", "sched.name": "constant"}),
        quiet=True,
    )
    assert float(_rows(muon.path)[0]["lr"]) == pytest.approx(0.05)


def test_settings_the_run_never_reads_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sched.milestones under the default cosine schedule, loss.focal_gamma without loss.name=focal, optim.momentum
    with adamw, aug.mix_prob without mixup/CutMix: each was accepted and did nothing, without a word; so did a
    warmup as long as the run (the lr never reached optim.lr) and multistep milestones after its last epoch."""
    odd = {"sched.milestones": "[1]", "loss.focal_gamma": 3, "optim.name": "adamw", "optim.momentum": 0.8}
    code, out, err = cli(capsys, "train", *small_run(tmp_path, exp_name="odd", epochs=1, **odd))
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: sched.milestones=[1] has no effect with sched.name=cosine: only sched.name=multistep reads it",
        "note: optim.momentum=0.8 has no effect with optim.name=adamw: only optim.name=sgd or lars or muon reads it",
        "note: loss.focal_gamma=3 has no effect with loss.name=crossentropy: only loss.name=focal reads it",
    ]
    assert unread_settings(validate({"epochs": 2, "sched": {"warmup_epochs": 10}})) == [
        "note: sched.warmup_epochs=10 is not shorter than the run (epochs=2): the lr is still rising when it ends "
        "and never reaches optim.lr=0.05"
    ]
    late = validate({"epochs": 4, "sched": {"name": "multistep", "milestones": [2, 4, 6.5]}})
    assert unread_settings(late) == [
        "note: sched.milestones 4, 6.5 fall at or after the run's end (epochs=4): the lr never drops there"
    ]
    assert unread_settings(validate({"aug": {"mix_prob": 0.5}})) == [
        "note: aug.mix_prob=0.5 has no effect: it is the chance of aug.mixup_alpha/cutmix_alpha"
    ]
    rotation = validate({"task": "rotation", "loss": {"label_smoothing": 0.1}})  # INI: unsuper = true, labelsmooth
    assert unread_settings(rotation) == [
        "note: loss.label_smoothing=0.1 has no effect with task=rotation: only task=classify or multitask reads it"
    ]
    inherited = validate({"sched": {"name": "cosine", "restart_period": 50}})
    assert unread_settings(inherited, only={"sched.name"}) == []  # a later stage: only its own keys
    assert unread_settings(validate({})) == []


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("optim.name=AdamW", "did you mean adamw?"),  # was 'adam': another optimizer (L2, not decoupled decay)
        ("optim.name=SGD", "did you mean sgd?"),  # was no hint
        ("sched.name=CosineAnnealingLR", "did you mean cosine?"),
        ("aug.mixup=0.2", "did you mean 'aug.mixup_alpha'?"),  # was 'aug.mix_prob'
        ("trainer.early_stopping=3", "did you mean 'trainer.patience'?"),  # was 'trainer.max_steps'
        ("trainer.amp=true", "did you mean 'trainer.precision'?"),  # was 'trainer'
        ("data.balanced=true", "did you mean 'data.sampler'?"),  # was 'data.loader'
    ],
)
def test_a_mistyped_training_option_gets_the_right_suggestion(override: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        classlab.train(None, [override], quiet=True)
    assert hint in str(caught.value) and isinstance(caught.value, ClassLabError)


def test_resume_with_other_epochs_says_the_schedule_is_stretched() -> None:
    """`--resume epochs=4` of a finished 2-epoch cosine run: the lr, at its floor, went back up to the middle of a
    4-epoch curve, and the lines said only 'resuming with changes: epochs 2 -> 4'."""
    from classlab.train import _resume_line

    line = _resume_line(Path("last.ckpt"), 2, 4, ["epochs 2 -> 4"], "cosine")
    assert line.splitlines()[-1] == (
        "note: sched.name=cosine spans the whole run: from epoch 3 on the lr follows the 4-epoch curve, above where "
        "the 2-epoch one had it"
    )
    assert "note:" not in _resume_line(Path("last.ckpt"), 2, 4, ["epochs 2 -> 4"], "multistep")  # milestones stay
    assert "note:" not in _resume_line(Path("last.ckpt"), 2, 4, ["optim.lr 0.05 -> 0.02"], "cosine")
