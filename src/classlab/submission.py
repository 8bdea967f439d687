"""The organisers' submission file: their template CSV with its label column filled in.

``classlab predict RUN... IMAGES --template info.csv --id-column ImageID --label-column ans
--out submission.csv``. The template decides everything a leaderboard checks: which rows,
in which order, which columns. So the output is the template itself, row for row, with only
the label column written (added at the end when the template lacks it); each row's image is
found among IMAGES by its id (a path relative to a given folder, or a file name).

A row whose image is missing or unreadable would silently cost a competitor a wrong answer
on the leaderboard, so such rows are listed and nothing is written, unless
``--allow-missing`` says to leave their label empty.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from classlab.errors import ClassLabError
from classlab.run import atomic_write_text

MAX_LISTED = 20


@dataclass
class Submission:
    out: Path
    rows: int
    missing: list[str] = field(default_factory=list)  # "id: why" for rows left empty


def read_template(path: str | Path, id_column: str) -> tuple[list[str], list[dict[str, str]]]:
    """The template's columns and rows, in its own order."""
    path = Path(path)
    if not path.is_file():
        raise ClassLabError(f"--template '{path}' not found; give the organisers' CSV (e.g. info.csv)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if id_column not in columns:
        raise ClassLabError(f"{path}: no column '{id_column}' (--id-column); its columns are: {', '.join(columns)}")
    if not rows:
        raise ClassLabError(f"{path} has no rows")
    return columns, rows


def index_images(paths: Sequence[str | Path]) -> dict[str, Path]:
    """id -> image file: each file by its path relative to a given folder and by its name.

    A name shared by two files is kept out of the index (its relative path still works), so
    an id never silently picks one of two images.
    """
    from classlab.inference import expand_paths

    by_rel: dict[str, Path] = {}
    by_name: dict[str, list[Path]] = {}
    for raw in paths:
        root = Path(raw)
        for file in expand_paths([root]):
            if root.is_dir():
                by_rel[file.relative_to(root).as_posix()] = file
            by_name.setdefault(file.name, []).append(file)
    index = {name: files[0] for name, files in by_name.items() if len(files) == 1}
    index.update(by_rel)
    return index


def _label(pred: dict[str, Any], classes: list[str], label_format: str) -> str:
    return str(classes.index(pred["class"])) if label_format == "index" else str(pred["class"])


def write_submission(
    runs: Any,
    paths: Sequence[str | Path],
    template: str | Path,
    out: str | Path,
    *,
    id_column: str = "ImageID",
    label_column: str = "ans",
    label_format: str = "index",
    allow_missing: bool = False,
    checkpoint: str = "best",
    batch_size: int = 256,
) -> Submission:
    """Predict the template's images (one run or an ensemble) and write the filled template to ``out``."""
    from classlab.inference import load_runs, predict

    if label_format not in ("index", "name"):
        raise ClassLabError(f"--label-format {label_format}: choose 'index' or 'name'")
    columns, rows = read_template(template, id_column)
    index = index_images(paths)
    ids = [row[id_column].strip() for row in rows]
    missing = {i: "no such image among the given paths" for i in ids if i not in index}
    wanted = list(dict.fromkeys(index[i] for i in ids if i in index))
    loaded = load_runs(runs, checkpoint)
    result = predict(loaded, wanted, None, checkpoint=checkpoint, top=1, batch_size=batch_size, keep_rows=True)
    by_path = {row["path"]: row for row in result.rows or []}
    for image_id in ids:
        pred = by_path.get(str(index[image_id])) if image_id in index else None
        if pred is not None and pred["error"]:
            missing[image_id] = f"unreadable ({pred['error']})"
    if missing and not allow_missing:
        listed = [f"{i}: {why}" for i, why in missing.items()]
        more = f"\n  ... and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
        raise ClassLabError(
            f"{len(missing)} template row(s) have no usable image; nothing written (add --allow-missing to leave "
            f"their label empty):\n  " + "\n  ".join(listed[:MAX_LISTED]) + more
        )
    out_columns = columns if label_column in columns else [*columns, label_column]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=out_columns, lineterminator="\n")
    writer.writeheader()
    for row, image_id in zip(rows, ids):
        pred = by_path.get(str(index.get(image_id))) if image_id not in missing else None
        writer.writerow(dict(row, **{label_column: _label(pred, loaded.classes, label_format) if pred else ""}))
    atomic_write_text(out, buffer.getvalue())
    return Submission(Path(out), len(rows), [f"{i}: {why}" for i, why in missing.items()])
