"""Lightning's and torch's own log lines and warnings: kept back unless asked for (``-v``, ``verbose=1``).

Lightning's advice (the device report, LOCAL_RANK, the model summary, "`Trainer.fit` stopped") is aimed at
Lightning's users; ours get classlab's lines instead. One policy for both ways in: the command line sets it
for its whole process (cli.py), a Python call for its own length only (``train._kept_for_caller``, which puts
the caller's logging and warnings back afterwards), so a notebook and a terminal see the same lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
MLFLOW_LOGGER = "mlflow"
MLFLOW_URL_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"  # MLflow's own switch for its 'View run at: URL' lines


def library_logs(verbose: int = 0) -> None:
    """Lightning's loggers and the warnings filters for ``verbose``: 0 keeps them back, 1 lets their info lines
    and warnings through, 2 their debug lines too. Process-wide: a caller that must give them back saves first."""
    import lightning  # noqa: F401  (it sets its loggers' levels on import: set ours after)

    if verbose:
        level = logging.DEBUG if verbose > 1 else logging.INFO
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(level)
        warnings.simplefilter("default")
        return
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    # An image over the pixel limit is listed as a bad file by classlab; PIL's own warning would say it twice.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


def kept_back() -> bool:
    """Whether the libraries' logs are kept back now: Lightning's loggers say, as ``library_logs`` set them (the
    command's whole process, or a Python call's own length, after which the call gives the caller's back)."""
    return logging.getLogger(LIGHTNING_LOGGERS[1]).getEffectiveLevel() > logging.INFO


@contextlib.contextmanager
def mlflow_kept_back() -> Iterator[None]:
    """MLflow's own lines while it opens its store and its run, kept back as Lightning's are without ``-v``:
    'INFO mlflow.store.db.utils: Creating initial MLflow database tables...' and 'Updating database tables' for a
    new SQLite store (the default), and the 'View run ... at: URL' lines it writes to standard output for a
    server's run. MLflow sets its loggers up (INFO, a handler of its own) as it is imported, which comes after
    ``library_logs`` ran: so its level is set here, for the opening only, and given back after it."""
    if not kept_back():
        yield
        return
    logger = logging.getLogger(MLFLOW_LOGGER)
    level, url = logger.level, os.environ.get(MLFLOW_URL_ENV)
    logger.setLevel(logging.WARNING)
    os.environ[MLFLOW_URL_ENV] = "true"
    try:
        yield
    finally:
        logger.setLevel(level)
        if url is None:
            os.environ.pop(MLFLOW_URL_ENV, None)
        else:
            os.environ[MLFLOW_URL_ENV] = url
