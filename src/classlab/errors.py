"""Errors a user can act on.

Anything raised as a ``ClassLabError`` is printed by the command line as one line
(``error: <message>``) with no traceback; the message names the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ClassLabError(Exception):
    """A problem with the user's input (files, images, checkpoints, runs). Exit code 1."""

    exit_code = 1


class ConfigError(ClassLabError):
    """A problem with the configuration (unknown key, wrong type or range). Exit code 2."""

    exit_code = 2


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of ``word`` among ``choices``, if any is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for an error message, or ''."""
    close = nearest(word, choices)
    return f" (did you mean '{close}'?)" if close else ""
