"""The shipped recipes: each validates, builds at its own input size, and keeps the structure its header promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from classlab.config import Config, load_config, stage_config
from classlab.models import build_model, count_params
from classlab.train import coerce_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


CLASSES = {"cifar10": 10, "stl10": 10, "sample": 10, "cifar100": 100}


def _forward_shape(cfg: Config) -> tuple[int, ...]:
    """The logits' shape for two images at the recipe's input size, computed on the meta device (no memory)."""
    size = cfg.data.image_size or 32
    # Shapes only: no weights are fetched (a recipe with pretrained: true would download them).
    spec = {k: v for k, v in cfg.model.spec().items() if k not in ("pretrained", "pretrained_path", "weights")}
    with torch.device("meta"):
        model = build_model(spec, CLASSES.get(cfg.data.dataset, 10), 3, size)
        return tuple(model(torch.zeros(2, 3, size, size)).shape)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_builds_and_says_how_to_run_it(path: Path) -> None:
    cfg = coerce_config(path)  # the model keys too, as `classlab train` checks them
    stages = [stage_config(cfg, k) for k in range(len(cfg.stages or []))] or [cfg]
    for stage in stages:
        assert _forward_shape(stage) == (2, CLASSES.get(stage.data.dataset, 10))
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert "classlab " in header or "benchmarks/" in header, f"{path.name}: its header gives no command"


def test_resnet32_recipe_is_he_et_al() -> None:
    cfg = load_config(CONFIGS / "cifar10_resnet32.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.data.batch_size) == (0.1, 0.9, 1e-4, 128)
    steps_per_epoch = 45_000 // 128
    assert [round(m * steps_per_epoch) for m in cfg.sched.milestones] == [32_000, 48_000]
    assert abs(cfg.epochs * steps_per_epoch - 64_000) < steps_per_epoch
    assert cfg.aug.mean_subtraction == "pixel" and cfg.optim.decay_norm_and_bias
    params = count_params(build_model(cfg.model.spec(), 10, 3, 32))
    assert abs(params - 0.46e6) / 0.46e6 < 0.02


def test_stl10_recipe_two_stages_under_2m() -> None:
    cfg = load_config(CONFIGS / "stl10_2m.yaml")
    first, second = stage_config(cfg, 0), stage_config(cfg, 1)
    assert (first.data.image_size, first.epochs) == (70, 300)
    assert (second.data.image_size, second.epochs) == (120, 140)
    assert cfg.sched.name == "restarts" and cfg.sched.restart_decay < 1
    assert cfg.aug.vflip and cfg.aug.rotation == 45 and cfg.data.images_per_class is None
    # the source's torchvision pipeline: RandomRotation(45) then RandomResizedCrop(70) at its default scale,
    # cut from the 96 px original
    assert cfg.aug.rotate_first and cfg.aug.random_resized_crop == (0.08, 1.0) and cfg.data.train_source_size == 96
    assert cfg.data.val_fraction == 0.2  # the source's 4,000 / 1,000 split, where its 84% was measured
    params = count_params(build_model(cfg.model.spec(), 10, 3, 70))
    assert params <= 2_000_000 and params > 1_990_000


PUBLISHED = {
    "normal_cnn": 1_183_322,
    "residual_cnn": 1_134_026,
    "mixer_s4": 273_674,
    "mixer_s2": 1_062_026,
    "mixer_b4": 698_186,
    "mixer_b2": 1_756_106,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_template_compare_models_match_published_counts(name: str) -> None:
    cfg = load_config(CONFIGS / "cifar10_template_compare.yaml", [f"model.name={name}"])
    params = count_params(build_model(cfg.model.spec(), 10, 3, 32))
    if name in ("normal_cnn", "residual_cnn"):
        assert params == PUBLISHED[name]  # the template's layers, conv biases included
    else:
        assert abs(params - PUBLISHED[name]) / PUBLISHED[name] < 0.01  # mixers: token pooling as in the paper


def test_template_compare_is_the_sources_setup() -> None:
    cfg = load_config(CONFIGS / "cifar10_template_compare.yaml")
    assert cfg.epochs == 600 and cfg.data.val_fraction == 0.0 and cfg.data.batch_size == 500
    assert cfg.aug.crop_padding == 0 and cfg.aug.flip is False and cfg.aug.random_resized_crop is None
    assert cfg.aug.norm_mean == [0.5] * 3 and cfg.aug.norm_std == [0.5] * 3
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-3, 1e-4)
    assert cfg.optim.decay_norm_and_bias and cfg.trainer.clip_grad == 1.0 and cfg.sched.name == "constant"


def test_resnet32_seed_variant() -> None:
    cfg = load_config(CONFIGS / "cifar10_resnet32_seed.yaml")
    assert cfg.data.val_fraction == 0.0 and cfg.sched.milestones == [82, 123] and cfg.aug.autoaugment == "cifar10"
    assert cfg.aug.norm_std == [1.0, 1.0, 1.0] and cfg.epochs == 239 and cfg.optim.decay_norm_and_bias


def test_efficientnet_fewshot_is_the_sources_setup() -> None:
    cfg = load_config(CONFIGS / "efficientnet_b0_fewshot.yaml")
    assert cfg.aug.random_resized_crop == (0.08, 1.0) and cfg.aug.flip is True and cfg.aug.rotation > 0
    assert cfg.aug.crop_padding == 0 and cfg.optim.name == "rangerlars" and cfg.optim.lr == 1e-3
    assert cfg.sched.name == "cosine" and cfg.sched.min_lr == 0.0 and cfg.data.batch_size == 64
    header = (CONFIGS / "efficientnet_b0_fewshot.yaml").read_text()
    assert "published 60" not in header and "gives NO epoch count" in header
    # the equal-steps grid in the header gives every N the same number of optimizer steps (within one epoch's)
    grid = header.split('"data.images_per_class,epochs,trainer.val_every=')[1].split('"')[0]
    points = [tuple(int(v) for v in p.strip("[]").split(",")) for p in grid.split("],[")]
    steps = [epochs * (10 * n // 64 if 10 * n > 64 else 1) for n, epochs, _ in points]  # drop_last batches of 64
    assert len(points) == 8 and max(steps) - min(steps) <= 10, steps
