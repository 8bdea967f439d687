"""Errors a user can act on.

Anything raised as a ``ClassLabError`` is printed by the command line as one line
(``error: <message>``) with no traceback; the message names the problem and the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path


class ClassLabError(Exception):
    """A problem with the user's input (files, images, checkpoints, runs). Exit code 1."""

    exit_code = 1


class ConfigError(ClassLabError):
    """A problem with the configuration (unknown key, wrong type or range). Exit code 2."""

    exit_code = 2


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM; the message says where and what last.ckpt holds. Exit 128 + signal.
    ``run``: the folder a resume goes on in (a k-fold or multi-stage run's own folder, not its fold's or stage's)."""

    def __init__(self, message: str, exit_code: int = 130, run: Path | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.run = run


def ddp_worker() -> str | None:
    """``process N`` in a DDP worker that Lightning started, None in process 0 or a run without DDP.

    The workers run the same command and share process 0's terminal: what process 0 says for all of them
    (a stop, the run's result) they leave unsaid, and a line only one of them has to say names its process.
    """
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    if local == "0" and node == "0":
        return None
    return f"process {local}" if node == "0" else f"node {node} process {local}"


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message as one line of the user's: its first line (or its type, when it says nothing),
    cut to ``limit`` characters; library messages run to pages."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``word`` among ``choices``, if any is close.

    Case first: ``AdamW`` is ``adamw`` (by spelling distance alone it was ``adam``, another optimizer), ``SGD`` is
    ``sgd`` (too far to be found at all)."""
    choices = list(choices)
    by_case = {c.lower(): c for c in reversed(choices)}
    if word.lower() in by_case:
        return by_case[word.lower()]
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if not found:
        found = [by_case[c] for c in difflib.get_close_matches(word.lower(), list(by_case), n=1, cutoff=0.5)]
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for an error message, or ''."""
    close = nearest(word, choices)
    return f" (did you mean '{close}'?)" if close else ""


def utf8_text(path: str | Path, error: type[ClassLabError] = ClassLabError) -> str:
    """A text file a user wrote (config, CSV manifest, template): UTF-8, with or without Excel's and Notepad's BOM.

    Excel and editors on Korean or Japanese Windows save CP949 / Shift-JIS; guessing an encoding would
    misread class names without a word, so that is one line asking for UTF-8 instead.
    """
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8 "
            "(Excel: CSV UTF-8; editors on Korean or Japanese Windows may have saved it as CP949 / Shift-JIS)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Whose words a hint is in. On the command line its fix is a flag (--resume, --checkpoint last); a caller
# of the Python API gives keywords instead (resume=True, checkpoint='last'). Messages name options through
# `option`, `option_name` and `spelt`; the Python API (classlab/__init__.py) runs each call inside
# `python_call`. This section is the one place that knows both spellings: the verbs never ask who called,
# and outside a Python call (the command line, a module used directly) the flags are named, word for word.

# A point of classlab.sweep(..., jobs=K) trains in a `classlab train` process of its own: the sweep names the
# call it serves in this variable, so the error line the sweep reads back from the point's log is in its words.
PYTHON_CALLER_ENV = "CLASSLAB_PYTHON_CALL"
_PYTHON_VERB: ContextVar[str | None] = ContextVar(
    "classlab_python_verb", default=os.environ.get(PYTHON_CALLER_ENV) or None
)

# Flags that take no value: ``resume=True`` in a call.
SWITCHES = frozenset({"resume", "force", "report", "allow-missing"})
# A flag whose keyword is not its own name ('-' read as '_'), with {} for the value; a verb's own entry
# (report calls --data ``labelled``) before the shared one.
KEYWORDS: dict[tuple[str | None, str], str] = {
    (None, "format"): "fmt={}",
    (None, "ray"): "ray_address={}",
    (None, "grid"): "grid=[{}]",  # --grid gives one axis; sweep's ``grid`` is the list of them
    ("report", "data"): "labelled={}",
}


@contextlib.contextmanager
def python_call(verb: str | None) -> Iterator[None]:
    """Messages raised or printed inside name keywords of ``classlab.<verb>(...)``, not flags (None: flags)."""
    token = _PYTHON_VERB.set(verb)
    try:
        yield
    finally:
        _PYTHON_VERB.reset(token)


def python_verb() -> str | None:
    """The verb of the Python call in progress (``train`` inside ``classlab.train(...)``), None on the command
    line: for work handed to another process (a sweep's point), which runs its share inside ``python_call`` of it."""
    return _PYTHON_VERB.get()


def caller_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a ``classlab`` process started to do part of this call: under a Python call it speaks as the
    call does (``PYTHON_CALLER_ENV``); under the command line as a command line, whatever this process inherited."""
    verb = _PYTHON_VERB.get()
    env = {k: v for k, v in env.items() if k != PYTHON_CALLER_ENV}
    return {**env, PYTHON_CALLER_ENV: verb} if verb else env


def _keyword(name: str) -> str:
    verb = _PYTHON_VERB.get()
    return KEYWORDS.get((verb, name)) or KEYWORDS.get((None, name)) or f"{name.replace('-', '_')}={{}}"


def option(name: str, value: object = None, *, quoted: bool = False, metavar: str | None = None) -> str:
    """An option as the reader gives it: ``--checkpoint last`` / ``checkpoint='last'``, ``--resume`` /
    ``resume=True``, ``--jobs K`` / ``jobs=K`` (``metavar``), ``--out`` / ``out=...`` (no value: the
    reader's to choose). ``quoted``: the command line shows the value in quotes (a path, a list of modes)."""
    if _PYTHON_VERB.get() is None:
        if name in SWITCHES or (value is None and metavar is None):
            return f"--{name}"
        shown = metavar if metavar is not None else f"'{value}'" if quoted else f"{value}"
        return f"--{name} {shown}"
    if name in SWITCHES:
        shown = "True"
    elif metavar is not None:
        shown = metavar
    elif value is None:
        shown = "..."
    else:
        shown = repr(os.fspath(value) if isinstance(value, (str, os.PathLike)) else value)
    return _keyword(name).format(shown)


def option_name(name: str) -> str:
    """An option spoken of rather than given (``--tta: unknown mode``, ``--grid seed sets seed``):
    ``--tta`` / ``tta``."""
    return f"--{name}" if _PYTHON_VERB.get() is None else _keyword(name).partition("=")[0]


def spelt(command_line: str, python: str) -> str:
    """A hint whose Python form is no keyword of the call: ``--ensemble mean`` is a list of runs there,
    ``--folds 3`` the override ``data.folds=3``."""
    return command_line if _PYTHON_VERB.get() is None else python


def command(line: str, python: str | None = None) -> str:
    """A hint that names a whole command (``classlab train --print-config``): the command line as it is; a Python
    caller gets ``python``, the call that does the same, or, where the API has none, the command marked as one to
    type in a shell, so it does not read as something to call."""
    if _PYTHON_VERB.get() is None:
        return line
    return python if python is not None else f"the shell command `{line.strip('`')}`"


def interrupted_for_python(verb: str, exc: KeyboardInterrupt) -> KeyboardInterrupt:
    """The Ctrl-C or SIGTERM that stopped ``classlab.<verb>(...)``, ending in how to go on from Python, as the
    command line ends its 'interrupted:' line with ``continue with --resume`` (a run) or 'run the same command again'
    (a sweep). A Ctrl-C before a run began is left as it is (the command line adds nothing to it either)."""
    sweep = "call classlab.sweep(...) again with the same arguments to continue the sweep"
    if isinstance(exc, RunInterrupted):
        where = f" the run in {exc.run}" if exc.run is not None else ""
        train = f"continue{where} with classlab.train(<the same config and overrides>, resume=True)"
        exc.args = (f"{exc}; {sweep if verb == 'sweep' else train}",)
        return exc
    if verb != "sweep":
        return exc
    stopped = RunInterrupted(f"interrupted; {sweep}", getattr(exc, "exit_code", 130))
    stopped.__suppress_context__ = True  # the plain KeyboardInterrupt it replaces says nothing more
    return stopped
