"""A new user's rotation pretext -> transfer -> sweep study: the defects it met, each pinned."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config
from test_sweep import _finished_point

import classlab
from classlab.config import load_config
from classlab.data.pipeline import load_data
from classlab.engine.trainer import build_network
from classlab.errors import ClassLabError, ConfigError
from classlab.models import pretrained
from classlab.sweep import name_value, plan, sweep

LAYERS = "[8,p,16,p]"  # four blocks: conv, pool, conv, pool


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("new_user_rotation")


def _overrides(workdir: Path, *extra: str) -> list[str]:
    return [*tiny_config(workdir, epochs=1, **{"data.images_per_class": 10, "model.layers": LAYERS}), *extra]


@pytest.fixture(scope="module")
def rot_run(workdir: Path) -> Path:
    """A one-epoch rotation pretext on the embedded sample, epoch1.ckpt kept."""
    run = classlab.train(None, _overrides(workdir, "task=rotation", "trainer.keep_every=1", "exp_name=rot"), quiet=True)
    return run.path


def test_init_from_a_checkpoint_file_of_a_run_is_that_run_and_checkpoint(workdir: Path, rot_run: Path) -> None:
    """Before: model.init_from=runs/rot/checkpoints/epoch1.ckpt (what tab completion gives, and what the RotNet INI's
    `transfer` named: a model file) was refused as "a file, not a run folder", with a hint about images to classify."""
    ckpt = rot_run / "checkpoints" / "epoch1.ckpt"
    cfg = load_config(None, _overrides(workdir, f"model.init_from={ckpt}"))
    assert cfg.model.init_from == f"{rot_run}:epoch1"
    report = build_network(cfg, load_data(cfg)).net.init_report
    assert (report["run"], report["checkpoint"], report["task"]) == (str(rot_run), "epoch1.ckpt", "rotation")
    assert report["loaded_tensors"] > 0 and report["left"] == []
    # A sweep over checkpoint files names its points as it names run:checkpoint values.
    assert name_value(str(ckpt)) == name_value(f"{rot_run}:epoch1") == "rot@epoch1"
    # A checkpoint copied out of its run is no run: the line says what init_from takes, and where a weights file goes.
    loose = workdir / "loose.ckpt"
    shutil.copy(ckpt, loose)
    cfg = load_config(None, _overrides(workdir, f"model.init_from={loose}"))
    with pytest.raises(ClassLabError) as info:
        build_network(cfg, load_data(cfg))
    text = str(info.value)
    assert "\n" not in text and "model.pretrained_path" in text and "runs/rot:epoch5" in text
    assert "images" not in text


def test_a_shape_mismatch_names_what_the_source_run_did_otherwise(workdir: Path, rot_run: Path) -> None:
    """Before: every mismatch said 'build the model with the same settings as the run the weights come from',
    also when the cause was the images' channels (greyscale pretext, colour data), which no model key changes."""
    cfg = load_config(None, _overrides(workdir, f"model.init_from={rot_run}", "model.layers=[8,p,32,p]"))
    data = load_data(cfg)
    with pytest.raises(ClassLabError) as info:
        build_network(cfg, data)
    assert str(info.value).endswith(
        "that run differs from this one in model.layers ([8,p,16,p] there, [8,p,32,p] here)"
    )
    cfg = load_config(None, _overrides(workdir, f"model.init_from={rot_run}"))
    with pytest.raises(ClassLabError) as info:
        build_network(cfg, dataclasses.replace(data, channels=1))  # the data a greyscale set gives
    assert "blocks.0.0.weight (checkpoint [8, 3, 3, 3] vs model [8, 1, 3, 3])" in str(info.value)
    assert str(info.value).endswith(
        "that run differs from this one in the images' channels (3 there, 1 here: no model setting changes them; "
        "pretrain on images with as many channels as this data has)"
    )


def test_a_grid_over_a_whole_section_is_one_run_per_value(tmp_path: Path) -> None:
    """Before: --grid "optim={name: sgd, lr: 0.1},{name: adam, lr: 0.001}" was refused: the two points were 'the same
    run once their values are read (optim=None)', since the config holds no key named optim, only keys under it."""
    base = [*tiny_config(tmp_path), "exp_name=sw"]
    root, points = plan(None, base, ["optim={name: sgd, lr: 0.1},{name: adam, lr: 0.001}"])
    assert [p.name for p in points] == ["optim=namesgd-lr0.1", "optim=nameadam-lr0.001"]
    _finished_point(root, points[0])
    _, again = plan(None, base, ["optim={lr: 0.1, name: sgd},{name: adam, lr: 0.001}"])  # keys in another order
    assert [(p.name, p.status) for p in again] == [
        ("optim=namesgd-lr0.1", "finished"),
        ("optim=nameadam-lr0.001", "new"),
    ]
    # Two spellings of one run are still refused, naming the keys the points gave, not all eighteen of optim's.
    with pytest.raises(ConfigError) as info:
        plan(None, base, ["optim={lr: 0.1},{name: sgd, lr: 0.1}"])
    assert str(info.value) == (
        "--grid: points optim=lr0.1 and optim=namesgd-lr0.1 are the same run once their values are read "
        "(optim={'lr': 0.1, 'name': 'sgd'}); list each value once"
    )


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ("aug.vflip=true", "aug.vflip with task=rotation: a vertical flip is the mirror image turned by 180 degrees"),
        ("aug.rotation=90", "aug.rotation=90 with task=rotation: a random turn of 45 degrees or more"),
        ("aug.rotation=45", "keep aug.rotation below 45 (0 in RotNet)"),
        ("aug.trivialaugment=true", "aug.trivialaugment with task=rotation: TrivialAugment (wide) turns images by up"),
    ],
)
def test_the_pretext_refuses_augmentations_that_turn_its_labels_into_each_other(setting: str, said: str) -> None:
    """Before: a rotation pretext with aug.vflip (0 and 180 degrees then look alike) or a random turn of 90 degrees
    trained without a word, towards an accuracy the task could no longer reach."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(None, ["task=rotation", setting])
    load_config(None, [setting])  # classify keeps them
    load_config(None, ["task=rotation", "aug.rotation=15"])  # a small turn stays within its quarter
    # torchvision's AutoAugment and RandAugment policies turn by 30 degrees at most: they stay.
    load_config(None, ["task=rotation", "aug.autoaugment=imagenet"])
    load_config(None, ["task=rotation", "aug.randaugment=[2,30]"])


def test_a_run_trained_before_the_refusal_still_loads_and_resumes(workdir: Path, rot_run: Path) -> None:
    """The refusal is for new runs: a rotation run an earlier classlab trained with aug.vflip (its config.yaml says
    so) still evaluates, predicts and resumes as it trained, not locked out by a check added after it."""
    old = workdir / "runs" / "rot_vflip"
    shutil.copytree(rot_run, old)
    (old / "config.yaml").write_text((old / "config.yaml").read_text().replace("vflip: false", "vflip: true"))
    assert classlab.load(old).cfg.aug.vflip is True
    resumed = run_cli("train", *_overrides(workdir, "exp_name=rot_vflip", "epochs=2"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert classlab.load(old).cfg.epochs == 2


def test_the_refusal_is_one_line_before_any_run_folder(tmp_path: Path) -> None:
    result = run_cli("pretrain", "rotation", *tiny_config(tmp_path), "aug.vflip=true")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "set aug.vflip=false" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_sweep_refused_for_want_of_ray_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `classlab sweep --ray local` without Ray printed its plan ('2 runs ... 2 to start'), then the error,
    and left runs/<exp>/sweep.json recording a call whose runs never started."""
    monkeypatch.setitem(sys.modules, "ray", None)
    said: list[str] = []
    with pytest.raises(ClassLabError, match="--ray needs Ray"):
        sweep(None, ["seed=0,1"], [*tiny_config(tmp_path), "exp_name=sw"], ray_address="local", say=said.append)
    assert said == [] and not (tmp_path / "runs").exists()


def test_init_from_a_folder_of_runs_names_one_run_without_the_ensemble_hint(workdir: Path, rot_run: Path) -> None:
    """Before: model.init_from=runs (run.root, a folder of runs) ended its line with "for predict/eval several of them
    with --ensemble mean", which no transfer can take."""
    cfg = load_config(None, _overrides(workdir, f"model.init_from={rot_run.parent}"))
    with pytest.raises(ClassLabError) as info:
        build_network(cfg, load_data(cfg))
    text = str(info.value)
    assert "\n" not in text and "ensemble" not in text and "predict" not in text
    assert "not one run" in text and f"model.init_from={rot_run}" in text


def test_a_run_and_its_best_checkpoint_are_one_grid_point(workdir: Path, rot_run: Path) -> None:
    """Before: --grid model.init_from=runs/rot,runs/rot:best made two folders (rot, rot@best) training one run:
    a run alone means its best checkpoint."""
    assert load_config(None, [f"model.init_from={rot_run}:best"]).model.init_from == str(rot_run)
    assert load_config(None, [f"model.init_from={rot_run}/checkpoints/best.ckpt"]).model.init_from == str(rot_run)
    assert name_value(f"{rot_run}:best") == name_value(str(rot_run)) == "rot"
    with pytest.raises(ConfigError, match="are the same run once their values are read"):
        plan(None, _overrides(workdir, "exp_name=sw_rot"), [f"model.init_from={rot_run},{rot_run}:best"])


def test_a_relative_init_from_in_a_config_file_is_read_from_its_folder(
    workdir: Path, rot_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: data.root and model.pretrained_path in a config file were read from the file's folder, but
    model.init_from from wherever the command ran: the same file found its run from one folder only."""
    configs = workdir / "configs"
    configs.mkdir(exist_ok=True)
    path = configs / "transfer.yaml"
    path.write_text(f"model:\n  init_from: {os.path.relpath(rot_run, configs)}:epoch1\n")  # ../runs/rot:epoch1
    monkeypatch.chdir(tmp_path)  # elsewhere
    assert load_config(path).model.init_from == f"{rot_run.resolve()}:epoch1"
    monkeypatch.chdir(rot_run.parent)  # an override is read from the working directory, as data.root=... is
    assert load_config(None, ["model.init_from=rot:epoch1"]).model.init_from == f"{rot_run.resolve()}:epoch1"


def test_a_failed_hub_download_prints_nothing_before_the_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before: offline with an empty cache (no HF_HUB_OFFLINE), torch printed 'Downloading: "https://..." to ...'
    before classlab's one-line error, which the README promises alone."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    spec = load_config(None, ["model.name=mobilenet_v2", "model.pretrained=true"]).model.spec()
    capfd.readouterr()
    with pytest.raises(ConfigError) as info:
        pretrained.prefetch(spec)
    assert "\n" not in str(info.value) and "download failed" in str(info.value)
    assert capfd.readouterr() == ("", "")
