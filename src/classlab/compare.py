"""``classlab compare``: tables and plots across run folders.

It reads only what runs leave behind (config.yaml, summary.json, metrics.csv), so it works on
runs from any machine, finished or not, and never needs the data or the models. The config
keys shown by default are the ones that differ between the runs: in a sweep those are the
swept keys, which is what a reader wants beside the numbers.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from classlab.config import flatten
from classlab.data.sources import natural_key
from classlab.errors import ClassLabError, did_you_mean, option
from classlab.run import (
    FOLDS,
    RunFolder,
    RunLock,
    atomic_write_figure,
    atomic_write_text,
    fold_runs,
    is_fold_group,
    is_moved_aside,
    is_run_folder,
    new_figure,
    run_of,
    write_error,
)

DEFAULT_METRICS = ("test_acc", "best_val_acc", "epochs_done", "wall_time_s")
# summary.json's keys that describe a run rather than measure it: never offered as a metric's spelling
NOT_METRICS = ("status", "exp_name", "task", "dataset", "model", "loader", "started_at", "finished_at", "versions")
# Keys that differ between runs of a sweep by construction and say nothing about the experiment.
NOT_INTERESTING = ("exp_name", "run.root", "data.cache_dir", "trainer.threads", "trainer.progress")
STAGES = "stages"  # a multi-stage run's overrides, a stage each (its top folder holds a run folder per stage)
FOLD_KEY = "data.fold"  # which fold a k-fold run is: a row's name, never a plot's axis


@dataclass
class Comparison:
    """The table compare prints, and the files it wrote."""

    columns: list[str]
    rows: list[dict[str, Any]]
    by: list[str]
    metrics: list[str]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user's eyes: a metric no run has
    summary_rows: int = 0  # the last rows summarise the others (k-fold mean ± std): never sorted among them

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "|" + "|".join("---:" if c in self.metrics else "---" for c in self.columns) + "|"
        body = ["| " + " | ".join(_cell(r.get(c), c) for c in self.columns) + " |" for r in self.rows]
        return "\n".join([head, rule, *body]) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({c: _csv_cell(row.get(c)) for c in self.columns})
        return out.getvalue()


def _cell(value: Any, column: str = "") -> str:
    """A Markdown table cell: the value as shown, its ``|`` escaped (an HTML cell wants ``format_value``)."""
    return format_value(value, column).replace("|", "\\|")


def format_value(value: Any, column: str = "") -> str:
    """A value as a table shows it: floats rounded (seconds to a tenth), lists and mappings as flow YAML."""
    if value is None:
        return ""
    if isinstance(value, float):
        if column.endswith("_s") and abs(value) < 1000:  # seconds: a tenth is as fine as a clock is read
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, list | dict):
        value = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return "" if value is None else value


# ---------------------------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------------------------


def find_runs(patterns: str | os.PathLike | Sequence[str | os.PathLike], notes: list[str] | None = None) -> list[Path]:
    """Run folders from paths or globs; a folder of runs (a sweep) stands for the runs in it. One path or a list,
    as text, Path or the RunFolder ``classlab.train`` returns (its str() is its repr, not its path).

    Runs that ``--force`` moved aside (``NAME.old-<time>``) are compared when named, not when a folder or a
    glob stands for them (they are the runs a rerun replaced); ``notes`` gets a line saying how many were passed over.
    """
    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    found: list[Path] = []
    aside: list[Path] = []
    for pattern in (os.fspath(p) for p in items):
        globbed = any(ch in pattern for ch in "*?[")
        matches = sorted(glob.glob(pattern)) if globbed else [pattern]
        if not matches:
            raise ClassLabError(f"'{pattern}' matches nothing; give run folders, a sweep folder or a glob")
        for match in (Path(run_of(m)[0]) for m in matches):  # runs/x/summary.json stands for runs/x
            if is_run_folder(match):
                (aside if globbed and is_moved_aside(match) else found).append(match)
            elif match.is_dir():
                inner = _runs_inside(match)
                # Among several paths (the shell's expansion of runs/*), a folder without runs, compare's own
                # runs/compare/ above all, is passed over as classlab's glob passes it over; alone, it is the error.
                if not inner and not globbed and len(items) == 1:
                    raise ClassLabError(f"'{match}' is not a run folder and holds none (no config.yaml)")
                for path in inner:  # a fold run is moved aside with its k-fold folder
                    rel = path.relative_to(match)
                    (aside if any(map(is_moved_aside, (rel, *rel.parents))) else found).append(path)
            elif match.is_file() and not globbed and len(items) == 1:
                raise ClassLabError(f"'{match}' is a file, not a run folder; give the folder that holds config.yaml")
            elif match.is_file():
                continue  # the shell's runs/sweep/* holds sweep.json (runs/* an MLflow store, mlflow.db): not runs
            elif not globbed:
                raise ClassLabError(f"run folder '{match}' not found")
    unique = list(dict.fromkeys(p.resolve() for p in found or aside))  # only runs moved aside: those, then
    if not unique:
        raise ClassLabError("no run folders found (a run folder holds config.yaml)")
    passed_over = [p for p in dict.fromkeys(a.resolve() for a in aside) if p not in unique] if found else []
    if passed_over and notes is not None:
        names = ", ".join(p.name for p in passed_over[:3]) + (", ..." if len(passed_over) > 3 else "")
        notes.append(
            f"left out {len(passed_over)} run{'s' * (len(passed_over) > 1)} that {option('force')} moved aside "
            f"({names}): "
            "name a run folder to compare it"
        )
    return unique


def _runs_inside(folder: Path) -> list[Path]:
    """The runs a folder of runs holds; a k-fold point of a sweep (``--grid ... data.folds=5``) is a
    folder of fold runs one level further down, and each fold is a row of its own."""
    inner = []
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        if is_run_folder(path):
            inner.append(path)
        elif is_fold_group(path):
            inner.extend(fold_runs(path))
    return inner


def _labels(paths: list[Path]) -> list[str]:
    """Folder names, with as many parents added as tell apart two runs that share a name (two sweeps' `lr=0.1`,
    and `a/sweep/lr=0.1` beside `b/sweep/lr=0.1`: one parent made both `sweep/lr=0.1`)."""
    labels = [p.name for p in paths]
    for depth in range(2, max((len(p.parts) for p in paths), default=0) + 1):
        shared = {label for label in labels if labels.count(label) > 1}
        if not shared:
            break
        labels = ["/".join(p.parts[-depth:]) if label in shared else label for p, label in zip(paths, labels)]
    return labels


@dataclass
class RunData:
    label: str
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, str]]
    stage_ends: list[int] = field(default_factory=list)  # a multi-stage run: the epoch each begun stage ended at


CUT_OFF = "cut off"  # says "running" in its summary, but no live process holds the folder; --resume continues it


def read_runs(paths: list[Path], notes: list[str] | None = None) -> list[RunData]:
    """The runs' files. Among several runs, one whose files are damaged (a summary.json cut short by a copy) is
    left out with a line in ``notes``, not the end of the table of the others; alone, it is the error."""
    runs = []
    for path, label in zip(paths, _labels(paths), strict=True):
        run = RunFolder(path)
        try:
            summary = run.summary(default={"status": "unknown"})
            config = flatten(run.read_config_tree())
            metrics = run.read_metrics()
            if summary.get("status") == "running" and RunLock(path).owner() is None:
                # killed (kill -9, power, a session's end): no process holds it
                summary = {**summary, "status": CUT_OFF}
            staged = _staged(path, config, summary) if config.get(STAGES) else None
        except (ClassLabError, csv.Error, UnicodeDecodeError) as exc:
            if len(paths) == 1 or notes is None:
                raise
            notes.append(f"left out {path}: {exc}")
            continue
        if staged is not None:
            config, summary, metrics = staged.config, staged.summary, staged.metrics
        if summary.get("status") != "finished":
            summary = {**_so_far(metrics), **summary}
        runs.append(RunData(label, path, config, summary, metrics, staged.stage_ends if staged else []))
    if not runs:
        raise ClassLabError(f"no run could be read: {notes[0] if notes else paths}")
    return runs


def _staged(path: Path, config: dict[str, Any], summary: dict[str, Any]) -> RunData:
    """A multi-stage run (``stages:``) as what its stages trained. Its top folder holds config.yaml (the base config
    and the stages' overrides), summary.json (the last stage's best and test figures, each finished stage's summary
    in ``stages``) and a run folder per stage; compare read the top files alone: the row said the base config's
    epochs (20, the default) beside an empty epochs_done, and the run had no validation curve. Now ``epochs`` is the
    epochs its stages train, ``epochs_done`` the epochs they trained, the metrics the stages' one after another,
    their epochs (and steps) numbered on, and a staged run cut off in a stage that says how it ended (Ctrl-C, a
    failure) reads as that stage does."""
    planned, done, steps = 0, 0, 0
    rows: list[dict[str, str]] = []
    ends: list[int] = []
    merged, times = dict(summary), []
    for k, override in enumerate(config[STAGES], 1):
        stage = RunFolder(path / f"stage{k}")
        begun = is_run_folder(stage.path)
        planned += _stage_epochs(flatten(stage.read_config_tree()) if begun else {}, override, config.get("epochs"))
        if not begun:
            continue
        own = stage.summary(default={})
        shifted = _numbered_on(stage.read_metrics(), done, steps)
        rows += shifted
        trained = own.get("epochs_done")
        done += trained if isinstance(trained, int) else (int(shifted[-1]["epoch"]) - done if shifted else 0)
        steps = int(shifted[-1]["step"]) if shifted and shifted[-1].get("step") else steps
        ends.append(done)
        times += [own["wall_time_s"]] if isinstance(own.get("wall_time_s"), int | float) else []
        if merged.get("status") == CUT_OFF and own.get("status") not in (None, "running", "finished"):
            merged["status"] = own["status"]  # interrupted, failed, diverged: the stage that stopped says how
            if own.get("error"):
                merged.setdefault("error", own["error"])
    merged.setdefault("epochs_done", done)
    if times:
        merged.setdefault("wall_time_s", round(sum(times), 2))
    return RunData("", path, {**config, "epochs": planned or config.get("epochs")}, merged, rows, ends)


def _stage_epochs(own: dict[str, Any], override: Any, base: Any) -> int:
    """The epochs a stage trains: its own config.yaml's once it has begun, else its override's or the base config's."""
    epochs = own.get("epochs", flatten(override).get("epochs", base) if isinstance(override, dict) else base)
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else 0


def _numbered_on(rows: list[dict[str, str]], epochs: int, steps: int) -> list[dict[str, str]]:
    """A later stage's metrics.csv rows (its epochs and steps count from 1 again) after the earlier stages' ``epochs``
    and ``steps``; a row whose numbers do not read (cut short by a crash) is passed over."""
    out = []
    for row in rows:
        try:
            epoch = int(float(row["epoch"])) + epochs
            step = int(float(row["step"])) + steps if row.get("step") else None
        except (KeyError, TypeError, ValueError):
            continue
        out.append({**row, "epoch": str(epoch), **({"step": str(step)} if step is not None else {})})
    return out


def _so_far(rows: list[dict[str, str]]) -> dict[str, Any]:
    """epochs_done and best_val_acc from metrics.csv, for a run not finished (training, cut off, failed) whose
    summary has them not yet: a sweep compared while it ran showed empty columns beside rows of figures."""
    try:
        done = {"epochs_done": int(float(rows[-1]["epoch"]))} if rows else {}
        accs = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    except (KeyError, ValueError):
        return {}
    return done | ({"best_val_acc": max(accs)} if accs else {})


def varying_keys(runs: list[RunData]) -> list[str]:
    """The config keys whose values differ between the runs; ``stages`` too where a run is staged, so that its
    stages are listed (what each one changed) beside figures that are theirs."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    out = []
    for key in keys:
        if key in NOT_INTERESTING:
            continue
        seen = {yaml.safe_dump(r.config.get(key)) for r in runs}
        if len(seen) > 1 or (key == STAGES and any(r.stage_ends or r.config.get(key) for r in runs)):
            out.append(key)
    return out


# ---------------------------------------------------------------------------------------------
# The table and the plots
# ---------------------------------------------------------------------------------------------


def compare(
    patterns: str | os.PathLike | Sequence[str | os.PathLike],
    by: list[str] | None = None,
    metrics: list[str] | None = None,
    out: str | Path | None = None,
    x: str | None = None,
    group: list[str] | None = None,
    plots: bool = True,
) -> Comparison:
    """Table of ``metrics`` (summary.json) and ``by`` keys (config.yaml); CSV, Markdown and PNGs under ``out``."""
    left_out: list[str] = []
    runs = read_runs(find_runs(patterns, left_out), left_out)
    varying = varying_keys(runs)
    by = list(by) if by else varying
    if "task" in varying and "task" not in by:
        by.append("task")  # a rotation run's accuracy is over angles: never beside a classifier's unlabelled
    known = set().union(*(r.config for r in runs))
    unknown = [k for k in by + ([x] if x else []) + list(group or []) if k not in known]
    if unknown:
        hint = did_you_mean(unknown[0], sorted(known))
        raise ClassLabError(f"config key '{unknown[0]}' is in none of the runs{hint}")
    table = comparison(runs, by, metrics)
    metrics = table.metrics
    table.notes = left_out + _absent_metrics(runs, metrics)
    out_dir = _out_folder(
        Path(out) if out else Path(os.path.commonpath([str(r.path.parent) for r in runs])) / "compare"
    )
    atomic_write_text(out_dir / "compare.csv", table.csv())
    atomic_write_text(out_dir / "compare.md", table.markdown())
    table.files += [out_dir / "compare.csv", out_dir / "compare.md"]
    if plots:
        curves = plot_curves(runs, out_dir / "curves.png")
        if curves:
            table.files.append(curves)
        # The fold index is a name, not a quantity: a metric against it (best_val_acc_vs_data_fold.png) says
        # nothing, and the folds of a k-fold point are its repeats (mean ± std), not lines of their own.
        axes = [k for k in by if k != FOLD_KEY and _numeric([r.config.get(k) for r in runs])]
        asked, x = x, x or next(iter(axes), None)
        if x == FOLD_KEY:
            table.notes.append(f"no plot against {option('x', x)}: the fold index is no axis (see the mean ± std row)")
        elif x is not None and metrics:
            groups = list(group) if group is not None else [k for k in by if k not in (x, FOLD_KEY)]
            plotted = plot_metric(runs, x, groups, metrics[0], out_dir / f"{_safe(metrics[0])}_vs_{_safe(x)}.png")
            if plotted:
                table.files.append(plotted)
            elif asked:  # --x model.name drew nothing and said nothing
                table.notes.append(
                    f"no plot of {metrics[0]} against {option('x', x)}: it needs runs with a number for {x} and for "
                    f"{metrics[0]}"
                )
    return table


def _out_folder(folder: Path) -> Path:
    """compare's folder, made before anything is written to it: ``--out`` naming a file (or a place that cannot be
    written) was an 'unexpected FileExistsError' after the table was printed nowhere."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder / "compare.csv", exc, output=True) from None
    return folder


def comparison(runs: list[RunData], by: list[str], metrics: list[str] | None = None) -> Comparison:
    """One row per run: its label, status, the ``by`` config keys and the ``metrics`` of its summary."""
    metrics = list(metrics) if metrics else [m for m in DEFAULT_METRICS if any(m in r.summary for r in runs)]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.label, "status": run.summary.get("status")}
        row.update({k: run.config.get(k) for k in by})
        row.update({m: run.summary.get(m) for m in metrics})
        rows.append(row)
    means = fold_mean_rows(runs, rows, metrics)  # k-fold runs: a mean ± std row per k-fold folder
    rows.sort(key=lambda r: tuple(_sort_key(r.get(k)) for k in by) + (r["run"],))
    return Comparison(["run", "status", *by, *metrics], rows + means, by, metrics, summary_rows=len(means))


def _absent_metrics(runs: list[RunData], metrics: list[str]) -> list[str]:
    """A note for each asked-for metric that no run's summary has: a typo (--metric tset_acc) left an empty column
    without a word. Not a refusal: runs still training have no test figures yet. '(yet)' only where a run may still
    bring it (one not finished); a test figure of runs that have no test split (a k-fold folder of a CSV or a class
    folder with no test set) will never come, and the note says so: it said '(yet)' there too."""
    have = set().union(*(r.summary for r in runs))
    notes = []
    for m in (m for m in metrics if m not in have):
        # classlab's own names are no typo: 'test_acc (did you mean best_val_acc?)' pointed away from the truth
        hint = "" if m in DEFAULT_METRICS else did_you_mean(m, sorted(k for k in have if k not in NOT_METRICS))
        untested = [m.startswith("test") and _no_test_split(r.summary) for r in runs]
        coming = any(r.summary.get("status") != "finished" and not no for r, no in zip(runs, untested))
        if coming:
            notes.append(f"no run has metric '{m}' (yet){hint}: its column is empty")
        elif all(untested):
            which = "the run has" if len(runs) == 1 else "the runs have"
            notes.append(f"no run has metric '{m}': {which} no test split, so its column stays empty")
        else:
            some = f" ({sum(untested)} of the {len(runs)} runs have no test split)" if any(untested) else ""
            notes.append(f"no run has metric '{m}'{hint}: its column is empty{some}")
    return notes


def _no_test_split(summary: dict[str, Any]) -> bool:
    """A run trained without a test split (summary.json's ``images``: test 0): it has no test figures, ever."""
    images = summary.get("images")
    return isinstance(images, dict) and images.get("test") == 0


def _sort_key(value: Any) -> tuple[int, Any]:
    """None first, then numbers, then text in natural order (``epoch4`` before ``epoch12``)."""
    if value is None:
        return (0, ())
    if isinstance(value, bool):
        return (1, (int(value),))
    if isinstance(value, int | float):
        return (1, (value,))
    return (2, tuple(natural_key(str(value))))


def _legend_value(value: Any) -> str:
    """A run path given as a value (``model.init_from``) is named by its folder: legends stay readable."""
    if value is None:
        return "none"
    text = format_value(value)
    return text.rstrip("/").rsplit("/", 1)[-1] if isinstance(value, str) and "/" in text else text


def _numeric(values: list[Any]) -> bool:
    nums = [v for v in values if v is not None]
    return len(set(map(str, nums))) > 1 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in nums)


def _safe(key: str) -> str:
    return key.replace("/", "_").replace(".", "_")


def _save(fig: Any, path: Path) -> Path:
    atomic_write_figure(path, fig, dpi=120, bbox_inches="tight")
    return path


def _plain(text: str) -> str:
    """``text`` as matplotlib draws it letter for letter: a run named ``cost$\\frac$`` was read as mathtext and
    stopped compare and report with a parser's error, and ``lr$0.1$`` lost its dollars."""
    return text.replace("$", r"\$")


def _legend(ax: Any, lines: list[Any], labels: list[str], **kwargs: Any) -> None:
    """A legend naming every line: matplotlib leaves out a line whose label starts with ``_`` (a run ``_baseline``)
    unless the labels are given with their lines."""
    ax.legend(lines, [_plain(label) for label in labels], **kwargs)


def _points(rows: list[dict[str, str]], column: str) -> list[tuple[int, float]]:
    """(epoch, value) of the rows that have ``column``; a row that does not read as numbers (a metrics.csv whose
    last row a crash cut short or padded with NUL bytes) is passed over, where it stopped compare and report."""
    points = []
    for row in rows:
        try:
            points.append((int(float(row["epoch"])), float(row[column])))
        except (KeyError, TypeError, ValueError):
            continue
    return points


def plot_curves(runs: list[RunData], path: Path, column: str = "val/acc") -> Path | None:
    """Validation accuracy against epoch, one line per run."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_figure(figsize=(7, 4.5))
    lines, labels = [], []
    for run in runs:
        points = _points(run.metrics, column)
        if points:
            lines += ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None)
            labels.append(run.label)
            for end in run.stage_ends[:-1]:  # a staged run's stages, one after another: where each gave over
                ax.axvline(end + 0.5, color=lines[-1].get_color(), linestyle=":", linewidth=0.8, alpha=0.6)
    if not lines:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at epoch 1.2
    ax.set_xlabel("epoch")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3)
    _legend(ax, lines, labels, fontsize=6 if len(lines) > 8 else 8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_metric(runs: list[RunData], x: str, groups: list[str], metric: str, path: Path) -> Path | None:
    """``metric`` against config key ``x``, one line per combination of ``groups`` (mean over repeats)."""
    lines: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        xv, yv = run.config.get(x), run.summary.get(metric)
        if not isinstance(xv, int | float) or not isinstance(yv, int | float):
            continue
        shown = [(g.rsplit(".", 1)[-1], run.config.get(g)) for g in groups]
        label = ", ".join(f"{k}={_legend_value(v)}" for k, v in shown) or metric
        lines[label][float(xv)].append(float(yv))
    if not lines:
        return None
    fig, ax = new_figure(figsize=(7, 4.5))
    xs_all, drawn = [], []
    for _, by_x in sorted(lines.items()):
        xs = sorted(by_x)
        xs_all += xs
        means = [statistics.fmean(by_x[v]) for v in xs]
        errs = [statistics.stdev(by_x[v]) if len(by_x[v]) > 1 else 0.0 for v in xs]
        drawn.append(ax.errorbar(xs, means, yerr=errs if any(errs) else None, marker="o", capsize=3))
    ticks = sorted(set(xs_all))
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    if len(ticks) <= 12:  # the swept values themselves, not 2.5 between truncation points 2 and 3
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{v:g}" for v in ticks])
    ax.set_xlabel(_plain(x))
    ax.set_ylabel(_plain(metric))
    ax.grid(alpha=0.3)
    if len(lines) > 1 or groups:
        _legend(ax, drawn, sorted(lines), fontsize=8, loc="best")
    return _save(fig, path)


def fold_mean_rows(runs: list[Any], rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """``classlab compare``: one 'mean ± std' row per k-fold folder whose fold runs are in the table, and below it
    the out-of-fold figures of the k-fold folder's summary.json once every fold has finished."""
    out = []
    by_parent: dict[Path, list[dict[str, Any]]] = {}
    for run, row in zip(runs, rows):
        if is_fold_group(run.path.parent) and run.config.get("data.fold") is not None:
            by_parent.setdefault(run.path.parent, []).append(row)
    for parent, members in by_parent.items():
        # Over the finished folds only, and said so: a fold cut off or still training has no final figures (or
        # the figures of its epochs so far), and '(3 folds)' over two of them read as the k-fold result. K is the
        # k-fold folder's own: one fold run given alone (a report of fold0) read 'mean ± std (1 folds)', ± 0.
        if len(members) < 2:
            continue
        k = _fold_count(parent, len(members))
        done = [r for r in members if r.get("status") == "finished"]
        count = f"{len(done)} of {k} folds" + ("" if len(done) == len(members) else " done")
        count = f"{k} folds" if len(done) == k else count
        mean_row: dict[str, Any] = {"run": f"{parent.name} mean ± std ({count})", "status": ""}
        for m in metrics:
            values = [r[m] for r in done if isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool)]
            if values:
                mean_row[m] = _mean_std(values, m)
        out.append(mean_row)
        oof = _out_of_fold_row(parent) if len(done) == k else None
        if oof is not None:
            out.append(oof)
    return out


def _mean_std(values: list[int | float], column: str) -> str:
    """'mean ± std' as the column's cells read: counts (epochs_done) as whole numbers (one value when all agree,
    '1.0000 ± 0.0000' said nothing), seconds to a tenth, the rest to four places."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    if all(isinstance(v, int) for v in values):
        if len(set(values)) == 1:
            return str(values[0])
        return f"{_short(mean)} ± {_short(std)}"
    if column.endswith("_s") and abs(mean) < 1000:
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


def _short(value: float) -> str:
    """A mean of whole numbers: whole when it is one (30), else to a tenth (29.5)."""
    return f"{value:.1f}".removesuffix(".0")


def _out_of_fold_row(group: Path) -> dict[str, Any] | None:
    """The k-fold result proper: every training image predicted by the fold model that did not train on it
    (summary.json's oof_acc, oof_f1), written when the last fold finished; None before that."""
    try:
        summary = RunFolder(group).summary(default={})
    except ClassLabError:
        return None
    acc, f1 = summary.get("oof_acc"), summary.get("oof_f1")
    if summary.get("status") != "finished" or not isinstance(acc, int | float):
        return None
    images = summary.get("images")
    what = f"all {images} training images" if isinstance(images, int) else "every training image once"
    figures = f"acc {acc:.4f}" + (f", macro-F1 {f1:.4f}" if isinstance(f1, int | float) else "")
    return {"run": f"{group.name} out-of-fold ({what}): {figures}", "status": ""}


def _fold_count(group: Path, default: int) -> int:
    """The K of a k-fold folder (folds.json), whichever of its fold runs are in the table."""
    try:
        return int(RunFolder(group).read_json(FOLDS)["folds"])
    except (ClassLabError, KeyError, TypeError, ValueError):
        return default
