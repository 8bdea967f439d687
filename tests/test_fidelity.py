"""The keys that let a recipe do what its source did: INI meanings, normalisation, augmentation order,
crops from the original picture, template layer options, Lookahead's k, plateau cooldown, He/Kaiming init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from classlab.config import AugSection, LossSection, OptimSection, SchedSection, load_config, read_ini
from classlab.data.augment import _Draw, affine
from classlab.errors import ConfigError
from classlab.models import build_model, count_params

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# INI files of the RotNet-style project
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("block_op", "kept"), [(15, 16), (10, 11), (2, 3), (0, 1)])
def test_ini_block_op_is_an_inclusive_block_index(tmp_path: Path, block_op: int, kept: int) -> None:
    path = tmp_path / "exp.ini"
    path.write_text(f"[EXP]\nmodel = efficientnet\n[MODEL]\ndepth = 0\nblock_op = {block_op}\n")
    cfg = load_config(path)
    assert cfg.model.truncate_at == kept
    with torch.device("meta"):
        model = build_model(cfg.model.spec(), num_classes=10, image_size=64)
        full = build_model({"name": "efficientnet_b0"}, num_classes=10, image_size=64)
    assert len(model.blocks) == kept
    if block_op == 15:  # "block 15 = the same structure as EfficientNet-B0": every block, same count
        assert len(full.blocks) == 16 and count_params(model) == count_params(full)


def test_ini_block_op_must_be_an_index(tmp_path: Path) -> None:
    path = tmp_path / "exp.ini"
    path.write_text("[MODEL]\nblock_op = -1\n")
    with pytest.raises(ConfigError, match=r"block_op = -1 must be a block index"):
        read_ini(path)


@pytest.mark.parametrize(
    ("dataset", "policy"), [("cifar10", "cifar10"), ("fasion", "imagenet"), ("fashion_mnist", "imagenet")]
)
def test_ini_autoaug_true_takes_the_data_sets_policy(tmp_path: Path, dataset: str, policy: str) -> None:
    path = tmp_path / "exp.ini"
    path.write_text(f"[DATASET]\ndataset = {dataset}\nautoaug = true\n")
    assert read_ini(path)["aug"]["autoaugment"] == policy
    path.write_text("[DATASET]\nautoaug = false\n")
    assert "aug" not in read_ini(path)


def test_ini_rot_is_the_random_rotation_in_degrees(tmp_path: Path) -> None:
    """Seed 000's supervised pipeline is RandomResizedCrop, flip and RandomRotation; its INI names the last rot."""
    path = tmp_path / "exp.ini"
    path.write_text("[DATASET]\nhflip = true\nrot = 15\n")
    assert read_ini(path)["aug"] == {"flip": True, "rotation": 15}
    path.write_text("[DATASET]\nrot = true\n")
    with pytest.raises(ConfigError, match=r"rot = true: give the rotation's degrees \(rot = 15\)"):
        read_ini(path)


def test_ini_focal_criterion(tmp_path: Path) -> None:
    path = tmp_path / "exp.ini"
    path.write_text("[MODEL]\ncriterion = focal\n")
    if "name" in LossSection.model_fields:  # a classlab with loss.name maps it
        assert read_ini(path)["loss"]["name"] == "focal"
    else:
        with pytest.raises(ConfigError, match=r"criterion=focal is not supported.*lacks"):
            read_ini(path)


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule details
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "k"),
    [
        ({"name": "rangerlars"}, 6),
        ({"name": "sgd", "lookahead": True}, 5),
        ({"name": "rangerlars", "lookahead_k": 3}, 3),
    ],
)
def test_lookahead_k_defaults_to_over9000s_for_rangerlars(kwargs: dict, k: int) -> None:
    from classlab.engine.optim import build_optimizer

    opt = build_optimizer(nn.Linear(3, 2), OptimSection(**kwargs))
    assert opt.param_groups[0]["lookahead_k"] == k


def test_plateau_cooldown_reaches_torch() -> None:
    from classlab.engine.optim import build_scheduler

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = build_scheduler(
        opt, SchedSection(name="plateau", plateau_patience=0, plateau_cooldown=2), epochs=9, steps_per_epoch=1
    )["scheduler"]
    lrs = []
    for _ in range(5):
        sched.step(1.0)  # never improves: a drop, then two validations of cooldown, then the next drop
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.01, 0.001])


# ---------------------------------------------------------------------------------------------
# Models: the template's layer options, and the STL-10 project's init
# ---------------------------------------------------------------------------------------------


def test_template_layer_options() -> None:
    plain = build_model({"name": "cnn", "preset": "normal_cnn", "conv_bias": False}, num_classes=10, image_size=32)
    assert count_params(plain) == 1_182_330  # the 992 biases BatchNorm makes redundant, dropped
    no_bn = build_model({"name": "cnn", "preset": "normal_cnn", "batchnorm": False}, num_classes=10, image_size=32)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert all(m.bias is not None for m in no_bn.modules() if isinstance(m, nn.Conv2d))
    assert count_params(no_bn) == 1_183_322 - 2 * 992  # the BatchNorm scales and shifts are gone
    mlp = build_model({"name": "mlp", "activation": "leaky_relu", "layers": [16]}, num_classes=2, image_size=8)
    acts = [m for m in mlp.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 1 and acts[0].negative_slope == 0.01
    with pytest.raises(ConfigError, match="relu or leaky_relu"):
        build_model({"name": "mlp", "activation": "gelu"}, num_classes=2, image_size=8)


def test_bottleneck_kaiming_init_uses_a_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    original = nn.init.kaiming_normal_

    def spy(tensor: torch.Tensor, a: float = 0.0, **kwargs: object) -> torch.Tensor:
        seen.append(a)
        return original(tensor, a=a, **kwargs)

    monkeypatch.setattr(nn.init, "kaiming_normal_", spy)
    build_model({"name": "bottleneck_resnet", "preset": "stl10_2m"}, num_classes=10, image_size=32)
    assert seen and set(seen) == {0.0}  # the source's kaiming_normal_(nonlinearity='leaky_relu') left a at 0


# ---------------------------------------------------------------------------------------------
# Data: fixed normalisation, crops from the original picture, rotation before the crop
# ---------------------------------------------------------------------------------------------


def test_fixed_normalisation_and_original_size_crops(color_folder: Path, tmp_path: Path) -> None:
    from classlab.data.pipeline import load_data

    base = [
        "data.dataset=folder",
        f"data.root={color_folder}",
        "data.image_size=16",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    cfg = load_config(None, [*base, "aug.norm_mean=[0.5,0.5,0.5]", "aug.norm_std=[0.5,0.5,0.5]"])
    data = load_data(cfg, with_test=False)
    assert data.mean.tolist() == [0.5] * 3 and data.std.tolist() == [0.5] * 3
    assert data.train.images.shape[-1] == 16
    cfg = load_config(None, [*base, "data.train_source_size=24", "aug.random_resized_crop=[0.08,1.0]"])
    data = load_data(cfg, with_test=False)
    assert data.train.images.shape[-2:] == (24, 24) and data.val.images.shape[-2:] == (16, 16)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["aug.norm_mean=[0.5,0.5,0.5]"], "go together"),
        (["aug.norm_mean=[0.5]", "aug.norm_std=[0.5,0.5]"], "same length"),
        (["aug.norm_mean=[0.5]", "aug.norm_std=[0]"], "must be > 0"),
        (["aug.rotate_first=true", "aug.rotation=45"], "needs aug.rotation and aug.random_resized_crop"),
        (["data.train_source_size=96"], "needs aug.random_resized_crop or aug.rotation"),
    ],
)
def test_fidelity_keys_fail_in_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def _reference_rotate_then_crop(
    x: torch.Tensor, angle: float, box: tuple[int, int, int, int], size: int
) -> torch.Tensor:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    rotated = TF.rotate(x.float(), angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    top, left, h, w = box
    return TF.resized_crop(rotated, top, left, h, w, [size, size], antialias=False)


def test_rotate_first_matches_torchvisions_rotation_then_crop() -> None:
    # A smooth picture, so the two bilinear samplers agree to within rounding away from the edges.
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    x = torch.stack([xx * 5, yy * 5, (xx + yy) * 2.5]).clamp(0, 255).to(torch.uint8)[None]
    aug = AugSection(random_resized_crop=(0.3, 0.6), rotation=30, rotate_first=True)
    for seed in range(4):
        first = affine(24, aug.random_resized_crop, 30, rotate_first=True)(
            x, _Draw(torch.Generator().manual_seed(seed), x.device)
        )
        after = affine(24, aug.random_resized_crop, 30)(x, _Draw(torch.Generator().manual_seed(seed), x.device))
        # the same draws: the box first, then the angle
        from classlab.data.augment import _rrc_boxes

        draw = _Draw(torch.Generator().manual_seed(seed), x.device)
        top, left, ch, cw = (float(t) for t in _rrc_boxes(draw, 1, 48, 48, (0.3, 0.6)))
        angle = float(draw.uniform(1, low=-30, high=30))
        box = (round(top), round(left), round(ch), round(cw))
        reference = _reference_rotate_then_crop(x[0], angle, box, 24)  # torchvision's angle convention too
        error = (first[0].float() - reference).abs().mean().item()
        assert error < 1.5, (seed, angle, error)  # mean grey-level difference: the same picture
        if abs(angle) > 3:  # the old order (rotate within the crop) is a different picture
            assert (after[0].float() - reference).abs().mean().item() > 3 * error


@pytest.mark.slow  # about 30 s on the shared 2 cores
def test_a_run_with_the_source_fidelity_keys_learns(color_folder: Path, tmp_path: Path) -> None:
    import json

    import classlab
    from tests.conftest import tiny_config

    overrides = tiny_config(
        tmp_path,
        exp_name="fidelity",
        **{
            "data.dataset": "folder",
            "data.root": str(color_folder),
            "data.image_size": 16,
            "data.images_per_class": "null",
            "data.batch_size": 16,
            "data.train_source_size": 24,
            "aug.crop_padding": 0,
            "aug.random_resized_crop": "[0.5,1.0]",
            "aug.rotation": 30,
            "aug.rotate_first": "true",
            "aug.norm_mean": "[0.5,0.5,0.5]",
            "aug.norm_std": "[0.5,0.5,0.5]",
            "model.layers": "[8,p,16,p]",
            "optim.name": "rangerlars",
            "optim.lr": 0.01,
        },
    )
    run = classlab.train(None, overrides, quiet=True)
    summary = json.loads((Path(run.path) / "summary.json").read_text())
    assert summary["best_val_acc"] > 0.6  # three colour classes: chance is 1/3
    metrics = classlab.evaluate(run.path, split="val")
    assert metrics["top1"] == pytest.approx(summary["best_val_acc"], abs=1e-6)
