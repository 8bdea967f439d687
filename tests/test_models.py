"""Model registry and surgery: shapes, published sizes, and the errors users see."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from classlab.errors import ClassLabError, ConfigError
from classlab.models import (
    ClassifierNet,
    build_model,
    count_flops,
    count_params,
    list_models,
    load_backbone_weights,
    validate_model_spec,
)
from classlab.models.registry import _REGISTRY, registered_names

torch.set_num_threads(1)

# Large at their default input on a CPU: only in the slow run.
SLOW = {
    *(f"efficientnet_b{i}" for i in range(1, 8)),
    "resnet101",
    "resnet152",
    "mlp_mixer:mixer_b2",
}


def _all_models() -> list:
    params = []
    for name in registered_names():
        for preset in [None, *sorted(_REGISTRY[name].presets)]:
            key = f"{name}:{preset}" if preset else name
            marks = [pytest.mark.slow] if key in SLOW or name in SLOW else []
            params.append(pytest.param(name, preset, id=key, marks=marks))
    return params


def _spec(name: str, preset: str | None = None, **kw) -> dict:
    return {"name": name, **({"preset": preset} if preset else {}), **kw}


def _batch(model: nn.Module, size: int = 32, n: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, size, size)


# -- every model -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "preset"), _all_models())
def test_forward_backward_at_default_input(name: str, preset: str | None) -> None:
    size = _REGISTRY[name].image_size(preset)
    model = build_model(_spec(name, preset), num_classes=7, image_size=size)
    assert isinstance(model, ClassifierNet)
    x = _batch(model, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)


def test_list_models_reports_sizes_without_building_real_weights() -> None:
    rows = {(r.name, r.preset): r for r in list_models()}
    assert ("cnn", None) in rows and ("cnn", "normal_cnn") in rows
    real = build_model({"name": "resnet_cifar"}, num_classes=10)
    assert rows[("resnet_cifar", None)].params == count_params(real)
    assert rows[("resnet_cifar", None)].mflops == pytest.approx(count_flops(real, 32) / 1e6)


def test_models_pattern_searches_families_and_both_hubs(capsys: pytest.CaptureFixture[str]) -> None:
    """`classlab models mobilenet`: the names model.name takes, torchvision's and timm's included."""
    from classlab.cli import main

    assert main(["models", "MobileNet"]) == 0
    out = capsys.readouterr().out
    assert "torchvision (3): mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small" in out
    assert "timm:mobilenetv2_100" in out and "name " not in out  # no family matches: no empty table
    assert main(["models", "resnet20"]) == 0
    assert "He et al.'s ResNet-20" in capsys.readouterr().out
    assert main(["models", "zzzq"]) == 1
    assert "no model name contains 'zzzq'" in capsys.readouterr().err


# -- published sizes -----------------------------------------------------------------


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_resnet_cifar_matches_paper_param_counts(depth: int, millions: float) -> None:
    model = build_model({"name": "resnet_cifar", "depth": depth}, num_classes=10)
    assert count_params(model) == pytest.approx(millions * 1e6, rel=0.02)
    assert len(model.blocks) == 3 * (depth - 2) // 6
    by_name = build_model({"name": f"resnet{depth}"}, num_classes=10)  # the paper's names are presets
    assert count_params(by_name) == count_params(model)


def test_resnet_cifar_rejects_depth_not_6n_plus_2() -> None:
    with pytest.raises(ConfigError, match=r"model.depth must be 6n\+2 \(20, 32, 44, 56, 110\): got 21"):
        build_model({"name": "resnet_cifar", "depth": 21}, num_classes=10)


def test_resnet_cifar_option_a_shortcut_has_no_parameters() -> None:
    model = build_model({"name": "resnet_cifar", "depth": 20}, num_classes=10)
    down = model.blocks[3]  # first block of stage 2: 16 -> 32 channels, stride 2
    assert sum(p.numel() for p in down.shortcut.parameters()) == 0
    y = down.shortcut(torch.ones(1, 16, 8, 8))
    assert y.shape == (1, 32, 4, 4)
    assert y.sum() == 16 * 4 * 4  # the 16 new channels are zeros


def test_default_cnn_is_small() -> None:
    model = build_model({"name": "cnn"}, num_classes=10)
    assert 100_000 <= count_params(model) <= 300_000


def test_count_flops_counts_multiply_add_as_two() -> None:
    model = build_model({"name": "mlp", "layers": [4]}, num_classes=10, in_chans=1, image_size=2)
    # Linear 4->4 and 4->10: (16 + 40) multiply-adds.
    assert count_flops(model, image_size=2, in_chans=1) == 2 * (16 + 40)


# -- truncation and heads ---------------------------------------------------------------


def test_truncate_keeps_exactly_n_blocks_and_rebuilds_head() -> None:
    full = build_model({"name": "resnet_cifar", "depth": 20}, num_classes=10)
    cut = build_model({"name": "resnet_cifar", "depth": 20, "truncate_at": 4}, num_classes=10)
    assert len(full.blocks) == 9 and len(cut.blocks) == 4
    # blocks 0-2 are 16 channels wide, block 3 opens the 32-channel stage
    assert cut.num_features == 32 and cut.head.fc.in_features == 32
    assert cut(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    stem_only = build_model({"name": "cnn", "truncate_at": 0}, num_classes=10)
    assert len(stem_only.blocks) == 0 and stem_only.num_features == 3


def test_truncate_out_of_range_names_the_valid_range() -> None:
    with pytest.raises(ConfigError, match=r"truncate_at=10 .* 9 blocks: use 0\.\.9"):
        build_model({"name": "resnet_cifar", "truncate_at": 10}, num_classes=10)


def test_head_kinds() -> None:
    conv = build_model({"name": "cnn", "head": "conv_fc"}, num_classes=5)
    assert isinstance(conv.head.pre[0], nn.Conv2d) and conv.head.pre[0].kernel_size == (3, 3)
    assert isinstance(conv.head.pre[1], nn.BatchNorm2d)
    mlp = build_model({"name": "cnn", "head": "mlp"}, num_classes=5)
    assert [type(m) for m in mlp.head.fc] == [nn.Linear, nn.ReLU, nn.Linear]
    for model in (conv, mlp):
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ConfigError, match="conv_fc needs a convolutional feature map"):
        build_model({"name": "mlp", "head": "conv_fc"}, num_classes=5)


def test_parameter_groups_split_backbone_and_head() -> None:
    model = build_model({"name": "cnn"}, num_classes=10)
    head = {id(p) for p in model.head_parameters()}
    backbone = {id(p) for p in model.backbone_parameters()}
    assert head and backbone and not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}


# -- freezing ---------------------------------------------------------------------------


def _one_step(model: nn.Module) -> None:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()


def test_freeze_all_keeps_backbone_bit_identical() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "resnet_cifar", "freeze": "all"}, num_classes=10)
    before = copy.deepcopy(model.state_dict())
    _one_step(model)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("head."):
            continue
        assert torch.equal(value, after[key]), key  # weights and BN running stats
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    bns = [m for m in model.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_freeze_up_to_k_freezes_stem_and_first_k_blocks() -> None:
    model = build_model({"name": "resnet_cifar", "freeze": "up_to:2"}, num_classes=10)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for b in model.blocks[:2] for p in b.parameters())
    assert all(p.requires_grad for b in model.blocks[2:] for p in b.parameters())
    model.train()
    assert not model.blocks[1].bn1.training and model.blocks[2].bn1.training
    with pytest.raises(ConfigError, match="model.freeze must be"):
        build_model({"name": "cnn", "freeze": "some"}, num_classes=10)


# -- weights transfer ----------------------------------------------------------------------


def test_load_backbone_weights_copies_values_exactly_and_leaves_head() -> None:
    torch.manual_seed(1)
    source = build_model({"name": "resnet_cifar"}, num_classes=4)  # e.g. the rotation pretext
    torch.manual_seed(2)
    target = build_model({"name": "resnet_cifar"}, num_classes=10)
    head_before = target.head.fc.weight.clone()
    # Lightning-style prefix on every key must not matter.
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    report = load_backbone_weights(target, state)
    for key, value in source.state_dict().items():
        if key.startswith("head."):
            continue
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.head.fc.weight, head_before)
    assert "head.fc.weight" in report["skipped"] and "stem.0.weight" in report["loaded"]
    assert report["missing"] == []


def test_load_backbone_weights_into_truncated_model_skips_dropped_blocks() -> None:
    source = build_model({"name": "resnet_cifar"}, num_classes=4)
    target = build_model({"name": "resnet_cifar", "truncate_at": 3, "head": "conv_fc"}, num_classes=10)
    report = load_backbone_weights(target, source.state_dict())
    assert "blocks.8.conv1.weight" in report["skipped"]
    assert torch.equal(target.blocks[2].conv2.weight, source.blocks[2].conv2.weight)


def test_load_backbone_weights_lists_every_shape_mismatch() -> None:
    source = build_model({"name": "cnn", "layers": [8, "p", 16]}, num_classes=10)
    target = build_model({"name": "cnn", "layers": [12, "p", 16]}, num_classes=10)
    with pytest.raises(ClassLabError) as info:
        load_backbone_weights(target, source.state_dict())
    msg = str(info.value)
    assert "\n" not in msg
    for key in ("blocks.0.0.weight", "blocks.0.1.weight", "blocks.2.0.weight"):
        assert key in msg
    assert "[8, 3, 3, 3] vs model [12, 3, 3, 3]" in msg


def test_pretrained_loads_only_from_a_local_file(tmp_path) -> None:
    source = build_model({"name": "cnn"}, num_classes=10)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    model = build_model({"name": "cnn", "pretrained": True, "pretrained_path": str(path)}, num_classes=10)
    assert torch.equal(model.head.fc.weight, source.head.fc.weight)  # head fits: loaded too
    with pytest.raises(ClassLabError, match="not found"):
        build_model({"name": "cnn", "pretrained": True, "pretrained_path": str(tmp_path / "no.pt")}, num_classes=10)
    with pytest.raises(ConfigError, match="pretrained_path"):
        build_model({"name": "cnn", "pretrained": True}, num_classes=10)


# -- config errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (
            {"name": "resnet_cifr"},
            r"unknown model.name 'resnet_cifr' \(did you mean 'resnet_cifar'\?\).*classlab models",
        ),
        ({"name": "resnet_56"}, r"unknown model.name 'resnet_56' \(did you mean 'resnet56'\?\)"),
        ({"name": "resnet_cifar", "dpth": 20}, r"model.dpth .*'resnet_cifar' \(did you mean 'depth'\?\)"),
        ({"name": "cnn", "preset": "normal_cn"}, r"unknown model.preset 'normal_cn'.*did you mean 'normal_cnn'"),
        ({"name": "cnn", "layers": [16, "q"]}, r"model.layers entries .* got 'q'"),
        ({"name": "cnn", "head": "lin"}, r"model.head must be .*did you mean 'linear'"),
        ({"name": "cnn", "max_params": 1000}, r"model 'cnn' has 242,474 parameters, over model.max_params=1,000"),
        ({}, r"model.name is missing"),
    ],
)
def test_config_errors_are_one_line_with_a_fix(spec: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        build_model(spec, num_classes=10)
    assert "\n" not in str(info.value)


def test_validate_model_spec_is_cheap_and_catches_family_values() -> None:
    validate_model_spec({"name": "resnet_cifar", "depth": 110, "truncate_at": 54, "freeze": "up_to:3"})
    with pytest.raises(ConfigError, match="6n"):
        validate_model_spec({"name": "resnet_cifar", "depth": 21})
    with pytest.raises(ConfigError, match="truncate_at=55"):
        validate_model_spec({"name": "resnet_cifar", "depth": 110, "truncate_at": 55})
    with pytest.raises(ConfigError, match="max_params"):
        validate_model_spec({"name": "cnn", "max_params": 10}, num_classes=10)
    validate_model_spec({"name": "cnn", "max_params": 10})  # no class count: budget not checked
    # Eight poolings need more than 32 pixels: only an error once the input size is known.
    deep = {"name": "cnn", "layers": [8, "p"] * 8}
    validate_model_spec(deep)
    with pytest.raises(ConfigError, match="cannot be built for 3x32x32"):
        validate_model_spec(deep, image_size=32)


def test_torchvision_and_timm_weights_map_onto_our_layout() -> None:
    """Weights saved from plain torchvision / timm models load key for key (``convert_state_dict``)."""
    import timm
    import torchvision

    cases = [
        ("resnet18", torchvision.models.resnet18(weights=None, num_classes=7)),
        ("efficientnet_b0", timm.create_model("efficientnet_b0", pretrained=False, num_classes=7)),
    ]
    for name, foreign in cases:
        ours = build_model({"name": name}, num_classes=7)
        state = foreign.state_dict()
        converted = ours.convert_state_dict(state)
        assert len(converted) == len(state)
        ours.load_state_dict(converted, strict=True)  # every key has a place, every place a key
        for key, value in converted.items():
            assert torch.equal(ours.state_dict()[key], value), f"{name}: {key}"
