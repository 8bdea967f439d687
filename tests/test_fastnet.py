"""fastnet and the parts of the fast recipe: whitening init, per-epoch hooks, decoupled groups,
the triangle schedule, scheduled lookahead, and a short run of the recipe itself."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from classlab.config import OptimSection, SchedSection, load_config
from classlab.engine.optim import ScheduledLookahead, build_optimizer, lr_factor_fn, param_groups
from classlab.models import build_model, count_params

REPO = Path(__file__).resolve().parents[1]


def test_fastnet_matches_airbench94_size_and_shapes() -> None:
    net = build_model({"name": "fastnet"}, num_classes=10)
    assert count_params(net) == 1_972_792  # airbench94's make_net94, counted the same way
    out = net(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert net.head.fc.bias is None
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert "stem.0.weight" in frozen and all(n.endswith("weight") for n in frozen)


def test_fastnet_rejects_bad_widths() -> None:
    from classlab.errors import ConfigError

    with pytest.raises(ConfigError, match="model.widths"):
        build_model({"name": "fastnet", "widths": [64, 0]}, num_classes=10)


def test_whitening_init_decorrelates_patches() -> None:
    torch.manual_seed(0)
    # correlated channels: every pixel's three values share a common part
    base = torch.randn(64, 1, 16, 16)
    images = torch.cat([base + 0.1 * torch.randn(64, 1, 16, 16) for _ in range(3)], 1)
    net = build_model({"name": "fastnet", "widths": [8, 8, 8]}, num_classes=2, image_size=16)
    net.init_from_data(images)
    w = net.stem[0].weight
    half = w.shape[0] // 2
    assert torch.allclose(w[:half], -w[half:])
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    white = patches @ w[:half].reshape(half, -1).T
    cov = white.T @ white / len(white)
    # unit variance in every direction that carries signal, and no correlation between outputs
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3
    assert torch.diag(cov)[:4].sub(1).abs().max() < 0.05


def test_whitening_bias_trains_only_in_early_epochs() -> None:
    net = build_model({"name": "fastnet", "whiten_bias_epochs": 2}, num_classes=10)
    net.set_epoch(1)
    assert net.stem[0].bias.requires_grad
    net.set_epoch(2)
    assert not net.stem[0].bias.requires_grad


def test_norm_lr_scale_keeps_decay_per_step() -> None:
    net = build_model({"name": "fastnet", "widths": [8, 8, 8]}, num_classes=10)
    cfg = OptimSection(lr=1.5, weight_decay=0.002, decay_norm_and_bias=True, norm_lr_scale=64.0)
    groups = {g["name"]: g for g in param_groups(net, cfg)}
    norm = groups["backbone_norm"]
    assert norm["lr"] == pytest.approx(96.0)
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(
        groups["backbone"]["lr"] * groups["backbone"]["weight_decay"]
    )
    bn_biases = {id(m.bias) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == bn_biases  # frozen BN scales are not trained at all
    # without the scale the groups are exactly the usual ones
    assert {g["name"] for g in param_groups(net, OptimSection())} == {"backbone", "backbone_no_decay", "head"}


def test_triangle_schedule() -> None:
    cfg = SchedSection(name="triangle", warmup_epochs=2.3, start_factor=0.2)
    f = lr_factor_fn(cfg, epochs=10, steps_per_epoch=48, min_ratio=0.07)
    assert f(0) == pytest.approx(0.2)
    assert f(110) == pytest.approx(1.0)
    assert f(479) == pytest.approx(0.07, abs=0.01)
    assert f(55) == pytest.approx(0.6)


def test_scheduled_lookahead_pulls_towards_slow_weights() -> None:
    la = ScheduledLookahead(k=5, final_alpha=0.25, total_steps=100)
    assert la.alpha(0) == 1.0
    assert la.alpha(100) == pytest.approx(0.25)
    assert la.alpha(50) == pytest.approx(1 - 0.75 * 0.125)

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.BatchNorm1d(2)

    class FakeTrainer:
        global_step = 0

    module, trainer = Holder(), FakeTrainer()
    la.on_fit_start(trainer, module)  # type: ignore[arg-type]
    with torch.no_grad():
        module.model.bias.fill_(1.0)
        module.model.running_mean.fill_(2.0)
    trainer.global_step = 50
    la.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    a = la.alpha(50)
    assert torch.allclose(module.model.bias, torch.full((2,), a))
    assert torch.allclose(module.model.running_mean, torch.full((2,), 2 * a))  # statistics averaged too
    state = la.state_dict()
    again = ScheduledLookahead(k=5, final_alpha=0.25, total_steps=100)
    again.load_state_dict(state)
    assert torch.equal(again.state_dict()["slow"]["bias"], state["slow"]["bias"])


def test_fast_config_is_airbench_in_pytorch_units() -> None:
    cfg = load_config(REPO / "configs" / "cifar10_fast.yaml")
    momentum = cfg.optim.momentum
    per_1024 = cfg.optim.lr * (1 + 1 / (1 - momentum)) / 1024 * 1024  # lr per 1024 examples (mean loss)
    assert per_1024 == pytest.approx(11.5, rel=1e-3)
    shrink = cfg.optim.lr * cfg.optim.weight_decay
    assert shrink == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / (1 - momentum))), rel=1e-3)
    assert cfg.optim.lookahead_alpha == pytest.approx(1 - 0.95**5, abs=1e-4)
    assert cfg.data.val_fraction == 0 and cfg.aug.crop_padding == 0 and cfg.aug.translate == 2
    net = build_model(cfg.model.spec(), 10)
    opt = build_optimizer(net, cfg.optim)
    assert not hasattr(opt, "_base_optimizer")  # the cubic lookahead is a callback, not timm's wrapper
    assert math.isclose(max(g["lr"] for g in opt.param_groups), 96.0, rel_tol=1e-6)


def test_fast_recipe_trains_on_small_data(color_folder: Path, tmp_path: Path) -> None:
    """The recipe end to end on tiny data: whitening from data, lookahead, TTA test in bf16."""
    import shutil

    import classlab

    data = tmp_path / "data"
    shutil.copytree(color_folder, data / "train")
    shutil.copytree(color_folder, data / "test")
    run = classlab.train(
        REPO / "configs" / "cifar10_fast.yaml",
        [
            "data.dataset=folder",
            f"data.root={data}",
            "data.image_size=16",
            "data.batch_size=32",
            "data.val_fraction=0.2",
            "model.widths=[16,32,32]",
            "epochs=3",
            "sched.warmup_epochs=1",
            f"run.root={tmp_path / 'runs'}",
            "trainer.progress=false",
        ],
        quiet=True,
    )
    summary = run.read_json("summary.json")
    assert summary["status"] == "finished"
    assert summary["test_tta"] == "flip,diagonal" and summary["test_acc_tta"] > 0.5
    assert summary["best_val_acc"] > 0.5  # three colour classes; chance is 1/3
    state = torch.load(run.checkpoint("last"), weights_only=True)
    whiten = state["state_dict"]["model.net.stem.0.weight"]
    assert torch.allclose(whiten[:12], -whiten[12:])  # set from the data, not the random start


def test_fastnet_bf16_autocast_runs() -> None:
    net = build_model({"name": "fastnet", "widths": [8, 16, 16]}, num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert net.blocks[0].conv1.weight.grad is not None


def test_alternate_flip_mirrors_each_image_every_other_epoch() -> None:
    from unittest.mock import PropertyMock, patch

    from classlab.engine.task import ClassifyTask

    cfg = load_config(REPO / "configs" / "cifar10_fast.yaml")
    assert cfg.aug.flip == "alternate"
    task = ClassifyTask(torch.nn.Identity(), cfg, 10, 32, steps_per_epoch=1)
    assert "flip" not in task.augment.names  # the random flip is replaced, not added to
    x = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    mirrored = x.flip(-1)
    first = task._alternate_flip(x)
    assert torch.equal(first, task._alternate_flip(x))  # a fixed start per image
    flipped0 = (first == mirrored).flatten(1).all(1)
    assert 0.4 < flipped0.float().mean() < 0.6
    with patch.object(ClassifyTask, "current_epoch", new_callable=PropertyMock, return_value=1):
        flipped1 = (task._alternate_flip(x) == mirrored).flatten(1).all(1)
    assert torch.equal(flipped1, ~flipped0)
