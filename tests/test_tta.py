"""Test-time augmentation: the views themselves, the --tta parser, and eval with TTA on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import classlab
from classlab.engine.tta import image_views, parse_tta, ten_crops, tta_views, views_per_image
from classlab.errors import ClassLabError
from tests.conftest import run_cli


def test_parse_modes_and_scales() -> None:
    plan = parse_tta("flip,translate", 32)
    assert plan.batch_modes == ("flip", "translate") and not plan.scales and views_per_image(plan) == 10
    plan = parse_tta("multiscale:224,256,384", 224)
    assert plan.scales == (224, 256, 384) and views_per_image(plan) == 30
    plan = parse_tta("flip,multiscale:32,40", 32)
    assert plan.scales == (32, 40) and plan.batch_modes == ()  # the ten crops already mirror
    assert parse_tta("tencrop", 224).scales == (256,)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("flop", "did you mean 'flip'"),
        ("multiscale", "needs the shorter-side sizes"),
        ("multiscale:16", "below"),
        ("flip,FLIP", r"--tta flip is given twice in 'flip,FLIP': give each mode once"),
        ("multiscale:32,multiscale:40", "multiscale is given twice"),
    ],
)
def test_parse_errors_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(ClassLabError, match=needle) as info:
        parse_tta(text, 32)
    assert "\n" not in str(info.value)


def test_views_first_is_input_and_shapes_hold() -> None:
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    views = tta_views(x, ["flip", "translate"], 16)
    assert len(views) == 10 and all(v.shape == x.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[5], x.flip(-1))
    # A shifted view is the input moved by the shift (inside the part not touched by padding).
    d = 1  # 16 px / 16: views[4] is the crop at (2d, 2d) of the padded batch, i.e. x moved up-left by d
    assert torch.equal(views[4][..., : 16 - d, : 16 - d], x[..., d:, d:])


def test_diagonal_views_and_their_airbench_weights() -> None:
    """flip,diagonal: the image, its 1-px up-left and down-right shifts, and the mirror of each (airbench's
    level-2 TTA); the two unshifted views carry half the weight together, the four shifted the other half."""
    from classlab.engine.tta import test_with_tta, view_weights

    plan = parse_tta("flip,diagonal", 32)
    assert views_per_image(plan) == 6
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    views = tta_views(x, plan.batch_modes, 32)
    assert len(views) == 6 and torch.equal(views[0], x) and torch.equal(views[3], x.flip(-1))
    assert torch.equal(views[1][..., 1:, 1:], x[..., :-1, :-1])  # moved down-right by one pixel
    assert torch.equal(views[2][..., :-1, :-1], x[..., 1:, 1:])  # moved up-left
    assert view_weights(plan.batch_modes, 6) == [0.25, 0.125, 0.125, 0.25, 0.125, 0.125]
    assert view_weights(("diagonal",), 3) == [0.5, 0.25, 0.25]

    class Probe(torch.nn.Module):  # logits from the view's top-left pixel: views tell apart
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1 / 50))

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return torch.stack([v[:, 0, 0, 0].float(), -v[:, 0, 0, 0].float()], 1) * self.scale

    probe = Probe()
    _, _, probs = test_with_tta(probe, [(x, torch.zeros(2, dtype=torch.long))], "flip,diagonal", 32)
    weights = [0.25, 0.125, 0.125, 0.25, 0.125, 0.125]
    with torch.no_grad():
        expected = sum(w * probe(v).softmax(1) for w, v in zip(weights, views))
    assert torch.allclose(probs, expected)
    with pytest.raises(ClassLabError, match="choose one"):
        parse_tta("translate,diagonal", 32)


def test_ten_crops_and_image_views() -> None:
    img = torch.arange(3 * 6 * 8, dtype=torch.uint8).reshape(3, 6, 8)
    crops = ten_crops(img, 4)
    assert len(crops) == 10 and torch.equal(crops[0], img[:, :4, :4]) and torch.equal(crops[5], img[:, :4, :4].flip(-1))
    assert torch.equal(crops[4], img[:, 1:5, 2:6])
    views = image_views(Image.new("RGB", (40, 20), (10, 20, 30)), [16, 24], 16)
    assert views.shape == (20, 3, 16, 16) and views.dtype == torch.uint8


def test_eval_tta_side_by_side(tiny_run: Path) -> None:
    result = run_cli("eval", str(tiny_run), "--split", "val", "--tta", "flip,translate")
    assert result.returncode == 0, result.stderr
    assert "plain" in result.stdout and "TTA flip,translate (10 views)" in result.stdout
    metrics = json.loads((tiny_run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["tta"]["modes"] == "flip,translate" and 0 <= metrics["tta"]["top1"] <= 1
    assert metrics["top1"] > 0  # the plain figure is still there


def test_multiscale_reads_originals_at_full_size(tiny_run: Path) -> None:
    # At the native 32 px, ten crops of 32 from 32 are five copies of the image and five mirrors: the
    # same softmax average as flip TTA. Equality shows the originals line up with the saved split.
    flip = classlab.evaluate(tiny_run, split="val", tta="flip")
    ms = classlab.evaluate(tiny_run, split="val", tta="multiscale:32")
    assert ms["tta"]["views"] == 10 and ms["tta"]["top1"] == pytest.approx(flip["tta"]["top1"], abs=1e-9)
    larger = classlab.evaluate(tiny_run, split="val", tta="multiscale:32,40,tencrop")
    assert larger["tta"]["scales"] == [32, 40, 37] and larger["tta"]["views"] == 30


def test_eval_bad_tta_is_one_line(tiny_run: Path) -> None:
    result = run_cli("eval", str(tiny_run), "--tta", "mirror")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "unknown mode 'mirror'" in result.stderr


def test_published_protocols_parse() -> None:
    plan = parse_tta("perscale:224,256,384,480,640", 224)
    assert plan.protocol == "perscale" and plan.scales == (224, 256, 384, 480, 640) and views_per_image(plan) == 10
    plan = parse_tta("fullconv:24,32,flip", 32)  # scales below the training size are fine: the net runs at S px
    assert plan.protocol == "fullconv" and plan.batch_modes == ("flip",) and views_per_image(plan) == 4
    assert parse_tta("multiscale:32", 32).protocol == "average"
    for text in ("perscale:32,multiscale:40", "fullconv:32,translate", "perscale:32,fullconv:40"):
        with pytest.raises(ClassLabError, match="a testing protocol of its own"):
            parse_tta(text, 32)


def test_scale_views_follow_each_protocol() -> None:
    from classlab.engine.tta import scale_views

    img = Image.new("RGB", (40, 20), (10, 20, 30))
    crops = scale_views(img, 24, "perscale")  # shorter side to 25, then ten 24 x 24 crops
    assert crops.shape == (10, 3, 24, 24) and crops.dtype == torch.uint8
    whole = scale_views(img, 24, "fullconv")  # the whole image, shorter side 24
    assert whole.shape == (1, 3, 24, 48)


def test_perscale_means_accuracies_and_fullconv_averages_scores() -> None:
    from classlab.engine.tta import scale_protocol_metrics

    labels = torch.tensor([0, 1])
    # scale A: image 0 right (0.9), image 1 wrong (0.6 on class 0); scale B: image 0 wrong (0.45), image 1 right.
    a = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    b = torch.tensor([[0.45, 0.55], [0.1, 0.9]])
    per, _ = scale_protocol_metrics([a, b], labels, parse_tta("perscale:32,40", 32), 2)
    assert [r["top1"] for r in per["per_scale"]] == [0.5, 0.5] and per["top1"] == 0.5
    full, probs = scale_protocol_metrics([a, b], labels, parse_tta("fullconv:32,40", 32), 2)
    assert full["top1"] == 1.0 and torch.allclose(probs, (a + b) / 2)  # averaged scores get both right


def test_fixed_size_models_refuse_other_scales_in_one_line() -> None:
    from classlab.data.preprocess import Normalize
    from classlab.engine.tta import scale_protocol_probabilities
    from classlab.models import build_model
    from classlab.models.net import ClassifierModel

    net = ClassifierModel(Normalize(torch.zeros(3), torch.ones(3)), build_model({"name": "mlp"}, 2, 3, 8))
    images = [Image.new("RGB", (8, 8), (200, 0, 0))]
    probs = scale_protocol_probabilities(net, lambda: images, parse_tta("fullconv:8", 8))
    assert probs[0].shape == (1, 2)
    with pytest.raises(ClassLabError, match=r"cannot score 12 px inputs.*pools globally") as info:
        scale_protocol_probabilities(net, lambda: images, parse_tta("fullconv:12", 8))
    assert "\n" not in str(info.value)


def test_eval_with_the_published_protocols(tiny_run: Path) -> None:
    # fullconv at the training size with mirrors is exactly flip TTA: the whole image and its mirror.
    flip = classlab.evaluate(tiny_run, split="val", tta="flip")
    full = classlab.evaluate(tiny_run, split="val", tta="fullconv:32,flip")
    assert full["tta"]["top1"] == pytest.approx(flip["tta"]["top1"], abs=1e-9)
    result = run_cli("eval", str(tiny_run), "--split", "val", "--tta", "perscale:32,40")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tiny_run / "eval" / "val" / "metrics.json").read_text())
    rows = metrics["tta"]["per_scale"]
    assert [r["scale"] for r in rows] == [32, 40] and metrics["tta"]["protocol"] == "perscale"
    assert metrics["tta"]["top1"] == pytest.approx((rows[0]["top1"] + rows[1]["top1"]) / 2, abs=1e-6)
    assert "scale    40 px  top-1" in result.stdout and "mean of the per-scale accuracies" in result.stdout
    assert "TTA perscale:32,40 (10 views a scale)" in result.stdout  # fullconv's count is the total, this one's not


def test_predict_with_tta_averages_each_images_views(tiny_run: Path, tmp_path: Path, capsys) -> None:
    """predict --tta scores unlabelled files as eval --tta scores a split: the same views, the same weights."""
    import csv

    import numpy as np

    from classlab.data.preprocess import open_image
    from classlab.engine.load import load

    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(32, 32), (48, 40), (40, 56)]):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    loaded = load(tiny_run)
    x = torch.stack([loaded.to_tensor(f) for f in files])
    plain = loaded.probabilities(x)
    flip = (plain + loaded.probabilities(x.flip(-1))) / 2
    got = classlab.predict(tiny_run, files, tta="flip", keep_rows=True)
    assert [r["prob"] for r in got] == pytest.approx(flip.max(1).values.tolist(), abs=1e-5)
    assert not torch.allclose(flip, plain)  # the views were scored, not the image alone
    crops = [image_views(open_image(f), [37], 32) for f in files]
    tencrop = torch.stack([loaded.probabilities(c).mean(0) for c in crops])
    got = classlab.predict(tiny_run, files, tta="tencrop", keep_rows=True, batch_size=7)  # crops over two passes
    assert [r["prob"] for r in got] == pytest.approx(tencrop.max(1).values.tolist(), abs=1e-5)
    assert [r["class"] for r in got] == [loaded.classes[int(i)] for i in tencrop.argmax(1)]
    from classlab.cli import main  # in this process: a subprocess would spend its time importing torch

    out = tmp_path / "preds.csv"
    assert main(["predict", str(tiny_run), str(tmp_path), "--tta", "flip", "--out", str(out), "--quiet"]) == 0
    assert "TTA flip" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert [float(r["prob"]) for r in rows] == pytest.approx(flip.max(1).values.tolist(), abs=1e-5)
    assert main(["predict", str(tiny_run), str(tmp_path), "--tta", "perscale:32,40", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "to predict, average the scales' views: --tta multiscale:32,40" in err
