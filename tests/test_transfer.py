"""Transfer from a rotation run: exactly the backbone tensors arrive, truncation and freezing do what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import classlab
from classlab.config import load_config, read_ini
from classlab.data.pipeline import load_data
from classlab.engine.trainer import build_network, init_from_line
from classlab.errors import ClassLabError, ConfigError
from classlab.models import build_model, load_backbone_weights
from classlab.run import safe_torch_load

LAYERS = "[16,p,32,p,64,p]"  # six blocks: conv, pool, conv, pool, conv, pool


def _net_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(ckpt)["state_dict"]
    return {k.removeprefix("model.net."): v for k, v in state.items() if k.startswith("model.net.")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("transfer")


@pytest.fixture(scope="module")
def rot_run(workdir: Path) -> Path:
    """A one-epoch rotation run on the embedded sample, epoch1.ckpt kept."""
    overrides = tiny_config(workdir, epochs=1, **{"data.images_per_class": 20, "model.layers": LAYERS})
    run = classlab.train(None, [*overrides, "task=rotation", "trainer.keep_every=1", "exp_name=rot"], quiet=True)
    assert (run.checkpoints / "epoch1.ckpt").is_file()
    return run.path


def _cfg(workdir: Path, *extra: str):
    return load_config(None, [*tiny_config(workdir, **{"data.images_per_class": 20, "model.layers": LAYERS}), *extra])


def test_init_from_loads_exactly_the_backbone_by_value(workdir: Path, rot_run: Path) -> None:
    cfg = _cfg(workdir, f"model.init_from={rot_run}:epoch1")
    net = build_network(cfg, load_data(cfg)).net
    source = _net_state(rot_run / "checkpoints" / "epoch1.ckpt")
    own = net.state_dict()
    backbone = [k for k in own if not k.startswith("head.")]
    assert backbone and all(torch.equal(own[k], source[k]) for k in backbone)
    # The head is new: 10 classes here, 4 rotations there.
    assert own["head.fc.weight"].shape[0] == 10 and source["head.fc.weight"].shape[0] == 4
    # And the equality is not trivial: a fresh network differs.
    scratch = build_network(_cfg(workdir), load_data(cfg)).net.state_dict()
    assert not torch.equal(scratch["blocks.0.0.weight"], source["blocks.0.0.weight"])


def test_truncation_removes_the_later_blocks_and_loads_the_kept_ones(workdir: Path, rot_run: Path) -> None:
    cfg = _cfg(workdir, "model.truncate_at=2", "model.head=conv_fc")
    net = build_model(cfg.model.spec(), 10, 3, 32)
    assert len(net.blocks) == 2
    assert net.num_features == 16 and net.head.pre[0].in_channels == 16
    assert not any(k.startswith(("blocks.2", "blocks.4")) for k in net.state_dict())
    report = load_backbone_weights(net, _net_state(rot_run / "checkpoints" / "best.ckpt"))
    assert {k.split(".")[1] for k in report["loaded"]} == {"0"}  # conv block 0 (block 1 is a pool)
    assert any(k.startswith("blocks.4.") for k in report["skipped"])  # the dropped conv
    assert report["missing"] == []

    resnet = build_model({"name": "resnet_cifar", "depth": 20, "truncate_at": 4}, 10, 3, 32)
    assert len(resnet.blocks) == 4 and resnet.num_features == 32  # 3 blocks of stage 1, the first of stage 2


def test_shape_mismatch_is_one_clear_error(rot_run: Path) -> None:
    other = build_model({"name": "cnn", "layers": [8, "p", 32, "p", 64, "p"]}, 10, 3, 32)
    with pytest.raises(ClassLabError, match=r"shape mismatch.*blocks\.0\.0\.weight") as err:
        load_backbone_weights(other, _net_state(rot_run / "checkpoints" / "best.ckpt"))
    assert "\n" not in str(err.value)


def test_linear_probe_freezes_the_backbone_bit_for_bit(workdir: Path, rot_run: Path) -> None:
    """freeze=all: weights and BatchNorm statistics of the backbone unchanged after real training steps."""
    source = _net_state(rot_run / "checkpoints" / "epoch1.ckpt")
    overrides = tiny_config(workdir, epochs=1, **{"data.images_per_class": 20, "model.layers": LAYERS})
    for head in ("linear", "conv_fc"):
        run = classlab.train(
            None,
            [
                *overrides,
                f"model.init_from={rot_run}:epoch1",
                "model.freeze=all",
                f"model.head={head}",
                f"exp_name={head}",
            ],
            quiet=True,
        )
        after = _net_state(run.checkpoint("last"))
        backbone = [k for k in after if not k.startswith("head.")]
        assert backbone and all(torch.equal(after[k], source[k]) for k in backbone), head
        assert run.summary()["status"] == "finished" and run.summary()["epochs_done"] == 1
        start = build_network(load_config(run.path / "config.yaml"), load_data(load_config(run.path / "config.yaml")))
        assert not torch.equal(start.net.state_dict()["head.fc.weight"], after["head.fc.weight"])  # the head learned


def test_fine_tune_with_up_to_freezing_and_a_smaller_backbone_lr(workdir: Path, rot_run: Path) -> None:
    source = _net_state(rot_run / "checkpoints" / "epoch1.ckpt")
    overrides = tiny_config(workdir, epochs=1, **{"data.images_per_class": 20, "model.layers": LAYERS})
    run = classlab.train(
        None,
        [
            *overrides,
            f"model.init_from={rot_run}",
            "model.freeze=up_to:1",
            "optim.backbone_lr_scale=0.1",
            "exp_name=ft",
        ],
        quiet=True,
    )
    after = _net_state(run.checkpoint("last"))
    assert torch.equal(after["blocks.0.0.weight"], source["blocks.0.0.weight"])  # frozen: block 0
    assert torch.equal(after["blocks.0.1.running_mean"], source["blocks.0.1.running_mean"])
    assert not torch.equal(after["blocks.2.0.weight"], source["blocks.2.0.weight"])  # trained
    assert run.summary()["status"] == "finished"


def test_ini_transfer_keys_map_onto_the_schema(tmp_path: Path) -> None:
    ini = tmp_path / "exp.ini"
    ini.write_text(
        "[EXP]\nexp_name = tl  # transfer learning\n[MODEL]\nmodel = efficientnet\ndepth = 0\n"
        "transfer = runs/rot:epoch5\nblock_op = 6\nno_head = true\n"
    )
    tree = read_ini(ini)
    assert tree["model"] == {
        "init_from": "runs/rot:epoch5",
        "truncate_at": 7,  # block_op is the last kept block, counted from 0 (seed 000): blocks 0..6
        "name": "efficientnet_b0",
        "head_conv": False,
    }
    cfg = load_config(ini)
    # The run folder is read from the INI's folder, as data.root is: the file finds its run from any directory.
    at = f"{(tmp_path / 'runs' / 'rot').resolve()}:epoch5"
    assert (cfg.model.init_from, cfg.model.truncate_at, cfg.model.head_conv) == (at, 7, False)


def test_init_from_says_what_it_loaded_and_refuses_to_freeze_what_it_did_not(workdir: Path, rot_run: Path) -> None:
    """A transfer that took only part of the backbone was silent; frozen, the rest stayed random for good."""
    deeper = "model.layers=[16,p,32,p,64,p,64]"  # one conv more than the rotation run has
    with pytest.raises(ConfigError) as err:
        cfg = _cfg(workdir, f"model.init_from={rot_run}", deeper, "model.freeze=all")
        build_network(cfg, load_data(cfg))
    assert str(err.value).startswith(
        f"model.init_from={rot_run}: model.freeze=all would freeze 3 tensor(s) that run's checkpoint does not hold "
        "(blocks.6.0.weight, blocks.6.1.weight, blocks.6.1.bias), leaving them random"
    )
    cfg = _cfg(workdir, f"model.init_from={rot_run}", deeper, "model.freeze=up_to:6")
    net = build_network(cfg, load_data(cfg)).net
    report = net.init_report
    assert report["task"] == "rotation" and report["checkpoint"] == "best.ckpt"
    assert report["loaded_tensors"] == 18 and "blocks.6.0.weight" in report["left"]
    assert init_from_line(report).startswith(
        f"model.init_from: rotation run {rot_run} (best.ckpt): loaded 18 backbone tensors, left 6 at their initial "
        "values: "
    )
    with pytest.raises(ClassLabError, match=rf"^model.init_from={workdir}/runs/nope: run folder .* not found"):
        cfg = _cfg(workdir, f"model.init_from={workdir}/runs/nope")
        build_network(cfg, load_data(cfg))


def test_init_from_says_when_the_source_normalised_otherwise(workdir: Path, rot_run: Path) -> None:
    """The backbone learned on inputs at the source's scale: a run on other statistics gets the values to set."""
    cfg = _cfg(workdir, f"model.init_from={rot_run}")
    assert build_network(cfg, load_data(cfg)).net.init_report["normalization_note"] is None  # same data: silent
    cfg = _cfg(workdir, f"model.init_from={rot_run}", "aug.norm_mean=[0.5,0.5,0.5]", "aug.norm_std=[0.5,0.5,0.5]")
    assert build_network(cfg, load_data(cfg)).net.init_report.get("normalization_note") is None  # set: the user's
    source = safe_torch_load(rot_run / "checkpoints" / "best.ckpt")["state_dict"]
    mean = ",".join(f"{v:.4f}" for v in source["model.normalize.mean"].flatten().tolist())
    std = ",".join(f"{v:.4f}" for v in source["model.normalize.std"].flatten().tolist())
    data = load_data(cfg)
    data.mean, data.std = data.mean * 0 + 0.9, data.std  # a much brighter data set
    net = build_network(_cfg(workdir, f"model.init_from={rot_run}"), data).net
    note = net.init_report["normalization_note"]
    assert note.startswith(f"note: model.init_from={rot_run} normalised its inputs with mean [{mean}] std [{std}]")
    assert note.endswith(f"aug.norm_mean=[{mean}] aug.norm_std=[{std}]")
    assert load_config(None, [f"aug.norm_mean=[{mean}]", f"aug.norm_std=[{std}]"]).aug.norm_std  # the fix parses


def test_force_moves_the_old_run_only_once_the_new_one_can_start(workdir: Path) -> None:
    """--force with a refused setting (class weights of a class that does not exist, early stopping without
    validation) moved the old run aside and left no run, or a half-made one, under the name."""
    overrides = tiny_config(workdir, epochs=1, **{"data.images_per_class": 20, "model.layers": LAYERS})
    old = workdir / "runs" / "kept"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"status": "finished"}')
    refused = [
        ("loss.class_weights={lion: 2.0}", r"loss.class_weights: unknown class\(es\) lion"),
        ("data.val_fraction=0", "trainer.patience needs a validation set"),
    ]
    for override, message in refused:
        with pytest.raises(ClassLabError, match=message):
            classlab.train(None, [*overrides, "exp_name=kept", "trainer.patience=2", override], force=True, quiet=True)
        assert sorted(p.name for p in old.parent.iterdir() if p.name.startswith("kept")) == ["kept"]
        assert (old / "summary.json").read_text() == '{"status": "finished"}'
    with pytest.raises(ClassLabError, match="trainer.patience needs a validation set"):
        classlab.train(None, [*overrides, "exp_name=fresh", "data.val_fraction=0", "trainer.patience=2"], quiet=True)
    assert not (workdir / "runs" / "fresh").exists()


def test_a_resumed_transfer_run_needs_its_source_no_more(workdir: Path, rot_run: Path, tmp_path: Path) -> None:
    """Before: --resume read the model.init_from run again, and stopped ('run folder not found') once it had moved,
    though last.ckpt holds every weight. The resumed run freezes what the source filled, as at its start: its
    second epoch equals that of a run never stopped."""
    import shutil

    source = Path(shutil.copytree(rot_run, tmp_path / "rot"))
    common = [f"model.init_from={source}", "model.freeze=all", "sched.name=constant", "sched.warmup_epochs=0"]
    base = tiny_config(tmp_path, **{"data.images_per_class": 20, "model.layers": LAYERS})
    straight = classlab.train(None, [*base, *common, "epochs=2", "exp_name=straight"], quiet=True)
    classlab.train(None, [*base, *common, "epochs=1", "exp_name=cut"], quiet=True)
    source.rename(tmp_path / "moved")
    resumed = classlab.train(None, [*base, *common, "epochs=2", "exp_name=cut"], resume=True, quiet=True)
    a, b = (_net_state(r.checkpoints / "last.ckpt") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    frozen = [k for k in b if not k.startswith("head.") and b[k].is_floating_point() and "running" not in k]
    start = _net_state(tmp_path / "moved" / "checkpoints" / "best.ckpt")
    assert frozen and all(torch.equal(b[k], start[k]) for k in frozen)  # the backbone stayed the source's
