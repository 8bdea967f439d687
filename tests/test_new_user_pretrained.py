"""A new user's pretrained weights, transfer, export and predict: what each did, and what went wrong before.

- a state dict saved from a DDP-wrapped model (``module.`` before every key), or from a model wrapped in the user's
  own class, was refused as 'weights for another architecture';
- the checkpoints torchvision's reference scripts and timm's train.py write (the weights beside an
  ``argparse.Namespace`` of the command line) were refused as pickles that need code;
- ``model.truncate_at`` with ImageNet weights (EfficientNet's rebuilt neck) was refused as another architecture;
- a weights path that is a folder was 'not found', an empty file was '(EOFError)', a text file '(105)';
- ``aug.norm_mean``/``aug.norm_std`` were silently replaced by ImageNet's when the run loaded pretrained weights;
- ``classlab.load(run)(Image.open(photo))`` fed a phone photo on its side (its EXIF turn not applied), while every
  file path was turned upright, as in training;
- ``classlab export RUN --out m.pt2`` wrote an ONNX graph into m.pt2, said 'wrote', then failed reading it back;
- ``classlab predict RUN photos --out -`` wrote a file named '-'.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image

import classlab
from classlab.errors import ClassLabError
from classlab.models import build_model
from classlab.run import safe_torch_load
from tests.conftest import class_folder, run_cli
from tests.faults import cli, error_lines
from tests.test_pretrained import _randomise_bn, _same_logits, _save, _train_args

# -- weights files as other tools save them -----------------------------------------------------------------


def _mobilenet_state() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    source = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=4))
    return source, source.state_dict()


@pytest.mark.parametrize("prefix", ["module.", "net.", "module.net."])
def test_state_dicts_of_wrapped_models_load_key_for_key(tmp_path: Path, prefix: str) -> None:
    """``module.``: torch.save(ddp_model.state_dict()); ``net.``: the user's own nn.Module holding the network."""
    source, state = _mobilenet_state()
    path = _save({prefix + k: v for k, v in state.items()}, tmp_path / "wrapped.pth")
    ours = build_model({"name": "mobilenet_v2", "pretrained_path": str(path)}, num_classes=4)
    assert (ours.pretrained_report.loaded, ours.pretrained_report.left) == (len(state), [])
    _same_logits(source, ours, 64)


def test_a_ddp_saved_timm_efficientnet_loads_through_its_key_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("efficientnet_b0", num_classes=1000)
    path = _save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "b0_ddp.pth")
    ours = build_model({"name": "efficientnet_b0", "pretrained_path": str(path)}, num_classes=5)
    assert ours.pretrained_report.layout == "torchvision/timm"
    assert ours.pretrained_report.left == ["head.fc.bias", "head.fc.weight"]


@pytest.mark.parametrize("kind", ["torchvision_reference", "timm_train"])
def test_training_script_checkpoints_with_their_command_line_load(tmp_path: Path, kind: str) -> None:
    source, state = _mobilenet_state()
    args = argparse.Namespace(model="mobilenet_v2", lr=0.1, epochs=90, amp=False, weights=None)
    if kind == "torchvision_reference":  # references/classification/train.py: checkpoint.pth
        saved = {"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 89, "args": args}
    else:  # timm train.py: model_best.pth.tar
        saved = {"epoch": 3, "arch": "mobilenetv2_100", "state_dict": state, "args": args, "state_dict_ema": state}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(saved, path)
    ours = build_model({"name": "mobilenet_v2", "pretrained_path": str(path)}, num_classes=4)
    assert ours.pretrained_report.loaded == len(state)
    _same_logits(source, ours, 64)


def test_truncated_efficientnet_takes_the_weights_of_the_blocks_it_keeps(tmp_path: Path) -> None:
    """The neck truncation rebuilds (1x1 conv 40 -> 1280 after five blocks) keeps its initial values, and under
    ``freeze: all`` trains with the head, as README's transfer section says; every kept block loads."""
    torch.manual_seed(0)
    source = _randomise_bn(timm.create_model("efficientnet_b0", num_classes=1000))
    path = _save(source.state_dict(), tmp_path / "b0.pth")
    spec = {"name": "efficientnet_b0", "pretrained_path": str(path), "truncate_at": 5, "freeze": "all"}
    ours = build_model(spec, num_classes=5, image_size=64)
    report = ours.pretrained_report
    assert report.left and all(k.startswith(("neck.", "head.")) for k in report.left)
    whole = build_model({"name": "efficientnet_b0", "pretrained_path": str(path)}, num_classes=5).state_dict()
    kept = [k for k in ours.state_dict() if k.startswith(("stem.", "blocks."))]
    assert len(kept) == report.loaded and any(k.startswith("blocks.4.") for k in kept)
    for key in kept:
        torch.testing.assert_close(ours.state_dict()[key], whole[key])
    trainable = {n.split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"neck", "head"}


def test_a_weights_path_that_is_no_weights_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notes.pth").write_text("hi\n")
    said = {}
    for name in ("weights", "empty.pth", "notes.pth"):
        with pytest.raises(ClassLabError) as err:
            build_model({"name": "mobilenet_v2", "pretrained_path": str(tmp_path / name)}, num_classes=4)
        said[name] = str(err.value)
    assert "is a folder: set model.pretrained_path to the .pth/.safetensors file in it" in said["weights"]
    assert "(an empty file (0 bytes))" in said["empty.pth"]
    assert "(not a file torch.save wrote)" in said["notes.pth"]


# -- a run with pretrained weights --------------------------------------------------------------------------


def test_aug_norm_mean_is_kept_beside_pretrained_weights(tmp_path: Path) -> None:
    """Weights trained at mean 0.5 / std 0.5 (a file says nothing of it): the run normalises as told."""
    photos = class_folder(tmp_path / "photos", {"red": (220, 40, 40), "blue": (40, 60, 220)}, 8, 40, ".jpg")
    _, state = _mobilenet_state()
    path = _save(state, tmp_path / "mnv2.pth")
    extra = ["model.name=mobilenet_v2", f"model.pretrained_path={path}", "aug.norm_mean=[0.5,0.5,0.5]"]
    run = classlab.train(None, _train_args(photos, tmp_path, *extra, "aug.norm_std=[0.5,0.5,0.5]")[1:], quiet=True)
    saved = safe_torch_load(run.checkpoint("best"))["state_dict"]
    torch.testing.assert_close(saved["model.normalize.mean"].flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(saved["model.normalize.std"].flatten(), torch.full((3,), 0.5))


def test_resume_and_a_later_stage_need_not_read_the_weights_file_again(tmp_path: Path) -> None:
    """Before: --resume of a run trained from a weights file stopped with 'weights file ... not found' once the
    file had moved, though last.ckpt holds every weight; a later stage read the file again and printed 'pretrained
    weights (file): loaded N tensors' for weights its start from the stage before then replaced."""
    photos = class_folder(tmp_path / "photos", {"red": (220, 40, 40), "blue": (40, 60, 220)}, 8, 40, ".jpg")
    _, state = _mobilenet_state()
    path = _save(state, tmp_path / "mnv2.pth")
    args = _train_args(photos, tmp_path, "model.name=mobilenet_v2", f"model.pretrained_path={path}")[1:]
    run = classlab.train(None, [*args, "exp_name=one", "model.freeze=all"], quiet=True)
    first = run.summary()
    staged = run_cli(*_train_args(photos, tmp_path, "model.name=mobilenet_v2", f"model.pretrained_path={path}"),
                     "exp_name=staged", "stages=[{}, {epochs: 1}]")  # fmt: skip
    assert staged.returncode == 0 and staged.stdout.count("pretrained weights (file)") == 1, staged.stdout
    path.rename(tmp_path / "moved.pth")
    resumed = run_cli(*_train_args(photos, tmp_path, "exp_name=one", "epochs=2"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = run.summary()
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    assert summary["pretrained"] == first["pretrained"] and summary["params_trainable"] == first["params_trainable"]
    top = tmp_path / "runs" / "staged"
    report = json.loads((top / "stage2" / "summary.json").read_text())["pretrained"]
    assert report == json.loads((top / "stage1" / "summary.json").read_text())["pretrained"]
    again = run_cli(*_train_args(photos, tmp_path, "exp_name=staged"), "--resume")  # no file: stages finished
    assert again.returncode == 0 and "not found" not in again.stderr, again.stderr


# -- predict and export ----------------------------------------------------------------------------------------


def test_a_pil_image_with_an_exif_turn_is_predicted_upright(tiny_run: Path, tmp_path: Path) -> None:
    """Image.open(photo) keeps a phone's orientation tag; the file path was turned upright, the PIL image was not."""
    photo = tmp_path / "phone.png"
    pixels = torch.zeros(3, 48, 40, dtype=torch.uint8)
    pixels[0, :16], pixels[2, :, :8] = 250, 200  # a red top band, a blue left band: a turn changes the picture
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(photo, exif=exif.tobytes())
    model = classlab.load(tiny_run)
    by_path = model.probabilities([photo])
    torch.testing.assert_close(model.probabilities([Image.open(photo)]), by_path)
    sideways = model.probabilities([pixels.permute(1, 2, 0).numpy()])  # the stored pixels, not turned
    assert not torch.allclose(sideways, by_path)


def test_export_writes_the_format_its_out_file_names(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from classlab.export import load_pt2

    code, out, err = cli(capsys, "export", str(tiny_run), "--out", str(tmp_path / "m.pt2"))
    assert code == 0 and not error_lines(err), err
    assert load_pt2(tmp_path / "m.pt2")[1]["classlab.classes"]  # a pt2 archive with its metadata
    code, _, err = cli(capsys, "export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "x.pt2"))
    assert code == 1 and error_lines(err) == [
        f"error: --out '{tmp_path / 'x.pt2'}' names a .pt2 file, and --format onnx was asked for: "
        "name the file .onnx, or ask for --format pt2"
    ], err
    assert not (tmp_path / "x.pt2").exists()


def test_predict_out_dash_writes_the_csv_to_standard_output(tiny_run: Path, tmp_path: Path) -> None:
    image = class_folder(tmp_path / "imgs", {"a": (200, 30, 30)}, 2, 32) / "a" / "a0.png"
    result = run_cli("predict", str(tiny_run), str(image), "--out", "-", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("path,class,prob") and result.stdout.count("\n") == 2
    assert not (tmp_path / "-").exists()
