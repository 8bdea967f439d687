"""The run folder: everything a run leaves behind, and the only thing eval/predict/export read.

A run folder is never left half-written: every file except the append-only logs goes through
a temporary file and an atomic rename, and an existing run is never overwritten (``--force``
moves it aside, ``--resume`` continues it).
"""

from __future__ import annotations

import csv
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from classlab.errors import ClassLabError, command, first_line, option, spelt

CONFIG = "config.yaml"
CLASSES = "classes.json"
SPLIT = "split.json"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
CHECKPOINTS = "checkpoints"
TASKS = "tasks.json"
FOLDS = "folds.json"  # a k-fold folder: the folds' config and K (the folder itself is not a run)
OOF = "oof.csv"  # a k-fold folder: out-of-fold predictions
SKIPPED = "skipped_images.txt"
# eval --calibrate: the temperature fitted for best.ckpt (calibration-<name>.json for another checkpoint)
CALIBRATION = "calibration.json"
LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"  # the last.ckpt before the newest, kept so a damaged last.ckpt is not the end
LOCK = "run.lock"
LOCK_OWNER_ENV = "CLASSLAB_LOCK_OWNER"  # handed to child processes (sweep jobs, DDP workers): the same owner
# What a new run writes before config.yaml, which goes last: a folder with no config.yaml holds no run yet.
START_FILES = frozenset({LOCK, CLASSES, TASKS, SPLIT, SKIPPED})

# A write that fails for one of these reasons is the user's to fix (space, permissions), not a bug.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


class RunInUse(ClassLabError):
    """Another live process holds the run folder (its run.lock)."""


class RunWriteError(ClassLabError):
    """A file of the run could not be written (disk full, no permission); the previous files are intact."""


def write_error(path: str | Path, exc: OSError, *, output: bool = False) -> ClassLabError | OSError:
    """The one line for a failed write naming the path, or ``exc`` itself when it is not the user's to fix.

    ``output``: a file the user asked for with ``--out`` (predictions, a submission, an ONNX file, a report).
    Its place is the user's choice, so any refusal is theirs to fix, and the fix is another place, not
    ``--resume``: the run itself was never touched.
    """
    if output:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.ENOTDIR, errno.EEXIST) and exc.filename:
            why = f"'{exc.filename}' is a file, not a folder"
        return ClassLabError(
            f"cannot write {path}: {why}; nothing was written there: give {option('out')} a place you can write to"
        )
    if exc.errno not in _WRITE_ERRNOS:
        return exc
    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
    return RunWriteError(
        f"cannot write {path}: {os.strerror(exc.errno)}; the files written before are intact: "
        f"{fix}, then continue the run with {option('resume')}"
    )


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


def is_special_file(path: Path) -> bool:
    """``--out /dev/stdout`` (or a pipe, a terminal): written into, never renamed onto. A rename would put a
    regular file in the place of the device or link, which is what a root user (a Docker or Kaggle notebook) gets."""
    try:
        if os.path.abspath(path).startswith("/dev/") and not path.is_dir():
            return True  # /dev/stdout redirected to a file is a link to a regular file, and still not ours to replace
        return path.exists() and not path.is_file() and not path.is_dir()
    except OSError:
        return False


def atomic_write_bytes(path: str | Path, data: bytes, *, output: bool = False) -> None:
    """Write ``data`` so that a reader sees the old file or the new one, never a torn one.

    A full disk or a read-only folder raises RunWriteError naming ``path``; the old file stays.
    ``output``: a file given with ``--out``, whose failures name another place as the fix (``write_error``).
    """
    path = Path(path)
    tmp = None
    if output and is_special_file(path):
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise write_error(path, exc, output=True) from None
        return
    try:
        fd, tmp = _temp_beside(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc, output=output) from None
        raise


def atomic_write_text(path: str | Path, text: str, *, output: bool = False) -> None:
    # surrogateescape: a file name that is not UTF-8 (old Windows and zip tools) is written as the bytes it has on disk
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"), output=output)


def shown_path(path: str | Path) -> str:
    """``path`` as UTF-8 text; a name that is not UTF-8 shows its bytes as \\xNN instead of failing the write."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
        first = first_line(exc)
        raise ClassLabError(
            f"checkpoint '{path}' cannot be read safely ({first[:160]}); it is damaged or not a classlab checkpoint"
        ) from None


@functools.lru_cache(maxsize=64)
def _sha256(path: str, stamp: tuple[int, ...]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: what ties a calibration to the very checkpoint it was fitted on (its name
    alone is not enough: a resumed run writes another best.ckpt). Kept for the process while the file stays the
    same, so a checkpoint loaded again (every member of an ensemble, a notebook's repeated loads) is read once. The
    same is its inode and change time too, not only its size and mtime: two checkpoints of one model have one size,
    a copy that keeps times (cp -p, rsync -a, tar) sets the mtime, and a coarse clock gives a rewrite the old one."""
    stat = os.stat(path)
    stamp = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return _sha256(os.path.realpath(path), stamp)


def atomic_write_figure(path: str | Path, fig: Any, dpi: int = 100, **savefig: Any) -> None:
    """A matplotlib figure as a PNG file, written atomically; the figure is closed.

    Text that the default font cannot draw (class names in Korean, Chinese, Japanese) is given an installed
    font that can; where none can, one warning names the characters and the fix, not matplotlib's line per glyph.
    """
    missing = _fit_fonts(fig)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _font_substitutions_unlogged():
            if missing:
                warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from")
            fig.savefig(buffer, format="png", dpi=dpi, **savefig)
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:  # a figure pyplot holds (one from new_figure never is)
            plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    if missing:
        shown = " ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        warnings.warn(
            f"{Path(path).name}: no installed font draws {shown}, so they show as boxes; install a font that has them "
            "(Debian/Ubuntu: apt-get install fonts-noto-cjk), remove matplotlib's font cache (rm -r "
            "~/.cache/matplotlib) and write the figure again",
            stacklevel=2,
        )


def _fit_fonts(fig: Any) -> list[str]:
    """Give each text of ``fig`` fallback fonts for the characters its own font lacks (matplotlib draws a box for
    each, with a warning per glyph); the characters no installed font has, which stay boxes."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    left_over: set[int] = set()
    for text in fig.findobj(Text):
        value = text.get_text()
        if value.isascii() or "$" in value:  # mathtext picks its own fonts
            continue
        own = _charmap(font_manager.findfont(text.get_fontproperties()))
        missing = {ord(ch) for ch in value if not ch.isspace()} - own
        chosen = []
        for name, chars in _installed_fonts() if missing else ():
            if chars & missing:
                chosen.append(name)
                missing -= chars
        if chosen:
            text.set_fontfamily([*text.get_fontfamily(), *chosen])
        left_over |= missing
    return [chr(c) for c in sorted(left_over)]


@contextmanager
def _font_substitutions_unlogged() -> Iterator[None]:
    """A fallback font with no face of the text's weight (WenQuanYi has 500, not 400) is drawn in the nearest one,
    and matplotlib logs 'findfont: Failed to find font weight normal' for each text: a fine substitution, unsaid."""
    logger = logging.getLogger("matplotlib.font_manager")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def _charmap(font_file: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    try:
        return frozenset(FT2Font(font_file).get_charmap())
    except (OSError, RuntimeError, ValueError):
        return frozenset()


@functools.lru_cache(maxsize=1)
def _installed_fonts() -> list[tuple[str, frozenset[int]]]:
    """The fonts matplotlib knows, each family once, with the characters it draws; read only when a figure needs
    a fallback; upright faces only. matplotlib's Last Resort font 'draws' every character as a box: never a fallback."""
    from matplotlib import font_manager

    fonts: dict[str, frozenset[int]] = {}
    for entry in font_manager.fontManager.ttflist:
        upright = entry.style == "normal" and entry.stretch == "normal"
        if upright and entry.name not in fonts and not entry.name.startswith("Last Resort"):
            fonts[entry.name] = _charmap(entry.fname)
    return sorted(fonts.items(), key=lambda item: -len(item[1]))  # the widest coverage first


def new_figure(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes (``subplots``' arguments) for a file, whatever backend the process has chosen.

    A bare ``matplotlib.figure.Figure`` is drawn by Agg when saved and needs no display and no backend:
    ``matplotlib.use("Agg")`` switched the caller's backend for the rest of the process, so a notebook's
    inline plots stopped showing after ``classlab.evaluate`` or ``classlab.report``. pyplot never holds it,
    so there is nothing to close.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


class AtomicCsvWriter:
    """A CSV written row by row into a temporary file and renamed onto its name only when complete.

    The file is one the user named (``--out``): a failed write is one line naming it (``write_error``), and
    a device or pipe (``--out /dev/stdout``) is streamed into, since there is nothing to rename onto it.
    """

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.tmp: str | None = None
        self.done = False
        try:
            if is_special_file(self.path):
                self.handle = open(self.path, "w", newline="", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            else:
                fd, self.tmp = _temp_beside(self.path)
                self.handle = os.fdopen(fd, "w", newline="", encoding="utf-8", errors="backslashreplace")
            self.writer = csv.DictWriter(self.handle, fieldnames=columns, lineterminator="\n")
            self.writer.writeheader()
        except OSError as exc:
            self._drop()
            raise write_error(self.path, exc, output=True) from None

    def write(self, rows: list[dict[str, Any]]) -> None:
        try:
            self.writer.writerows(rows)
        except OSError as exc:
            raise write_error(self.path, exc, output=True) from None

    def commit(self) -> None:
        try:
            self.handle.flush()
            if self.tmp is not None:
                os.fsync(self.handle.fileno())
            self.handle.close()
            if self.tmp is not None:
                os.replace(self.tmp, self.path)
        except OSError as exc:
            raise write_error(self.path, exc, output=True) from None
        self.done = True

    def discard(self) -> None:
        if not self.done:
            self._drop()

    def _drop(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                pass  # the write already failed and says so; closing a full device must not hide that line
        if self.tmp is not None:
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

    def __fspath__(self) -> str:
        """``classlab.train`` returns a RunFolder: ``Path(run) / "export"`` and ``open`` take it as its path."""
        return str(self.path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def checkpoint_path(self, name: str) -> Path:
        """Where checkpoint ``name`` (``last``, ``best``, ``epoch5``) is written, whether or not it exists yet."""
        return self.checkpoints / f"{name.removesuffix('.ckpt')}.ckpt"

    @contextmanager
    def creating(self) -> Iterator[RunFolder]:
        """Write a new run's first files into its folder (taken with ``reserve``); if that fails, take it away again.

        A folder holding half of config/classes/split is neither a run nor free for a new one.
        """
        try:
            yield self
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Take away the folder of a run that never began, and the folders above it made for it (``runs/``): a run
        refused for its data leaves the disk as it found it. A folder this process did not make (an empty one made
        by hand, or one a killed run left) stays, without the files a run writes first."""
        made = getattr(self, "_made", None)
        if made is None:
            for name in START_FILES - {LOCK}:  # the lock goes with its release
                (self.path / name).unlink(missing_ok=True)
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if made == self.path:
            return
        for folder in self.path.parents:
            try:
                folder.rmdir()  # only while empty: another run's folder made there meanwhile keeps it
            except OSError:
                return
            if folder == made:
                return

    def never_started(self) -> bool:
        """A folder a run was stopped in before it began (kill -9 while its data loaded, or between its first files):
        no config.yaml, which a run writes last of its first files, and nothing but those files, its lock and
        temporary files. Nothing in it is worth keeping: the next run under its name takes it (``reserve``)."""
        try:
            names = [p.name for p in self.path.iterdir()]
        except OSError:  # not there, or a file
            return False
        return all(name in START_FILES or _leftover(name) for name in names)

    def reserve(self, lock: RunLock | None = None) -> RunLock | None:
        """Take this folder for a new run, before anything slow (loading the data) is done: made here (of two
        processes making it at once, exactly one does), or one a run never started in (``never_started``), whose
        leftovers go. Returns its lock, held; None when the folder holds anything else (a run). RunInUse when a
        live process holds it (one that made it a moment ago and is loading its data)."""
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._made: Path | None = None
        try:
            self.path.mkdir(parents=True)
            self._made = missing[-1] if missing else self.path  # what ``discard`` may take away (runs/ made for it)
        except FileExistsError:
            if not self.never_started():
                return None
        except OSError as exc:
            raise write_error(self.path, exc) from None
        lock = (lock or self.lock()).acquire()
        if not self.never_started():  # a run began there between our look and the lock
            lock.release()
            return None
        for path in self.path.iterdir():
            if path.name != LOCK:
                path.unlink(missing_ok=True)
        return lock

    # -- checkpoints kept for resuming ----------------------------------------------------
    def keep_previous(self) -> None:
        """Before last.ckpt is replaced, keep it as previous.ckpt: a damaged last.ckpt then costs one epoch.

        A hard link costs no copy and leaves last.ckpt in place until its successor is complete.
        """
        last, previous = self.checkpoints / LAST, self.checkpoints / PREVIOUS
        if not last.is_file():
            return
        tmp = self.checkpoints / f".{PREVIOUS}.{os.getpid()}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.link(last, tmp)
            os.replace(tmp, previous)
        except OSError:
            tmp.unlink(missing_ok=True)
            os.replace(last, previous)  # no hard links here: the resume falls back to previous.ckpt alone

    def resume_checkpoint(self, set_damaged_aside: bool = True) -> tuple[Path | None, int, int]:
        """The newest checkpoint ``--resume`` can continue from, how many epochs it holds, and how many batches of
        the next epoch (0 for a checkpoint written at an epoch's end; more when a stop wrote it mid-epoch).

        last.ckpt first; if it does not load, the newest of previous.ckpt and epochN.ckpt that does
        (the damaged file is renamed ``*.damaged`` and reported in one line). No checkpoints at
        all: (None, 0, 0), the run starts over. Checkpoints but none loads: ClassLabError, and
        nothing in the folder has been touched.
        """
        last = self.checkpoints / LAST
        others = [self.checkpoints / PREVIOUS] + sorted(
            self.checkpoints.glob("epoch*.ckpt"), key=lambda p: -_epoch_number(p)
        )
        candidates = [p for p in [last, *others] if p.is_file()]
        if not candidates:
            return None, 0, 0
        failures: list[str] = []
        found: tuple[Path, int, int] | None = None
        for path in candidates:
            if found is not None and path != self.checkpoints / PREVIOUS and _epoch_number(path) <= found[1]:
                break
            try:
                done, batches = _resumable_point(path)
            except ClassLabError as exc:
                failures.append(str(exc))
                continue
            if found is None or done > found[1]:
                found = (path, done, batches)
            if path == last:
                break
        if found is None:
            raise ClassLabError(
                f"{option('resume')}: no checkpoint of '{self.path}' loads ({'; '.join(failures)[:600]}); "
                f"start the run again with {option('force')} (the old folder is moved aside)"
            )
        if found[0] != last:
            why = failures[0] if failures and last.is_file() else f"{LAST} is missing"
            aside = ""
            if set_damaged_aside and last.is_file():
                os.replace(last, last.with_name(LAST + ".damaged"))
                aside = f" ({LAST} kept as {LAST}.damaged)"
            warnings.warn(f"{why}; resuming from {found[0].name} (epoch {found[1]}) instead{aside}", stacklevel=2)
        return found

    # -- the lock --------------------------------------------------------------------------
    def lock(self, command: str = "train") -> RunLock:
        return RunLock(self.path, command)

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

    # -- calibration -----------------------------------------------------------------------
    def calibration_path(self, checkpoint: str = "best") -> Path:
        """Where the temperature fitted for ``checkpoint`` is kept: calibration.json for best, calibration-<name>.json
        for another (as export names model-<name>.onnx), so fitting last.ckpt does not throw best's away."""
        name = checkpoint.removesuffix(".ckpt")
        return self.path / (CALIBRATION if name == "best" else f"{Path(CALIBRATION).stem}-{name}.json")

    def write_calibration(self, checkpoint: str, record: Mapping[str, Any]) -> Path:
        path = self.calibration_path(checkpoint)
        atomic_write_json(path, dict(record))
        return path

    def read_calibration(self, checkpoint: str = "best") -> dict[str, Any] | None:
        """The calibration record of ``checkpoint``, None when none was fitted; a damaged file is a ClassLabError."""
        path = self.calibration_path(checkpoint)
        if not path.is_file():
            return None
        record = self.read_json(path.name)
        if not isinstance(record, dict):
            raise ClassLabError(f"{path} is damaged (not a mapping of calibration fields)")
        return record

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
            why = f"{exc.msg.removesuffix(' at')} at line {exc.lineno}"  # 'Invalid control character at' read 'at at'
            raise ClassLabError(f"{path} is damaged (not valid JSON: {why})") from None
        except UnicodeDecodeError as exc:
            raise ClassLabError(f"{path} is damaged (not UTF-8 text: byte {exc.object[exc.start]:#04x})") from None

    def write_config(self, cfg_dict: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / CONFIG, yaml.safe_dump(dict(cfg_dict), sort_keys=False, default_flow_style=None))

    def read_config_tree(self) -> dict[str, Any]:
        path = self.path / CONFIG
        if not path.is_file():
            raise ClassLabError(f"'{self.path}' is not a run folder (no {CONFIG}); give {_folder_train_gave()}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ClassLabError(f"{path} is damaged (not valid YAML: {why})") from None
        if not isinstance(tree, dict):
            raise ClassLabError(f"{path} is damaged (not a mapping of config sections)")
        return tree

    def write_classes(self, classes: Sequence[str]) -> None:
        self.write_json(CLASSES, {str(i): name for i, name in enumerate(classes)})

    def read_classes(self) -> list[str]:
        mapping = self.read_json(CLASSES)
        if not isinstance(mapping, dict) or sorted(mapping) != sorted(str(i) for i in range(len(mapping))):
            raise ClassLabError(
                f"{self.path / CLASSES} is damaged (it maps the class numbers 0, 1, ... to names, as classlab wrote it)"
            )
        return [str(mapping[str(i)]) for i in range(len(mapping))]

    def mark_failed(self, status: str, error: str | None, **fields: Any) -> None:
        """Record how a run ended badly, if the disk still lets us: a failed write must not hide the first error."""
        if not (self.path / CONFIG).is_file():
            return  # a new folder taken away again (RunFolder.creating) stays away
        try:
            self.update_summary(status=status, error=error, **fields)
        except (OSError, ClassLabError):
            pass

    def update_summary(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into summary.json; a run that starts again or finishes sheds an earlier attempt's error,
        and one that trains again (``--resume epochs=60`` after 30) the figures its earlier finish measured: they
        stood beside 'running' in compare until the run finished again."""
        summary = self.read_json(SUMMARY) if (self.path / SUMMARY).is_file() else {}
        if fields.get("status") in ("running", "finished") and "error" not in fields:
            summary.pop("error", None)
        if fields.get("status") == "running":
            for key in [k for k in summary if k in FINISH_FIELDS or k.startswith(FINISH_PREFIXES)]:
                del summary[key]
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
        """Append one row; the header is written with the first row.

        The row goes out in one write; if the disk refuses it, the file is cut back to its old
        length, so metrics.csv never ends in half a row.
        """
        new = not self.metrics_path.is_file()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: _fmt(row.get(k)) for k in columns})
        try:
            with open(self.metrics_path, "ab") as handle:
                size = handle.tell()
                try:
                    handle.write(out.getvalue().encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
                except OSError:
                    handle.truncate(size)
                    raise
        except OSError as exc:
            raise write_error(self.metrics_path, exc) from None

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


def _epoch_number(path: Path) -> int:
    digits = path.stem.removeprefix("epoch")
    return int(digits) if digits.isdigit() else -1


def _resumable_point(path: Path) -> tuple[int, int]:
    """(epochs, batches of the next epoch) a checkpoint holds, if it loads and is a classlab training checkpoint;
    the batches are 0 unless a stop wrote it mid-epoch (RunRecorder's ``batches_done``)."""
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "classlab" not in ckpt:
        raise ClassLabError(f"checkpoint '{path}' is not a classlab training checkpoint")
    return int(ckpt["classlab"].get("epochs_done", 0)), int(ckpt["classlab"].get("batches_done", 0))


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class RunLock:
    """``run.lock`` in a run folder: the pid and host of the one process that writes there.

    Taken with O_EXCL, so of two processes starting at once exactly one gets it. A lock left by a
    process that died on this host is taken over with a warning; one from another host cannot be
    checked and is respected (the message says how to clear it). Processes a holder starts (sweep
    jobs, DDP workers) inherit ``CLASSLAB_LOCK_OWNER`` and count as the same owner.
    """

    STALE_EMPTY_S = 30.0  # a lock file still empty after this long was left by a crash while taking it

    def __init__(self, folder: str | Path, command: str = "train") -> None:
        self.path = Path(folder) / LOCK
        self.command = command
        self.host = socket.gethostname()
        self.token = os.environ.get(LOCK_OWNER_ENV) or f"{self.host}:{os.getpid()}:{time.time_ns()}"
        self.held = False
        self._env_before: str | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def owner(self) -> dict[str, Any] | None:
        """The live owner's record, or None when the folder is free (no lock, or a stale one)."""
        record = self._read()
        if record is None or self._stale(record):
            return None
        return record

    def check_free(self) -> None:
        """Refuse (one line naming the owner) when another live process holds the folder."""
        record = self.owner()
        if record is not None and record.get("owner") != self.token:
            raise RunInUse(self._in_use(record))

    def acquire(self) -> RunLock:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                record = self._read()
                if record is None:
                    continue  # released between our two looks: try again
                if self._stale(record):
                    self._take_over(record)
                    continue
                if record.get("owner") == self.token:
                    return self  # the process that started us holds it (sweep job, DDP worker)
                raise RunInUse(self._in_use(record)) from None
            except OSError as exc:
                raise write_error(self.path, exc) from None
            record = {
                "pid": os.getpid(),
                "host": self.host,
                "owner": self.token,
                "command": self.command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.held = True
            self._env_before = os.environ.get(LOCK_OWNER_ENV)
            os.environ[LOCK_OWNER_ENV] = self.token
            return self
        raise ClassLabError(f"could not take the lock {self.path}: other processes keep taking it; try again")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._env_before is None:
            os.environ.pop(LOCK_OWNER_ENV, None)
        else:
            os.environ[LOCK_OWNER_ENV] = self._env_before
        record = self._read()
        if record is not None and record.get("owner") == self.token and record.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    # -- details ----------------------------------------------------------------------------
    def _read(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            return record if isinstance(record, dict) else {"text": text}
        except json.JSONDecodeError:
            return {"text": text}  # being written right now, or left empty by a crash

    def _stale(self, record: dict[str, Any]) -> bool:
        if "pid" not in record:
            try:
                return time.time() - self.path.stat().st_mtime > self.STALE_EMPTY_S
            except FileNotFoundError:
                return True
        return record.get("host") == self.host and not _alive(int(record["pid"]))

    def _in_use(self, record: dict[str, Any]) -> str:
        who = (
            f"`classlab {record.get('command', 'train')}` (pid {record['pid']} on {record.get('host')}, "
            f"since {record.get('since', '?')})"
            if "pid" in record
            else "a process that is taking the lock right now"
        )
        remote = "pid" in record and record.get("host") != self.host
        hint = f"; if that process is gone, delete {self.path}" if remote else "; wait for it to finish"
        return f"run folder '{self.path.parent}' is in use by {who}{hint}, or train under another exp_name"

    def _take_over(self, stale: dict[str, Any]) -> None:
        """Move the stale lock aside, check it was the one we judged stale, and say so."""
        aside = self.path.with_name(f".{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first; the next O_EXCL decides
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            moved = None
        if moved != stale and "pid" in stale:
            try:
                os.link(aside, self.path)  # it was a fresh lock taken in between: put it back
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        who = f"pid {stale['pid']} on {stale.get('host')}" if "pid" in stale else "a crashed process"
        warnings.warn(f"{self.path}: took over the lock of {who}, which is no longer running", stacklevel=3)


def _leftover(name: str) -> bool:
    """A temporary file of an atomic write (``.config.yaml.XXXX.tmp``) or of a lock's take-over, left by a kill."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(f".{LOCK}.stale-"))


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


def run_of(path: str | Path) -> tuple[str, str | None]:
    """A run's own file (its config.yaml, summary.json, or a checkpoint) -> that run folder and the checkpoint's name.

    People tab-complete to the file they think of as "the model" (checkpoints/best.ckpt); anything
    else comes back as given.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt" and p.parent.name == CHECKPOINTS and is_run_folder(p.parent.parent):
        return str(p.parent.parent), p.stem
    if p.is_file() and p.name in (CONFIG, SUMMARY) and is_run_folder(p.parent):
        return str(p.parent), None
    return str(path), None


def run_and_checkpoint(run: str | Path, checkpoint: str | None = None) -> tuple[str, str]:
    """``run_of`` for the Python API: a checkpoint file given as the run also picks the checkpoint.

    ``checkpoint`` None means best, unless the run is given as one of its files; a name given beside a file
    that names another is refused (an explicit "best" beside last.ckpt was once read as the default, and lost).
    """
    folder, picked = run_of(run)
    if picked is None:
        return folder, checkpoint or "best"
    if checkpoint not in (None, picked):
        raise ClassLabError(f"{picked}.ckpt given with checkpoint={checkpoint!r}: keep one of the two")
    return folder, picked


def is_fold_group(path: str | Path) -> bool:
    """A folder made by a k-fold run (it holds fold{i} runs and folds.json)."""
    return (Path(path) / FOLDS).is_file()


def fold_runs(path: str | Path) -> list[Path]:
    """The fold run folders of a k-fold folder, in fold order (only those that exist)."""
    folder = Path(path)
    k = int(RunFolder(folder).read_json(FOLDS)["folds"])
    return [folder / f"fold{i}" for i in range(k) if is_run_folder(folder / f"fold{i}")]


def holds_runs(path: str | Path) -> str | None:
    """What to give instead of a folder of runs (a sweep's, or run.root itself), or None when it holds none."""
    folder = Path(path)
    inner = sorted(p for p in folder.iterdir() if p.is_dir() and is_run_folder(p)) if folder.is_dir() else []
    if not inner:
        return None
    return (
        f"it holds {len(inner)} run(s) (a sweep's or run.root's folder): give one of them ({inner[0]}), or for "
        f"predict/eval several of them {spelt('with --ensemble mean', 'as a list')}"
    )


def _folder_train_gave() -> str:
    """The run folder as the reader got it: printed by the command, returned by the call."""
    return command("the folder `classlab train` printed", "the folder classlab.train returned")


def open_run(path: str | Path) -> RunFolder:
    """An existing run folder (for eval, predict, export, resume)."""
    run = RunFolder(path)
    if run.path.is_file():  # classlab.load("photo.png"): an image where the run goes
        raise ClassLabError(
            f"'{run.path}' is a file, not a run folder; give {_folder_train_gave()} (the images to "
            f"classify come after it: {command('classlab predict RUN IMAGES', 'classlab.predict(RUN, IMAGES)')}, or "
            "classlab.load(RUN)(image))"
        )
    if not run.path.is_dir():
        made = command("`classlab train` prints the folder it made", "classlab.train returns the folder it made")
        raise ClassLabError(f"run folder '{run.path}' not found; {made}")
    if not (run.path / CONFIG).is_file():
        if is_fold_group(run.path):  # `classlab train --folds K` printed the fold runs' folders, not this one
            raise ClassLabError(
                f"'{run.path}' is a k-fold folder (one run per fold), not one run; give a fold run "
                f"({run.path / 'fold0'}), or for predict/eval {spelt('add --ensemble mean', 'give this folder')} "
                "to use them all"
            )
        raise ClassLabError(
            f"'{run.path}' is not a run folder (no {CONFIG}); "
            + (holds_runs(run.path) or f"give {_folder_train_gave()}")
        )
    stages = run.read_config_tree().get("stages") or []
    if stages:
        # A multi-stage run is used through its last stage, which holds the final weights.
        last = RunFolder(run.path / f"stage{len(stages)}")
        if not (last.path / CONFIG).is_file():
            raise ClassLabError(
                f"multi-stage run '{run.path}' has not reached its last stage; continue it with {option('resume')}"
            )
        return last
    return run


def open_run_at(run: str | Path | RunFolder, checkpoint: str | None = None) -> tuple[RunFolder, str]:
    """A run as the Python API is given it, opened, and the checkpoint meant: a path or one of the run's checkpoint
    files (``run_and_checkpoint``), or the RunFolder ``classlab.train`` returns, whose staged top folder stands for
    its last stage as its path does (``open_run``)."""
    if isinstance(run, RunFolder):
        return open_run(run.path), checkpoint or "best"
    path, checkpoint = run_and_checkpoint(run, checkpoint)
    return open_run(path), checkpoint


# summary.json's fields that a run's finish measures (train._finish, engine.trainer.final_test).
FINISH_FIELDS = ("epochs_done", "wall_time_s", "finished_at", "stopped_early", "training_loss_note")
FINISH_PREFIXES = ("test", "best_", "val/")
MOVED_ASIDE = re.compile(r"\.old-\d{8}-\d{6}(-\d+)?$")  # the name move_aside gives


def is_moved_aside(path: Path) -> bool:
    """A run ``--force`` replaced: kept, but not one of the runs a folder or a glob stands for."""
    return MOVED_ASIDE.search(Path(path).name) is not None


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
