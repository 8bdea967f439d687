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
    [("flop", "did you mean 'flip'"), ("multiscale", "needs the shorter-side sizes"), ("multiscale:16", "below")],
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
