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


# ---------------------------------------------------------------------------------------------
# Settings that did something twice, or said what was not so
# ---------------------------------------------------------------------------------------------


def test_balanced_class_weights_beside_a_balanced_sampler_are_named() -> None:
    """loss.class_weights=balanced with data.sampler=balanced corrected the imbalance twice (the sampler already
    draws every class equally often, the weights then tilted the loss to the rare classes), without a word."""
    both = validate({"data": {"sampler": "balanced"}, "loss": {"class_weights": "balanced"}})
    assert unread_settings(both) == [
        "note: loss.class_weights=balanced with data.sampler=balanced corrects the class imbalance twice: the "
        "sampler already draws every class equally often, so the weights then favour the rare classes over the "
        "common ones; keep one: data.sampler=balanced (rare images drawn more often) or loss.class_weights=balanced "
        "(every image once an epoch, rare classes weighted up)"
    ]
    assert unread_settings(both, only={"epochs"}) == []  # a later stage inheriting both: said once, at the start
    assert unread_settings(validate({"data": {"sampler": "balanced"}})) == []
    assert unread_settings(validate({"loss": {"class_weights": "balanced"}})) == []
    chosen = validate({"data": {"sampler": "balanced"}, "loss": {"class_weights": {"cat": 2.0}}})
    assert unread_settings(chosen) == []  # weights of one's own choosing: a deliberate tilt


@pytest.mark.parametrize("asked", [True, False])
def test_rangerlars_with_the_cubic_schedule_has_one_lookahead(asked: bool) -> None:
    """optim.name=rangerlars (RAdam + LARS in Lookahead, as over9000's RangerLars the RotNet-style project used) with
    optim.lookahead=true and lookahead_schedule=cubic took timm's Lookahead *and* the cubic callback: two
    Lookaheads pulling the same weights. Without lookahead=true the cubic schedule was left unread, no word said.
    Now rangerlars always has one Lookahead, and the schedule picks which."""
    from classlab.engine.optim import ScheduledLookahead, build_optimizer
    from classlab.engine.trainer import _checkpoint_callbacks

    cubic = validate({"optim": {"name": "rangerlars", "lookahead": asked, "lookahead_schedule": "cubic"}})
    assert not hasattr(build_optimizer(torch.nn.Linear(3, 2), cubic.optim), "_base_optimizer")  # no timm wrapper
    (callback,) = [c for c in _checkpoint_callbacks(cubic, None, False, 10) if isinstance(c, ScheduledLookahead)]
    assert callback.k == 6 and callback.total == cubic.epochs * 10  # over9000's k, the whole run
    assert unread_settings(cubic) == []
    constant = validate({"optim": {"name": "rangerlars", "lookahead": asked}})
    assert build_optimizer(torch.nn.Linear(3, 2), constant.optim).param_groups[0]["lookahead_k"] == 6
    assert not [c for c in _checkpoint_callbacks(constant, None, False, 10) if isinstance(c, ScheduledLookahead)]
    plain = validate({"optim": {"name": "sgd", "lookahead_schedule": "cubic"}})
    assert unread_settings(plain) == [
        "note: optim.lookahead_schedule=cubic has no effect: Lookahead is off (set optim.lookahead=true)"
    ]
    from classlab.engine.optim import lookahead_schedule

    assert (lookahead_schedule(cubic.optim), lookahead_schedule(plain.optim)) == ("cubic", None)


def test_two_augmentation_policies_at_once_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """aug.autoaugment, aug.randaugment and aug.trivialaugment were all taken at once and ran one after the other
    on every image (no recipe, classlab's or a source project's, stacks them)."""
    both = ("aug.autoaugment=cifar10", "aug.randaugment=[2,9]")
    code, _, err = cli(capsys, "train", *small_run(tmp_path, exp_name="policies"), *both)
    assert code == 2 and error_lines(err) == [
        "error: aug.autoaugment=cifar10 and aug.randaugment=[2,9] are each a whole augmentation policy, and would "
        "run one after the other on every image; keep one of them, e.g. aug.autoaugment=cifar10 alone with "
        "aug.randaugment=null"
    ]
    assert not (tmp_path / "runs" / "policies").exists()
    with pytest.raises(ConfigError, match=r"^aug.randaugment=\[2,9\] and aug.trivialaugment=true are each a whole"):
        validate({"aug": {"randaugment": [2, 9], "trivialaugment": True}})
    with pytest.raises(ConfigError, match=r"alone with aug.randaugment=null aug.trivialaugment=false$"):
        validate({"aug": {"autoaugment": "svhn", "randaugment": [2, 9], "trivialaugment": True}})
    assert validate({"aug": {"trivialaugment": True}}).aug.trivialaugment


def test_ini_choice_values_are_read_in_any_case(tmp_path: Path) -> None:
    """An INI's `optim = RangerLars` or `scheduler = Cosine` was refused for its case ('allowed: sgd, ...') while
    `criterion = CrossEntropy` and `model = EfficientNet` were lowercased: the INI's names are read in any case.
    A YAML key keeps its one spelling and its error names it."""
    from classlab.config import load_config

    path = tmp_path / "old.ini"
    path.write_text(
        "[EXP]\nmodel = EfficientNet\n[DATASET]\ndataset = CIFAR10\nautoaug = CIFAR10\n"
        "[MODEL]\ndepth = 0\noptim = RangerLars\nscheduler = Cosine\ncriterion = Focal\n"
    )
    cfg = load_config(path)
    assert (cfg.optim.name, cfg.sched.name, cfg.loss.name) == ("rangerlars", "cosine", "focal")
    assert (cfg.data.dataset, cfg.aug.autoaugment, cfg.model.name) == ("cifar10", "cifar10", "efficientnet_b0")
    path.write_text("[MODEL]\nscheduler = ReduceLR\n")
    assert load_config(path).sched.name == "plateau"
    with pytest.raises(ConfigError, match="allowed: 'sgd', .*; did you mean rangerlars"):
        load_config(None, ["optim.name=RangerLars"])


def test_resume_says_mid_epoch_only_of_a_checkpoint_written_mid_epoch(tmp_path: Path) -> None:
    """Every --resume said '(... epochs done; a checkpoint written mid-epoch goes on with its next batch)', of
    checkpoints written at an epoch's end too. It says where the run picks up: the next batch only where a stop
    wrote the checkpoint between two batches (its classlab.batches_done)."""
    from classlab.run import RunFolder
    from classlab.train import _resume_line

    assert _resume_line(Path("last.ckpt"), 2, 4, []) == "resuming from checkpoints/last.ckpt (2 of 4 epochs done)"
    assert _resume_line(Path("last.ckpt"), 2, 4, [], batches_done=5) == (
        "resuming from checkpoints/last.ckpt (2 of 4 epochs done, and 5 batch(es) of epoch 3: it goes on with batch 6)"
    )
    run = RunFolder(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {}, "classlab": {"epochs_done": 1}}, run.checkpoint_path("last"))
    assert run.resume_checkpoint() == (run.checkpoint_path("last"), 1, 0)
    torch.save({"state_dict": {}, "classlab": {"epochs_done": 1, "batches_done": 3}}, run.checkpoint_path("last"))
    assert run.resume_checkpoint() == (run.checkpoint_path("last"), 1, 3)


def _write_idx(path: Path, array: object) -> None:
    """torchvision's MNIST file format: a big-endian header, then the raw uint8 values."""
    import numpy as np

    values = np.asarray(array)
    header = np.array([2049 if values.ndim == 1 else 2051, *values.shape], dtype=">i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + values.astype(np.uint8).tobytes())


def test_export_of_a_greyscale_run_says_one_channel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`classlab export` of an MNIST run said 'float32 NCHW RGB in [0, 1]': the file takes one channel, and a
    deployer who fed it RGB got a shape error. The line says the run's own channels, as the file's metadata does."""
    import numpy as np

    rng = np.random.default_rng(0)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    for prefix, n in (("train", 100), ("t10k", 20)):
        labels = np.arange(n) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    grey = {"data.dataset": "mnist", "data.root": tmp_path / "mnist", "data.images_per_class": 8, "epochs": 1}
    run = classlab.train(None, small_run(tmp_path, exp_name="grey", **grey), quiet=True).path
    code, out, err = cli(capsys, "export", str(run), "--format", "pt2")
    assert code == 0, err
    assert f"wrote {run / 'export' / 'model.pt2'} (float32 NCHW greyscale (1 channel) in [0, 1], dynamic batch" in out
    from classlab.export import input_layout

    assert input_layout(3) == "float32 NCHW RGB in [0, 1]"


def test_a_training_loss_far_above_chance_says_the_lr_may_be_too_high(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """optim.lr=100 on the sample: finite training losses of 1e12 and more, and the run 'finished' at chance
    without a word. The first epoch whose mean training loss is over 20 times an even guess's (ln 10 = 2.30 here)
    says so, once, and summary.json keeps it; an ordinary run says nothing of the kind."""
    code, out, err = cli(capsys, "train", *small_run(tmp_path, exp_name="hot", **{"optim.lr": 100}))
    assert code == 0, err
    notes = [line for line in out.splitlines() if "training loss" in line]
    assert len(notes) == 1 and notes[0].startswith("note: epoch 1's mean training loss "), out
    assert notes[0].endswith(
        "is over 20x the 2.30 of an even guess over 10 classes: the weights are blowing up; optim.lr may be too high "
        "(try a tenth of it)"
    )
    assert _summary(tmp_path / "runs" / "hot")["training_loss_note"] == notes[0].removeprefix("note: ")
    code, out, err = cli(capsys, "train", *small_run(tmp_path, exp_name="mild", **{"sched.warmup_epochs": 1}))
    assert code == 0 and "training loss" not in out and "training_loss_note" not in _summary(tmp_path / "runs" / "mild")
    from classlab.engine.callbacks import loss_blowup_note

    assert loss_blowup_note(46.0, 10, 1) is None and loss_blowup_note(47.0, 10, 1) is not None
    assert loss_blowup_note(19.0, 2, 1) is None  # ln 2 < 1: the bar is 20, not 14


def test_a_run_stopped_by_max_steps_says_why_nothing_was_scored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: trainer.max_steps ending the run mid-epoch (validation runs at an epoch's end) finished with "no
    validation or test images to score" beside a split of several validation images."""
    for name, color in (("red", (220, 40, 40)), ("blue", (40, 60, 220))):
        for i in range(12):
            make_image(tmp_path / "photos" / name / f"{i}.png", color, size=16)
    args = [f"data.root={tmp_path / 'photos'}", "data.dataset=folder", "data.batch_size=4", "data.image_size=16"]
    code, out, err = cli(capsys, "train", *small_run(tmp_path, **{"data.images_per_class": "null"}), *args,
                         "trainer.max_steps=2", "exp_name=steps")  # fmt: skip
    assert code == 0, err
    assert "finished in" in out and "trainer.max_steps=2 stopped it before an epoch ended, so its " in out, out
    assert "validation images were never scored" in out
