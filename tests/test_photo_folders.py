"""Folders as people keep them: notes beside the class folders are ignored with one notice, bad images still stop;
large photos decode once, in parallel, in the same order whatever the thread count."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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
from classlab.errors import ClassLabError

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


def test_a_class_too_small_for_validation_is_named(tmp_path: Path) -> None:
    """One image of 'rare': it trains, validation has none of it, and the user is told val/acc leaves it out."""
    root = _folder(tmp_path)
    make_image(root / "rare" / "only.jpg", (40, 200, 60), size=24)
    bundle = load_data(_cfg(root, tmp_path))
    assert "rare" in bundle.classes and len(bundle.val) == 4
    assert bundle.notices[-1].startswith("note: no validation image of 1 class(es): rare (too few images to spare one)")
    assert not any("no validation image" in n for n in load_data(_cfg(_folder(tmp_path / "b"), tmp_path)).notices)


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


def _presplit(tmp_path: Path, val_name: str = "val", test_labelled: bool = True) -> Path:
    """The layout of ImageNet, Kaggle and fastai downloads: train/, a validation folder, test/."""
    root = tmp_path / "presplit"
    colors = {"cat": (200, 60, 40), "dog": (40, 60, 200)}
    for part, n in (("Train", 8), (val_name, 3)):
        for name, color in colors.items():
            for i in range(n):
                make_image(root / part / name / f"{part}{i}.jpg", color, size=16)
    for i in range(4):  # a competition's test/: images without labels, or with class folders
        make_image(root / "test" / ("cat" if test_labelled else "") / f"t{i}.jpg", colors["cat"], size=16)
    return root


def test_the_datas_own_validation_folder_is_the_validation_split(tmp_path: Path, capsys) -> None:
    root = _presplit(tmp_path, "valid")
    bundle = load_data(_cfg(root, tmp_path))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 6, 4)
    files = bundle.train_files
    assert sorted(Path(files[i]).parent.parent.name for i in bundle.split["val"]) == ["valid"] * 6
    assert {Path(files[i]).parent.parent.name for i in bundle.split["train"]} == {"Train"}
    assert bundle.split["val_folder"] == str(root / "valid") and bundle.split["val_fraction"] is None
    run = classlab.train(_cfg(root, tmp_path, "epochs=2", "model.layers=[8,p]", "trainer.progress=false"))
    out = capsys.readouterr().out
    assert f"note: validating on {root / 'valid'} (6 images), the data's own validation folder" in out
    assert "16 train / 6 val / 4 test images" in out
    saved = json.loads((run.path / "split.json").read_text())
    assert saved["val"] == bundle.split["val"] and saved["val_folder"] == str(root / "valid")
    assert len(load_data(_cfg(root, tmp_path), split=saved).val) == 6  # eval and resume serve the saved split
    with pytest.raises(ClassLabError, match=r"data.folds=3 makes its own validation folds.*move its class"):
        load_data(_cfg(root, tmp_path, "data.folds=3", "data.fold=0"))


def test_an_unlabelled_test_folder_is_named_not_a_stop(tmp_path: Path) -> None:
    root = _presplit(tmp_path, test_labelled=False)
    bundle = load_data(_cfg(root, tmp_path))
    assert bundle.test is None and len(bundle.val) == 6
    assert any(
        f"{root / 'test'} has no class folders, so its images have no labels and are not scored; predict them" in line
        for line in bundle.notices
    )
    shutil.rmtree(root / "val")
    (root / "val").mkdir()  # an empty validation folder: the split falls back to data.val_fraction, saying so
    bundle = load_data(_cfg(root, tmp_path))
    assert (len(bundle.train), len(bundle.val)) == (12, 4) and "val_folder" not in bundle.split
    empty = f"note: {root / 'val'} is empty; validating on data.val_fraction of {root / 'Train'} instead"
    assert empty in bundle.notices


def test_two_validation_folders_are_ambiguous(tmp_path: Path) -> None:
    root = _presplit(tmp_path)
    (root / "validation" / "cat").mkdir(parents=True)
    with pytest.raises(ClassLabError, match=r"has val/, validation/: which one holds the data is ambiguous"):
        open_dataset(_cfg(root, tmp_path).data)


def test_a_downloaded_archive_as_root_says_how_to_unpack_it(tmp_path: Path) -> None:
    for name, command in (("flowers.zip", "unzip '{a}' -d '{f}'"), ("flowers.tar.gz", "tar -xf '{a}' -C '{f}'")):
        archive = tmp_path / name
        archive.write_bytes(b"PK\x03\x04")
        with pytest.raises(ClassLabError, match=r"is an archive; unpack it once and point data.root at") as e:
            open_dataset(_cfg(archive, tmp_path).data)
        assert command.format(a=archive, f=tmp_path / "flowers") in str(e.value)


def test_what_macos_and_notebooks_leave_behind_is_passed_over(tmp_path: Path) -> None:
    """A zip made on a Mac unpacks with __MACOSX/ (._ twins of every photo); Jupyter leaves .ipynb_checkpoints/.
    Neither is a class, a bad file or a photo to predict."""
    from classlab.predict import expand_paths

    root = _folder(tmp_path)
    for name in ("cat", "dog"):
        (root / "__MACOSX" / name).mkdir(parents=True)
        (root / "__MACOSX" / name / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / name / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    make_image(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.jpg", (0, 0, 0), size=24)
    dataset = open_dataset(_cfg(root, tmp_path).data)
    assert dataset.classes == ["cat", "dog"] and len(dataset.train) == 20 and not dataset.train.problems
    assert len(expand_paths([root])) == 20


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_pipes_and_dangling_links_named_like_images_are_named_not_opened(tmp_path: Path) -> None:
    """Opening a named pipe waits for a writer for ever; a link whose target was not copied is a lost file.
    Training lists both as problems; predict gives each an error row and predicts the rest."""
    from classlab.predict import predict

    root = _folder(tmp_path)
    os.mkfifo(root / "cat" / "pipe.jpg")
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DataProblems) as info:
        load_data(_cfg(root, tmp_path))
    text = str(info.value)
    assert "2 problem(s)" in text
    assert f"{root / 'cat' / 'pipe.jpg'}: not a regular file (a pipe, socket or device)" in text
    assert f"{root / 'dog' / 'gone.jpg'}: a link to '{tmp_path / 'nowhere.jpg'}', which does not exist" in text

    run = classlab.train(
        _cfg(root, tmp_path, "epochs=1", "model.layers=[8,p]", "trainer.progress=false", "data.skip_bad_images=true")
    )
    rows = {"/".join(Path(r["path"]).parts[-2:]): r for r in predict(run.path, [root, root / "cat" / "pipe.jpg"])}
    assert len(rows) == 22 and rows["cat/0.jpg"]["class"] in ("cat", "dog") and not rows["cat/0.jpg"]["error"]
    assert rows["cat/pipe.jpg"]["error"].startswith("not a regular file") and not rows["cat/pipe.jpg"]["class"]
    assert rows["dog/gone.jpg"]["error"].startswith("a link to")


def test_class_folders_a_case_or_a_space_apart_are_named(tmp_path: Path) -> None:
    """Before: Daisy/ and daisy/ became two classes without a word, rose/ and 'rose '/ (a space typed after the name)
    two classes that looked the same, and a lone 'tulip '/ a class with a space in its name."""
    from classlab.config import DataSection
    from classlab.data.labelled_files import labelled_files

    root = tmp_path / "flowers"
    for name in ("Daisy", "daisy", "rose", "rose ", "tulip "):
        for i in range(3):
            make_image(root / name / f"{i}.jpg", (200, 60, 40), size=16)
    dataset = open_dataset(_cfg(root, tmp_path).data)
    assert sorted(dataset.classes) == ["Daisy", "daisy", "rose", "tulip"] and len(dataset.train) == 15
    assert dataset.train.notices == [
        f"note: class folders 'rose' and 'rose ' in {root} differ only in the spaces around their names and are "
        "read as one class, 'rose'; merge them into one folder",
        f"note: class folders in {root} differ only in case and are trained as separate classes: Daisy and daisy; "
        "if they are one class, move the images of one folder into the other",
    ]
    assert open_dataset(_cfg(root, tmp_path, "data.classes=[tulip,rose,daisy,Daisy]").data).classes[0] == "tulip"
    # A run trained before names were stripped says 'tulip ' in its classes.json: eval --data maps by name.
    found = labelled_files(DataSection(), root, ["Daisy", "daisy", "rose ", "tulip "])
    assert sorted(found.labels) == [0] * 3 + [1] * 3 + [2] * 6 + [3] * 3
    with pytest.raises(ClassLabError) as info:
        labelled_files(DataSection(), root, ["daisy", "rose", "tulip"])
    said = str(info.value)
    assert "class(es) the run was not trained on: Daisy (only its case differs from daisy); the run's classes" in said
    # The class order of such a run's folders is kept: ' zebra/' sorted first, and its index is the run's.
    shutil.rmtree(root)
    for name in ("apple", " zebra"):
        make_image(root / name / "0.jpg", (200, 60, 40), size=16)
    assert open_dataset(_cfg(root, tmp_path).data).classes == ["zebra", "apple"]


def test_manifest_labels_a_case_apart_are_named(tmp_path: Path) -> None:
    """Before: Cat and cat in a manifest became two classes without a word ('cat ' was always read as cat)."""
    for i in range(4):
        make_image(tmp_path / f"{i}.png", (200, 60, 40), size=16)
    (tmp_path / "train.csv").write_text("path,label\n0.png,Cat\n1.png,cat\n2.png,cat \n3.png,dog\n")
    dataset = open_dataset(_cfg(tmp_path, tmp_path, "data.dataset=csv", "data.csv_file=train.csv").data)
    assert dataset.classes == ["Cat", "cat", "dog"] and sorted(dataset.train.labels.tolist()) == [0, 1, 1, 2]
    assert dataset.train.notices == [
        "note: labels in column 'label' of train.csv differ only in case and are trained as separate classes: "
        "Cat and cat; if they are one class, write its label one way"
    ]
