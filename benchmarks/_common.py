"""What every benchmark shares: the machine line, the exact command, and BENCHMARKS.md sections.

A figure without the machine and the command that produced it cannot be checked or repeated,
so each benchmark rewrites only its own section of BENCHMARKS.md (between marker comments),
atomically, with the date, the machine and the command above its table.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work"  # git-ignored: downloads, run folders, partial results
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"
FLOWERS = REPO.parent / "shared" / "data" / "flowers5"  # real photos in flat class folders
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
RESULTS = REPO / "benchmarks" / "results"  # committed: figures that later calls (and sessions) add to


def results_path(name: str, work: Path, local: bool) -> Path:
    """Where a benchmark keeps the rows it has measured, which its BENCHMARKS.md section is rebuilt from.

    Committed (``benchmarks/results/<name>.json``) by default, because the section is rewritten from
    this file: a store under the git-ignored work folder is gone in the next fresh checkout, and the
    next call would publish only what it measured itself. ``local`` (smoke runs, an explicit --work)
    keeps it in the work folder.
    """
    return work / "results.json" if local else RESULTS / f"{name}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> str:
    """``2 cores, AMD EPYC (avx512_bf16), torch 2.14.1 with 2 threads``."""
    flags = cpu_flags()
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{os.cpu_count()} cores, {cpu_model()}" + (f" ({', '.join(isa)})" if isa else "") + f", Linux "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )


def command() -> str:
    """The command line as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def section_head(title: str, meta: dict[str, str], notes: list[str]) -> list[str]:
    """A section's first lines: its title, then date, machine and command, then its own notes as bullets."""
    stamp = [f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{meta['command']}`"]
    return [f"## {title}", "", *stamp, *(f"- {note}" for note in notes), ""]


def measured_by(rows: Iterable[dict]) -> list[str]:
    """The note that names the call (and date) behind each row, as a list of zero or one notes.

    A section is rewritten by whichever call ran last, while its rows may come from earlier calls
    (``--sides``/``--arms`` measure part of a table); the reader must see which command made each figure.
    """
    dates: dict[str, set[str]] = {}  # one command run on several dates (a long sweep across sessions): named once
    for r in rows:
        if r.get("command"):
            dates.setdefault(r["command"], set()).update([r["date"]] if r.get("date") else [])
    calls = [f"`{c}`" + (f" ({', '.join(sorted(d))})" if d else "") for c, d in sorted(dates.items())]
    return ["rows measured by: " + "; ".join(calls)] if calls else []


def run_worker(cmd: list[str]) -> tuple[dict | None, str]:
    """Run a benchmark's worker process: (its ``RESULT {json}`` line parsed, "") or (None, the tail of its output).

    Each measured run is a fresh process, so one side's warm caches and allocator never time the other's.
    """
    import json
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        return None, "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
    return json.loads(line[len("RESULT ") :]), ""


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    from classlab.run import atomic_write_text

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def publish(name: str, body: str, smoke: bool) -> None:
    """Print the section; a full run (not ``--smoke``) also writes it into BENCHMARKS.md."""
    print(body)
    if not smoke:
        write_section(name, body)


def copy_class_folders(source: Path, dest: Path, per_class: int) -> None:
    """The first ``per_class`` files (by name) of each ``source/<class>/`` folder, into ``dest/<class>/``."""
    import shutil

    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        out = dest / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(f for f in class_dir.iterdir() if f.is_file())[:per_class]:
            shutil.copyfile(file, out / file.name)


def subset_folder(source: Path, dest: Path, train_per_class: int, test_per_class: int | None = None) -> Path:
    """A small copy of an image folder: the smoke runs' data.

    With ``test_per_class`` the source has ``train/`` and ``test/`` (by class) and so has the copy;
    without it, the source is flat class folders (a photo folder) and so is the copy. A finished copy
    is marked and reused.
    """
    if (dest / ".complete").is_file():
        return dest
    if test_per_class is None:
        copy_class_folders(source, dest, train_per_class)
    else:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            copy_class_folders(source / split, dest / split, count)
    (dest / ".complete").write_text("ok\n")
    return dest
