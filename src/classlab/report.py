"""``classlab report RUNS --out report.html``: one static page about a set of runs, to open in any browser.

The page is a single file: its CSS and JavaScript are inline and its images are data URIs, so it can be
mailed, attached to an issue or opened from a laptop without the run folders, a server or a network. It
holds the runs' table (click a column header to sort it), the validation curves, and for a single run the
error analysis of ``classlab eval --report``: confusion matrix, per-class precision/recall/F1, the most
confidently wrong images with their true and predicted classes, and the reliability diagram. That analysis
is read from ``RUN/eval/<split>/``, and computed first (as ``eval --report``) when it is not there yet.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from classlab.compare import RunData, comparison, find_runs, format_value, plot_curves, read_runs, varying_keys
from classlab.errors import ClassLabError, option
from classlab.run import atomic_write_text, open_run

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta, .note { color: #666; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
table.sortable th { cursor: pointer; background: #f4f6f8; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
table.confusion td { min-width: 2.2rem; text-align: center; }
.plots { display: flex; flex-wrap: wrap; gap: .5rem; }
.plots img { width: calc(50% - .5rem); box-sizing: border-box; } img.reliability { width: 480px; }
.plots img, .figure { max-width: 100%; border: 1px solid #eee; }
.errors { display: flex; flex-wrap: wrap; gap: .6rem; }
.errors figure { margin: 0; width: 112px; font-size: 12px; text-align: center; }
.errors img { width: 96px; height: 96px; image-rendering: pixelated; object-fit: contain; border: 1px solid #ccc; }
.true { color: #1a7f37; } .pred { color: #c62828; }
"""

# Sorts the table whose header was clicked: numbers as numbers, text in natural order; whichever way, a number that
# is not one (nan, inf: a run that diverged) after the others and blanks last. nan was sorted as the text "nan", so
# it came first of a column sorted descending, above the best run.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var dir = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.setAttribute("aria-sort", "none"); });
      th.setAttribute("aria-sort", dir);
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var c = row.cells[col];
        return c.dataset.sort !== undefined ? c.dataset.sort : c.textContent.trim();
      };
      var last = function (row) {
        return key(row) === "" ? 2 : row.cells[col].hasAttribute("data-nonfinite") ? 1 : 0;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), lx = last(a), ly = last(b);
        if (lx || ly) { return lx - ly; }
        var nx = Number(x), ny = Number(y);
        var c = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
        return dir === "ascending" ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{title}</h1>
<p class="meta">written by classlab {version} on {date}: {count}</p>
{body}
<script>{script}</script>
</body>
</html>
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str, cls: str = "figure") -> str:
    return f'<img class="{cls}" alt="{_esc(alt)}" src="{data_uri(png)}">'


def _table(columns: list[str], rows: list[dict[str, Any]], table_id: str, summary_rows: int = 0) -> str:
    """A sortable table; each cell keeps its exact value in data-sort, shown rounded. The last ``summary_rows``
    (k-fold mean ± std) go in the table's foot, which a click on a header leaves where it is."""
    head = "".join(f'<th aria-sort="none">{_esc(c)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            exact = "" if value is None else (repr(value) if isinstance(value, float) else format_value(value))
            odd = " data-nonfinite" if isinstance(value, float) and not math.isfinite(value) else ""  # sorted last
            cells.append(f'<td data-sort="{_esc(exact)}"{odd}>{_esc(format_value(value, c))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    split = len(body) - summary_rows
    foot = f"<tfoot>{''.join(body[split:])}</tfoot>" if summary_rows else ""
    rows_html = "".join(body[:split])
    return (
        f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{rows_html}</tbody>{foot}</table>"
    )


def _failures(runs: list[RunData]) -> str:
    """Why each run that ended badly ended (summary.json's error): a failed run's page said only 'no validation
    rows yet', as if it were still to come."""
    lines = [f"<li><b>{_esc(r.label)}</b> ({_esc(str(r.summary.get('status')))}): {_esc(str(r.summary['error']))}</li>"
             for r in runs if r.summary.get("error")]  # fmt: skip
    return f'<h3>Runs that stopped with an error</h3><ul class="note">{"".join(lines)}</ul>' if lines else ""


def _curves(runs: list[RunData]) -> str:
    """Validation accuracy and loss against epoch, one line per run (the plots ``compare`` draws)."""
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for column in ("val/acc", "val/loss"):
            path = plot_curves(runs, Path(tmp) / f"{column.replace('/', '_')}.png", column=column)
            if path is not None:
                images.append(_img(path.read_bytes(), f"{column} per epoch"))
    if not images:
        return '<h2>Validation curves</h2><p class="note">no validation rows in metrics.csv</p>'
    return '<h2>Validation curves</h2><div class="plots">' + "".join(images) + "</div>"


def _confusion(folder: Path) -> str:
    """The confusion matrix as a table, each cell shaded by its share of the true class's images."""
    rows = list(csv.reader((folder / "confusion.csv").open()))
    classes = rows[0][1:]
    out = ['<table class="confusion" id="confusion"><thead><tr><th>true \\ predicted</th>']
    out += [f"<th>{_esc(c)}</th>" for c in classes]
    out.append("</tr></thead><tbody>")
    for row in rows[1:]:
        counts = [int(v) for v in row[1:]]
        total = max(1, sum(counts))
        cells = []
        for count in counts:
            share = count / total
            color = "#fff" if share > 0.5 else "#222"
            cells.append(f'<td style="background: rgba(21,101,192,{share:.3f}); color: {color}">{count or ""}</td>')
        out.append(f"<tr><th>{_esc(row[0])}</th>{''.join(cells)}</tr>")
    return "".join(out) + "</tbody></table>"


def _errors(folder: Path, errors: list[dict[str, Any]]) -> str:
    if not errors:
        return '<p class="note">no errors</p>'
    figures = []
    for err in errors:
        thumb = folder / err.get("thumbnail", "")
        if not thumb.is_file():
            continue
        true, pred, conf = err["true"], err["predicted"], err["confidence"]
        image = _img(thumb.read_bytes(), f"true {true}, predicted {pred}", "thumb")
        figures.append(
            f'<figure>{image}<figcaption><span class="true">true: {_esc(true)}</span><br>'
            f'<span class="pred">pred: {_esc(pred)}</span> ({conf:.2f})</figcaption></figure>'
        )
    return '<div class="errors">' + "".join(figures) + "</div>"


def _report_still_of(run: RunData, folder: Path) -> bool:
    """Whether eval --report's files in ``folder`` are of the run's best.ckpt as it is now, plain (no TTA), with
    the calibration in use now: a resumed run's new best.ckpt or a later calibration made them another's."""
    from classlab.engine.metrics import rounded
    from classlab.evaluate import report_inputs

    if not (folder / "report.json").is_file() or not (folder / "errors").is_dir():
        return False
    try:
        made_of = json.loads((folder / "report.json").read_text()).get("inputs")
        return made_of == rounded(report_inputs(open_run(run.path)))
    except (ClassLabError, OSError, ValueError):
        return False


def _analysis(run: RunData, split: str, labelled: str | Path | None = None) -> str:
    """The single run's error analysis, computed first (``eval --report``) if the run folder lacks it;
    ``labelled``: of those images instead of a split (``eval --data``), computed every time."""
    from classlab.engine.metrics import top5_tells
    from classlab.evaluate import evaluate

    if labelled is not None:
        folder = Path(evaluate(run.path, report=True, data=labelled)["out"])  # an error here is the user's to see
    else:
        try:  # a multi-stage run's analysis is its last stage's, in that stage's folder, where eval writes it
            folder = open_run(run.path).path / "eval" / split
            if not _report_still_of(run, folder):
                folder = Path(evaluate(run.path, split=split, report=True)["out"])
        except ClassLabError as exc:
            return f'<h2>Error analysis</h2><p class="note">not available: {_esc(exc)}</p>'
    report = json.loads((folder / "report.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    what = f"{metrics['data']}" if metrics.get("data") else f"{split} split"
    per_class = [{k: r[k] for k in ("class", "precision", "recall", "f1", "support")} for r in report["per_class"]]
    # A multitask run's figures per task (the analysis below is of the combined class): what its user ranks by.
    per_task = [
        {"task": name, "accuracy": acc, "macro F1": (metrics.get("tasks_f1") or {}).get(name)}
        for name, acc in (metrics.get("tasks") or {}).items()
    ]
    top5 = f"top-5 {metrics['top5']:.4f}, " if top5_tells(len(metrics["per_class"])) else ""
    weighted = f"weighted F1 {report['weighted_f1']:.4f}, " if "weighted_f1" in report else ""  # older report.json
    return "\n".join(
        [
            f"<h2>Error analysis: {_esc(what)}, {metrics['images']} images, "
            f"{_esc(metrics['checkpoint'])}.ckpt, {_esc(report['predictions'])} predictions</h2>",
            f"<p>top-1 {metrics['top1']:.4f}, {top5}macro F1 {report['macro_f1']:.4f}, {weighted}"
            f"expected calibration error {report['ece']:.4f} ({report['ece_bins']} bins)</p>",
            *(
                [
                    "<h3>Per task</h3>",
                    _table(["task", "accuracy", "macro F1"], per_task, "per-task"),
                    '<p class="note">below: the combined class (every task\'s class at once)</p>',
                ]
                if per_task
                else []
            ),
            "<h3>Confusion matrix</h3>",
            _confusion(folder),
            "<h3>Per-class precision, recall and F1</h3>",
            _table(["class", "precision", "recall", "f1", "support"], per_class, "per-class"),
            "<h3>Most confidently wrong</h3>",
            _errors(folder, report["confident_errors"]),
            "<h3>Reliability</h3>",
            _img((folder / "reliability.png").read_bytes(), "reliability diagram", "figure reliability"),
        ]
    )


def write_html_report(
    runs: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | Path = "report.html",
    *,
    split: str = "test",
    by: list[str] | None = None,
    metrics: list[str] | None = None,
    labelled: str | Path | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write the page for ``runs`` (run folders, sweep folders or globs) to ``out``; return its path.

    ``labelled``: the single run's error analysis on these labelled images (``eval --data``) instead of ``split``.
    ``notes`` (when given) collects a line for each run left out of several because its files are damaged.
    """
    from importlib.metadata import version

    data = read_runs(find_runs(runs, notes), notes)
    table = comparison(data, list(by) if by else varying_keys(data), metrics)
    runs_table = _table(table.columns, table.rows, "runs", table.summary_rows)
    sections = ["<h2>Runs</h2>", runs_table, _failures(data), _curves(data)]
    if len(data) == 1:
        sections.append(_analysis(data[0], split, labelled))
    elif labelled is not None:
        raise ClassLabError(f"{option('data')} analyses one run: give a single run folder")
    title = f"classlab report: {data[0].label}" if len(data) == 1 else f"classlab report: {len(data)} runs"
    page = PAGE.format(
        title=_esc(title),
        style=STYLE,
        script=SCRIPT,
        body="\n".join(sections),
        version=version("classlab"),
        date=time.strftime("%Y-%m-%d %H:%M"),
        count=f"{len(data)} run{'s' if len(data) != 1 else ''}",
    )
    path = Path(out)
    atomic_write_text(path, page, output=True)
    return path


report = write_html_report  # ``classlab.report(runs, out)``, named as its command
