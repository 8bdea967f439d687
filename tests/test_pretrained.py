"""Pretrained weights: three key layouts load key for key, wrong files and offline hubs stop with one line,
the weights' preprocessing is what the run saves and uses, and unfreeze_at_epoch keeps the backbone fixed until then.

No test reaches a network: hub downloads are tried only against an empty cache with HF_HUB_OFFLINE=1
or an unreachable proxy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import classlab
from classlab.config import load_config
from classlab.data.preprocess import image_to_tensor, open_image
from classlab.errors import ClassLabError, ConfigError
from classlab.models import build_model
from classlab.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, configure
from classlab.run import safe_torch_load
from tests.conftest import class_folder, run_cli


def _same_logits(source: torch.nn.Module, ours: torch.nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), source.eval()(x), rtol=1e-4, atol=1e-4)


def _randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial running statistics, so a BatchNorm that did not load would show in the logits."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# -- the three layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_layout_loads_key_for_key(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    source = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=4))
    path = _save(source.state_dict(), tmp_path / f"mnv2{suffix}")
    ours = build_model({"name": "mobilenet_v2", "pretrained_path": str(path)}, num_classes=4)
    report = ours.pretrained_report
    assert (report.loaded, report.left, report.layout) == (len(source.state_dict()), [], "classlab")
    _same_logits(source, ours, 64)


def test_torchvision_resnet_layout_maps_onto_the_resnet_family(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _randomise_bn(torchvision.models.resnet18(num_classes=1000))
    path = _save(source.state_dict(), tmp_path / "resnet18.pt")
    ours = build_model({"name": "resnet18", "pretrained_path": str(path)}, num_classes=3)
    report = ours.pretrained_report
    # Every tensor but the classifier (1,000 ImageNet classes vs 3) is loaded; the classifier is named.
    assert report.layout == "torchvision/timm"
    assert report.loaded == len(source.state_dict()) - 2
    assert report.left == ["head.fc.bias", "head.fc.weight"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_features(x), source.eval().avgpool(_trunk(source, x)).flatten(1))


def _trunk(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
    return x


def test_timm_layout_loads_key_for_key(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _randomise_bn(timm.create_model("efficientnet_b0", pretrained=False, num_classes=6))
    path = _save(source.state_dict(), tmp_path / "effb0_timm.safetensors")
    ours = build_model({"name": "efficientnet_b0", "pretrained_path": str(path)}, num_classes=6)
    assert (ours.pretrained_report.loaded, ours.pretrained_report.left) == (len(source.state_dict()), [])
    _same_logits(source, ours, 64)
    # timm:<name> takes the same file as it is.
    passthrough = build_model({"name": "timm:efficientnet_b0", "pretrained_path": str(path)}, num_classes=6)
    assert passthrough.pretrained_report.left == []
    _same_logits(source, passthrough, 64)


def test_efficientnet_pytorch_layout_loads_key_for_key(tmp_path: Path) -> None:
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    source = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0", num_classes=5)
    _randomise_bn(source)
    path = _save(source.state_dict(), tmp_path / "effb0_lukemelas.pth")
    # tf_same: the TensorFlow padding and BatchNorm eps these weights were trained with.
    ours = build_model({"name": "efficientnet_b0", "tf_same": True, "pretrained_path": str(path)}, num_classes=5)
    report = ours.pretrained_report
    assert (report.layout, report.loaded, report.left, report.notes) == (
        "efficientnet_pytorch",
        len(source.state_dict()),
        [],
        [],
    )
    _same_logits(source, ours, 64)
    plain = build_model({"name": "efficientnet_b0", "pretrained_path": str(path)}, num_classes=5)
    assert "model.tf_same=true" in plain.pretrained_report.notes[0]


# -- refusals: one line each -----------------------------------------------------------------------


def test_file_for_another_architecture_is_one_line_naming_tensors(tmp_path: Path) -> None:
    path = _save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ClassLabError) as err:
        build_model({"name": "resnet18", "pretrained_path": str(path)}, num_classes=10)
    text = str(err.value)
    assert "\n" not in text
    assert "resnet34.pth" in text and "do not match by name and shape" in text and "set model.name" in text
    with pytest.raises(ClassLabError, match=r"does not fit model 'mobilenet_v2'.*model\.features\.0\.0\.weight"):
        build_model({"name": "mobilenet_v2", "pretrained_path": str(path)}, num_classes=10)


def test_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=3), path)  # the module object, not a state dict
    with pytest.raises(ClassLabError, match="weights_only"):
        build_model({"name": "mobilenet_v2", "pretrained_path": str(path)}, num_classes=3)


def test_contradictory_weight_keys_fail_at_config_time(tmp_path: Path) -> None:
    # Model keys are checked where models are built (as `classlab train` does), before any data is read.
    from classlab.train import coerce_config

    with pytest.raises(ConfigError, match="contradicts"):
        coerce_config(None, ["model.name=mobilenet_v2", "model.pretrained=false", "model.pretrained_path=x.pth"])
    with pytest.raises(ConfigError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        coerce_config(None, ["model.name=mobilenet_v2", "model.pretrained=true", "model.weights=V3"])
    with pytest.raises(ConfigError, match="no published pretrained weights"):
        coerce_config(None, ["model.name=cnn", "model.pretrained=true"])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return class_folder(tmp_path / "photos", {"red": (220, 40, 40), "blue": (40, 60, 220)}, 12, 40, ".jpg")


def _train_args(photos: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"data.root={photos}",
        "data.dataset=folder",
        f"run.root={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=32",
        "epochs=1",
        "trainer.progress=false",
        *extra,
    ]


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_wrong_architecture_file_exits_2_before_a_run_folder(photos: Path, tmp_path: Path) -> None:
    path = _save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18.pth")
    result = run_cli(*_train_args(photos, tmp_path, "model.name=mobilenet_v2", f"model.pretrained_path={path}"))
    line = _one_error_line(result)
    assert "resnet18.pth" in line and "mobilenet_v2" in line and "model.features." in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("name", "env"),
    [
        ("mobilenet_v2", {"HF_HUB_OFFLINE": "1"}),
        # No offline flag: the download itself fails (a proxy nobody listens on), no real network is reached.
        ("mobilenet_v2", {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}),
        ("timm:resnet18.a1_in1k", {"HF_HUB_OFFLINE": "1"}),
    ],
)
def test_offline_pretrained_is_one_line_exit_2_no_run_folder(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, env: dict[str, str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty caches
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_cli(*_train_args(photos, tmp_path, f"model.name={name}", "model.pretrained=true"))
    line = _one_error_line(result)
    cache = tmp_path / ("torch_home/hub/checkpoints" if name == "mobilenet_v2" else "hf_home/hub")
    assert f"model '{name}'" in line and str(cache) in line and "model.pretrained_path" in line
    assert ("HF_HUB_OFFLINE=1" in line) == ("HF_HUB_OFFLINE" in env)
    assert not (tmp_path / "runs").exists()


# -- the weights' preprocessing --------------------------------------------------------------------


def test_image_size_defaults_to_the_weights_input_size(tmp_path: Path) -> None:
    cfg = configure(load_config(None, ["model.name=mobilenet_v2", "model.pretrained_path=/nowhere/x.pth"]))
    assert cfg.data.image_size == 224
    cfg = configure(load_config(None, ["model.name=mobilenet_v2", "model.pretrained_path=x.pth", "data.image_size=96"]))
    assert cfg.data.image_size == 96  # set by the user: kept
    # timm's pretrained_cfg decides for timm weights (metadata only, nothing downloaded).
    cfg = load_config(None, ["model.name=timm:vit_tiny_patch16_384.augreg_in21k_ft_in1k", "model.pretrained=true"])
    from classlab.models.pretrained import preprocessing

    prep = preprocessing(cfg.model.spec())
    assert (prep.input_size, prep.mean, prep.std) == (384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert preprocessing({"name": "timm:vit_tiny_patch16_384.augreg_in21k_ft_in1k"}) is None  # no weights


def test_run_saves_the_weights_normalisation_and_predict_export_use_it(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = _save(torchvision.models.mobilenet_v2(num_classes=1000).state_dict(), tmp_path / "mnv2.pth")
    run = classlab.train(
        None,
        _train_args(photos, tmp_path, "model.name=mobilenet_v2", f"model.pretrained_path={path}")[1:],
        quiet=True,
    )
    state = safe_torch_load(run.checkpoint("best"))["state_dict"]
    torch.testing.assert_close(state["model.normalize.mean"].flatten(), torch.tensor(IMAGENET_MEAN))
    torch.testing.assert_close(state["model.normalize.std"].flatten(), torch.tensor(IMAGENET_STD))
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["pretrained"]["file"] == "mnv2.pth"
    assert summary["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert summary["pretrained"]["left"] == ["model.classifier.1.bias", "model.classifier.1.weight"]
    assert summary["params_trainable"] == summary["params"]

    # predict: the loaded model normalises with ImageNet's statistics, and its probabilities are those
    # of the network on (x / 255 - mean) / std.
    loaded = classlab.load(run.path)
    image = sorted((photos / "red").iterdir())[0]
    preds = classlab.predict(run.path, [image], keep_rows=True)
    x = image_to_tensor(open_image(image, 32), 32)[None].float() / 255  # the one preprocessing path: resize, crop
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        by_hand = loaded.model.net((x - mean) / std)
    p = by_hand.softmax(1)[0]
    top = loaded.classes[int(p.argmax())]
    assert preds[0]["class"] == top and abs(preds[0]["prob"] - float(p.max())) < 1e-4

    # export: the ONNX graph carries the same normalisation (same outputs as the torch model).
    ort = pytest.importorskip("onnxruntime")
    from classlab.export import export

    onnx_path = export(run.path, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), by_hand, rtol=1e-3, atol=1e-3)


# -- unfreeze_at_epoch ------------------------------------------------------------------------------


def test_unfreeze_at_epoch_keeps_backbone_bit_identical_until_then(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    donor = _randomise_bn(build_model({"name": "cnn", "layers": [8, "p", 16, "p"]}, num_classes=2, image_size=32))
    path = _save(donor.state_dict(), tmp_path / "donor.pt")
    args = _train_args(
        photos,
        tmp_path,
        "model.layers=[8,p,16,p]",
        f"model.pretrained_path={path}",
        "model.unfreeze_at_epoch=1",
        "epochs=2",
        "trainer.keep_every=1",
        "data.batch_size=8",
        "optim.lr=0.1",
    )
    run = classlab.train(None, args[1:], quiet=True)
    reference = donor.state_dict()

    def net(name: str) -> dict[str, torch.Tensor]:
        state = safe_torch_load(run.checkpoints / name)["state_dict"]
        return {k.removeprefix("model.net."): v for k, v in state.items() if k.startswith("model.net.")}

    first, second = net("epoch1.ckpt"), net("epoch2.ckpt")
    backbone = [k for k in reference if not k.startswith("head.")]
    assert backbone
    for key in backbone:  # parameters and BatchNorm statistics alike
        assert torch.equal(first[key], reference[key]), key
    assert not torch.equal(first["head.fc.weight"], reference["head.fc.weight"])  # the head trained
    changed = [k for k in backbone if k.endswith("weight") and not torch.equal(second[k], reference[k])]
    assert len(changed) == len([k for k in backbone if k.endswith("weight")])
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["params_trainable"] == donor.head.fc.weight.numel() + donor.head.fc.bias.numel()


def test_first_lines_print_total_and_trainable_parameters(photos: Path, tmp_path: Path) -> None:
    result = run_cli(*_train_args(photos, tmp_path, "model.layers=[8,p,16,p]", "model.freeze=all"))
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert "parameters, 34 trainable" in first, first  # 16 features x 2 classes + 2 biases


def test_hub_weights_come_from_the_torch_cache(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained: true`` reads torchvision's cache: a file placed there under the URL's name is what loads."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    cached = home / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    source = torchvision.models.mobilenet_v2(num_classes=1000)
    torch.save(source.state_dict(), cached)
    from classlab.models import pretrained

    pretrained.fetch.cache_clear()
    ours = build_model({"name": "mobilenet_v2", "pretrained": True, "weights": "IMAGENET1K_V1"}, num_classes=1000)
    pretrained.fetch.cache_clear()
    assert ours.pretrained_report.source == "torchvision MobileNet_V2_Weights.IMAGENET1K_V1"
    assert ours.pretrained_report.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    _same_logits(source, ours, 64)


# -- real ImageNet weights on real photos (slow) ------------------------------------------------------

SHARED = Path(os.environ.get("CLASSLAB_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FLOWERS = SHARED / "data" / "flowers5"
MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet.pth"


@pytest.mark.slow
@pytest.mark.skipif(not (FLOWERS.is_dir() and MOBILENET.is_file()), reason="needs ../shared (flowers5, weights)")
def test_flowers_finetune_beats_scratch_by_a_wide_margin(tmp_path: Path) -> None:
    import shutil

    subset = tmp_path / "flowers"
    for class_dir in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        (subset / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:100]:
            shutil.copyfile(f, subset / class_dir.name / f.name)
    recipe = Path(__file__).resolve().parents[1] / "configs" / "photos_finetune.yaml"
    common = [
        f"data.root={subset}",
        f"run.root={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.image_size=112",
        "data.batch_size=32",
        "trainer.progress=false",
    ]
    tuned = classlab.train(recipe, [*common, "exp_name=tuned", f"model.pretrained_path={MOBILENET}"], quiet=True)
    scratch = classlab.train(recipe, [*common, "exp_name=scratch", "model.pretrained=false"], quiet=True)
    tuned_acc = json.loads((tuned.path / "summary.json").read_text())["best_val_acc"]
    scratch_acc = json.loads((scratch.path / "summary.json").read_text())["best_val_acc"]
    # measured 2026-12-02: 0.74 vs 0.20 (100 validation photos; the full recipe: 0.79 vs 0.58 on 864)
    assert tuned_acc >= 0.6 and tuned_acc >= scratch_acc + 0.3, (tuned_acc, scratch_acc)
