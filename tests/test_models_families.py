"""Family-specific facts: published sizes, block layouts, foreign weights, timm passthrough."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from classlab.errors import ConfigError
from classlab.models import build_model, count_params, load_backbone_weights, validate_model_spec

torch.set_num_threads(1)


# Counts the model-template project printed for CIFAR-10 (32x32, 10 classes).
@pytest.mark.parametrize(
    ("name", "preset", "published"),
    [
        ("cnn", "normal_cnn", 1_183_322),
        ("residual_cnn", "residual_cnn", 1_134_026),
        ("mlp_mixer", "mixer_s4", 273_674),
        ("mlp_mixer", "mixer_s2", 1_062_026),
        ("mlp_mixer", "mixer_b4", 698_186),
        ("mlp_mixer", "mixer_b2", 1_756_106),
    ],
)
def test_template_presets_match_published_counts(name: str, preset: str, published: int) -> None:
    with torch.device("meta"):
        model = build_model({"name": name, "preset": preset}, num_classes=10, image_size=32)
    if name in ("cnn", "residual_cnn"):  # conv biases (and the residual stem without BN) as in the template
        assert count_params(model) == published
    else:  # the mixers pool tokens as the paper does, not as the template did (mixer docstring)
        assert count_params(model) == pytest.approx(published, rel=0.01)


def test_stl10_2m_fits_the_budget() -> None:
    spec = {"name": "bottleneck_resnet", "preset": "stl10_2m", "max_params": 2_000_000}
    model = build_model(spec, num_classes=10, image_size=96)
    assert 1_980_000 < count_params(model) < 2_000_000
    assert len(model.blocks) == 4 + 9 + 8
    assert isinstance(model.blocks[0].act, nn.LeakyReLU) and model.blocks[0].act.negative_slope == 0.1
    assert model.stem[0].kernel_size == (4, 4) and isinstance(model.stem[3], nn.MaxPool2d)
    assert model.num_features == 96 * 4
    # projection shortcuts exactly where the shape changes: first block of each stage
    projected = [i for i, b in enumerate(model.blocks) if not isinstance(b.downsample, nn.Identity)]
    assert projected == [0, 4, 13]


def test_bottleneck_zero_init_and_activation_errors() -> None:
    model = build_model({"name": "bottleneck_resnet", "depths": [1, 1], "widths": [8, 16]}, num_classes=3)
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.blocks)
    with pytest.raises(ConfigError, match="did you mean 'leaky_relu'"):
        build_model({"name": "bottleneck_resnet", "activation": "leaky_rel"}, num_classes=3)
    with pytest.raises(ConfigError, match="same length"):
        build_model({"name": "bottleneck_resnet", "depths": [1, 1], "widths": [8]}, num_classes=3)


def test_residual_cnn_transitions_are_parameter_free_blocks() -> None:
    model = build_model({"name": "residual_cnn", "preset": "residual_cnn"}, num_classes=10)
    assert len(model.blocks) == 9
    transitions = [i for i, b in enumerate(model.blocks) if not any(True for _ in b.parameters())]
    assert transitions == [1, 5]  # 32 -> 64 and 64 -> 128
    large = build_model({"name": "residual_cnn", "widths": [16, 32, 32], "block_size": "large"}, num_classes=2)
    assert [m.kernel_size for m in large.blocks[2].body if isinstance(m, nn.Conv2d)] == [(1, 1), (3, 3), (1, 1)]
    with pytest.raises(ConfigError, match="never decrease"):
        build_model({"name": "residual_cnn", "widths": [32, 16]}, num_classes=2)


def test_mixer_structure_and_errors() -> None:
    model = build_model({"name": "mlp_mixer", "preset": "mixer_s4"}, num_classes=10)
    assert len(model.blocks) == 6 and model.num_features == 128
    assert model.forward_map(torch.randn(2, 3, 32, 32)).shape == (2, 64, 128)  # 8x8 patches of 4x4
    cut = build_model({"name": "mlp_mixer", "preset": "mixer_s4", "truncate_at": 2, "head": "mlp"}, num_classes=10)
    assert len(cut.blocks) == 2 and cut(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="patch_size=5 does not divide data.image_size=32"):
        build_model({"name": "mlp_mixer", "patch_size": 5}, num_classes=10)
    with pytest.raises(ConfigError, match="conv_fc"):
        build_model({"name": "mlp_mixer", "head": "conv_fc"}, num_classes=10)


# -- torchvision ResNets -----------------------------------------------------------------------


def test_resnet_blocks_and_cifar_stem() -> None:
    r18 = build_model({"name": "resnet18"}, num_classes=10, image_size=64)
    assert len(r18.blocks) == 8 and isinstance(r18.stem.maxpool, nn.MaxPool2d)
    cifar = build_model({"name": "resnet18", "stem": "cifar", "truncate_at": 2}, num_classes=10)
    assert cifar.stem.conv1.kernel_size == (3, 3) and cifar.stem.conv1.stride == (1, 1)
    assert isinstance(cifar.stem.maxpool, nn.Identity)
    assert cifar.forward_map(torch.randn(1, 3, 32, 32)).shape == (1, 64, 32, 32)
    r50 = build_model({"name": "resnet50", "truncate_at": 4}, num_classes=10, image_size=64)
    assert len(r50.blocks) == 4 and r50.num_features == 512  # block 3 opens layer2 (128 x 4)


def test_resnet_loads_plain_torchvision_weights_exactly() -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    model = build_model({"name": "resnet18"}, num_classes=10)
    report = load_backbone_weights(model, tv.state_dict())
    assert torch.equal(model.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.blocks[2].conv1.weight, tv.layer2[0].conv1.weight)  # layer1 has 2 blocks
    assert torch.equal(model.blocks[7].bn2.running_var, tv.layer4[1].bn2.running_var)
    assert report["missing"] == [] and "head.fc.weight" in report["skipped"]


# -- EfficientNet ----------------------------------------------------------------------------------


def test_efficientnet_b0_blocks_neck_and_truncation() -> None:
    full = build_model({"name": "efficientnet_b0"}, num_classes=10, image_size=32)
    assert len(full.blocks) == 16 and full.num_features == 1280
    assert full.forward_map(torch.randn(2, 3, 32, 32)).shape[-2:] == (1, 1)  # total stride 32
    no_neck = build_model({"name": "efficientnet_b0", "head_conv": False}, num_classes=10, image_size=32)
    assert isinstance(no_neck.neck, nn.Identity) and no_neck.num_features == 320
    cut = build_model({"name": "efficientnet_b0", "truncate_at": 10}, num_classes=10, image_size=32)
    assert len(cut.blocks) == 10 and cut.neck.conv_head.in_channels == 112 and cut.num_features == 1280
    bare = build_model({"name": "efficientnet_b0", "truncate_at": 4, "head_conv": False}, num_classes=10, image_size=32)
    assert bare.num_features == 40
    validate_model_spec({"name": "efficientnet_b0", "truncate_at": 16})
    with pytest.raises(ConfigError, match="use 0..16"):
        validate_model_spec({"name": "efficientnet_b0", "truncate_at": 17})


def test_freeze_all_leaves_a_rebuilt_neck_trainable_until_weights_fill_it() -> None:
    """The RotNet study's "conv + fc" classifier on frozen features cut after block_op 2: the new 1x1 conv trains."""
    cut = build_model({"name": "efficientnet_b0", "truncate_at": 3, "freeze": "all"}, num_classes=10, image_size=64)
    assert not any(p.requires_grad for m in (cut.stem, cut.blocks) for p in m.parameters())
    assert all(p.requires_grad for p in cut.neck.parameters()) and cut.neck.conv_head.in_channels == 24
    cut.train()
    assert cut.neck.bn2.training and not cut.blocks[0].bn1.training
    # weights from a run truncated the same way fit the new neck: then it is frozen with the rest
    source = build_model({"name": "efficientnet_b0", "truncate_at": 3}, num_classes=4, image_size=64)
    report = load_backbone_weights(cut, source.state_dict())
    assert "neck.conv_head.weight" in report["loaded"]
    assert not any(p.requires_grad for p in cut.neck.parameters())
    assert all(p.requires_grad for p in cut.head.parameters())
    cut.train()
    assert not cut.neck.bn2.training
    # the full model's neck is the family's own (pretrained or loaded with the blocks): frozen as asked
    full = build_model({"name": "efficientnet_b0", "freeze": "all"}, num_classes=10, image_size=64)
    assert not any(p.requires_grad for p in full.neck.parameters())


def test_efficientnet_loads_timm_weights_exactly() -> None:
    import timm

    torch.manual_seed(0)
    src = timm.create_model("efficientnet_b0", pretrained=False, num_classes=1000)
    model = build_model({"name": "efficientnet_b0", "truncate_at": 5}, num_classes=10, image_size=32)
    report = load_backbone_weights(model, src.state_dict())
    assert torch.equal(model.stem.conv_stem.weight, src.conv_stem.weight)
    assert torch.equal(model.blocks[4].conv_pw.weight, src.blocks[2][1].conv_pw.weight)  # stages: 1, 2, 2, ...
    assert "neck.conv_head.weight" in report["skipped"]  # 320-channel head conv does not fit block 5
    assert "neck.bn2.weight" in report["skipped"]  # nor does its BatchNorm, though its shape would


# -- timm passthrough --------------------------------------------------------------------------------


def test_timm_passthrough_builds_freezes_and_rejects_surgery() -> None:
    model = build_model({"name": "timm:resnet10t", "freeze": "all"}, num_classes=5, in_chans=1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 5)
    assert model.forward_features(torch.randn(2, 1, 32, 32)).shape == (2, model.num_features)
    assert not any(p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    twin = copy.deepcopy(model)
    assert len(list(twin.head_parameters())) == len(list(model.head_parameters())) == 2
    import timm

    plain = timm.create_model("resnet10t", pretrained=False, num_classes=1000, in_chans=1)
    report = load_backbone_weights(twin, plain.state_dict())  # timm's own key names
    assert torch.equal(twin.model.conv1[0].weight, plain.conv1[0].weight)
    assert "model.fc.weight" not in report["loaded"] and report["missing"] == []
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet10x' \(did you mean"):
        build_model({"name": "timm:resnet10x"}, num_classes=5)
    with pytest.raises(ConfigError, match="model.truncate_at is not supported for timm:resnet10t"):
        validate_model_spec({"name": "timm:resnet10t", "truncate_at": 3})
    with pytest.raises(ConfigError, match="model.depth is not used by timm passthrough"):
        validate_model_spec({"name": "timm:resnet10t", "depth": 3})
