"""Lightning's and torch's own log lines and warnings: kept back unless asked for (``-v``, ``verbose=1``).

Lightning's advice (the device report, LOCAL_RANK, the model summary, "`Trainer.fit` stopped") is aimed at
Lightning's users; ours get classlab's lines instead. One policy for both ways in: the command line sets it
for its whole process (cli.py), a Python call for its own length only (``train._kept_for_caller``, which puts
the caller's logging and warnings back afterwards), so a notebook and a terminal see the same lines.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


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
