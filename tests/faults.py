"""Fault injection shared by the fault tests: failing writes, NaN losses, decompression bombs, the CLI in-process.

Each helper makes one thing go wrong the way it does for users (a disk that fills up at the
write, a folder that turns read-only, a loss that blows up at one step, a PNG that declares
400 megapixels in a few hundred kB), so a test can assert what the user then sees.
"""

from __future__ import annotations

import builtins
import errno as errno_module
import importlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest

from classlab.run import LOCK
from tests.conftest import tiny_config


def small_run(tmp_path: Path, **extra: object) -> list[str]:
    """Overrides for the fastest real run: 200 sample images, a two-layer CNN, two epochs."""
    base: dict[str, object] = {
        "data.images_per_class": 20,
        "data.batch_size": 32,
        "model.layers": "[8,p,16,p]",
        "epochs": 2,
        "trainer.threads": 1,
        "trainer.checkpoint_every_s": 0,  # last.ckpt at every epoch: these tests damage a given epoch's file
    }
    base.update(extra)
    return tiny_config(tmp_path, **base)


# ---------------------------------------------------------------------------------------------
# Writes that fail
# ---------------------------------------------------------------------------------------------


def _matches(path: Any, name: str) -> bool:
    """``name`` itself, or the temporary file an atomic write of ``name`` goes through (``.name.XXXX.tmp``)."""
    base = Path(os.fsdecode(path)).name if isinstance(path, (str, bytes, os.PathLike)) else ""
    return base == name or (base.startswith(f".{name}.") and base.endswith(".tmp"))


def fail_writes(
    monkeypatch: pytest.MonkeyPatch, name: str, err: int, *, at: str = "fsync", after: int = 0
) -> list[str]:
    """Make writes of files called ``name`` fail with ``err`` from the ``after+1``-th one on.

    ``at="fsync"``: the data reached the page cache but the disk refuses it (ENOSPC, EDQUOT);
    ``at="open"``: the file cannot even be created or opened for writing (EACCES, EROFS).
    Returns the list of paths that failed, so a test can check the fault was hit.
    """
    seen = {"n": 0}
    failed: list[str] = []

    def hit(path: Any) -> bool:
        if not _matches(path, name):
            return False
        seen["n"] += 1
        if seen["n"] <= after:
            return False
        failed.append(os.fsdecode(path))
        return True

    def boom(path: Any) -> OSError:
        return OSError(err, os.strerror(err), os.fsdecode(path))

    if at == "fsync":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            where = os.readlink(f"/proc/self/fd/{fd}")
            if hit(where):
                raise boom(where)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    elif at == "open":
        real_os_open, real_open = os.open, builtins.open
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & writing and hit(path):
                raise boom(path)
            return real_os_open(path, flags, *args, **kwargs)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+") and hit(file):
                raise boom(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
    else:
        raise ValueError(at)
    return failed


ENOSPC, EACCES = errno_module.ENOSPC, errno_module.EACCES


# ---------------------------------------------------------------------------------------------
# A run killed at one point
# ---------------------------------------------------------------------------------------------


class Killed(BaseException):
    """kill -9 at one point of a run, raised there (``killed_before_summary``); ``dead_lock`` then writes the lock
    a dead process leaves where the run's own clean-up took it away."""


def killed_before_summary(monkeypatch: pytest.MonkeyPatch, folder_name: str) -> None:
    """The run in a folder named ``folder_name`` (a stage's, a fold's) is killed after its config.yaml and before
    its summary.json (while its model is built): it holds classes.json, split.json and config.yaml, no summary."""
    train_module = importlib.import_module("classlab.train")
    real = train_module._announce

    def announce(run: Any, *args: Any) -> None:
        if run.path.name == folder_name:
            raise Killed(folder_name)
        real(run, *args)

    monkeypatch.setattr(train_module, "_announce", announce)


def dead_lock(folder: Path) -> None:
    """The run.lock a killed process leaves in ``folder``: a pid of this host that no longer runs."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = {"pid": proc.pid, "host": socket.gethostname(), "owner": "killed", "command": "train", "since": "then"}
    (folder / LOCK).write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# A loss that becomes NaN
# ---------------------------------------------------------------------------------------------


def nan_loss_at(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The training loss becomes NaN at these optimizer steps (0-based ``global_step``), as a blown-up run's does."""
    from classlab.engine.task import ClassifyTask

    original = ClassifyTask.training_step

    def training_step(self: ClassifyTask, batch: Any, batch_idx: int) -> Any:
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step in steps else loss

    monkeypatch.setattr(ClassifyTask, "training_step", training_step)


# ---------------------------------------------------------------------------------------------
# Decompression bombs
# ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, width: int, height: int, channels: int = 3) -> Path:
    """A valid all-black PNG of ``width`` x ``height`` pixels that takes a few hundred kB on disk.

    Decoded it takes width * height * channels bytes. Written in well under a second: after a
    full flush the deflate stream of one block of zero rows repeats byte for byte, so one
    compressed block is written many times and only the Adler-32 checksum sees every byte.
    """
    row = b"\x00" * (1 + width * channels)  # filter byte + pixels
    rows_per_block = 256
    block = row * rows_per_block
    blocks, rest = divmod(height, rows_per_block)
    comp = zlib.compressobj(9)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.compress(row * rest) + comp.flush()
    adler = 1
    for _ in range(blocks):
        adler = zlib.adler32(block, adler)
    adler = zlib.adler32(row * rest, adler)
    stream = first + again * (blocks - 1) + tail[:-4] + struct.pack(">I", adler)
    colour_type = {1: 0, 3: 2}[channels]
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------
# The command line, in this process (so the faults above apply to it)
# ---------------------------------------------------------------------------------------------

_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``classlab ARGS`` as the user runs it: (exit code, stdout, stderr); global state restored after."""
    from classlab.cli import main

    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    capsys.readouterr()
    with warnings.catch_warnings():
        shown = warnings.showwarning
        try:
            code = main(list(args))
        finally:
            warnings.showwarning = shown
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
