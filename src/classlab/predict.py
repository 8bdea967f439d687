"""``classlab predict``: image files or folders in, a predictions CSV out.

Images go through the run's own preprocessing (``engine.load``), are decoded on threads one
batch ahead of the model, and the CSV is streamed into a temporary file that is renamed at the
end, so any number of files costs the memory of one batch and a reader never sees half a file.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import os
import re
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from classlab.config import IMAGE_EXTENSIONS, is_url
from classlab.data.preprocess import is_system_file
from classlab.data.sources import delimiter, natural_key
from classlab.engine.ensemble import load_runs
from classlab.engine.exported import ExportedRun
from classlab.engine.file_batches import file_batches, images_a_batch
from classlab.engine.load import LoadedRun, load
from classlab.engine.tta import TTAPlan, prediction_plan, views_probabilities
from classlab.errors import (
    ClassLabError,
    ConfigError,
    command,
    option,
    option_name,
    python_call,
    python_verb,
    spelt,
    utf8_text,
)
from classlab.run import AtomicCsvWriter, RunFolder, atomic_write_text, shown_path


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively for image files, in natural order, passing over what
    training passes over (hidden files and folders, macOS's ._ twins and __MACOSX)."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(_images_under(path))
        elif path.suffix.lower() in (".csv", ".tsv") and path.is_file():
            # A competition's test.csv given as if it were images: one error row, 'not an image', and exit 0.
            fill = command(
                f"with --template {path} --id-column COLUMN to fill it as a submission (or `classlab eval RUN --data "
                f"{path}` to score a labelled manifest)",
                f"and classlab.predict.write_submission(RUN, [FOLDER], {str(path)!r}, OUT, id_column=COLUMN) to "
                f"fill it as a submission (or classlab.evaluate(RUN, data={str(path)!r}) to score a labelled manifest)",
            )
            raise ClassLabError(f"'{path}' is a CSV file, not an image; give the folder of the images it lists, {fill}")
        elif path.exists():
            out.append(path)
        elif is_url(str(raw)):
            raise ClassLabError(f"'{raw}' is a URL; predict reads files: download it first (curl -O '{raw}')")
        elif _PATTERN.search(str(raw)):
            out.extend(_matches(str(raw)))
        else:
            raise ClassLabError(f"'{path}' does not exist; give image files or folders")
    return out


def _images_under(folder: Path) -> list[Path]:
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(is_system_file(part) for part in p.relative_to(folder).parts)
        and not p.is_dir()  # a pipe or a dangling link stays: an error row says what it is
    ]
    return sorted(found, key=lambda p: natural_key(str(p)))


_PATTERN = re.compile(r"[*?[]")


def _through_a_loop(path: Path) -> bool:
    """``**`` follows links to folders: one back up (nested/loop -> ..) gave each image again at every depth."""
    folders = [os.path.realpath(p) for p in path.parents]
    return len(set(folders)) < len(folders)


def _matches(pattern: str) -> list[Path]:
    """``photos/*.jpg`` as a shell expands it, for a shell that does not (Windows' cmd and PowerShell) and for
    ``classlab.predict(run, ["photos/*.jpg"])``: the image files it matches, and the images of folders it matches."""
    found: dict[Path, None] = {}  # in order, each once: 'd/**' matches d/sub and the files in it
    for match in sorted(glob.glob(pattern, recursive=True), key=natural_key):
        path = Path(match)
        if _through_a_loop(path):
            continue
        if path.is_dir():
            found.update(dict.fromkeys(_images_under(path)))
        elif path.suffix.lower() in IMAGE_EXTENSIONS and not is_system_file(path.name):
            found[path] = None
    out = list(found)
    if not out:
        raise ClassLabError(f"'{pattern}' matches no image file; give image files or folders")
    return out


@dataclass
class Predictions:
    """What ``predict`` did: counts, the unreadable files, speed and (when kept) the rows.

    Rows are kept only when there is no CSV to stream them into, or when asked (``keep_rows``),
    so a folder of millions of images costs no more memory than one batch.
    """

    out: Path | None
    count: int
    failed: list[tuple[str, str]]
    failed_count: int
    seconds: float
    columns: list[str]
    rows: list[dict[str, Any]] | None = None
    odd_names: int = 0  # file names that are not UTF-8: their bytes show as \xNN in the CSV
    backend: str = "torch"  # what ran the model: torch, or onnxruntime on an exported file
    task: str = "classify"  # what the model predicts (LoadedRun.task): its classes are angles for "rotation"
    calibration_note: str | None = None  # "probabilities calibrated: T=... (calibration.json)" when they are

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def rate(self) -> str:
        """The speed as a person reads it: "0.4 images/s" for a handful, not "0 images/s"."""
        return rate_text(self.count, self.seconds)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.rows is None:
            raise ClassLabError("the rows were streamed to the CSV only; pass keep_rows=True to keep them in memory")
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return list(self)[i] if self.rows is None else self.rows[i]


MAX_FAILED_KEPT = 1000


def _scorer(loaded: LoadedRun, backend: str, plan: TTAPlan | None = None, chunk: int = 256) -> Any:
    """uint8 batch -> probabilities, in PyTorch or in onnxruntime on the run's exported file;
    with a TTA plan, the weighted mean over each image's views."""
    plain = _plain_scorer(loaded, backend)
    if plan is None:
        return plain
    if loaded.tasks is not None:
        raise ClassLabError(
            f"{option_name('tta')} gives one probability per class, not the per-task predictions of a multitask run"
        )
    return lambda batch: views_probabilities(plain, batch, plan, loaded.image_size, chunk)


def _plain_scorer(loaded: LoadedRun, backend: str) -> Any:
    if backend not in ("torch", "onnx"):
        raise ClassLabError(f"{option('backend', backend)}: choose 'torch' or 'onnx'")
    if isinstance(loaded, ExportedRun) and backend == "torch":
        raise ClassLabError(f"{loaded.path} runs in onnxruntime; for {option('backend', 'torch')} give the run folder")
    return loaded.probabilities


def _exported(loaded: LoadedRun, checkpoint: str) -> ExportedRun:
    """The run's ONNX file (exported first if missing) for ``--backend onnx``: the same file ``classlab predict
    model.onnx`` runs, so the run gives the rows its file gives, every task's of a multitask run included."""
    if getattr(loaded, "members", None):
        raise ClassLabError(
            f"{option('backend', 'onnx')} runs one exported model; an ensemble predicts with "
            f"{option('backend', 'torch')}"
        )
    from classlab.export import ensure_onnx

    exported = ExportedRun(ensure_onnx(loaded.run, checkpoint), calibrated=loaded.temperature is not None)
    if exported.classes != loaded.classes or exported.tasks != loaded.tasks:
        raise ClassLabError(f"{exported.path} has other classes or tasks than the run; delete it to re-export")
    exported.max_image_pixels = loaded.max_image_pixels
    return exported


def _columns(k: int, layout: Any) -> list[str]:
    columns = ["path", "class", "prob"]
    for i in range(2, k + 1):
        columns += [f"top{i}_class", f"top{i}_prob"]
    for name in layout.names if layout is not None else ():
        columns += [f"{name}_class", f"{name}_prob"]
    return [*columns, "error"]


def _fill(row: dict[str, Any], probs: torch.Tensor, task_probs: list[torch.Tensor], loaded: LoadedRun, k: int) -> None:
    """One readable image's columns: its top-k classes, and each task's class under multitask."""
    values, indices = probs.topk(k)
    row["class"], row["prob"] = loaded.classes[int(indices[0])], round(float(values[0]), 6)
    for r in range(1, k):
        row[f"top{r + 1}_class"] = loaded.classes[int(indices[r])]
        row[f"top{r + 1}_prob"] = round(float(values[r]), 6)
    for t, tp in enumerate(task_probs):
        best_p, best_i = tp.max(0)
        row[f"{loaded.tasks.names[t]}_class"] = loaded.tasks.classes[t][int(best_i)]
        row[f"{loaded.tasks.names[t]}_prob"] = round(float(best_p), 6)


def _image_files(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """The files to predict; paths given that hold none is an error: a wrong or still-empty folder wrote a CSV of
    its header alone with exit code 0, which becomes an empty submission. One path alone is one path: a string
    taken as the list it also is was predicted letter by letter ("'p' does not exist")."""
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    for item in given:
        if not isinstance(item, (str, os.PathLike)):
            raise ClassLabError(
                f"classlab.predict reads image files and folders, and was given a value of type "
                f"'{type(item).__name__}'; predict images in memory with classlab.load(run)(images)"
            )
    files = expand_paths(given)
    if given and not files:
        shown = ", ".join(f"'{p}'" for p in given[:3]) + (" ..." if len(given) > 3 else "")
        raise ClassLabError(
            f"no image files in {shown} (.jpg, .png, .webp, ... in any sub-folder); "
            "give the folder that holds the images"
        )
    return files


def _not_an_image(out: str | Path | None) -> None:
    """``predict RUN --out a.jpg b.jpg`` (the flag typed before the images) wrote the CSV over the photo a.jpg."""
    if out is not None and Path(out).suffix.lower() in IMAGE_EXTENSIONS:
        example = spelt("e.g. --out predictions.csv", "e.g. out='predictions.csv'")
        after = spelt("the images come after the run", "the images are the paths")
        raise ConfigError(
            f"{option('out', out, quoted=True)} names an image; {option_name('out')} is the CSV the predictions go to "
            f"({example}), {after}"
        )


def predict(
    run: str | Path | RunFolder | Sequence[str | Path | RunFolder] | LoadedRun,
    paths: Iterable[str | Path] | str | Path,
    out: str | Path | None = None,
    *,
    checkpoint: str | None = None,
    top: int = 3,
    batch_size: int = 256,
    progress: bool = False,
    backend: str | None = None,
    keep_rows: bool | None = None,
    threads: int | None = None,
    tta: str | None = None,
) -> Predictions:
    """Predict every image; stream the predictions CSV (``path,class,prob,top2_class,...,error``) to ``out``.

    The CSV is written to a temporary file beside ``out`` and renamed at the end, so a reader
    never sees half a file. Unreadable images do not stop the run: they get an ``error`` and
    are listed in the result. ``backend="onnx"`` runs the run's exported ONNX file (exported
    first if missing) in onnxruntime instead of PyTorch; ``run`` may also be such a file itself
    (``RUN/export/model.onnx``, or a copy anywhere), which always runs in onnxruntime. ``tta`` averages each image's
    views (``flip``, ``translate``, ``diagonal``, ``tencrop``, ``multiscale:S1,S2``) as ``eval --tta`` does.
    """
    _not_an_image(out)
    loaded = load_runs(run, checkpoint)
    checkpoint = loaded.checkpoint  # what was loaded: a run's last.ckpt given as the run picks last for --backend onnx
    backend = backend or ("onnx" if isinstance(loaded, ExportedRun) else "torch")
    if backend == "onnx" and not isinstance(loaded, ExportedRun):
        loaded = _exported(loaded, checkpoint)
    plan = prediction_plan(tta, loaded.image_size) if tta else None
    scorer = _scorer(loaded, backend, plan, batch_size)
    files = _image_files(paths)
    k = max(1, min(top, len(loaded.classes)))
    columns = _columns(k, loaded.tasks)
    result = Predictions(
        Path(out) if out is not None else None, 0, [], 0, 0.0, columns, backend=backend, task=loaded.task,
        calibration_note=loaded.calibration_note,
    )  # fmt: skip
    result.rows = [] if (out is None if keep_rows is None else keep_rows) else None
    started, shown = time.time(), 0.0
    writer = AtomicCsvWriter(out, columns) if out is not None else None
    try:
        threads = threads or min(4, os.cpu_count() or 1)
        for chunk, batch, errors in file_batches(files, loaded, images_a_batch(batch_size, plan), threads, plan):
            task_probs: list[torch.Tensor] = []
            if batch is not None and loaded.tasks is not None:
                probs, task_probs = loaded.task_probabilities(batch)
            else:
                probs = scorer(batch) if batch is not None else None
            batch_rows, j = [], 0
            for path, error in zip(chunk, errors):
                row: dict[str, Any] = dict.fromkeys(columns, "")
                written = shown_path(path)
                row["path"], row["error"] = written, error
                result.odd_names += written != str(path)
                if error:
                    result.failed_count += 1
                    if len(result.failed) < MAX_FAILED_KEPT:
                        result.failed.append((written, error))
                else:
                    _fill(row, probs[j], [tp[j] for tp in task_probs], loaded, k)
                    j += 1
                batch_rows.append(row)
            if writer is not None:
                writer.write(batch_rows)
            if result.rows is not None:
                result.rows.extend(batch_rows)
            result.count += len(chunk)
            if progress and (time.time() - shown > 0.5 or result.count == len(files)):
                shown = time.time()
                _show_progress(result, len(files), shown - started)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.discard()
    if progress and files:
        print(file=sys.stderr)
    result.seconds = time.time() - started
    return result


def rate_text(count: int, seconds: float) -> str:
    rate = count / seconds if seconds > 0 else 0.0
    return f"{rate:.0f} images/s" if rate >= 10 else f"{rate:.1f} images/s"


def _show_progress(result: Predictions, total: int, seconds: float) -> None:
    bad = f", {result.failed_count} unreadable" if result.failed_count else ""
    line = f"\r{result.count}/{total} images, {rate_text(result.count, seconds)}{bad}"
    print(line, end="", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Submission files: the organisers' template with its label column filled in
#
# The organisers' submission file: their template CSV with its label column filled in.
#
# ``classlab predict RUN... IMAGES --template info.csv --id-column ImageID --label-column ans
# --out submission.csv``. The template decides everything a leaderboard checks: which rows,
# in which order, which columns. So the output is the template itself, row for row, with only
# the label column written (added at the end when the template lacks it); each row's image is
# found among IMAGES by its id (a path relative to a given folder, or a file name).
#
# A row whose image is missing or unreadable would silently cost a competitor a wrong answer
# on the leaderboard, so such rows are listed and nothing is written, unless
# ``--allow-missing`` says to leave their label empty.
# ---------------------------------------------------------------------------------------------

MAX_LISTED = 20


@dataclass
class Submission:
    out: Path
    rows: int
    missing: list[str] = field(default_factory=list)  # "id: why" for rows left empty
    notes: list[str] = field(default_factory=list)  # what a user should know about the template (repeated ids)


def read_template(path: str | Path, id_column: str) -> tuple[list[str], list[dict[str, str]], str]:
    """The template's columns, rows (in its own order) and separator: the submission is written with the
    organisers' separator, since a leaderboard that wrote semicolons reads semicolons."""
    path = Path(path)
    if not path.is_file():
        raise ClassLabError(f"{option_name('template')} '{path}' not found; give the organisers' CSV (e.g. info.csv)")
    text = utf8_text(path)
    sep = delimiter(text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=sep)
    columns = list(reader.fieldnames or [])
    rows = list(reader)
    if id_column not in columns:
        near = [c for c in columns if c.strip().lower() == id_column.strip().lower()]
        hint = (
            f"did you mean {option('id-column', near[0], quoted=True)}?"
            if near
            else f"its columns are: {', '.join(columns)}"
        )
        raise ClassLabError(f"{path}: no column '{id_column}' ({option_name('id-column')}); {hint}")
    if not rows:
        raise ClassLabError(f"{path} has no rows")
    _check_row_lengths(path, columns, rows, id_column, sep)
    return columns, rows, sep


def _check_row_lengths(path: Path, columns: list[str], rows: list[dict[str, Any]], id_column: str, sep: str) -> None:
    """A row longer than the header (an unquoted separator inside a value) stopped the writer with 'unexpected
    ValueError', and one too short to reach its id with 'unexpected AttributeError'. A row that stops before its
    empty label column (``7f`` under ``ImageID,ans``, as some tools write it) is fine: its missing cells are empty."""
    bad = [i for i, row in enumerate(rows) if None in row or row[id_column] is None]
    if not bad:
        return
    row = rows[bad[0]]
    count = len(columns) + len(row.get(None) or ()) - sum(row[c] is None for c in columns)
    shown = "tab" if sep == "\t" else repr(sep)
    raise ClassLabError(
        f"{path}: row {bad[0] + 1} after the header has {count} field(s) where the header has {len(columns)}"
        f"{f' ({len(bad)} such rows)' if len(bad) > 1 else ''}; give every row one value a column (a value that "
        f"holds the separator {shown} goes in double quotes)"
    )


def index_images(paths: Sequence[str | Path]) -> dict[str, Path | list[Path]]:
    """id -> image file: each file by its path relative to a given folder and by its name, each
    also without its extension (many competitions' ids are file names without ``.jpg``).

    A name shared by two files maps to both (its relative path still works) and is refused, so
    an id never silently picks one of two images.
    """
    exact: dict[str, Path] = {}  # paths relative to a given folder: one file each
    loose: dict[str, set[Path]] = {}  # names, and every key without its extension: kept when one file has it
    for raw in paths:
        root = Path(raw)
        for file in expand_paths([root]):
            if root.is_dir():
                rel = file.relative_to(root)
                exact[_id_key(rel.as_posix())] = file
                loose.setdefault(_id_key(rel.with_suffix("").as_posix()), set()).add(file)
            for key in (file.name, file.stem):
                loose.setdefault(_id_key(key), set()).add(file)
    index: dict[str, Path | list[Path]] = {key: sorted(files) for key, files in loose.items() if len(files) > 1}
    index.update({key: next(iter(files)) for key, files in loose.items() if len(files) == 1})
    index.update(exact)
    return index


def _id_key(text: str) -> str:
    """An id or a file name in one Unicode form (NFC): a template typed on Windows or Linux and files unzipped on
    a Mac (names stored decomposed) spell 'été' differently, and the refusal named an id that looked like its file."""
    return unicodedata.normalize("NFC", text)


def _template_id(key: str, found: Mapping[str, Any], by_lower_suffix: Mapping[str, str]) -> str:
    """A template's id (``_id_key``'d) as the image index keys it; a Windows path (``sub\\7f.png``) reads with forward
    slashes, as a manifest's paths do, unless an image is named with the backslash itself. An extension in another
    case (``7f.JPG`` for ``7f.jpg``: cameras and Windows write capitals) finds its file when one file answers to it."""
    if "\\" in key and key not in found:
        key = key.replace("\\", "/")
    return key if key in found else by_lower_suffix.get(_lower_suffix(key), key)


def _lower_suffix(key: str) -> str:
    stem, dot, suffix = key.rpartition(".")
    return f"{stem}.{suffix.lower()}" if dot and "/" not in suffix else key


def _by_lower_suffix(found: Mapping[str, Any]) -> dict[str, str]:
    """Index keys by their extension in lower case, keeping only those that one key answers to."""
    keys: dict[str, list[str]] = {}
    for key in found:
        keys.setdefault(_lower_suffix(key), []).append(key)
    return {lowered: same[0] for lowered, same in keys.items() if len(same) == 1}


def _repeated_ids(ids: Sequence[str]) -> list[str]:
    counts = Counter(i for i in ids if i)
    repeated = [f"{i} ({n} rows)" for i, n in counts.items() if n > 1]
    if not repeated:
        return []
    shown = ", ".join(repeated[:3]) + (f" and {len(repeated) - 3} more" if len(repeated) > 3 else "")
    return [
        f"{len(repeated)} id(s) appear on more than one template row: {shown}; each such row gets its image's "
        "prediction (check the template if every row should name its own image)"
    ]


def _label(pred: dict[str, Any], classes: list[str], label_format: str) -> str:
    return str(classes.index(pred["class"])) if label_format == "index" else str(pred["class"])


def fill_template(
    runs: Any,
    paths: Sequence[str | Path],
    template: str | Path,
    out: str | Path,
    *,
    id_column: str = "ImageID",
    label_column: str = "ans",
    label_format: str = "index",
    allow_missing: bool = False,
    checkpoint: str | None = None,
    batch_size: int = 256,
    tta: str | None = None,
) -> Submission:
    """Predict the template's images (one run or an ensemble) and write the filled template to ``out``, its messages
    in the words of the caller in progress: the command line's flags, or under ``write_submission`` its keywords."""
    _not_an_image(out)
    if label_format not in ("index", "name"):
        raise ClassLabError(f"{option_name('label-format')} {label_format!r}: choose 'index' or 'name'")
    columns, rows, sep = read_template(template, id_column)
    if label_column == id_column:  # the predictions would overwrite the ids the leaderboard matches rows by
        raise ClassLabError(
            f"{option('label-column', label_column)} is also the {option_name('id-column')}: the labels would "
            f"replace the ids; name the template's label column (e.g. {option('label-column', 'ans')})"
        )
    near = [c for c in columns if c.strip().lower() == label_column.strip().lower()]
    if near and label_column not in columns:  # the label would go into a second, new column beside the organisers' own
        raise ClassLabError(
            f"{template}: no column '{label_column}' ({option_name('label-column')}); did you mean "
            f"{option('label-column', near[0], quoted=True)}?"
        )
    found = index_images(paths)
    by_lower_suffix = _by_lower_suffix(found)
    given = [_id_key(row[id_column].strip()) for row in rows]  # as the template spells them, in one Unicode form
    ids = [_template_id(key, found, by_lower_suffix) for key in given]
    missing = {i: "no such image among the given paths" if i else "a row without an id" for i in ids if i not in found}
    for i in ids:
        several = found.get(i)
        if isinstance(several, list):
            shown = ", ".join(str(f) for f in several[:3]) + (" ..." if len(several) > 3 else "")
            missing[i] = f"matches {len(several)} files ({shown}); give the path relative to the folder as the id"
    index = {i: f for i, f in found.items() if isinstance(f, Path)}
    wanted = list(dict.fromkeys(index[i] for i in ids if i in index))
    loaded = load_runs(runs, checkpoint)
    result = predict(loaded, wanted, None, checkpoint=checkpoint, top=1, batch_size=batch_size, keep_rows=True, tta=tta)
    by_path = {row["path"]: row for row in result.rows or []}
    for image_id in ids:
        pred = by_path.get(str(index[image_id])) if image_id in index else None
        if pred is not None and pred["error"]:
            missing[image_id] = f"unreadable ({pred['error']})"
    listed = [f"{i or '(empty id)'}: {why}" for i, why in missing.items()]
    if missing and not allow_missing:
        more = f"\n  ... and {len(listed) - MAX_LISTED} more" if len(listed) > MAX_LISTED else ""
        raise ClassLabError(
            f"{len(missing)} template row(s) have no usable image; nothing written (add {option('allow-missing')} "
            f"to leave their label empty):\n  " + "\n  ".join(listed[:MAX_LISTED]) + more
        )
    out_columns = columns if label_column in columns else [*columns, label_column]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=out_columns, delimiter=sep, lineterminator="\n")
    writer.writeheader()
    for row, image_id in zip(rows, ids):
        row = {c: "" if v is None else v for c, v in row.items()}  # a row that stops before its empty label
        pred = by_path.get(str(index.get(image_id))) if image_id not in missing else None
        writer.writerow(dict(row, **{label_column: _label(pred, loaded.classes, label_format) if pred else ""}))
    atomic_write_text(out, buffer.getvalue(), output=True)
    return Submission(Path(out), len(rows), listed, _repeated_ids(given))


@functools.wraps(fill_template)  # its signature and doc, for help() and a notebook's completion
def write_submission(*args: Any, **kwargs: Any) -> Submission:
    # fill_template for a Python caller: its messages name these keywords (allow_missing=True), not the flags of
    # `classlab predict` (--allow-missing).
    with python_call(python_verb() or "write_submission"):
        return fill_template(*args, **kwargs)


write_submission.__name__ = write_submission.__qualname__ = "write_submission"


__all__ = [
    "LoadedRun",
    "Predictions",
    "load",
    "load_runs",
    "predict",
    "expand_paths",
    "write_submission",
]
