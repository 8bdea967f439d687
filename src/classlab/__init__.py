"""classlab: image-classification experiments as one config and one command.

The public functions mirror the command line: ``train``, ``evaluate``, ``predict``, ``load``,
``export``, ``sweep``, ``compare``, ``report``. Each verb is a module named as its command
(``classlab/train.py`` holds ``classlab train``), and ``classlab.train(...)`` calls the function
of the same name in it, so the package stays importable in a blink: torch and Lightning load
only when a verb is first used.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types
from typing import Any

from classlab.errors import interrupted_for_python as _interrupted_for_python
from classlab.errors import python_call as _python_call

__version__ = "0.1.0"

VERBS = ("train", "evaluate", "predict", "export", "sweep", "compare", "report")
__all__ = [*VERBS, "load", "__version__"]


class _Verb(types.ModuleType):
    """A verb module that can be called as its function: ``classlab.train(cfg)`` == ``classlab.train.train(cfg)``.

    Python binds a submodule to its package's attribute of the same name once it is imported,
    so without this ``classlab.train`` would be the function before anything imported
    ``classlab.train`` and the module after.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        verb = self.__name__.rpartition(".")[2]
        with _python_call(verb):  # its hints name keywords, not the command's flags
            try:
                return self._function(*args, **kwargs)
            except KeyboardInterrupt as exc:  # the command line adds its own 'continue with --resume'
                raise _interrupted_for_python(verb, exc)  # noqa: B904 - the same exception, or one in its place

    @property
    def _function(self) -> Any:
        return getattr(self, self.__name__.rpartition(".")[2])

    @property
    def __signature__(self) -> inspect.Signature:
        """The function's parameters, for ``inspect.signature`` and a notebook's ``classlab.train?`` and
        tab completion; the module's own would be ``(*args, **kwargs)``."""
        return inspect.signature(self._function)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in VERBS and isinstance(value, types.ModuleType) and not isinstance(value, _Verb):
            value.__class__ = _Verb
            # help(classlab.train) shows a module: lead its page with the function a user calls, and its doc.
            function = getattr(value, name)
            lead = f"{name}{inspect.signature(function)}\n\n{inspect.getdoc(function)}"
            value.__doc__ = f"{lead}\n\n{value.__doc__ or ''}"
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in VERBS:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "load":
        load_runs = importlib.import_module(f"{__name__}.engine.ensemble").load_runs

        @functools.wraps(load_runs)
        def load(*args: Any, **kwargs: Any) -> Any:
            with _python_call("load"):  # as a verb's call: its hints name keywords (checkpoint='last')
                return load_runs(*args, **kwargs)

        globals()["load"] = load
        return load
    raise AttributeError(f"module 'classlab' has no attribute '{name}'")
