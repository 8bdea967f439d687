"""The run folder: everything a run leaves behind, and the only thing eval/predict/export read.

A run folder is never left half-written: every file except the append-only logs goes through
a temporary file and an atomic rename, and an existing run is never overwritten (``--force``
moves it aside, ``--resume`` continues it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from classlab.errors import ClassLabError

CONFIG = "config.yaml"
CLASSES = "classes.json"
SPLIT = "split.json"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
TASKS = "tasks.json"
SKIPPED = "skipped_images.txt"


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file in ``path``'s folder (so the final rename is atomic), with the user's usual permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide run files from the user's group
    return fd, tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint without executing code; a damaged or foreign file gets one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ClassLabError(f"checkpoint '{path}' not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not a usable checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClassLabError(
            f"checkpoint '{path}' cannot be read safely ({first[:160]}); it is damaged or not a classlab checkpoint"
        ) from None


def atomic_write_figure(path: str | Path, fig: Any, dpi: int = 100, **savefig: Any) -> None:
    """A matplotlib figure as a PNG file, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, **savefig)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class AtomicCsvWriter:
    """A CSV written row by row into a temporary file and renamed onto its name only when complete."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = _temp_beside(self.path)
        self.handle = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=columns, lineterminator="\n")
        self.writer.writeheader()
        self.done = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        if not self.done:
            self.handle.close()
            Path(self.tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Run folders
# ---------------------------------------------------------------------------------------------


class RunFolder:
    """A run folder on disk: its paths and its small files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder('{self.path}')"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def checkpoint_path(self, name: str) -> Path:
        """Where checkpoint ``name`` (``last``, ``best``, ``epoch5``) is written, whether or not it exists yet."""
        return self.checkpoints / f"{name.removesuffix('.ckpt')}.ckpt"

    def checkpoint(self, name: str = "best") -> Path:
        """``best``, ``last``, ``epoch5`` or a file name -> its path (falling back from best to last)."""
        name = name.removesuffix(".ckpt")
        path = self.checkpoints / f"{name}.ckpt"
        if not path.is_file() and name == "best" and (self.checkpoints / "last.ckpt").is_file():
            return self.checkpoints / "last.ckpt"
        if not path.is_file():
            have = sorted(p.stem for p in self.checkpoints.glob("*.ckpt")) if self.checkpoints.is_dir() else []
            raise ClassLabError(
                f"run '{self.path}' has no checkpoint '{name}'"
                + (f"; it has: {', '.join(have)}" if have else "; it has none yet")
            )
        return path

    # -- small files -----------------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClassLabError(f"run '{self.path}' has no {name}; is it a classlab run folder?") from None
        except json.JSONDecodeError as exc:
            raise ClassLabError(f"{path} is damaged (not valid JSON: {exc.msg} at line {exc.lineno})") from None

    def write_config(self, cfg_dict: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(dict(cfg_dict), sort_keys=False, default_flow_style=None))

    def read_config_tree(self) -> dict[str, Any]:
        path = self.path / CONFIG
        if not path.is_file():
            raise ClassLabError(
                f"'{self.path}' is not a run folder (no {CONFIG}); give the folder `classlab train` printed"
            )
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}

    def write_classes(self, classes: Sequence[str]) -> None:
        self.write_json(CLASSES, {str(i): name for i, name in enumerate(classes)})

    def read_classes(self) -> list[str]:
        mapping = self.read_json(CLASSES)
        return [mapping[str(i)] for i in range(len(mapping))]

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        summary = self.read_json(SUMMARY) if (self.path / SUMMARY).is_file() else {}
        summary.update(fields)
        self.write_json(SUMMARY, summary)
        return summary

    def summary(self, default: dict[str, Any] | None = None) -> dict[str, Any]:
        """summary.json; ``default`` (when given) for a run that has not written one yet."""
        if default is not None and not (self.path / SUMMARY).is_file():
            return default
        return self.read_json(SUMMARY)

    def write_split(self, split: Mapping[str, Any]) -> None:
        self.write_json(SPLIT, split)

    def read_split(self) -> Any:
        return self.read_json(SPLIT)

    def write_tasks(self, layout: Mapping[str, Any]) -> None:
        self.write_json(TASKS, layout)

    def write_skipped(self, paths: Sequence[str]) -> None:
        """The unreadable images a run skipped (``data.skip_bad_images``), one a line."""
        atomic_write_text(self.path / SKIPPED, "".join(f"{p}\n" for p in paths))

    # -- metrics ---------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any], columns: Sequence[str]) -> None:
        """Append one row; the header is written with the first row."""
        new = not self.metrics_path.is_file()
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, str]]:
        if not self.metrics_path.is_file():
            return []
        with open(self.metrics_path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def truncate_metrics(self, keep_epochs_below: int) -> None:
        """Drop rows of epochs that the checkpoint being resumed from had not finished."""
        if not self.metrics_path.is_file():
            return
        with open(self.metrics_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = [r for r in reader if int(r["epoch"]) < keep_epochs_below]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.metrics_path, out.getvalue())


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def open_run(path: str | Path) -> RunFolder:
    """An existing run folder (for eval, predict, export, resume)."""
    run = RunFolder(path)
    if not run.path.is_dir():
        raise ClassLabError(f"run folder '{run.path}' not found; `classlab train` prints the folder it made")
    if not (run.path / CONFIG).is_file():
        raise ClassLabError(f"'{run.path}' is not a run folder (no {CONFIG}); give the folder `classlab train` printed")
    stages = run.read_config_tree().get("stages") or []
    if stages:
        # A multi-stage run is used through its last stage, which holds the final weights.
        last = RunFolder(run.path / f"stage{len(stages)}")
        if not (last.path / CONFIG).is_file():
            raise ClassLabError(
                f"multi-stage run '{run.path}' has not reached its last stage; continue it with --resume"
            )
        return last
    return run


def new_run_path(root: str | Path, exp_name: str | None, default_name: str, numbered: bool = True) -> tuple[Path, bool]:
    """Where a new run goes: ``root/exp_name``; without a name, the first free ``default_name[-N]``.

    Returns the path and whether the name was chosen by the user (then a taken name is refused).
    """
    root = Path(root)
    if exp_name:
        return root / exp_name, True
    candidate = root / default_name
    n = 2
    while numbered and candidate.exists():
        candidate = root / f"{default_name}-{n}"
        n += 1
    return candidate, False


def move_aside(path: Path) -> Path:
    """``--force``: keep the old run under a dated name instead of deleting anything."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 2
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    return target
