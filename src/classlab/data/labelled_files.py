"""Labelled images a run never saw, read against the run's class map (``classlab eval RUN --data FOLDER``).

The question after training is often not the run's own test split but "how does it do on these?":
photos from another camera, a month later, a partner's set. They come as the data sets training
reads (class folders, or a CSV manifest with the run's path and label columns), so they are
opened by the same code, with the same checks; their class names are then mapped to the run's
class indices by name. A subset of the run's classes is fine (a folder of roses only); a class the
run never learnt cannot be scored and is refused by name.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from classlab.config import DataSection
from classlab.data.sources import (
    UNLABELED,
    Dataset,
    OutsideRoot,
    class_name,
    column_names,
    delimiter,
    open_dataset,
    unknown_named,
)
from classlab.errors import ClassLabError, command, option, utf8_text

# Keys of the run's data section that describe its own data set, not how images are read.
_RUN_DATA_KEYS = ("classes", "csv_file", "test_csv_file", "val_csv_file", "group_column", "image_dir")


@dataclass
class LabelledFiles:
    files: list[Path]
    labels: list[int]  # the run's class indices
    where: str  # what was read, for the user's line: "flowers/ (its test/ folder)"
    problems: list[str]


def _check_columns(path: Path, section: DataSection) -> None:
    """The manifest names its columns as the run's config does (eval takes no overrides to rename them)."""
    text = utf8_text(path)
    header = column_names(next(csv.reader(io.StringIO(text), delimiter=delimiter(text)), []))
    wanted = [section.path_column, section.label_column]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ClassLabError(
            f"{option('data', path, quoted=True)}: no column {', '.join(repr(c) for c in missing)}; its columns are "
            f"{', '.join(header) or 'none'}: name them {wanted[0]},{wanted[1]} as the run's data.path_column and "
            "data.label_column do"
        )


def _open(section: DataSection, update: dict[str, object], path: Path) -> Dataset:
    """The data set; a manifest whose paths climb out of its folder (lists/test.csv listing ../images/x.jpg) is
    read from the folder above that holds them, as the paths are written relative to the manifest's own folder:
    eval has no data.root to set (training names the settings that read it)."""
    for _ in range(len(path.resolve().parents)):
        try:
            return open_dataset(section.model_copy(update=update))
        except OutsideRoot as exc:
            if update["dataset"] != "csv" or exc.top is None:
                raise
            update |= {
                "root": str(exc.top),
                "csv_file": path.resolve().relative_to(exc.top).as_posix(),
                "image_dir": path.parent.resolve().relative_to(exc.top).as_posix(),
            }
    return open_dataset(section.model_copy(update=update))


def labelled_files(section: DataSection, path: str | Path, classes: list[str], whose: str = "the run") -> LabelledFiles:
    """The images of a folder of class folders (its test/ part when it has one) or of a CSV manifest, labelled
    with ``classes``, those of ``whose`` (its words in the refusal of a class it lacks: "the run", or "the model"
    for an exported file, which has no run)."""
    path = Path(path)
    update: dict[str, object] = dict.fromkeys(_RUN_DATA_KEYS)
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        _check_columns(path, section)
        update |= {"dataset": "csv", "root": str(path.parent.resolve()), "csv_file": path.name}
    elif path.is_dir():
        update |= {"dataset": "folder", "root": str(path.resolve())}
    else:
        what = "does not exist" if not path.exists() else "is neither a folder of class folders nor a .csv manifest"
        raise ClassLabError(
            f"{option('data', path, quoted=True)} {what}; give labelled images: FOLDER/<class>/*.jpg or a CSV manifest"
        )
    dataset = _open(section, update, path)
    source = dataset.test if dataset.test is not None else dataset.train
    if dataset.classes == [UNLABELED]:
        raise ClassLabError(
            f"{option('data', path, quoted=True)} has images but no class folders: eval needs <folder>/<class>/ "
            "images to score; "
            f"{command('`classlab predict`', 'classlab.predict')} reads unlabelled images"
        )
    # By name in one form: a run trained before names were composed (NFC) or stripped of spaces maps too.
    index = {class_name(name): i for i, name in enumerate(classes)}
    unknown = [c for c in dataset.classes if c not in index]
    if unknown:
        named = unknown_named(unknown, classes)
        shown = ", ".join(named[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        known = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
        how = (
            f"the manifest's {section.label_column} column holds the class: "
            "correct those labels or leave their rows out"
            if update["dataset"] == "csv"
            else "a folder's name is its class: rename or leave out the others"
        )
        raise ClassLabError(
            f"{option('data', path, quoted=True)}: class(es) {whose} was not trained on: {shown}; {whose}'s "
            f"classes are {known} ({how})"
        )
    files = list(source.files or [])
    labels = [index[dataset.classes[int(label)]] for label in source.labels]
    where = f"{path} (its test/ folder)" if dataset.test is not None else str(path)
    return LabelledFiles(files, labels, where, list(source.problems))
