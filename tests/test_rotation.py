"""The rotation pretext: right pixels and labels for every angle, and pretraining on an unlabelled folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, run_cli, tiny_config
from PIL import Image

import classlab
from classlab.data.rotation import ANGLES, rotate_batch
from classlab.errors import ClassLabError


def test_rotation_labels_and_pixels_for_all_four_angles() -> None:
    # A 3x3 image whose every pixel is distinct pins the direction of each turn.
    img = torch.arange(1, 10, dtype=torch.uint8).reshape(1, 1, 3, 3)
    batch = torch.cat([img, img + 100])  # two images: labels must come in blocks of N per angle
    views, labels = rotate_batch(batch)
    assert views.shape == (8, 1, 3, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    expected = {
        0: [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        90: [[3, 6, 9], [2, 5, 8], [1, 4, 7]],  # anticlockwise
        180: [[9, 8, 7], [6, 5, 4], [3, 2, 1]],
        270: [[7, 4, 1], [8, 5, 2], [9, 6, 3]],
    }
    for k, angle in enumerate(ANGLES):
        assert views[2 * k, 0].tolist() == expected[angle], angle
        assert views[2 * k + 1, 0].tolist() == (torch.tensor(expected[angle]) + 100).tolist(), angle


def test_rotation_matches_pil_on_a_colour_image() -> None:
    """Label k means PIL's rotate(90 * k) (anticlockwise degrees), on every channel of a real-sized image."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    views, labels = rotate_batch(x)
    pil = Image.fromarray(arr)
    for k in range(4):
        want = np.asarray(pil.rotate(90 * k))
        assert labels[k].item() == k
        assert torch.equal(views[k].permute(1, 2, 0), torch.from_numpy(want.copy()))


def test_rotation_refuses_non_square_images() -> None:
    with pytest.raises(ValueError, match="square"):
        rotate_batch(torch.zeros(1, 3, 8, 6))


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """Unlabelled images straight in one folder, as a photo dump looks."""
    root = tmp_path / "unlabeled"
    rng = np.random.default_rng(1)
    for i in range(60):
        make_image(root / f"img{i}.png", tuple(int(c) for c in rng.integers(30, 220, 3)), size=16)
    return root


def test_pretrain_rotation_on_an_unlabelled_folder(tmp_path: Path, flat_folder: Path) -> None:
    args = tiny_config(tmp_path, epochs=2, **{"data.images_per_class": 50, "data.batch_size": 16})
    args = [a for a in args if not a.startswith("data.images_per_class")]
    result = run_cli(
        "pretrain",
        "rotation",
        *args,
        "data.dataset=folder",
        f"data.root={flat_folder}",
        "data.image_size=16",
        "data.val_fraction=0.2",
        "trainer.keep_every=1",
        "exp_name=rot",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "rot"
    assert json.loads((run / "classes.json").read_text()) == {"0": "0", "1": "90", "2": "180", "3": "270"}
    assert {p.name for p in (run / "checkpoints").glob("epoch*.ckpt")} == {"epoch1.ckpt", "epoch2.ckpt"}
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[0] == "1"
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    # Its predictions are angles, said so, and its ONNX file says the same (it was refused once while predict ran).
    out = tmp_path / "angles.csv"
    result = run_cli("predict", str(run), str(flat_folder), "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rotation pretext model" in result.stderr and f"model.init_from={run}" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and {r["class"] for r in rows} <= {"0", "90", "180", "270"}
    result = run_cli("export", str(run))
    assert result.returncode == 0 and "rotation pretext model" in result.stderr, result.stderr[-2000:]
    result = run_cli("predict", str(run / "export" / "model.onnx"), str(flat_folder), "--out", str(out), "-q")
    assert result.returncode == 0 and "model.init_from=RUN" in result.stderr, result.stderr[-2000:]
    assert [r["class"] for r in csv.DictReader(out.open())] == [r["class"] for r in rows]
    # Its probabilities are of angles, no user's: --calibrate is refused in one line, and nothing written.
    with pytest.raises(ClassLabError, match="rotation pretext run") as refused:
        classlab.evaluate(run, calibrate=True)
    assert f"(classlab.train(None, ['model.init_from={run}'])) instead" in str(refused.value)
    assert not (run / "calibration.json").exists()
    # The same folder cannot be classified: one line saying what to do instead.
    result = run_cli("train", *args, "data.dataset=folder", f"data.root={flat_folder}", "exp_name=cls")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and "class folders" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
