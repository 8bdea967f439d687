"""``classlab sweep``: a grid of runs, each in its own folder, that a second call continues.

A study of sixty runs is never finished in one sitting on a laptop, so the sweep keeps no
state of its own: the run folders are the state. Each grid point gets a folder named from its
swept values; a call skips points whose summary says ``finished``, resumes the rest from their
``last.ckpt`` and starts the missing ones. Killing a sweep at any moment loses at most the
epoch in flight.

Grid syntax (one ``--grid`` per axis; the grid is the cartesian product of the axes)::

    data.images_per_class=10,20,50            three values
    model.layers=[16,p,32],[32,p,64]           YAML values; commas inside [] {} or quotes do not split
    data.images_per_class,epochs=[10,800],[500,16]
                                               linked keys: moved together, one value list per point

Linked keys exist for comparisons "at an equal number of optimizer steps", where epochs must
shrink as the training set grows: a cartesian product of both would mostly be waste.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from classlab.config import (
    Config,
    and_others,
    changed_keys,
    flatten,
    init_from_parts,
    parse_override,
    saved_tree,
    validate,
    yaml_text,
)
from classlab.errors import ClassLabError, ConfigError, caller_env, option, option_name, python_call, python_verb, spelt
from classlab.run import (
    FOLDS,
    RunFolder,
    RunLock,
    atomic_write_json,
    is_fold_group,
    is_moved_aside,
    is_run_folder,
    run_of,
)
from classlab.train import NOT_WHAT_TRAINS, coerce_config, train

MAX_NAME = 150  # characters of a run folder name before it is shortened with a hash
SWEEP_FILE = "sweep.json"
LOG_DIR = "sweep-logs"  # not a run folder (no config.yaml), so compare skips it


# ---------------------------------------------------------------------------------------------
# Parsing --grid
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One ``--grid`` argument: the keys it sets and one tuple of values per point."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]


def split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets, braces or quotes (YAML flow values stay whole)."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if quote or depth:
        raise ConfigError(f"{option('grid', text, quoted=True)}: unbalanced brackets or quotes")
    parts.append("".join(current).strip())
    return parts


def parse_axis(text: str) -> Axis:
    """``key=v1,v2`` or ``k1,k2=[a1,a2],[b1,b2]`` -> Axis."""
    if "=" not in text:
        raise ConfigError(
            f"{option('grid', text, quoted=True)} is not of the form key=v1,v2 "
            "(for example data.images_per_class=10,50)"
        )
    head, raw = text.split("=", 1)
    keys = tuple(k.strip() for k in head.split(","))
    if not all(keys) or not raw.strip():
        raise ConfigError(f"{option('grid', text, quoted=True)} needs a key and at least one value (key=v1,v2)")
    values: list[tuple[Any, ...]] = []
    for item in split_top_level(raw):
        try:
            value = yaml.safe_load(item) if item else None
        except yaml.YAMLError:
            raise ConfigError(f"{option_name('grid')} {head}: value '{item}' is not valid YAML") from None
        if len(keys) == 1:
            values.append((value,))
        elif isinstance(value, list) and len(value) == len(keys):
            values.append(tuple(value))
        else:
            raise ConfigError(
                f"{option_name('grid')} {head}: linked keys need one [{', '.join(keys)}] list per point, got '{item}'"
            )
    rendered = [json.dumps(v, sort_keys=True) for v in values]
    if len(set(rendered)) != len(rendered):
        raise ConfigError(f"{option_name('grid')} {head}: a value is listed twice")
    return Axis(keys, tuple(values))


# ---------------------------------------------------------------------------------------------
# Naming run folders
# ---------------------------------------------------------------------------------------------


def _short_keys(keys: list[str]) -> dict[str, str]:
    """``data.images_per_class`` -> ``images_per_class`` unless two keys would then look the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def name_value(value: Any) -> str:
    """A readable, filesystem-safe rendering of one value (``runs/x/rot:epoch4`` -> ``rot@epoch4``)."""
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list | tuple):
        text = "-".join(name_value(v) for v in value)
    elif isinstance(value, dict):
        text = "-".join(f"{k}{name_value(v)}" for k, v in value.items())
    elif isinstance(value, str) and ("/" in value or "\\" in value or ":" in value):
        folder, ckpt = run_of(value)  # runs/rot/checkpoints/epoch4.ckpt is rot@epoch4, as runs/rot:epoch4 is
        if ckpt is None:
            folder, ckpt = init_from_parts(value)  # runs/rot is runs/rot:best, both named rot
        text = Path(folder.rstrip("/\\")).name + (f"@{ckpt}" if ckpt != "best" else "")
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+@-]", "-", text) or "empty"


def point_name(assignment: dict[str, Any], short: dict[str, str]) -> str:
    name = ",".join(f"{short[k]}={name_value(v)}" for k, v in assignment.items())
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[: MAX_NAME - 9] + "~" + digest
    return name


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One run of the sweep: its folder name, its overrides and what happened to it."""

    name: str
    assignment: dict[str, Any]
    overrides: list[str]
    path: Path
    status: str = "new"  # new | finished | resume | broken, then finished | failed | interrupted
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "values": self.assignment, "status": self.status, "error": self.error}


def expand(axes: list[Axis]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, each point as key -> value (in --grid order)."""
    keys = [k for axis in axes for k in axis.keys]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(
            f"{option_name('grid')} sets {', '.join(dup)} more than once; give each key in one "
            f"{spelt('--grid', 'grid entry')} only"
        )
    points = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        assignment: dict[str, Any] = {}
        for axis, values in zip(axes, combo, strict=True):
            assignment.update(zip(axis.keys, values, strict=True))
        points.append(assignment)
    return points


def _state(path: Path) -> tuple[str, dict[str, Any]]:
    """What a point's folder says: new, finished, resume (unfinished run) or broken (no config).

    A k-fold point (``data.folds``) is a folder of fold runs with folds.json and no config.yaml of
    its own; taking it for broken would move every finished fold aside and train them all again.
    """
    if not path.exists():
        return "new", {}
    if not is_run_folder(path) and not is_fold_group(path):
        return "broken", {}
    try:
        summary = RunFolder(path).summary()
    except ClassLabError:
        return "resume", {}
    return ("finished" if summary.get("status") == "finished" else "resume"), summary


def plan(
    config: str | None, overrides: list[str], grid: list[str], threads: int | None = None
) -> tuple[Path, list[Point]]:
    """Validate every point before anything runs, and find what each folder already holds."""
    axes = [parse_axis(g) for g in grid]
    if not axes:
        raise ConfigError(f"sweep needs at least one {option('grid', 'key=v1,v2')}")
    assignments = expand(axes)
    base = coerce_config(config, overrides)
    _check_grid_keys(axes)
    exp = base.exp_name or (Path(config).stem if config else f"{base.data.dataset}_{base.model.name}")
    exp = re.sub(r"[^A-Za-z0-9._+@=,-]", "-", exp.replace(":", "_"))
    root = (Path(base.run.root) / exp).resolve()
    short = _short_keys(list(assignments[0]))
    names = [point_name(a, short) for a in assignments]
    for i, name in enumerate(names):
        if names.count(name) > 1:  # e.g. two init_from runs in different folders with the same name
            names[i] = f"{name}~{hashlib.sha1(repr(assignments[i]).encode()).hexdigest()[:6]}"
    points = []
    saved = _saved_configs(root)
    existing = _existing_points(saved, list(assignments[0]))
    free = _free_keys(saved, [k for axis in axes for k in axis.keys])  # what a new point may set otherwise
    seen: dict[str, tuple[str, dict[str, Any]]] = {}  # grid values as read -> the first point with them
    for assignment, name in zip(assignments, names, strict=True):
        point_overrides = [*overrides, *(f"{k}={yaml_text(v)}" for k, v in assignment.items())]
        point_overrides += [f"run.root={root}", f"exp_name={name}"]
        if threads and base.trainer.threads is None:
            point_overrides.append(f"trainer.threads={threads}")
        try:
            point_cfg = coerce_config(config, point_overrides)
        except ConfigError as exc:
            raise ConfigError(f"grid point {name}: {exc}") from None
        values = _grid_values(point_cfg, list(assignment))
        if values in seen:  # --grid optim.lr=1e-2,0.01: two folders training one run
            raise _same_run(seen[values], (name, assignment), values)
        seen[values] = (name, assignment)
        same = None if (root / name).exists() else existing.get(values)
        if same is not None:  # the --grid flags in another order, or a value spelt otherwise (1e-2 for 0.01)
            name = same
            point_overrides = [o if not o.startswith("exp_name=") else f"exp_name={same}" for o in point_overrides]
            point_cfg = coerce_config(config, point_overrides)
        state, summary = _state(root / name)
        if state in ("finished", "resume"):
            _check_same_settings(root, name, point_cfg, saved.get(name))
        elif saved:  # a new point beside runs already there: trained with their settings, but for its grid values
            name_there, first = next(iter(saved.items()))
            _check_same_settings(root, name_there, point_cfg, first, free, skip_defaults=False)
        points.append(Point(name, assignment, point_overrides, root / name, state, summary=summary))
    return root, points


def _same_run(first: tuple[str, dict[str, Any]], second: tuple[str, dict[str, Any]], values: str) -> ConfigError:
    """Two points of one grid that train the same run, with the values they share as the config reads them (of a
    section given whole, the keys the points give: not every key of the section)."""
    given = set(flatten(first[1])) | set(flatten(second[1]))
    shown = []
    for key, value in json.loads(values):
        if isinstance(value, dict):
            value = {k.removeprefix(key + "."): v for k, v in value.items() if k in given}
        shown.append(f"{key}={value!r}")
    return ConfigError(
        f"{option_name('grid')}: points {first[0]} and {second[0]} are the same run once their values are read "
        f"({', '.join(shown)}); list each value once"
    )


def _grid_values(cfg: Config, keys: list[str]) -> str:
    """What a point is, as its config says: the grid keys' values (not the folder name, which follows the order
    and the spelling of the --grid flags). A key that names a section (``--grid optim={name: sgd},{name: adam}``)
    is every key under it: the config holds no ``optim`` key of its own, and every point read as None there, so two
    different points were refused as the same run."""
    flat = flatten(cfg.to_dict())

    def value(key: str) -> Any:
        if key in flat:
            return flat[key]
        under = {k: v for k, v in flat.items() if k.startswith(key + ".")}
        return dict(sorted(under.items())) if under else None

    return json.dumps([[k, value(k)] for k in sorted(keys)], default=str)


def _saved_configs(root: Path) -> dict[str, Config]:
    """The configs the point folders already in the sweep folder were trained with, by folder name, read once:
    they find a point given again in another spelling, and they must agree with this call's settings.
    A folder ``--force`` moved aside (``NAME.old-<time>``) is not a point; an unreadable one is left out."""
    found: dict[str, Config] = {}
    for path in sorted(p for p in root.iterdir() if not is_moved_aside(p)) if root.is_dir() else []:
        folder = RunFolder(path)
        try:
            if is_fold_group(path):
                found[path.name] = validate(saved_tree(folder.read_json(FOLDS)["config"]), saved=True)
            elif is_run_folder(path):
                found[path.name] = validate(saved_tree(folder.read_config_tree()), saved=True)
        except (ClassLabError, KeyError, TypeError, ValueError):
            continue  # unreadable: never matched, so never reused; resuming it says why in its own words
    return found


def _existing_points(saved: dict[str, Config], keys: list[str]) -> dict[str, str]:
    """The point folders by their grid keys' values: a second call that gives the same grid in another order
    trained every point again in new folders (seed=0,lr=0.1 beside lr=0.1,seed=0)."""
    found: dict[str, str] = {}
    for name, cfg in saved.items():
        found.setdefault(_grid_values(cfg, keys), name)
    return found


# What a second call may change without training something else: how runs execute and where they live, and the
# parameter budget, a guard (a point refused by model.max_params says to raise it, then to run the same command).
SWEEP_MAY_CHANGE = NOT_WHAT_TRAINS | {"model.max_params"}

# Set by the sweep itself for every point: a value for them in --grid would be overwritten unseen.
SWEEP_SETS = ("exp_name", "run.root")


def _check_grid_keys(axes: list[Axis]) -> None:
    for key in (k for axis in axes for k in axis.keys):
        if key in SWEEP_SETS:
            raise ConfigError(
                f"{option_name('grid')} {key}: the sweep names each run's folder itself "
                "(<run.root>/<exp_name>/<grid values>); "
                "sweep another key, or set exp_name and run.root once as overrides"
            )


def overridden_by_grid(grid: list[str], overrides: list[str]) -> list[str]:
    """A line for each override that a --grid value replaces at some point, so ``epochs=3`` beside
    ``--grid epochs=1,2`` is not dropped unseen. A notice, not a refusal: a base setting that the grid
    refines (``benchmarks/recipes.py --smoke`` sets ``epochs=1`` under a grid of epochs) is a fair use."""
    lines = []
    axes = [parse_axis(g) for g in grid]
    for text in overrides:
        given = flatten(dict([parse_override(text)]))  # optim={lr: 0.1} and optim.lr=0.1 alike
        for axis in axes:
            clash = next(
                (
                    k
                    for values in axis.values
                    for k, v in flatten(dict(zip(axis.keys, values, strict=True))).items()
                    if k in given and v != given[k]
                ),
                None,
            )
            if clash:
                grid = f"{option_name('grid')} {','.join(axis.keys)}"
                lines.append(f"note: {text} does not apply: {grid} sets {clash} for every run")
                break
    return lines


def _free_keys(saved: dict[str, Config], grid_keys: list[str]) -> set[str]:
    """The keys a new point (a value added to the grid, a new axis) may set otherwise than the runs already in the
    sweep folder: its grid keys, and the keys those runs differ in (an earlier call's grid). Every other setting must
    be theirs: a second call with ``epochs=2`` where the first had ``epochs=1`` trained the new points for 2 epochs
    and compared them with the old ones in one table without a word."""
    flat = [flatten(c.to_dict()) for c in saved.values()]
    keys = set().union(*flat)
    varying = {k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1}
    return varying | {k for k in keys if any(k == g or k.startswith(g + ".") for g in grid_keys)}


def _check_same_settings(
    root: Path,
    name: str,
    cfg: Config,
    saved: Config | None,
    ignored: set[str] | frozenset[str] = frozenset(),
    *,
    skip_defaults: bool = True,
) -> None:
    """A point already in the folder was trained with the settings of an earlier call; skipping or resuming
    it under other settings would mix two experiments in one table without a word.

    A key this call leaves at its default is not compared: a default that a later classlab changed must
    not stop a sweep begun with the earlier one (config.yaml holds every key, defaults included).
    """
    if saved is None:
        return  # unreadable: resuming it reports that in its own words
    defaults = flatten(Config().to_dict())
    changes = [
        (key, old, new)
        for key, old, new in changed_keys(saved, cfg)
        if key not in SWEEP_MAY_CHANGE
        and key not in ignored
        and new is not None
        and (not skip_defaults or key not in defaults or new != defaults[key])
    ]
    if changes:
        key, old, new = changes[0]
        raise ConfigError(
            f"sweep '{root}' was run with other settings: its run {name} has {key}={old!r}, this call "
            f"{new!r}{and_others(changes)}; give the config and overrides it was started with "
            f"({SWEEP_FILE} lists them), or another exp_name for a new sweep"
        )


def _record(root: Path, config: str | None, overrides: list[str], grid: list[str], points: list[Point]) -> None:
    """sweep.json: this call, every call that trained runs here (``calls``), and every run of the folder. A second
    call with a grid of other values rewrote it with its own points alone, so the runs of the first were no
    longer listed, nor the call that made them."""
    earlier = _earlier_record(root)
    call = {"config": str(Path(config).resolve()) if config else None, "overrides": overrides, "grid": grid}
    calls = [c for c in earlier.get("calls", []) if c != call] + [call]
    names = {p.name for p in points}
    kept = [r for r in earlier.get("runs", []) if r.get("name") not in names and (root / str(r.get("name"))).exists()]
    runs = kept + [p.to_dict() for p in points]
    atomic_write_json(
        root / SWEEP_FILE, {**call, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "calls": calls, "runs": runs}
    )


def _earlier_record(root: Path) -> dict[str, Any]:
    """What sweep.json said before this call (nothing when it is missing or unreadable: it is a record, not state)."""
    try:
        old = json.loads((root / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict):
        return {}
    calls = (
        old.get("calls")
        if isinstance(old.get("calls"), list)
        else [{k: old.get(k) for k in ("config", "overrides", "grid")}]
    )
    runs = [r for r in old.get("runs", []) if isinstance(r, dict)] if isinstance(old.get("runs"), list) else []
    return {"calls": [c for c in calls if isinstance(c, dict)], "runs": runs}


def _outcome(point: Point) -> None:
    """Read back a point's final status from its folder (the run folder is the truth)."""
    state, summary = _state(point.path)
    point.summary = summary
    if state == "finished":
        point.status = "finished"
    elif point.status not in ("failed", "interrupted"):
        point.status = summary.get("status", "failed") if summary else "failed"
        point.error = point.error or summary.get("error")


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _run_here(config: str | None, point: Point, quiet: bool, verbose: int) -> None:
    resume, force = point.status == "resume", point.status == "broken"
    try:
        train(config, point.overrides, resume=resume, force=force, quiet=quiet, verbose=verbose)
    except KeyboardInterrupt:
        point.status = "interrupted"
        raise
    except ClassLabError as exc:
        point.status, point.error = "failed", str(exc).splitlines()[0]
    except Exception as exc:  # noqa: BLE001 - one broken point must not stop the rest of the grid
        point.status, point.error = "failed", f"{type(exc).__name__}: {exc}"[:300]


def _command(config: str | None, point: Point, verbose: int = 0) -> list[str]:
    """A point's own ``classlab train``: its log gets the library lines too when the sweep was given -v."""
    cmd = [sys.executable, "-m", "classlab.cli", "train", *([config] if config else []), *point.overrides, "--quiet"]
    cmd += ["-" + "v" * verbose] if verbose else []
    if point.status == "resume":
        cmd.append("--resume")
    elif point.status == "broken":
        cmd.append("--force")
    return cmd


def _run_parallel(config: str | None, todo: list[Point], jobs: int, logs: Path, say: Any, verbose: int = 0) -> None:
    """K subprocesses at a time; each writes its own log, so one failure is readable on its own. Started by
    ``classlab.sweep(...)``, a point's process words its errors as that call does (``caller_env``): the line
    read back from its log is the 'failed' line the caller sees."""
    logs.mkdir(parents=True, exist_ok=True)
    env = caller_env(dict(os.environ, PYTHONUNBUFFERED="1"))
    env.pop("CLASSLAB_RUN_DIR", None)
    queue = list(todo)
    running: dict[subprocess.Popen, tuple[Point, Any]] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                point = queue.pop(0)
                log = open(logs / f"{point.name}.log", "a", encoding="utf-8")  # noqa: SIM115 - closed when it ends
                command = _command(config, point, verbose)
                log.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                running[proc] = (point, log)
                say(f"started  {point.name}")
            for proc in [p for p in running if p.poll() is not None]:
                point, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    point.status = "failed"
                    point.error = _last_error(logs / f"{point.name}.log") or f"exit code {proc.returncode}"
                _outcome(point)
                say(_line(point))
            time.sleep(0.2)
    except KeyboardInterrupt:
        # The children got the same Ctrl-C from the terminal; make sure, then let them save last.ckpt.
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, (point, log) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            point.status = "interrupted"
        raise


def _last_error(log: Path) -> str | None:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith("error:")]
    return lines[-1].removeprefix("error: ") if lines else None


def _ray_task(
    cwd: str, config: str | None, overrides: list[str], resume: bool, force: bool, verb: str | None = None
) -> dict[str, Any]:
    """Runs on a Ray worker: the same train() call, in the submitter's folder (a shared filesystem), its errors
    worded for the submitter's reader (``verb``: the Python call it serves, None for the command line)."""
    os.chdir(cwd)
    try:
        with python_call(verb):
            run = train(config, overrides, resume=resume, force=force, quiet=True)
        return {"status": "finished", "path": str(run.path)}
    except Exception as exc:  # noqa: BLE001 - reported back to the driver as this point's failure
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def _import_ray() -> Any:
    """Ray, or the line saying how to get it: asked before the sweep says its plan and makes its folder, which a
    sweep refused for want of Ray left behind with a sweep.json recording a call that ran nothing."""
    try:
        import ray
    except ImportError:
        raise ClassLabError(
            f"{option_name('ray')} needs Ray, which is not installed: pip install 'ray>=2.9' (or run the sweep with "
            f"{option('jobs', metavar='K')})"
        ) from None
    return ray


def _run_ray(config: str | None, todo: list[Point], address: str, cpus: float, say: Any) -> None:
    """Send every point to a Ray cluster as one task each; run folders must be on a shared filesystem."""
    ray = _import_ray()
    try:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - connection problems are user errors here
        raise ClassLabError(
            f"{option('ray', address)}: cannot connect ({str(exc).splitlines()[0][:200]}); "
            "give a running cluster's address (ray://host:10001 or auto) or 'local' to start one here"
        ) from None
    task = ray.remote(num_cpus=cpus)(_ray_task)
    config = str(Path(config).resolve()) if config else None
    verb = python_verb()
    futures = {
        task.remote(os.getcwd(), config, p.overrides, p.status == "resume", p.status == "broken", verb): p for p in todo
    }
    pending = list(futures)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            point = futures[done[0]]
            result = ray.get(done[0])
            if result["status"] != "finished":
                point.status, point.error = "failed", result.get("error")
            _outcome(point)
            say(_line(point))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        raise


def _line(point: Point) -> str:
    shown = ", ".join(
        f"{k} {point.summary[k]:.4f}" for k in ("best_val_acc", "test_acc") if isinstance(point.summary.get(k), float)
    )
    if point.status == "finished":
        return f"finished {point.name}" + (f" ({shown})" if shown else "")
    return f"{point.status:<8} {point.name}" + (f": {point.error}" if point.error else "")


def sweep(
    config: str | Path | None,
    grid: list[str],
    overrides: list[str] | None = None,
    *,
    jobs: int = 1,
    ray_address: str | None = None,
    ray_cpus: float = 1.0,
    quiet: bool = False,
    verbose: int = 0,
    say: Any = print,
) -> list[Point]:
    """Run (or continue) the grid; return every point with its final status.

    ``quiet`` and ``verbose`` are train's, for the runs trained in this process. Raises ConfigError before
    anything runs if any point's config is invalid.
    """
    config = str(config) if config is not None else None
    overrides = list(overrides or [])
    if jobs < 1:
        raise ConfigError(f"{option('jobs', jobs)}: give 1 or more processes")
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    root, points = plan(config, overrides, grid, threads=threads)
    if ray_address:
        _import_ray()
    done = [p for p in points if p.status == "finished"]
    todo = [p for p in points if p.status != "finished"]
    resumed = sum(p.status == "resume" for p in todo)
    say(
        f"sweep {root}: {len(points)} runs, {len(done)} finished (skipped), {resumed} to resume, "
        f"{len(todo) - resumed} to start"
    )
    for line in overridden_by_grid(grid, overrides):
        say(line)
    root.mkdir(parents=True, exist_ok=True)
    # One sweep per folder; its jobs inherit the lock's owner (CLASSLAB_LOCK_OWNER) and lock their own runs.
    lock = RunLock(root, "sweep").acquire()
    try:
        _record(root, config, overrides, grid, points)
        if ray_address:
            _run_ray(config, todo, ray_address, ray_cpus, say)
        elif jobs > 1:
            _run_parallel(config, todo, jobs, root / LOG_DIR, say, verbose)
        else:
            for i, point in enumerate(todo, 1):
                say(f"[{i}/{len(todo)}] {'resuming' if point.status == 'resume' else 'starting'} {point.name}")
                _run_here(config, point, quiet, verbose)
                _outcome(point)
                say(_line(point))
    finally:
        _record(root, config, overrides, grid, points)
        lock.release()
    return points
