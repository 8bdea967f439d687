"""Folders as people keep them: notes beside the class folders are ignored with one notice, bad images still stop;
large photos decode once, in parallel, in the same order whatever the thread count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_image
from PIL import Image

import classlab
from classlab.config import load_config
from classlab.data.loaders import decode
from classlab.data.pipeline import DataProblems, load_data
from classlab.data.sources import open_dataset

REPO = Path(__file__).resolve().parents[1]


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name, color in {"cat": (200, 60, 40), "dog": (40, 60, 200)}.items():
        for i in range(10):
            make_image(root / name / f"{i}.jpg", color, size=24)
    (root / "README.md").write_text("my photos\n")
    (root / "labels.txt").write_text("cat\ndog\n")
    (root / "analysis.ipynb").write_text("{}\n")
    return root


def _cfg(root: Path, tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.root={tmp_path / 'runs'}",
            "data.val_fraction=0.2",
            *extra,
        ],
    )


def test_notes_beside_class_folders_are_ignored_with_one_notice(tmp_path: Path, capsys) -> None:
    root = _folder(tmp_path)
    bundle = load_data(_cfg(root, tmp_path))
    assert bundle.classes == ["cat", "dog"] and len(bundle.train) + len(bundle.val) == 20
    assert bundle.notices == [
        f"note: ignored 3 non-image file(s) beside the class folders in {root}: analysis.ipynb, labels.txt, README.md"
    ]
    classlab.train(
        _cfg(root, tmp_path, "epochs=1", "model.layers=[8,p]", "trainer.progress=false", "data.image_size=16")
    )
    out = capsys.readouterr().out
    assert out.count("note: ignored 3 non-image file(s)") == 1


def test_bad_images_inside_class_folders_still_stop(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "notes.txt").write_text("inside a class folder: a problem")
    make_image(root / "stray.jpg", (0, 0, 0))  # an image beside the class folders belongs in one
    with pytest.raises(DataProblems) as info:
        load_data(_cfg(root, tmp_path))
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "broken.jpg" in text and "notes.txt" in text and "stray.jpg: an image beside the class folders" in text
    assert "README.md" not in text


def test_large_photos_decode_in_parallel_in_order_and_at_reduced_scale(tmp_path: Path) -> None:
    root = tmp_path / "big"
    for i in range(6):
        make_image(root / ("a" if i % 2 else "b") / f"{i}.png", (30 * i, 100, 200), size=8)
        big = Image.open(root / ("a" if i % 2 else "b") / f"{i}.png").convert("RGB").resize((1200, 1600))
        big.save(root / ("a" if i % 2 else "b") / f"{i}.jpg", quality=90)
        (root / ("a" if i % 2 else "b") / f"{i}.png").unlink()
    source = open_dataset(_cfg(root, tmp_path).data).train
    one = decode(source, 32, cache_dir=False, threads=1)
    many = decode(source, 32, cache_dir=False, threads=4)
    assert one.images.shape == (6, 3, 32, 32) and torch.equal(one.images, many.images)
    cached = decode(source, 32, cache_dir=tmp_path / "cache", threads=2)
    again = decode(source, 32, cache_dir=tmp_path / "cache", threads=2)
    assert torch.equal(cached.images, again.images) and len(list((tmp_path / "cache").glob("*32px*"))) == 1


def test_decode_photos_benchmark_smoke(tmp_path: Path) -> None:
    source = tmp_path / "flowers"
    for name in ("daisy", "rose"):
        for i in range(4):
            make_image(source / name / f"{i}.jpg", (200, 100, 50), size=32)
    spec = importlib.util.spec_from_file_location("bench_decode_photos", REPO / "benchmarks" / "decode_photos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--source", str(source), "--work", str(tmp_path / "work")]) == 0
    photos = sorted((tmp_path / "work" / "photos_300x400").rglob("*.jpg"))
    assert len(photos) == 8 and Image.open(photos[0]).size == (300, 400)
