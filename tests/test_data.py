"""Data sources, class order, bad files, splits, decoding."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from classlab.config import load_config
from classlab.data.loaders import MemoryLoader, decode
from classlab.data.pipeline import DataProblems, load_data
from classlab.data.preprocess import BadImage, image_to_tensor, open_image
from classlab.data.sources import open_dataset
from classlab.data.splits import make_split
from classlab.errors import ClassLabError, ConfigError
from tests.conftest import make_image


def folder_cfg(root: Path, *extra: str, tmp: Path | None = None):
    cache = [f"data.cache_dir={tmp / 'cache'}"] if tmp else []
    return load_config(None, ["data.dataset=folder", f"data.root={root}", "data.image_size=16", *cache, *extra])


def test_class_names_typed_on_a_mac_and_elsewhere_are_one_class(tmp_path: Path) -> None:
    """macOS stores a Korean folder name decomposed (NFD); typed on Linux or Windows, or in a CSV, it is composed."""
    import unicodedata

    cat, dog = "고양이", "강아지"
    nfd = unicodedata.normalize("NFD", cat)
    assert nfd != cat  # the two spellings differ byte for byte, and look alike
    root = tmp_path / "pets"
    for i in range(3):
        make_image(root / nfd / f"mac{i}.png", (200, 0, 0))
        make_image(root / dog / f"d{i}.png", (0, 0, 200))
    make_image(root / cat / "linux0.png", (200, 0, 0))  # a second copy, made on Linux, beside the Mac's
    ds = open_dataset(folder_cfg(root, f"data.classes=[{cat},{dog}]").data)
    assert ds.classes == [cat, dog]
    assert np.bincount(np.asarray(ds.train.labels)).tolist() == [4, 3]
    rows = ["path,label", *(f"{nfd}/mac{i}.png,{nfd}" for i in range(3)), f"{cat}/linux0.png,{cat}"]
    rows += [f"{dog}/d{i}.png,{dog}" for i in range(3)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    manifest = open_dataset(load_config(None, [f"data.csv_file={root / 'labels.csv'}"]).data)
    assert manifest.classes == [dog, cat] and len(manifest.train) == 7  # one class each, in natural order
    from classlab.engine.losses import class_weight_tensor

    assert class_weight_tensor({nfd: 2.0}, [0, 1], [cat, dog]).tolist() == [2.0, 1.0]  # loss.class_weights keys


def test_natural_class_order(tmp_path: Path) -> None:
    for c in range(18):
        make_image(tmp_path / "d" / str(c) / "a.png", (c * 10, 0, 0))
    ds = open_dataset(folder_cfg(tmp_path / "d").data)
    assert ds.classes == [str(i) for i in range(18)]


def test_explicit_classes_override_and_mismatch(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        make_image(tmp_path / "d" / c / "a.png", (0, 0, 0))
    ds = open_dataset(folder_cfg(tmp_path / "d", "data.classes=[dog, cat]").data)
    assert ds.classes == ["dog", "cat"]
    labels = {ds.train.describe(i).split("/")[-2]: int(ds.train.labels[i]) for i in range(len(ds.train))}
    assert labels == {"dog": 0, "cat": 1}
    with pytest.raises(ClassLabError, match="not found in .*: bird"):
        open_dataset(folder_cfg(tmp_path / "d", "data.classes=[dog, cat, bird]").data)


def test_numbered_classes_listed_as_numbers(tmp_path: Path) -> None:
    """Before: data.classes=[1,0] for folders 0/ and 1/ was "config key 'data.classes.0' = 1: Input should be a
    valid string"; a decimal that YAML read as a number is named with the quoting that keeps it a name."""
    for c in ("0", "1"):
        make_image(tmp_path / "d" / c / "a.png", (0, 0, 0))
    assert open_dataset(folder_cfg(tmp_path / "d", "data.classes=[1, 0]").data).classes == ["1", "0"]
    with pytest.raises(ConfigError, match=r"'data.classes' = \[1.5, 0\]: 1.5 is not a class name: YAML reads .*quote"):
        folder_cfg(tmp_path / "d", "data.classes=[1.5, 0]")


def test_an_empty_class_folder_alone_names_its_own_fix(tmp_path: Path) -> None:
    """Before: "fix them, or set data.skip_bad_images=true to skip these files", which then refused the class
    ("data.skip_bad_images skips files, not classes")."""
    for c in ("a", "b"):
        for i in range(4):
            make_image(tmp_path / "d" / c / f"{i}.png", (200, 0, 0) if c == "a" else (0, 0, 200))
    (tmp_path / "d" / "c").mkdir()
    with pytest.raises(DataProblems) as info:
        load_data(folder_cfg(tmp_path / "d", tmp=tmp_path))
    assert str(info.value).splitlines()[0] == (
        "1 problem(s) in the data; give each such class folder its images, or remove the folder to train without "
        "that class:"
    )


def test_bad_files_reported_together_then_skipped(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(6):
            make_image(root / c / f"{i}.png", (200, 0, 0) if c == "a" else (0, 0, 200))
    (root / "a" / "broken.jpg").write_bytes(b"not really a jpeg")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "notes.txt").write_text("hello")
    (root / "empty").mkdir()
    (root / ".DS_Store").write_text("ignored")
    cfg = folder_cfg(root, "data.val_fraction=0.2", tmp=tmp_path)
    with pytest.raises(DataProblems) as info:
        load_data(cfg)
    text = str(info.value)
    assert "4 problem(s)" in text
    for part in ("broken.jpg", "truncated.png", "notes.txt", "empty: class folder with no images"):
        assert part in text
    assert "set data.skip_bad_images=true to skip these files (an empty class folder needs images, or removing)" in text
    # Skipping files skips no class: the empty folder became an output of the model that no image ever taught.
    with pytest.raises(ClassLabError) as info:
        load_data(folder_cfg(root, "data.val_fraction=0.2", "data.skip_bad_images=true", tmp=tmp_path))
    assert str(info.value) == (
        "class(es) empty have no usable training image (data.skip_bad_images skips files, not classes): give them "
        "images, or remove their folders (or manifest rows) to train without them"
    )
    (root / "empty").rmdir()
    bundle = load_data(folder_cfg(root, "data.val_fraction=0.2", "data.skip_bad_images=true", tmp=tmp_path))
    assert len(bundle.bad) == 3
    assert len(bundle.train) + len(bundle.val) == 12
    streamed = load_data(
        folder_cfg(root, "data.val_fraction=0.2", "data.skip_bad_images=true", "data.loader=stream", tmp=tmp_path)
    )
    assert sorted(streamed.bad) == sorted(bundle.bad)
    assert len(streamed.train) + len(streamed.val) == 12
    # A run already made (eval, --resume reads its split.json): data.skip_bad_images=true would change its split
    # and eval refuses overrides, so the line no longer offers it (it was a dead end).
    with pytest.raises(DataProblems) as info:
        load_data(cfg, split=bundle.split)
    assert str(info.value).startswith(
        "3 problem(s) in the data since the run was made: restore these files, or point data.root at the original "
        "data:\n  "
    )


def test_modes_converted(tmp_path: Path) -> None:
    for i, mode in enumerate(("L", "RGBA", "P", "CMYK")):
        path = make_image(tmp_path / f"{i}.png" if mode != "CMYK" else tmp_path / f"{i}.jpg", (10, 200, 30), mode=mode)
        t = image_to_tensor(open_image(path), 16, 3)
        assert t.shape == (3, 16, 16) and t.dtype == torch.uint8


def test_16_bit_and_float_images_keep_their_brightness(tmp_path: Path) -> None:
    """Pillow's convert clips a 16-bit image to 255 (white) and a float one in [0, 1] to 0 (black): microscopy,
    medical and depth images would train on nothing. They are scaled instead, file and array alike."""
    from PIL import Image

    from classlab.data.preprocess import array_to_tensor

    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp16).save(tmp_path / "ramp16.png")
    Image.fromarray((ramp16 / 65535).astype(np.float32)).save(tmp_path / "ramp.tif")
    expected = np.tile(np.linspace(0, 255, 64), (64, 1)).mean()
    for name in ("ramp16.png", "ramp.tif"):
        t = image_to_tensor(open_image(tmp_path / name), 64, 3)
        assert t.shape == (3, 64, 64)
        assert abs(t.float().mean().item() - expected) < 2, name
        assert t[0, 0, 0] == 0 and t[0, 0, -1] == 255, name  # black stays black, full scale is white
    assert abs(array_to_tensor(ramp16, 64).float().mean().item() - expected) < 2
    eight_bit_as_int = np.tile(np.arange(0, 256, 4), (64, 1)).astype(np.int64)  # 0..252 in an int64 array
    assert array_to_tensor(eight_bit_as_int, 64)[0, 0, -1] == 252


def test_phone_formats_heic_and_avif_are_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An iPhone folder holds .heic, a web download .avif: both train like JPEGs; without pillow-heif
    a .heic file is a bad file whose line says what to install, not 'not an image file'."""
    from PIL import Image

    from classlab.data import preprocess

    pillow_heif = pytest.importorskip("pillow_heif")  # in the test extra
    root = tmp_path / "phone"
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    for name, color in colors.items():
        for i in range(3):
            make_image(root / name / f"{i}.jpg", color, size=24)
        img = Image.new("RGB", (40, 30), color)
        pillow_heif.from_pillow(img).save(root / name / "IMG_0001.HEIC", quality=90)
        img.save(root / name / "web.avif", quality=90)
    cfg = load_config(None, ["data.dataset=folder", f"data.root={root}", "data.image_size=16", "data.val_fraction=0"])
    bundle = load_data(cfg)
    files = bundle.train_files
    assert len(files) == 10 and sum(f.endswith((".HEIC", ".avif")) for f in files) == 4
    images = bundle.train.images.float()
    for i, f in enumerate(files):  # each decoded to its class colour, the lossy formats within a few levels
        color = colors[Path(f).parent.name]
        assert images[i].mean((1, 2)).tolist() == pytest.approx(color, abs=12)
    monkeypatch.setattr(preprocess, "_HEIF", [False])  # a machine without pillow-heif
    with pytest.raises(BadImage, match=r"a HEIC/HEIF photo, which Pillow reads through pillow-heif: pip install"):
        open_image(root / "red" / "IMG_0001.HEIC")


def test_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    from PIL import Image

    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 10:30] = 255  # a white centre band, as wide as the crop
    Image.fromarray(arr).save(tmp_path / "wide.png")
    t = image_to_tensor(open_image(tmp_path / "wide.png"), 10, 3)
    assert t.shape == (3, 10, 10)
    assert t.float().mean() > 240  # the centre crop is all band


def test_stratified_split_seeded_and_balanced() -> None:
    labels = np.repeat(np.arange(4), 50)
    a = make_split(labels, val_fraction=0.2, seed=1, class_names=list("abcd"))
    b = make_split(labels, val_fraction=0.2, seed=1, class_names=list("abcd"))
    c = make_split(labels, val_fraction=0.2, seed=2, class_names=list("abcd"))
    assert a == b and a != c
    assert np.bincount(labels[a["val"]]).tolist() == [10, 10, 10, 10]
    assert not set(a["train"]) & set(a["val"])


def test_grouped_split_keeps_groups_on_one_side() -> None:
    labels = np.repeat([0, 1], 60)
    groups = [f"person{i // 6}" for i in range(120)]
    split = make_split(labels, val_fraction=0.25, seed=0, class_names=["x", "y"], groups=groups)
    train_groups = {groups[i] for i in split["train"]}
    val_groups = {groups[i] for i in split["val"]}
    assert not train_groups & val_groups
    assert 0.1 < len(split["val"]) / 120 < 0.4
    assert set(labels[split["val"]]) == {0, 1}
    # Groups each bigger than the validation share: the split had no validation image, and nothing said so. Now
    # the smallest group that leaves every class a training image validates, as a stratified split spares one.
    big = [f"person{i // 15}" for i in range(120)]
    split = make_split(labels, val_fraction=0.1, seed=0, class_names=["x", "y"], groups=big)
    assert len(split["val"]) == 15 and len({big[i] for i in split["val"]}) == 1
    big[:7] = ["tiny"] * 7
    split = make_split(labels, val_fraction=0.05, seed=0, class_names=["x", "y"], groups=big)
    assert {big[i] for i in split["val"]} == {"tiny"}
    # ... and when every group is a whole class (the label column given as the group), none can.
    with pytest.raises(ClassLabError) as err:
        make_split(labels, val_fraction=0.1, seed=0, class_names=["x", "y"], groups=[str(v) for v in labels])
    assert str(err.value) == (
        "data.group_column: each of its 2 groups holds every image of some class, so no group can be the validation "
        "split without that class missing from training; group by a finer column (one person, one patient), or "
        "leave data.group_column unset"
    )


def test_images_per_class() -> None:
    labels = np.repeat(np.arange(3), 30)
    split = make_split(labels, val_fraction=0.1, seed=0, class_names=list("abc"), images_per_class=5)
    assert np.bincount(labels[split["train"]]).tolist() == [5, 5, 5]
    with pytest.raises(ClassLabError, match="images_per_class=40") as err:
        make_split(labels, val_fraction=0.1, seed=0, class_names=list("abc"), images_per_class=40)
    # The line names the fix: 27 of each class's 30 are left for training after the validation split.
    assert str(err.value).endswith(
        "a (27), b (27), c (27); use data.images_per_class=27 or less, or lower data.val_fraction"
    )
    # With no validation split (val_fraction 0) there is nothing to lower: the line said so all the same.
    with pytest.raises(ClassLabError) as err:
        make_split(labels, val_fraction=0, seed=0, class_names=list("abc"), images_per_class=40)
    assert str(err.value) == (
        "data.images_per_class=40 but these classes have fewer training images: a (30), b (30), c (30); "
        "use data.images_per_class=30 or less"
    )


def test_images_per_class_passes_over_combinations_the_data_never_has() -> None:
    """Multi-task classes are every combination of the tasks' classes; one that no image carries has nothing to
    draw, and counting it short made every data.images_per_class refuse."""
    labels = np.repeat([0, 1, 3], 10)  # class 2 (say age=60+|gender=male) occurs nowhere
    split = make_split(labels, val_fraction=0.2, seed=0, class_names=list("abcd"), images_per_class=4)
    assert np.bincount(labels[split["train"]], minlength=4).tolist() == [4, 4, 0, 4]
    with pytest.raises(ClassLabError, match=r"^data.images_per_class=9 .*: a \(8\), b \(8\), d \(8\); use"):
        make_split(labels, val_fraction=0.2, seed=0, class_names=list("abcd"), images_per_class=9)


def test_csv_manifest_groups_and_escape(tmp_path: Path) -> None:
    root = tmp_path / "img"
    rows = ["path,label,person"]
    for i in range(24):
        label = "mask" if i % 2 else "nomask"
        make_image(root / f"{i}.png", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(f"{i}.png,{label},p{i // 4}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "data.dataset=csv",
            f"data.root={root}",
            "data.csv_file=train.csv",
            "data.group_column=person",
            "data.val_fraction=0.3",
            "data.image_size=16",
            f"data.cache_dir={tmp_path / 'c'}",
        ],
    )
    bundle = load_data(cfg)
    assert bundle.classes == ["mask", "nomask"]
    (root / "evil.csv").write_text("path,label\n../../etc/passwd,x\n")
    cfg2 = load_config(None, ["data.dataset=csv", f"data.root={root}", "data.csv_file=evil.csv"])
    with pytest.raises(ClassLabError, match="outside data.root"):
        open_dataset(cfg2.data)


def _manifest_of_labels(tmp_path: Path, labels: list[str]) -> tuple[Path, list[str], list[str]]:
    """img/<i>.png, one a label, listed in img/train.csv: (the folder, its rows, the overrides that read it)."""
    root = tmp_path / "img"
    rows = ["path,label"]
    for i, label in enumerate(labels):
        make_image(root / f"{i}.png", (20 * i, 0, 0))
        rows.append(f"{i}.png,{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    args = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", f"data.cache_dir={tmp_path / 'c'}"]
    return root, rows, args


def test_labels_that_read_as_missing_values_are_noted(tmp_path: Path) -> None:
    """R's write.csv writes a missing label as NA; trained, it is a class the model learns to predict."""
    root, rows, args = _manifest_of_labels(tmp_path, [["cat", "dog", "NA"][i % 3] for i in range(9)])
    bundle = load_data(load_config(None, [*args, "data.val_fraction=0"]))
    assert bundle.classes == ["cat", "dog", "NA"]
    assert bundle.notices == [
        "note: 3 row(s) of train.csv have 'NA' in column 'label', trained as a class of its own; if it marks a "
        "missing label, remove those rows from the manifest"
    ]
    (root / "train.csv").write_text("\n".join(r.replace(",NA", ",bird") for r in rows) + "\n")
    assert load_data(load_config(None, [*args, "data.val_fraction=0"])).notices == []


def test_a_number_written_two_ways_in_the_labels_is_noted(tmp_path: Path) -> None:
    """pandas writes an integer column with a missing value as floats: manifests joined from two sources carry
    '1' and '1.0', which trained as two classes without a word."""
    _, _, args = _manifest_of_labels(tmp_path, [["1", "2", "1.0", "2"][i % 4] for i in range(8)])
    bundle = load_data(load_config(None, [*args, "data.val_fraction=0"]))
    assert bundle.classes == ["1", "1.0", "2"]
    assert bundle.notices == [
        "note: 1 and 1.0 in column 'label' of train.csv are one number written 2 ways, trained as separate classes; "
        "write each label one way"
    ]


def test_csv_images_through_a_linked_folder_inside_the_root(tmp_path: Path) -> None:
    """data/images -> /mnt/disk/images is a common layout; the path as written stays inside data.root, so the
    manifest reads. Written paths that leave the root ('../') are still refused."""
    disk = tmp_path / "disk" / "images"
    for i in range(6):
        make_image(disk / f"{i}.png", (200, 0, 0) if i % 2 else (0, 0, 200))
    root = tmp_path / "data"
    root.mkdir()
    (root / "images").symlink_to(disk, target_is_directory=True)
    rows = [f"images/{i}.png,{'red' if i % 2 else 'blue'}" for i in range(6)]
    (root / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv"])
    source = open_dataset(cfg.data)
    assert len(source.train.files or []) == 6 and source.classes == ["blue", "red"]
    (root / "up.csv").write_text("path,label\nimages/../../disk/images/0.png,blue\n")
    cfg2 = load_config(None, ["data.dataset=csv", f"data.root={root}", "data.csv_file=up.csv"])
    with pytest.raises(ClassLabError, match="path 'images/../../disk/images/0.png' is outside data.root"):
        open_dataset(cfg2.data)


def test_blank_group_ids_are_named_not_pooled(tmp_path: Path) -> None:
    """Rows with an empty data.group_column used to form one silent group of unrelated images."""
    root = tmp_path / "img"
    rows = ["path,label,person"]
    for i in range(8):
        make_image(root / f"{i}.png", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(f"{i}.png,{'a' if i % 2 else 'b'},{'' if i in (2, 5) else f'p{i // 2}'}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    overrides = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.group_column=person"]
    with pytest.raises(DataProblems) as err:
        load_data(load_config(None, [*overrides, f"data.cache_dir={tmp_path / 'c'}"]))
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "train.csv, line 4: empty group (column 'person'); give every image its group" in text
    assert "train.csv, line 7: empty group" in text
    # A test manifest (a competition's test.csv) has no group column: groups only decide the validation split.
    (root / "train.csv").write_text("\n".join(r for k, r in enumerate(rows) if k not in (3, 6)) + "\n")
    (root / "test.csv").write_text("path,label\n2.png,b\n5.png,a\n")
    bundle = load_data(load_config(None, [*overrides, "data.test_csv_file=test.csv", f"data.cache_dir={tmp_path}"]))
    assert len(bundle.test) == 2


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_skipped_bad_images_keep_the_other_rows_groups(tmp_path: Path, loader: str) -> None:
    """The data problem line says to set data.skip_bad_images=true; with data.group_column that was refused
    ('cannot be combined') for unreadable files, though the groups of the images kept are known."""
    root = tmp_path / "img"
    rows = ["path,label,person"]
    for i in range(12):
        make_image(root / f"{i}.png", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(f"{i}.png,{'a' if i % 2 else 'b'},p{i // 2}")
    (root / "bad.png").write_bytes(b"")
    rows.insert(1, "bad.png,a,p5")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    args = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.group_column=person"]
    args += [f"data.loader={loader}", "data.skip_bad_images=true", "data.val_fraction=0.3", "data.image_size=16"]
    bundle = load_data(load_config(None, [*args, f"data.cache_dir={tmp_path / 'c'}"]))
    assert bundle.bad == [f"{root / 'bad.png'}: an empty file (0 bytes)"]
    assert len(bundle.train) + len(bundle.val) == 12
    val_people = {int(i) // 2 for i in bundle.split["val"]}  # kept index i is file i.png (the bad row came first)
    train_people = {int(i) // 2 for i in bundle.split["train"]}
    assert val_people and not val_people & train_people


def test_a_class_whose_groups_all_fall_on_one_side_is_named(tmp_path: Path) -> None:
    """All of a class in one group (one patient with the rare disease): in a grouped split or fold it trained
    without a word on the side that has none of it, or got the 'too few images to spare one' note of 6 images."""
    root = tmp_path / "img"
    rows = ["path,label,person"]
    for i in range(18):
        label = ("a", "b", "rare")[i // 6]
        make_image(root / f"{i}.png", (40 * (i // 6), 0, 200))
        rows.append(f"{i}.png,{label},{'r' if label == 'rare' else f'p{i % 5}'}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    args = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.group_column=person"]
    args += ["data.folds=3", "data.image_size=16", f"data.cache_dir={tmp_path / 'c'}"]
    notes = {line for fold in range(3) for line in load_data(load_config(None, [*args, f"data.fold={fold}"])).notices}
    assert notes == {
        "note: no training image of 1 class(es): rare (its groups in column person are all on the validation side); "
        "the model cannot learn them: give it images in more groups",
        "note: no validation image of 1 class(es): rare (its groups in column person are all on the training side); "
        "val/acc does not cover them: give it images in more groups",
    }


def test_a_manifest_in_the_other_unicode_form_finds_its_files(tmp_path: Path) -> None:
    """A manifest written on a Mac spells 'ü' decomposed (NFD); the files unzipped on Linux are composed (NFC).
    Each line said '.../Müller/0.png: ... does not exist', naming what looked exactly like the file there."""
    import unicodedata

    root = tmp_path / "img"
    rows = ["path,label"]
    for i in range(6):
        make_image(root / "Müller" / f"{i}.png", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(unicodedata.normalize("NFD", f"Müller/{i}.png,{'rot' if i % 2 else 'blau'}"))
    rows.append(unicodedata.normalize("NFC", "Müller/0.png,blau"))  # the same file in the other form: twice
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv"])
    source = open_dataset(cfg.data).train
    assert source.problems == [f"{root / 'train.csv'}, line 8: path 'Müller/0.png' is listed twice (first on line 2)"]
    assert source.files == [(root / "Müller" / f"{i}.png").resolve() for i in range(6)]


def test_csv_test_manifest_is_the_test_split(tmp_path: Path) -> None:
    """A competition-style layout: train.csv for training/validation, test.csv with labels for the test figure."""
    root = tmp_path / "img"
    colors = {"red": (220, 0, 0), "blue": (0, 0, 220), "green": (0, 200, 0)}
    train_rows, test_rows = ["path,label"], ["path,label"]
    for i in range(30):
        label = list(colors)[i % 3]
        make_image(root / f"{i}.png", colors[label])
        (test_rows if i >= 24 else train_rows).append(f"{i}.png,{label}")
    test_rows.append("missing.png,red")
    (root / "train.csv").write_text("\n".join(train_rows) + "\n")
    (root / "test.csv").write_text("\n".join(test_rows) + "\n")
    base = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.image_size=16"]
    cfg = load_config(None, [*base, "data.test_csv_file=test.csv", "data.skip_bad_images=true"])
    bundle = load_data(cfg)
    assert bundle.classes == ["blue", "green", "red"]
    assert len(bundle.train) + len(bundle.val) == 24 and len(bundle.test) == 6
    index = {c: i for i, c in enumerate(bundle.classes)}
    expected = sorted(index[list(colors)[i % 3]] for i in range(24, 30))
    assert sorted(bundle.test.labels.tolist()) == expected
    assert any("missing.png" in line and "test.csv" in line for line in bundle.bad)
    # A test image the training manifest lists too is named: trained on, it made test_acc a training figure.
    (root / "both.csv").write_text("path,label\n24.png,red\n3.png,red\n")
    with pytest.raises(DataProblems) as info:
        load_data(load_config(None, [*base, "data.test_csv_file=both.csv"]))
    assert info.value.problems == [f"{(root / '3.png').resolve()}: listed in both train.csv and both.csv"]
    # labels the model is not trained on are refused by name; test_csv_file needs a csv dataset
    (root / "odd.csv").write_text("path,label\n24.png,purple\n")
    with pytest.raises(ClassLabError, match=r"odd.csv: labels not in the training manifest's classes: purple"):
        open_dataset(load_config(None, [*base, "data.test_csv_file=odd.csv"]).data)
    with pytest.raises(ClassLabError, match=r"data.test_csv_file 'nope.csv' not found"):
        open_dataset(load_config(None, [*base, "data.test_csv_file=nope.csv"]).data)
    (root / "unlabelled.csv").write_text("path\n24.png\n")  # a competition's test.csv: was "no column 'label'" alone
    with pytest.raises(
        ClassLabError,
        match=r"unlabelled.csv: no column 'label' \(data.label_column\): data.test_csv_file "
        r"lists labelled images to score; .* classlab predict RUN FOLDER \(--template unlabelled.csv",
    ):
        open_dataset(load_config(None, [*base, "data.test_csv_file=unlabelled.csv"]).data)
    with pytest.raises(ConfigError, match=r"data.test_csv_file needs data.dataset=csv"):
        load_config(None, ["data.test_csv_file=test.csv"])


def test_csv_val_manifest_is_the_validation_split(tmp_path: Path) -> None:
    """fastai's and Kaggle's habit: a validation list chosen by the data's maker, used as it is."""
    root = tmp_path / "img"
    colors = {"red": (220, 0, 0), "blue": (0, 0, 220), "green": (0, 200, 0)}
    rows = {"train": ["path,label"], "val": ["path,label"]}
    for i in range(30):
        label = list(colors)[i % 3]
        make_image(root / f"{i}.png", colors[label])
        rows["val" if i >= 24 else "train"].append(f"{i}.png,{label}")
    for part, lines in rows.items():
        (root / f"{part}.csv").write_text("\n".join(lines) + "\n")
    base = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.image_size=16"]
    bundle = load_data(load_config(None, [*base, "data.val_csv_file=val.csv"]))
    assert (len(bundle.train), len(bundle.val)) == (24, 6)
    assert sorted(Path(bundle.train_files[i]).name for i in bundle.split["val"]) == [f"{i}.png" for i in range(24, 30)]
    assert bundle.split["val_folder"] == str(root / "val.csv")
    assert any("validating on" in line and "val.csv (6 images)" in line for line in bundle.notices)
    # a row in both lists would be trained on and scored: named, like any bad row
    (root / "overlap.csv").write_text("path,label\n0.png,red\n25.png,blue\n")
    with pytest.raises(DataProblems, match=r"0.png: listed in both train.csv and overlap.csv"):
        load_data(load_config(None, [*base, "data.val_csv_file=overlap.csv"]))
    (root / "odd.csv").write_text("path,label\n24.png,purple\n")
    with pytest.raises(ClassLabError, match=r"odd.csv: labels not in the training manifest's classes: purple"):
        open_dataset(load_config(None, [*base, "data.val_csv_file=odd.csv"]).data)
    with pytest.raises(ConfigError, match=r"data.val_csv_file needs data.dataset=csv"):
        load_config(None, ["data.val_csv_file=val.csv"])


def test_csv_ids_without_extension_find_their_image(tmp_path: Path) -> None:
    """Kaggle's labels.csv often names `0a1b` for train/0a1b.jpg: the one image with that name is used;
    two candidates (0a1b.jpg and 0a1b.png) are a problem that asks for the extension."""
    root = tmp_path / "train"
    rows = ["id,breed"]
    for i in range(12):
        make_image(root / f"id{i}.jpg", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(f"id{i},{'red' if i % 2 else 'blue'}")
    make_image(root / "id0.png", (0, 0, 200))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    base = ["data.dataset=csv", f"data.root={root}", f"data.csv_file={tmp_path / 'labels.csv'}"]
    cfg = load_config(None, [*base, "data.path_column=id", "data.label_column=breed"])
    with pytest.raises(DataProblems, match=r"line 2: 'id0' could be id0.jpg, id0.png; write the extension"):
        load_data(cfg)
    (root / "id0.png").unlink()
    source = open_dataset(cfg.data).train
    assert [Path(source.describe(i)).name for i in range(3)] == ["id0.jpg", "id1.jpg", "id2.jpg"]
    assert len(source) == 12 and not source.problems


def _blue_red_rows(folder: Path, n: int, path_of: Callable[[int], str], sep: str = ",") -> list[str]:
    """``n`` images in ``folder`` (im0.jpg, ...), blue and red in turn; their manifest rows, each path as
    ``path_of(i)`` writes it."""
    rows = []
    for i in range(n):
        make_image(folder / f"im{i}.jpg", (200, 0, 0) if i % 2 else (0, 0, 200))
        rows.append(f"{path_of(i)}{sep}{'red' if i % 2 else 'blue'}")
    return rows


def test_csv_image_dir_and_a_manifest_beside_its_image_folder(tmp_path: Path) -> None:
    """A competition's folder: train.csv beside train_images/. Without data.image_dir not one listed file exists:
    one line names the folder that holds them and the setting; with it the manifest reads as listed."""
    root = tmp_path / "comp"
    rows = ["image_id,label", *_blue_red_rows(root / "train_images", 8, lambda i: f"im{i}")]
    (root / "test_images").mkdir()
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    base = ["data.dataset=csv", f"data.root={root}", "data.csv_file=train.csv", "data.path_column=image_id"]
    with pytest.raises(ClassLabError) as caught:
        open_dataset(load_config(None, base).data)
    assert str(caught.value) == (
        f"{root / 'train.csv'}: none of its 8 image paths exist under {root}; they are in "
        f"{root / 'train_images'}: set data.image_dir=train_images"
    )
    source = open_dataset(load_config(None, [*base, "data.image_dir=train_images"]).data).train
    assert len(source) == 8 and not source.problems
    assert Path(source.describe(0)) == root / "train_images" / "im0.jpg"
    with pytest.raises(ClassLabError, match=r"data.image_dir 'nope' is not a folder under data.root"):
        open_dataset(load_config(None, [*base, "data.image_dir=nope"]).data)
    # Paths written with the folder (train_images/im0.jpg) and data.image_dir as well: the line said
    # 'set data.root=<the root given> data.csv_file=train.csv', and following it gave the same line again.
    rows = ["image_id,label", *_blue_red_rows(root / "train_images", 8, lambda i: f"train_images/im{i}.jpg")]
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ClassLabError) as caught:
        open_dataset(load_config(None, [*base, "data.image_dir=train_images"]).data)
    assert str(caught.value) == (
        f"{root / 'train.csv'}: none of its 8 image paths exist under {root / 'train_images'}; they are relative to "
        f"data.root {root}: leave data.image_dir unset"
    )
    with pytest.raises(ClassLabError, match=r"data.image_dir needs data.dataset=csv"):
        load_config(None, ["data.dataset=folder", f"data.root={root}", "data.image_dir=train_images"])


def test_a_manifest_alone_is_the_data_and_paths_from_the_folder_above_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data.csv_file given alone trains on that manifest (the embedded sample was trained, the key unread);
    paths a script wrote relative to the project folder, not the manifest's, get the two keys that read them."""
    project = tmp_path / "project"
    rows = ["path,label", *_blue_red_rows(project / "photos", 8, lambda i: f"photos/im{i}.jpg")]
    (project / "lists").mkdir()
    (project / "lists" / "train.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.csv_file=project/lists/train.csv"])
    assert (cfg.data.dataset, cfg.data.root, cfg.data.csv_file) == ("csv", str(project / "lists"), "train.csv")
    with pytest.raises(ClassLabError) as caught:
        open_dataset(cfg.data)
    assert str(caught.value).endswith(
        f"they are relative to {project}: set data.root=project data.csv_file=lists/train.csv"
    )
    source = open_dataset(load_config(None, ["data.root=project", "data.csv_file=lists/train.csv"]).data).train
    assert len(source) == 8 and not source.problems
    with pytest.raises(ConfigError, match=r"data.csv_file=train.csv is not read by data.dataset=sample; set data."):
        load_config(None, ["data.dataset=sample", "data.csv_file=train.csv"])


def test_a_manifest_written_on_windows_reads_its_backslash_paths(tmp_path: Path) -> None:
    root = tmp_path / "data"
    rows = ["path,label"]
    for i in range(4):
        make_image(root / "photos" / "red" / f"{i}.jpg", (200, 0, 0))
        rows.append(f"photos\\red\\{i}.jpg,red")
    make_image(root / "photos" / "blue" / "0.jpg", (0, 0, 200))
    rows.append("photos/blue/0.jpg,blue")
    (root / "train.csv").write_bytes(("\r\n".join(rows) + "\r\n").encode())
    source = open_dataset(load_config(None, [f"data.csv_file={root / 'train.csv'}"]).data).train
    assert len(source) == 5 and not source.problems
    assert Path(source.describe(0)) == root / "photos" / "red" / "0.jpg"


@pytest.mark.parametrize(("name", "sep"), [("semicolons.csv", ";"), ("tabs.tsv", "\t")])
def test_a_manifest_separated_by_semicolons_or_tabs(tmp_path: Path, name: str, sep: str) -> None:
    """A spreadsheet set to German or French saves CSV with semicolons; a .tsv has tabs."""
    rows = [f"path{sep}label", *_blue_red_rows(tmp_path, 4, lambda i: f"im{i}.jpg", sep)]
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    ds = open_dataset(load_config(None, [f"data.csv_file={tmp_path / name}"]).data)
    assert ds.classes == ["blue", "red"] and len(ds.train) == 4 and not ds.train.problems


def test_a_manifest_without_a_header_line_is_named(tmp_path: Path) -> None:
    """Before: "no column 'path' (data.path_column); its columns are: im0.jpg, blue" (its first row)."""
    (tmp_path / "train.csv").write_text("\n".join(_blue_red_rows(tmp_path, 4, lambda i: f"im{i}.jpg")) + "\n")
    with pytest.raises(ClassLabError) as err:
        open_dataset(load_config(None, [f"data.csv_file={tmp_path / 'train.csv'}"]).data)
    assert str(err.value) == (
        f"{tmp_path / 'train.csv'}: its first line (im0.jpg, blue) is a row of data, not column names; add a header "
        "line first (path,label)"
    )


def test_a_path_column_of_another_name_is_pointed_at(tmp_path: Path) -> None:
    """Before: "no column 'path' (data.path_column); its columns are: file, label, group", with no word on which
    of them holds the images; a Kaggle manifest's file/id/image column is the usual first stumble."""
    rows = [f"im{i}.jpg,{c},g{i}" for i, c in enumerate(["blue", "red"] * 2)]
    (tmp_path / "train.csv").write_text("file,label,group\n" + "\n".join(rows) + "\n")
    with pytest.raises(ClassLabError) as err:
        open_dataset(load_config(None, [f"data.csv_file={tmp_path / 'train.csv'}"]).data)
    assert str(err.value) == (
        f"{tmp_path / 'train.csv'}: no column 'path' (data.path_column); did you mean data.path_column=file? "
        "(its columns are: file, label, group)"
    )
    (tmp_path / "two.csv").write_text("im0.jpg,x\n".join(["img,category\n", "im1.jpg,y\n"]))  # 2 columns
    with pytest.raises(ClassLabError, match=r"no column 'label' \(data.label_column\); did you mean "):
        open_dataset(load_config(None, [f"data.csv_file={tmp_path / 'two.csv'}", "data.path_column=img"]).data)
    (tmp_path / "three.csv").write_text("img,category,kind\nim0.jpg,x,a\n")  # which of two: no guess
    with pytest.raises(ClassLabError, match=r"no column 'label' \(data.label_column\); its columns are: img, "):
        open_dataset(load_config(None, [f"data.csv_file={tmp_path / 'three.csv'}", "data.path_column=img"]).data)


def test_torchvision_missing_files_named(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.dataset=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(ClassLabError, match=r"cifar10 not found in .*cifar-10-batches-py/.*data.download=true"):
        open_dataset(cfg.data)


def test_decode_cache_reused(tmp_path: Path, color_folder: Path) -> None:
    cfg = folder_cfg(color_folder, tmp=tmp_path)
    source = open_dataset(cfg.data).train
    first = decode(source, 16, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    second = decode(source, 16, tmp_path / "cache")
    assert torch.equal(first.images, second.images)
    # The same files labelled otherwise (data.classes reordered, a CSV corrected): their pixels are reused,
    # without a warning, and the labels are the source's own, never the cached ones.
    source.labels = (source.labels + 1) % (source.labels.max() + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = decode(source, 16, tmp_path / "cache")
    assert torch.equal(third.images, first.images)
    assert third.labels.tolist() == source.labels[third.kept].tolist() != first.labels.tolist()


def test_memory_loader_order_is_function_of_seed_and_epoch() -> None:
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    a = MemoryLoader(x, y, 3, shuffle=True, drop_last=True, seed=5)
    a.set_epoch(2)
    b = MemoryLoader(x, y, 3, shuffle=True, drop_last=True, seed=5)
    b.set_epoch(2)
    assert [t.tolist() for _, t in a] == [t.tolist() for _, t in b]
    b.set_epoch(3)
    assert [t.tolist() for _, t in a] != [t.tolist() for _, t in b]
    assert len(a) == 3


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The MNIST file format: a big-endian header, then the raw uint8 values."""
    magic = 2049 if array.ndim == 1 else 2051
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_files_train_single_channel(tmp_path: Path) -> None:
    """torchvision's MNIST path end to end on small files in its format: one channel, native 28px."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    cfg = load_config(
        None, ["data.dataset=mnist", f"data.root={tmp_path / 'mnist'}", f"data.cache_dir={tmp_path / 'c'}"]
    )
    bundle = load_data(cfg)
    assert bundle.channels == 1 and bundle.size == 28 and bundle.classes[0].startswith("0")
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    assert len(bundle.train) + len(bundle.val) == 200 and len(bundle.test) == 50


def test_exif_orientation_applied_and_large_jpeg_drafted(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert open_image(tmp_path / "phone.jpg").size == (200, 400)
    big = Image.new("RGB", (2048, 1536), (10, 200, 10))
    big.save(tmp_path / "big.jpg", quality=90)
    drafted = open_image(tmp_path / "big.jpg", 128)
    assert min(drafted.size) >= 128 and drafted.size[0] < 2048
    t = image_to_tensor(drafted, 128, 3)
    assert t.shape == (3, 128, 128) and abs(int(t[1].float().mean()) - 200) < 5


def test_per_pixel_mean_image() -> None:
    from classlab.data.preprocess import Normalize, compute_stats

    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255
    mean, std = compute_stats(images, per_pixel=True)
    assert mean.shape == (3, 2, 2) and mean[0, 0, 0] == 1.0 and mean[0, 1, 1] == 0.0 and torch.all(std == 1)
    assert torch.all(Normalize(mean, std)(images) == 0)
    channel_mean, channel_std = compute_stats(images)
    assert channel_mean.shape == (3,) and channel_mean[0] == pytest.approx(0.25)


def test_folder_trains_at_its_own_size_capped(tmp_path: Path) -> None:
    from classlab.data.sources import DEFAULT_FILE_SIZE, training_size

    for c in ("a", "b"):
        make_image(tmp_path / "small" / c / "1.png", (0, 0, 0), size=20)
        make_image(tmp_path / "big" / c / "1.png", (0, 0, 0), size=300)
    small = load_config(None, ["data.dataset=folder", f"data.root={tmp_path / 'small'}"]).data
    big = load_config(None, ["data.dataset=folder", f"data.root={tmp_path / 'big'}"]).data
    assert training_size(small, open_dataset(small)) == 20
    assert training_size(big, open_dataset(big)) == DEFAULT_FILE_SIZE


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from classlab.run import atomic_write_text

    target = tmp_path / "sub" / "file.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_loaders_resume_an_epoch_at_the_batch_they_stopped_after() -> None:
    """A loader restored from its state_dict serves the rest of that epoch, the batches an unbroken one would;
    a state from another epoch is ignored (the new epoch starts at its first batch)."""
    images = torch.arange(100, dtype=torch.uint8).repeat_interleave(3).view(100, 3, 1, 1)
    labels = torch.arange(100) % 10
    whole = MemoryLoader(images, labels, 8, shuffle=True, drop_last=True, seed=3)
    whole.set_epoch(4)
    batches = [y for _, y in whole]
    partial = iter(whole)
    for _ in range(5):
        next(partial)
    state = whole.state_dict()
    assert state == {"epoch": 4, "batches": 5}
    restored = MemoryLoader(images, labels, 8, shuffle=True, drop_last=True, seed=3)
    restored.load_state_dict(state)
    rest = [y for _, y in restored]
    assert len(rest) == len(batches) - 5 and all(torch.equal(a, b) for a, b in zip(rest, batches[5:]))
    restored.load_state_dict(state)
    restored.set_epoch(5)
    assert len([y for _, y in restored]) == len(batches)

    # The streaming loader: its sampler starts past the served batches and reads nothing it skips.
    from classlab.data.loaders import EpochSampler, ResumableLoader

    data = torch.utils.data.TensorDataset(labels)

    def loader() -> ResumableLoader:
        return ResumableLoader(data, batch_size=8, sampler=EpochSampler(100, seed=3), drop_last=True)

    first = loader()
    first.sampler.set_epoch(4)
    streamed = [b[0] for b in first]
    assert len(streamed) == len(batches)
    again = loader()
    again.load_state_dict({"epoch": 4, "batches": 5})
    assert all(torch.equal(a, b[0]) for a, b in zip(streamed[5:], again, strict=True))
