"""Where images come from: the embedded sample, torchvision sets, image folders, CSV manifests.

A source is a list of images with integer labels and a fixed class order, nothing more: it
knows how to read image ``i``, never how to batch or augment it. Problems with the files
(unreadable, truncated, empty class folders, stray files) are collected into one report so a
user fixes them all at once instead of one per run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from classlab.config import IMAGE_EXTENSIONS, DataSection, yaml_text
from classlab.data.preprocess import BadImage, is_system_file, open_image
from classlab.data.tasks import combined_index, combined_names
from classlab.errors import ClassLabError, command, utf8_text

SAMPLE_ZIP = Path(__file__).parent / "sample" / "cifar10_sample.zip"
NATIVE_SIZE = {"sample": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "mnist": 28, "fashion_mnist": 28}
UNLABELED = "(unlabeled)"  # the one class of a folder without class folders
DEFAULT_FILE_SIZE = 128  # training resolution of folder/CSV images when data.image_size is not set

# A problem data.skip_bad_images cannot take away (it skips files, not classes): its own fix is named.
EMPTY_CLASS = "class folder with no images"


@dataclass
class Source:
    """Images ``0..n-1`` with labels; ``read(i, size)`` gives image i as a PIL image.

    ``size`` is a hint that the image is bound for that resolution (large JPEGs then decode at
    a reduced scale); without it the image comes at its full size (multi-scale testing).
    """

    name: str
    labels: np.ndarray
    read: Callable[..., Image.Image]
    describe: Callable[[int], str]
    fingerprint: str
    channels: int = 3
    groups: np.ndarray | None = None
    array: np.ndarray | None = None  # uint8 NHWC when the whole set is already in memory
    files: list[Path] | None = None  # the image files, for sources that read files
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # worth a line, not worth stopping for
    given_val: np.ndarray | None = None  # bool per image: from the data's own validation folder (root/val/)
    given_val_from: str | None = None  # that folder, for split.json and the notice

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A dataset's parts and its class order (index -> name)."""

    classes: list[str]
    train: Source
    test: Source | None
    native_size: int | None
    tasks: dict[str, list[str]] | None = None  # multitask: task name -> its classes; ``classes`` is their product


def natural_key(text: str) -> list[object]:
    """'img10' sorts after 'img9'; class folders 0..17 keep their numeric order."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _digest(*parts: object) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def class_name(text: str) -> str:
    """A class as one string however it was typed or stored: macOS writes a Korean folder name decomposed (NFD),
    Linux, Windows and a CSV typed anywhere composed (NFC); the same word looked alike and matched nothing. The
    spaces around it do not count, as a manifest's never did: a folder 'rose ' (a space typed after the name,
    unseen in a file browser) is the class 'rose', and a run trained before, whose classes.json says 'rose ',
    maps its images to that class by name."""
    composed = unicodedata.normalize("NFC", text)
    return composed.strip() or composed


def case_twins(names: Sequence[str]) -> list[list[str]]:
    """Groups of names that differ only in case (Daisy, daisy): each is a class of its own."""
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names), key=lambda n: (natural_key(n), n)):
        groups.setdefault(name.casefold(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def twins_note(groups: list[list[str]], what: str, fix: str) -> list[str]:
    """One line naming the groups of ``what`` (class folders, labels) that differ only in case, and ``fix``."""
    if not groups:
        return []
    more = f"; and {len(groups) - 5} more" if len(groups) > 5 else ""
    shown = "; ".join(" and ".join(g) for g in groups[:5]) + more
    return [f"note: {what} differ only in case and are trained as separate classes: {shown}; {fix}"]


def unknown_named(unknown: Sequence[str], known: Sequence[str]) -> list[str]:
    """Unknown class names, each one that differs from a known class only in case saying which (Daisy where the
    classes have daisy): the two look like one class to a reader of the refusal."""
    by_case = {k.casefold(): k for k in known}
    twin = {u: by_case.get(u.casefold()) for u in unknown}
    return [f"{u} (only its case differs from {twin[u]})" if twin[u] else u for u in unknown]


def _order_classes(
    found: list[str], wanted: list[str] | None, where: str, *, ordered: bool = False, key: str = "data.classes"
) -> list[str]:
    """The class order: ``wanted`` (data.classes, or a task's model.tasks.<task>.classes as ``key``) checked
    against ``found``, else natural order (``found`` as given when ``ordered``)."""
    found = list(found) if ordered else sorted(found, key=natural_key)
    if wanted is None:
        return found
    wanted = [class_name(c) for c in wanted]
    twice = list(dict.fromkeys(c for c in wanted if wanted.count(c) > 1))
    if twice:
        raise ClassLabError(f"{key} lists {', '.join(twice)} twice; give each class once")
    missing = [c for c in wanted if c not in found]
    extra = [c for c in found if c not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"not found in {where}: {', '.join(unknown_named(missing, found))}")
        if extra:
            parts.append(f"found in {where} but not in {key}: {', '.join(extra)}")
        if len(found) > 20:
            fix = f"list each of the data's {len(found)} classes once, in the order you want"
        else:
            fix = f"list each class of the data once, in the order you want: {key}=[{','.join(map(yaml_text, found))}]"
        raise ClassLabError(f"{key} does not match the data ({'; '.join(parts)}); {fix}")
    return list(wanted)


# ---------------------------------------------------------------------------------------------
# The embedded sample
# ---------------------------------------------------------------------------------------------


def _sample(cfg: DataSection) -> Dataset:
    with zipfile.ZipFile(SAMPLE_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))
    classes = sorted({n.split("/")[1] for n in names}, key=natural_key)
    classes = _order_classes(classes, cfg.classes, "the embedded sample")
    index = {c: i for i, c in enumerate(classes)}
    stat = SAMPLE_ZIP.stat()

    def part(split: str) -> Source:
        members = [n for n in names if n.startswith(split + "/")]
        labels = np.array([index[n.split("/")[1]] for n in members], dtype=np.int64)

        def read(i: int, size: int | None = None) -> Image.Image:
            return open_image(_open_zip(str(SAMPLE_ZIP), os.getpid()).read(members[i]), size)

        return Source(
            name=f"sample/{split}",
            labels=labels,
            read=read,
            describe=lambda i: f"sample:{members[i]}",
            fingerprint=_digest("sample", split, stat.st_size, classes),
            array=_zip_array(str(SAMPLE_ZIP), tuple(members)),
        )

    return Dataset(classes, part("train"), part("test"), NATIVE_SIZE["sample"])


@cache
def _open_zip(path: str, pid: int) -> zipfile.ZipFile:
    """The sample's archive, opened once per process (a loader worker has its own): reading its index
    again for every image made streaming the sample about a hundred times slower than decoding it."""
    return zipfile.ZipFile(path)


@cache
def _zip_array(path: str, members: tuple[str, ...]) -> np.ndarray:
    """The sample decoded in one pass (one zip open, not one per image)."""
    with zipfile.ZipFile(path) as archive:
        return np.stack([np.asarray(open_image(archive.read(m)).convert("RGB")) for m in members])


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def unreadable_kind(path: Path) -> str:
    """What a path with an image's name is when it is not a regular file."""
    if path.is_symlink() and not path.exists():
        return f"a link to '{os.readlink(path)}', which does not exist"
    if path.is_dir():
        return "a folder named like an image"
    return "not a regular file (a pipe, socket or device), so it cannot be read as an image"


def _sort_file(path: Path, files: list[Path], problems: list[str]) -> None:
    """An image joins ``files``; hidden and system files are passed over; anything else is a problem."""
    if is_system_file(path.name):
        return
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        if path.is_file():
            files.append(path)
        else:  # opening a pipe would wait for ever; a dangling link is a file lost in a copy
            problems.append(f"{path}: {unreadable_kind(path)}")
    else:
        problems.append(f"{path}: not an image file (extension '{path.suffix or 'none'}')")


def _scan_class_folders(root: Path, notices: list[str] | None = None) -> tuple[dict[str, list[Path]], list[str]]:
    """class name -> image files, and the problems seen (empty folders, non-image files in class folders).

    Non-image files beside the class folders (a README, labels.txt, a notebook) are how people
    keep folders; like torchvision's ImageFolder they are ignored, with one line in ``notices``.
    An image there is still a problem: it belongs in a class folder.
    """
    problems: list[str] = []
    per_class: dict[str, list[Path]] = {}
    spelled: dict[str, list[str]] = {}  # class -> its folders' names (NFC), two where only spaces tell them apart
    ignored: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if is_system_file(entry.name):
            continue
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_EXTENSIONS:
                problems.append(f"{entry}: an image beside the class folders (images go in {root}/<class>/)")
            else:
                ignored.append(entry.name)
            continue
        files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(entry):
            dirnames[:] = sorted((d for d in dirnames if not is_system_file(d)), key=natural_key)
            for name in sorted(filenames, key=natural_key):
                _sort_file(Path(dirpath) / name, files, problems)
        if not files:
            problems.append(f"{entry}: {EMPTY_CLASS}")
        per_class.setdefault(class_name(entry.name), []).extend(files)  # a copy from a Mac beside one from Linux
        spelled.setdefault(class_name(entry.name), []).append(unicodedata.normalize("NFC", entry.name))
    if ignored and notices is not None:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        notices.append(f"note: ignored {len(ignored)} non-image file(s) beside the class folders in {root}: {shown}")
    if notices is not None:
        notices += _class_folder_notes(root, spelled)
    # Natural order of the folders' names as written (spaces and all): the order runs trained before names were
    # stripped, so ' zebra/' stays the class index it was for them.
    return dict(sorted(per_class.items(), key=lambda kv: natural_key(min(spelled[kv[0]], key=natural_key)))), problems


def _class_folder_notes(root: Path, spelled: dict[str, list[str]]) -> list[str]:
    """A line for folders read as one class because only the spaces around their names differ ('rose', 'rose '),
    and one for folders that differ only in case (Daisy, daisy), which stay classes of their own."""
    notes = []
    for cls, names in spelled.items():
        if len(set(names)) > 1:
            shown = " and ".join(repr(n) for n in sorted(set(names)))
            notes.append(
                f"note: class folders {shown} in {root} differ only in the spaces around their names and are read "
                f"as one class, '{cls}'; merge them into one folder"
            )
    fix = "if they are one class, move the images of one folder into the other"
    return notes + twins_note(case_twins(list(spelled)), f"class folders in {root}", fix)


def _file_source(
    name: str, files: list[Path], labels: list[int], root: Path, problems: list[str], max_pixels: int | None = None
) -> Source:
    stats = []
    for f in files:
        st = f.stat()
        stats.append((str(f.relative_to(root)) if f.is_relative_to(root) else str(f), st.st_size, st.st_mtime_ns))
    return Source(
        name=name,
        labels=np.array(labels, dtype=np.int64),
        read=lambda i, size=None: open_image(files[i], size, max_pixels),
        describe=lambda i: str(files[i]),
        fingerprint=_digest(name, str(root), stats, max_pixels),
        problems=problems,
        files=files,
    )


VAL_FOLDERS = ("val", "valid", "validation")  # the names people give a validation split's folder
ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")


def _part_folder(root: Path, names: tuple[str, ...]) -> Path | None:
    """root's sub-folder with one of ``names`` (any case: Train/, TEST/); two of them is ambiguous."""
    found = [p for p in root.iterdir() if p.name.lower() in names and p.is_dir()]
    if len(found) > 1:
        shown = ", ".join(sorted(p.name + "/" for p in found))
        raise ClassLabError(f"{root} has {shown}: which one holds the data is ambiguous; keep one of them")
    return found[0] if found else None


def _unpack(archive: Path) -> str:
    """The shell line that unpacks a downloaded archive beside itself (reading through it every epoch would be slow)."""
    name = archive.name.lower()
    folder = archive.parent / archive.name[: len(archive.name) - len(next(a for a in ARCHIVES if name.endswith(a)))]
    if name.endswith(".zip"):
        return f"unzip '{archive}' -d '{folder}'"
    return f"mkdir -p '{folder}' && tar -xf '{archive}' -C '{folder}'"


def _has_class_folders(folder: Path) -> bool:
    return any(p.is_dir() and not is_system_file(p.name) for p in folder.iterdir())


def _folder(cfg: DataSection) -> Dataset:
    root = Path(cfg.root or "")
    if root.is_file() and root.name.lower().endswith(ARCHIVES):
        raise ClassLabError(
            f"data.root '{root}' is an archive; unpack it once and point data.root at the folder: {_unpack(root)}"
        )
    if not root.is_dir():
        raise ClassLabError(
            f"data.root '{root}' is not a folder; expected {root}/<class>/<images> or {root}/train/<class>/"
        )
    train_dir = _part_folder(root, ("train",))
    base = train_dir or root
    if train_dir is None and not _has_class_folders(root):
        return _flat_folder(root, cfg.max_image_pixels)
    notices: list[str] = []
    per_class, problems = _scan_class_folders(base, notices)
    if not per_class:
        raise ClassLabError(f"{base} has no class folders; put images in {base}/<class>/<image files>")
    classes = _order_classes(list(per_class), cfg.classes, str(base), ordered=True)
    index = {c: i for i, c in enumerate(classes)}

    def labelled(part: Path) -> tuple[dict[str, list[Path]], list[str]]:
        scanned, probs = _scan_class_folders(part)
        unknown = [c for c in scanned if c not in index]
        if unknown:
            raise ClassLabError(f"{part} has class folders not in {base}: {', '.join(unknown_named(unknown, classes))}")
        return scanned, probs

    def source(part_root: Path, scanned: dict[str, list[Path]], probs: list[str], label: str) -> Source:
        files, labels = [], []
        for cls in classes:
            for f in scanned.get(cls, []):
                files.append(f)
                labels.append(index[cls])
        return _file_source(f"folder:{label}", files, labels, part_root, probs, cfg.max_image_pixels)

    val_dir = _part_folder(root, VAL_FOLDERS) if train_dir is not None else None
    given: list[bool] = [False] * sum(len(v) for v in per_class.values())
    if val_dir is not None and not any(val_dir.iterdir()):
        notices.append(f"note: {val_dir} is empty; validating on data.val_fraction of {base} instead")
        val_dir = None
    if val_dir is not None:
        # The data's own validation images join the training source after its images, marked, so
        # one decode, one cache and one split.json (indices) serve both; make_split keeps them apart.
        val_scanned, val_problems = labelled(val_dir)
        merged = {c: per_class.get(c, []) + val_scanned.get(c, []) for c in classes}
        given = [f.is_relative_to(val_dir) for c in classes for f in merged[c]]
        per_class, problems = merged, problems + val_problems
    train = source(root if val_dir is not None else base, per_class, problems, "train")
    train.notices = notices
    if val_dir is not None:
        train.given_val, train.given_val_from = np.array(given, dtype=bool), str(val_dir)
    test = None
    test_dir = _part_folder(root, ("test",)) if train_dir is not None else None
    if test_dir is not None and not _has_class_folders(test_dir):
        notices.append(
            f"note: {test_dir} has no class folders, so its images have no labels and are not scored; "
            "predict them after training: "
            + command(
                f"classlab predict <run folder> {test_dir} --out predictions.csv",
                f"classlab.predict(<run folder>, {str(test_dir)!r}, 'predictions.csv')",
            )
        )
    elif test_dir is not None:
        test = source(test_dir, *labelled(test_dir), "test")
    return Dataset(classes, train, test, None)


def _flat_folder(root: Path, max_pixels: int | None) -> Dataset:
    """Images directly in root, no class folders: one class, which only the rotation pretext can use.

    Unlabelled photo dumps are what self-supervised pretraining is for; classification on such a
    folder stops in load_data with a message asking for class folders.
    """
    files, problems = [], []
    for entry in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        _sort_file(entry, files, problems)
    if not files:
        raise ClassLabError(f"{root} holds no images; put images in {root}/<class>/ or directly in {root}")
    train = _file_source("folder:train", files, [0] * len(files), root, problems, max_pixels)
    return Dataset([UNLABELED], train, None, None)


# ---------------------------------------------------------------------------------------------
# CSV manifests
# ---------------------------------------------------------------------------------------------


@dataclass
class _Manifest:
    """The usable rows of one CSV manifest, before labels become class indices."""

    path: Path
    files: list[Path]
    labels: list[str]  # the label column, or the task values joined (multi-task)
    task_values: list[tuple[str, ...]]
    groups: list[str]
    problems: list[str]


def _manifest_path(cfg: DataSection, name: str, key: str) -> Path:
    root = Path(cfg.root or "").resolve()
    manifest = Path(name)
    if not manifest.is_absolute():
        manifest = root / manifest if (root / manifest).is_file() else manifest.resolve()
    if not manifest.is_file():
        raise ClassLabError(f"{key} '{name}' not found (looked in {root} and the current folder)")
    return manifest


def _with_image_extension(path: Path, listings: dict[Path, dict[str, list[str]]]) -> tuple[Path, list[str]]:
    """``train/0a1b`` -> ``train/0a1b.jpg`` (many competitions' id columns are file names without the
    extension): the path with the one image extension that exists, and every candidate found.

    Each folder is listed once (``listings``), not probed with a stat per extension per row.
    """
    folder = path.parent
    if folder not in listings:
        by_stem: dict[str, list[str]] = {}
        if folder.is_dir():
            for name in os.listdir(folder):
                stem, ext = os.path.splitext(name)
                if ext.lower() in IMAGE_EXTENSIONS:
                    by_stem.setdefault(stem, []).append(name)
        listings[folder] = by_stem
    found = sorted(listings[folder].get(path.name, []))
    return (folder / found[0] if len(found) == 1 else path), found


def _image_dir(cfg: DataSection) -> Path:
    """The folder a manifest's paths are relative to: ``data.image_dir`` under data.root, else data.root."""
    root = Path(cfg.root or "").resolve()
    if not cfg.image_dir:
        return root
    folder = (root / cfg.image_dir).resolve()
    if not folder.is_dir():
        raise ClassLabError(f"data.image_dir '{cfg.image_dir}' is not a folder under data.root {root}")
    return folder


def _where_listed_images_are(base: Path, rels: list[str]) -> Path | None:
    """The sub-folder of ``base`` where most of ``rels`` exist: the usual slip with a competition's
    manifest, whose ids name files in ``train_images/``, not beside the CSV."""
    sample = rels[:20]
    candidates = [p for p in sorted(base.iterdir()) if p.is_dir() and not is_system_file(p.name)]
    best, best_found = None, len(sample) // 2
    for folder in candidates:
        listings: dict[Path, dict[str, list[str]]] = {}
        found = 0
        for rel in sample:
            path = folder / rel
            found += path.is_file() or len(_with_image_extension(path, listings)[1]) == 1
        if found > best_found:
            best, best_found = folder, found
    return best


def delimiter(text: str) -> str:
    """The manifest's separator, read off its header: a comma, or the semicolon of a spreadsheet set to a
    language that writes decimal commas (German, French), or a tab (.tsv)."""
    header = text.split("\n", 1)[0]
    if "," in header:
        return ","
    return next((sep for sep in (";", "\t") if sep in header), ",")


def _portable(rel: str, base: Path) -> str:
    """A path a Windows machine wrote (photos\\cat\\1.jpg) read with forward slashes, unless a file of that very
    name exists (a backslash is a legal, if rare, character in a Linux file name)."""
    if "\\" not in rel or os.sep == "\\" or (base / rel).exists():
        return rel
    return rel.replace("\\", "/")


def _stored_form(path: Path) -> Path:
    """The file as the disk spells it when the manifest spells its name in the other Unicode form: a manifest
    written on a Mac (decomposed, NFD) beside files unzipped on Linux (composed, NFC), or the reverse. Before,
    the line said the file 'does not exist', naming a path that looked exactly like the file there."""
    if path.exists() or path.is_symlink() or str(path).isascii():
        return path
    for form in ("NFC", "NFD"):
        other = Path(unicodedata.normalize(form, str(path)))
        if other != path and other.is_file():
            return other
    return path


def _empty_group(manifest: Path, line: int, column: str) -> str:
    """Blank group ids would all be one group: unrelated images kept together on one side of the split."""
    return (
        f"{manifest}, line {line}: empty group (column '{column}'); give every image its group "
        "(an image that shares none with others gets an id of its own)"
    )


def column_names(header: Sequence[str]) -> list[str]:
    """A header's column names without the spaces around them (`path, label` typed by hand), as its values are
    read; as written where two would then be one name."""
    stripped = [c.strip() for c in header]
    return stripped if len(set(stripped)) == len(set(header)) else list(header)


def _check_columns(
    cfg: DataSection,
    manifest: Path,
    columns: list[str],
    tasks: dict[str, str] | None,
    splits_by_group: bool,
    first_row: Mapping[str, str | None] | None = None,
) -> None:
    """Every column the config names is in the manifest; one a case or a space away is pointed at."""
    for key, col in (
        ("path_column", cfg.path_column),
        ("label_column", None if tasks else cfg.label_column),
        ("group_column", cfg.group_column if splits_by_group else None),  # a test manifest needs no groups
        *((f"model.tasks.{name}.column", col) for name, col in (tasks or {}).items()),
    ):
        if col is not None and col not in columns:
            where = key if key.startswith("model.") else f"data.{key}"
            same = [c for c in columns if c.strip().lower() == col.strip().lower()]  # Race for race, 'label ' ...
            if same:
                raise ClassLabError(f"{manifest}: no column '{col}' ({where}); did you mean {where}={same[0]}?")
            if any(Path(c.strip()).suffix.lower() in IMAGE_EXTENSIONS for c in columns):  # no header line at all
                raise ClassLabError(
                    f"{manifest}: its first line ({', '.join(columns)}) is a row of data, not column names; add a "
                    f"header line first ({cfg.path_column},{cfg.label_column})"
                )
            guess = _column_guess(key, cfg, columns, first_row or {})
            listed = f"its columns are: {', '.join(columns)}"
            hint = f"did you mean {where}={guess}? ({listed})" if guess else listed
            raise ClassLabError(f"{manifest}: no column '{col}' ({where}); {hint}")


def _column_guess(key: str, cfg: DataSection, columns: list[str], first_row: Mapping[str, str | None]) -> str | None:
    """The one column that must be the one a key names: ``file`` when only its values are image files (the path
    column), the other column of a two-column manifest (the labels); None where it is a guess among several."""
    images = [c for c in columns if Path((first_row.get(c) or "").strip()).suffix.lower() in IMAGE_EXTENSIONS]
    if key == "path_column":
        return images[0] if len(images) == 1 else None
    others = [c for c in columns if c != cfg.path_column and c not in images]
    return others[0] if key == "label_column" and len(columns) == 2 and len(others) == 1 else None


def _predict_into(template: str) -> str:
    """How to label a competition's unlabelled test images (and fill its template), in the reader's words."""
    return command(
        f"run classlab predict RUN FOLDER (--template {template} to fill it as a submission)",
        f"call classlab.predict(RUN, FOLDER) (classlab.predict.write_submission(RUN, [FOLDER], {template!r}, OUT) "
        "to fill it as a submission)",
    )


def _read_manifest(
    cfg: DataSection, manifest: Path, tasks: dict[str, str] | None, *, splits_by_group: bool = False, test: bool = False
) -> _Manifest:
    root = Path(cfg.root or "").resolve()
    text = utf8_text(manifest)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter(text))
    columns = column_names(reader.fieldnames or [])
    reader.fieldnames = columns
    rows = list(reader)
    if test and not tasks and cfg.label_column not in columns and cfg.path_column in columns:
        # A competition's test.csv has no labels: scoring needs them, and predicting unlabelled images is predict's.
        near = [c for c in columns if c.strip().lower() == cfg.label_column.strip().lower()]
        if not near:
            raise ClassLabError(
                f"{manifest}: no column '{cfg.label_column}' (data.label_column): data.test_csv_file lists labelled "
                f"images to score; to label unlabelled ones, train without it and {_predict_into(manifest.name)}"
            )
    _check_columns(cfg, manifest, columns, tasks, splits_by_group, rows[0] if rows else None)
    if not rows:
        raise ClassLabError(f"{manifest} has no rows")
    base = _image_dir(cfg)
    # Containment is judged on the path as written: a folder under data.root that is a link to another
    # disk (images/ -> /mnt/big/images) is the user's layout, while '../' or an absolute path leaves the root.
    written_base = Path(os.path.normpath(root / (cfg.image_dir or "")))
    out = _Manifest(manifest, [], [], [], [], [])
    missing: list[str] = []  # paths as listed, of files that do not exist
    first_line: dict[Path, int] = {}
    listings: dict[Path, dict[str, list[str]]] = {}  # folder -> image files by name without extension
    for line, row in enumerate(rows, start=2):
        rel = _portable((row.get(cfg.path_column) or "").strip(), base)
        path = _stored_form((base / rel).resolve())
        if not rel:
            out.problems.append(f"{manifest}, line {line}: empty path (column '{cfg.path_column}')")
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS and not path.is_file():
            path, found = _with_image_extension(path, listings)
            if len(found) > 1:
                shown = ", ".join(found)
                out.problems.append(f"{manifest}, line {line}: '{rel}' could be {shown}; write the extension")
                continue
        if not Path(os.path.normpath(written_base / rel)).is_relative_to(root):
            raise _outside_root(manifest, line, rel, written_base, root)
        if path in first_line:
            # The same image twice could sit in train and val at once, or carry two labels.
            first = first_line[path]
            out.problems.append(f"{manifest}, line {line}: path '{rel}' is listed twice (first on line {first})")
            continue
        first_line[path] = line
        values: tuple[str, ...] = ()
        if tasks:
            values = tuple(class_name((row.get(col) or "").strip()) for col in tasks.values())
            empty = [name for name, v in zip(tasks, values) if not v]
            if empty:
                out.problems.append(f"{manifest}, line {line}: empty label of task(s) {', '.join(empty)}")
                continue
            label = "|".join(values)
        else:
            label = class_name((row.get(cfg.label_column) or "").strip())
        if not label:
            out.problems.append(f"{manifest}, line {line}: empty label")
            continue
        group = (row.get(cfg.group_column) or "").strip() if cfg.group_column else ""
        if splits_by_group and not group:
            out.problems.append(_empty_group(manifest, line, cfg.group_column or ""))
            continue
        if not path.is_file():
            what = "does not exist" if not path.exists() and not path.is_symlink() else f"is {unreadable_kind(path)}"
            out.problems.append(f"{path}: file listed in {manifest.name} (line {line}) {what}")
            missing.append(rel)
            continue
        out.files.append(path)
        out.labels.append(label)
        if tasks:
            out.task_values.append(values)
        out.groups.append(group)
    if missing and not out.files:
        _none_found(manifest, base, root, missing)
    return out


class OutsideRoot(ClassLabError):
    """A manifest's path climbs out of data.root (``../images/x.jpg`` in ``lists/train.csv``); ``top`` is the
    folder above that holds both (None when none does: an absolute path elsewhere, a file that is not there)."""

    def __init__(self, message: str, top: Path | None) -> None:
        super().__init__(message)
        self.top = top


def _outside_root(manifest: Path, line: int, rel: str, written_base: Path, root: Path) -> OutsideRoot:
    """The refusal of a path outside data.root, naming the settings that read it where there are some: the
    folder above that holds the manifest and the image as data.root, the paths' own folder as data.image_dir."""
    message = f"{manifest}, line {line}: path '{rel}' is outside data.root {root}; paths must stay inside it"
    target = Path(os.path.normpath(written_base / rel))
    top = Path(os.path.commonpath([written_base, target, manifest.resolve()]))
    if Path(rel).is_absolute() or not target.exists() or top == Path(top.anchor):
        return OutsideRoot(message, None)
    shown = os.path.relpath(top) if top.is_relative_to(Path.cwd()) else str(top)
    fix = (
        f"data.root={shown} data.csv_file={manifest.resolve().relative_to(top).as_posix()} "
        f"data.image_dir={written_base.relative_to(top).as_posix()}"
    )
    return OutsideRoot(f"{message}: to read them from {top}, set {fix}", top)


def _none_found(manifest: Path, base: Path, root: Path, missing: list[str]) -> None:
    """Not one listed file exists: say where they are, when a sub-folder holds them, in place of a list of misses."""
    folder = _where_listed_images_are(base, missing) if base.is_dir() else None
    if folder is None:
        _above(manifest, base, root, missing)
        return
    where = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else str(folder)
    raise ClassLabError(
        f"{manifest}: none of its {len(missing)} image paths exist under {base}; they are in {folder}: "
        f"set data.image_dir={where}"
    )


def _above(manifest: Path, base: Path, root: Path, missing: list[str]) -> None:
    """Listed paths relative to a folder above the manifest's (the project folder a script wrote it from):
    that folder is the data.root to give, the manifest named under it."""
    sample = missing[:20]
    for folder in list(base.parents)[:3]:
        if sum((folder / rel).is_file() for rel in sample) <= len(sample) // 2:
            continue
        if folder == root != base:
            # Relative to data.root itself: data.image_dir is what sends them astray (the data.root the line
            # below would name is the one already given, and the same error came back).
            raise ClassLabError(
                f"{manifest}: none of its {len(missing)} image paths exist under {base}; they are relative to "
                f"data.root {root}: leave data.image_dir unset"
            )
        shown = os.path.relpath(folder) if folder.is_relative_to(Path.cwd()) else str(folder)
        raise ClassLabError(
            f"{manifest}: none of its {len(missing)} image paths exist under {base}; they are relative to "
            f"{folder}: set data.root={shown} data.csv_file={manifest.resolve().relative_to(folder).as_posix()}"
        )


def _csv(cfg: DataSection, tasks: dict[str, str] | None = None, orders: dict[str, list[str]] | None = None) -> Dataset:
    """A manifest's images and labels; with ``tasks`` (name -> column) one label per task column, each task's
    classes in the order ``orders`` gives it (model.tasks.<task>.classes), else in natural order.

    Multi-task labels are stored as one combined label (the row-major index into the product of
    the tasks' classes), so splitting, stratifying on the combination, caching and batching all
    work on one integer as for plain classification; ``data.tasks`` takes it apart.
    ``data.test_csv_file`` is a second manifest with the same columns: the held-out test set,
    labelled with the training manifest's classes; ``data.val_csv_file`` a third, the validation set.
    """
    root = Path(cfg.root or "").resolve()
    grouped = bool(cfg.group_column) and not cfg.val_csv_file
    train = _read_manifest(
        cfg, _manifest_path(cfg, cfg.csv_file or "", "data.csv_file"), tasks, splits_by_group=grouped
    )
    own_rows = len(train.files)  # rows of a validation manifest come after these
    test = val = None
    if cfg.test_csv_file:
        test = _read_manifest(cfg, _manifest_path(cfg, cfg.test_csv_file, "data.test_csv_file"), tasks, test=True)
    if cfg.val_csv_file:
        val = _read_manifest(cfg, _manifest_path(cfg, cfg.val_csv_file, "data.val_csv_file"), tasks)
    if test is not None:
        test = _held_out(test, [m for m in (train, val) if m is not None])
    task_classes: dict[str, list[str]] | None = None
    if tasks:
        if not train.files:
            raise ClassLabError(f"{train.path}: no row has a label for every task ({', '.join(tasks)})")
        task_classes = {
            name: _order_classes(
                sorted({v[t] for v in train.task_values}),
                (orders or {}).get(name),
                f"column '{column}' of {train.path}",
                key=f"model.tasks.{name}.classes",
            )
            for t, (name, column) in enumerate(tasks.items())
        }
        few = [f"{name} ({', '.join(c)})" for name, c in task_classes.items() if len(c) < 2]
        if few:
            raise ClassLabError(f"{train.path}: each task needs at least 2 classes; these have one: {'; '.join(few)}")
        classes = combined_names(task_classes)
        for held in (m for m in (test, val) if m is not None):
            for t, name in enumerate(tasks):
                _check_test_labels(held, [v[t] for v in held.task_values], task_classes[name], f"task {name}")
        if val is not None:
            train = _with_given_val(train, val)
        labels = combined_index(task_classes, train.task_values)
        test_labels = combined_index(task_classes, test.task_values) if test is not None else []
    else:
        classes = _order_classes(sorted(set(train.labels)), cfg.classes, str(train.path))
        index = {c: i for i, c in enumerate(classes)}
        for held in (m for m in (test, val) if m is not None):
            _check_test_labels(held, held.labels, classes, "classes")
        if val is not None:
            train = _with_given_val(train, val)
        labels = [index[lab] for lab in train.labels]
        test_labels = [index[lab] for lab in test.labels] if test is not None else []

    def manifest_source(name: str, manifest: _Manifest, labels: list[int]) -> Source:
        source = _file_source(name, manifest.files, labels, root, manifest.problems, cfg.max_image_pixels)
        # The manifest and task columns are part of what the labels mean: the decoded cache must not mix them up.
        source.fingerprint = _digest(source.fingerprint, manifest.path.read_bytes(), *([tasks] if tasks else []))
        return source

    source = manifest_source("csv:train", train, labels)
    columns = {name: [v[t] for v in train.task_values] for t, name in enumerate(tasks)} if tasks else None
    source.notices += _missing_markers(train.path, columns or {cfg.label_column: train.labels})
    source.notices += _number_twins(train.path, columns or {cfg.label_column: train.labels})
    for column, values in (columns or {cfg.label_column: train.labels}).items():
        fix = "if they are one class, write its label one way"
        source.notices += twins_note(case_twins(values), f"labels in column '{column}' of {train.path.name}", fix)
    if cfg.group_column:
        source.groups = np.array(train.groups, dtype=object)
    if val is not None:
        source.given_val = np.arange(len(train.files)) >= own_rows
        source.given_val_from = str(val.path)
        source.fingerprint = _digest(source.fingerprint, val.path.read_bytes())
    test_source = manifest_source("csv:test", test, test_labels) if test is not None else None
    return Dataset(classes, source, test_source, None, tasks=task_classes)


# How R, pandas, spreadsheets and databases write a missing value; as a label it is a class like any other.
MISSING_MARKERS = frozenset({"na", "n/a", "nan", "null", "none", "missing", "?", "-"})


def _missing_markers(manifest: Path, columns: dict[str, list[str]]) -> list[str]:
    """A note for each label that reads like a missing value (R's write.csv writes NA): trained as a class of
    its own, it would be a class the model learns to predict, though the user never meant it as one."""
    notes = []
    for column, values in columns.items():
        for value in sorted({v for v in values if v.strip().lower() in MISSING_MARKERS}):
            rows = sum(1 for v in values if v == value)
            notes.append(
                f"note: {rows} row(s) of {manifest.name} have '{value}' in column '{column}', trained as a class of "
                "its own; if it marks a missing label, remove those rows from the manifest"
            )
    return notes


def _number_twins(manifest: Path, columns: dict[str, list[str]]) -> list[str]:
    """A note for each number written two ways in a label column (1 and 1.0: pandas writes a column of integers
    with a missing value as floats): each spelling is trained as a class of its own."""
    notes = []
    for column, values in columns.items():
        spellings: dict[float, set[str]] = {}
        for value in set(values):
            try:
                spellings.setdefault(float(value), set()).add(value)
            except ValueError:
                continue
        for _, written in sorted(spellings.items()):
            if len(written) > 1:
                shown = " and ".join(sorted(written, key=natural_key))
                notes.append(
                    f"note: {shown} in column '{column}' of {manifest.name} are one number written {len(written)} "
                    "ways, trained as separate classes; write each label one way"
                )
    return notes


def _check_test_labels(held: _Manifest, labels: list[str], known: list[str], what: str) -> None:
    unknown = sorted(set(labels) - set(known), key=natural_key)
    if unknown:
        named = unknown_named(unknown, known)
        shown = ", ".join(named[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ClassLabError(
            f"{held.path}: labels not in the training manifest's {what}: {shown}; "
            f"a held-out set can only use classes the model is trained on"
        )


def _held_out(test: _Manifest, others: list[_Manifest]) -> _Manifest:
    """The test manifest less the images the training (or validation) manifest also lists, each named as a
    problem: trained on, they made test_acc a training figure without a word."""
    seen = {f: m.path.name for m in others for f in m.files}
    keep = [i for i, f in enumerate(test.files) if f not in seen]
    if len(keep) == len(test.files):
        return test
    twice = [f"{f}: listed in both {seen[f]} and {test.path.name}" for f in test.files if f in seen]
    return _Manifest(
        test.path,
        [test.files[i] for i in keep],
        [test.labels[i] for i in keep],
        [test.task_values[i] for i in keep] if test.task_values else test.task_values,
        [test.groups[i] for i in keep],
        test.problems + twice,
    )


def _with_given_val(train: _Manifest, val: _Manifest) -> _Manifest:
    """The training manifest with the validation manifest's rows after its own (one source, one cache)."""
    listed = set(train.files)
    twice = [f for f in val.files if f in listed]
    problems = train.problems + val.problems
    problems += [f"{f}: listed in both {train.path.name} and {val.path.name}" for f in twice]
    keep = [i for i, f in enumerate(val.files) if f not in listed]
    return _Manifest(
        train.path,
        train.files + [val.files[i] for i in keep],
        train.labels + [val.labels[i] for i in keep],
        train.task_values + [val.task_values[i] for i in keep] if val.task_values else train.task_values,
        train.groups + [val.groups[i] for i in keep],
        problems,
    )


# ---------------------------------------------------------------------------------------------
# torchvision sets (downloaded for users with internet)
# ---------------------------------------------------------------------------------------------

_EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "cifar100": "cifar-100-python/{train, test, meta}",
    "stl10": "stl10_binary/{train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt}",
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "fashion_mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
}


def default_data_root(name: str) -> Path:
    base = os.environ.get("CLASSLAB_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "classlab", "datasets"
    )
    return Path(base) / name


def _torchvision(cfg: DataSection) -> Dataset:
    import torchvision.datasets as tvd

    name = cfg.dataset
    root = Path(cfg.root) if cfg.root else default_data_root(name)

    def build(train: bool):
        kwargs = {"root": str(root), "download": cfg.download}
        if name == "cifar10":
            return tvd.CIFAR10(train=train, **kwargs)
        if name == "cifar100":
            return tvd.CIFAR100(train=train, **kwargs)
        if name == "stl10":
            return tvd.STL10(split="train" if train else "test", **kwargs)
        if name == "mnist":
            return tvd.MNIST(train=train, **kwargs)
        return tvd.FashionMNIST(train=train, **kwargs)

    try:
        parts = [build(True), build(False)]
    except RuntimeError as exc:
        if cfg.download:
            raise ClassLabError(f"{name}: download into {root} failed ({str(exc).splitlines()[0]})") from None
        raise ClassLabError(
            f"{name} not found in {root}: expected {root}/{_EXPECTED_FILES[name]}; "
            f"set data.root to the folder holding them, or data.download=true to fetch them"
        ) from None
    except OSError as exc:
        raise ClassLabError(
            f"{name}: cannot download into {root} ({exc}); check the network or set data.root"
        ) from None
    classes = [str(c) for c in parts[0].classes]
    if cfg.classes is not None:
        if list(cfg.classes) != classes:
            raise ClassLabError(f"data.classes cannot reorder {name}'s fixed classes: {', '.join(classes)}")

    def source(ds, split: str) -> Source:
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        if data.ndim == 4 and data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
            data = data.transpose(0, 2, 3, 1)  # STL-10 is stored NCHW
        labels = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels, dtype=np.int64)
        channels = 1 if data.ndim == 3 else data.shape[-1]
        return Source(
            name=f"{name}/{split}",
            labels=labels,
            read=lambda i, size=None: Image.fromarray(data[i]),
            describe=lambda i: f"{name}:{split}[{i}]",
            fingerprint=_digest(name, split, data.shape, int(data[:64].sum())),
            channels=channels,
            array=data,
        )

    return Dataset(classes, source(parts[0], "train"), source(parts[1], "test"), NATIVE_SIZE[name])


def open_dataset(
    cfg: DataSection, tasks: dict[str, str] | None = None, orders: dict[str, list[str]] | None = None
) -> Dataset:
    """The configured dataset's parts and class order; ``tasks`` (name -> column) for multitask manifests, and
    ``orders`` (name -> class order) for the tasks whose model.tasks.<task>.classes lists their names."""
    if cfg.dataset == "sample":
        return _sample(cfg)
    if cfg.dataset == "folder":
        return _folder(cfg)
    if cfg.dataset == "csv":
        return _csv(cfg, tasks, orders)
    return _torchvision(cfg)


def training_size(cfg: DataSection, dataset: Dataset) -> int:
    """The resolution images are brought to: data.image_size, or the data's own.

    For folders and manifests "the data's own" is the median shorter side of a sample of files
    (read from their headers), capped at DEFAULT_FILE_SIZE: a folder of 32-pixel images trains
    at 32, a folder of phone photos at 128, and neither surprises anyone.
    """
    if cfg.image_size:
        return cfg.image_size
    if dataset.native_size:
        return dataset.native_size
    return probe_size(dataset.train)


def probe_size(source: Source, samples: int = 64) -> int:
    files = source.files or []
    if not files:
        return DEFAULT_FILE_SIZE
    picks = np.linspace(0, len(files) - 1, num=min(samples, len(files))).round().astype(int)
    sides = []
    for i in sorted(set(picks.tolist())):
        try:
            with Image.open(files[i]) as img:
                sides.append(min(img.size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # the file is reported (or skipped) with the others when it is decoded
    if not sides:
        return DEFAULT_FILE_SIZE
    return int(min(float(np.median(sides)), DEFAULT_FILE_SIZE))


def check_readable(source: Source) -> dict[int, str]:
    """Decode every image once; return index -> 'path: reason' for each that fails."""
    bad = {}
    for i in range(len(source)):
        try:
            source.read(i, 64)
        except BadImage as exc:
            bad[i] = f"{source.describe(i)}: {exc}"
    return bad
