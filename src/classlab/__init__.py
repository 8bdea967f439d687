"""classlab: image-classification experiments as one config and one command.

The public functions mirror the command line: ``train``, ``evaluate``, ``predict``, ``load``,
``export``, ``sweep``, ``compare``, ``report``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "predict", "load", "export", "sweep", "compare", "report", "__version__"]


def __getattr__(name: str) -> Any:
    # Import lazily: `classlab --help` and config errors should not pay for importing torch + Lightning.
    if name == "train":
        from classlab.training import train

        return train
    if name == "evaluate":
        from classlab.evaluation import evaluate

        return evaluate
    if name == "sweep":
        from classlab.sweeping import sweep

        return sweep
    if name == "export":
        from classlab.export import export

        return export
    if name == "report":
        from classlab.report_html import write_html_report

        return write_html_report
    if name == "compare":
        from classlab.report import compare

        return compare
    if name in ("predict", "load"):
        from classlab import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'classlab' has no attribute '{name}'")
