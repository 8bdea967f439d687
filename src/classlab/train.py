"""``classlab.train(config)``: validate, load data, make the run folder, fit, test, summarise.

The order matters: the config and the data are checked before the run folder exists, so a
typo or a broken image never leaves a half-made run behind; the config and class map are
written first, so a run folder always says what it is.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import platform
import random
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from rich.console import Console

from classlab.config import (
    Config,
    and_others,
    annotated_yaml,
    changed_keys,
    flatten,
    load_config,
    saved_tree,
    stage_config,
    unread_settings,
    validate,
    with_overrides,
    yaml_text,
)
from classlab.data.pipeline import DataBundle, load_data
from classlab.data.tasks import TaskLayout
from classlab.engine import loggers as tracking
from classlab.engine.callbacks import METRIC_COLUMNS, GracefulStop, RunConsole, RunRecorder
from classlab.engine.finetune import trainable_at_start
from classlab.engine.library_logs import LIGHTNING_LOGGERS, library_logs
from classlab.engine.load import load
from classlab.engine.metrics import macro_f1, top_k_accuracy
from classlab.engine.predict import predict_split
from classlab.engine.task import ClassifyTask
from classlab.engine.trainer import (
    accelerator,
    build_network,
    build_task,
    build_trainer,
    final_test,
    init_from_line,
    load_stage_weights,
    precision_notice,
    stopped_early,
    stopped_early_line,
)
from classlab.errors import (
    ClassLabError,
    ConfigError,
    RunInterrupted,
    ddp_worker,
    first_line,
    option,
    spelt,
)
from classlab.models import count_params, pretrained, validate_model_spec
from classlab.run import (
    CONFIG,
    FOLDS,
    LOCK,
    OOF,
    SKIPPED,
    SPLIT,
    SUMMARY,
    RunFolder,
    RunInUse,
    RunLock,
    RunWriteError,
    atomic_write_text,
    is_fold_group,
    is_run_folder,
    move_aside,
    safe_torch_load,
)

RUN_DIR_ENV = "CLASSLAB_RUN_DIR"  # set by process 0 so that DDP worker processes join its run folder


Overrides = Sequence[str] | Mapping[str, Any] | str | None


def override_list(overrides: Overrides) -> list[str]:
    """``key=value`` strings from what a Python caller may give: a list of them, one alone, or a mapping
    ``{"optim.lr": 0.05}``. A string alone was read as the list of its letters ("override 'e' is not of
    the form key=value") and a mapping as its keys alone."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={_yaml_value(value)}" for key, value in overrides.items()]
    given = list(overrides)
    for item in given:
        if not isinstance(item, str):
            raise ConfigError(
                f"override {item!r} is a value of type '{type(item).__name__}'; give overrides as 'key=value' strings "
                "(['epochs=3']) or as a dict ({'epochs': 3})"
            )
    return given


def _yaml_value(value: Any) -> str:
    """A Python value as the YAML text an override carries: None -> null, [16, 'p'] -> [16, p], 'x' -> x."""
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def coerce_config(config: Config | str | Path | dict | None, overrides: Overrides = None) -> Config:
    """Accept a Config, a path to YAML/INI, a plain dict, or nothing (the defaults); overrides as ``override_list``."""
    overrides = override_list(overrides)
    if not isinstance(config, (Config, str, Path, dict)) and config is not None:
        raise ConfigError(
            f"config is a value of type '{type(config).__name__}'; give a YAML or INI file's path, a dict, "
            "a Config, or None for the defaults"
        )
    if isinstance(config, Config):
        cfg = validate(with_overrides(config.to_dict(), overrides)) if overrides else config
    elif isinstance(config, dict):
        cfg = validate(with_overrides(config, overrides or []))
    else:
        cfg = load_config(config, overrides)
    check_models(cfg)
    return cfg


def print_config(config: str | Path | None, overrides: list[str] | None = None) -> str:
    """``--print-config``: the resolved config with every default and allowed values, as YAML (checked as a run is)."""
    return annotated_yaml(coerce_config(config, overrides))


def check_models(cfg: Config) -> None:
    """The model keys of the run and of each stage, checked in a second, before any data is read."""
    validate_model_spec(cfg.model.spec())
    for k in range(len(cfg.stages or [])):
        try:
            validate_model_spec(stage_config(cfg, k).model.spec())
        except ClassLabError as exc:
            raise type(exc)(f"stages[{k}]: {exc}") from None


def _versions() -> dict[str, str]:
    import lightning
    import timm
    import torchvision

    return {
        "classlab": metadata.version("classlab"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }


def _make_run(cfg: Config, resume: bool, force: bool, *, move_now: bool = True) -> tuple[RunFolder, Config, RunLock]:
    """The run's folder, the config named after it, and its lock (``_take_folder``)."""
    joined = os.environ.get(RUN_DIR_ENV)
    if joined and not _is_zero():
        return RunFolder(joined), cfg, RunLock(joined)
    run, lock = _take_folder(cfg, _default_name(cfg), resume=resume, force=force, move_now=move_now)
    return run, cfg if resume else cfg.model_copy(update={"exp_name": run.path.name}), lock


def _default_name(cfg: Config) -> str:
    """The folder name of a run given no exp_name (the first free of it, ``<name>-2``, ...)."""
    return f"{cfg.data.dataset}_{cfg.model.name.replace(':', '_')}"


def _take_folder(
    cfg: Config, default: str, *, resume: bool, force: bool, move_now: bool = True, keep: bool = False
) -> tuple[RunFolder, RunLock]:
    """A new run's folder (a single run's, a staged run's, a k-fold run's), taken at once, before its data load:
    made (or one a run never started in), its lock held. So of two runs started at the same moment without an
    exp_name the second takes the next free name (``<name>-2``); under an exp_name the user gave, the second stops
    at once with the 'in use' line. ``--force`` holds the old run's lock from here and moves it aside here, or,
    with ``move_now=False``, only once the new run is about to be written (``_replace_old``). ``keep``: a folder
    already under the exp_name is taken as it is, its lock held, for the caller to judge and continue (a k-fold
    folder: its finished folds are kept). ``--resume`` takes its lock later (``_resume_state``).
    """
    root = Path(cfg.run.root).absolute()
    if resume:
        run = RunFolder(root / (cfg.exp_name or default))
        _check_resumable(run)
        return run, run.lock()
    if cfg.exp_name:
        return _take_named(RunFolder(root / cfg.exp_name), force, move_now, keep)
    return _take_free_name(root, default)


def _take_free_name(root: Path, default: str) -> tuple[RunFolder, RunLock]:
    """The first of ``default``, ``default-2``, ... that is free (or that a run never started in), taken."""
    n = 1
    while True:
        run = RunFolder(root / (default if n == 1 else f"{default}-{n}"))
        n += 1
        try:
            lock = run.reserve()
        except RunInUse:  # a run started a moment ago is loading its data there
            continue
        if lock is not None:
            return run, lock


def _take_named(run: RunFolder, force: bool, move_now: bool, keep: bool = False) -> tuple[RunFolder, RunLock]:
    """``run.root/exp_name``: taken when free; a run there is refused, or with ``--force`` (or ``keep``) its lock
    is held."""
    lock = run.reserve()  # RunInUse: the one line naming the process that holds it
    if lock is not None:
        return run, lock
    if not force and not keep:
        run.lock().check_free()  # never refuse with "use --resume" or move aside a folder in use
        raise ClassLabError(_exists_line(run))
    lock = run.lock().acquire()  # the old run stays ours until it moves aside: a second process stops at once
    if force and move_now:
        _replace_old(run, lock)
    return run, lock


def _exists_line(run: RunFolder) -> str:
    """Why a new run cannot go into ``run``'s folder, and the ways out."""
    others = f"{option('force')} to move it aside, or choose another exp_name"
    started = (run.path / CONFIG).is_file()
    if not started and not (run.path / SUMMARY).is_file():
        return f"'{run.path}' already exists and holds no run (no {CONFIG}); use {others}"
    status = run.summary(default={}).get("status")
    if started and status is None and not (run.path / SPLIT).is_file():  # a staged run's own folder has none
        return f"run folder '{run.path}' already exists but its run never began (no {SPLIT}); use {others}"
    how = {"running": " and was cut off", "finished": " and has finished"}.get(status, "")
    how_on = "with more epochs to train it on" if status == "finished" else "to continue it"
    return f"run folder '{run.path}' already exists{how}; use {option('resume')} {how_on}, {others}"


def _check_resumable(run: RunFolder) -> None:
    """``--resume`` of a folder with no run to continue: one line naming the way out."""
    flag = option("resume")
    if not run.path.is_dir():
        raise ClassLabError(f"{flag}: run folder '{run.path}' does not exist; start it without {flag}")
    if (run.path / CONFIG).is_file() or is_fold_group(run.path):
        return
    if run.never_started():
        raise ClassLabError(
            f"{flag}: the run in '{run.path}' was stopped before it began (no {CONFIG} yet, nothing trained); start "
            f"it again without {flag}: the folder is reused"
        )
    raise ClassLabError(
        f"{flag}: '{run.path}' is not a run folder (no {CONFIG}); start a new run without {flag}: under another "
        f"exp_name, or with {option('force')} to move this folder aside"
    )


def _create_run(run: RunFolder, lock: RunLock, cfg: Config, data: DataBundle) -> None:
    """The new run's first files, once everything that can refuse the run has passed. ``--force``: the old run
    the lock holds moves aside first."""
    if not run.never_started():
        _replace_old(run, lock)
    with run.creating():  # a write that fails here takes the new folder away again
        _write_run_start(run, cfg, data)


def _replace_old(run: RunFolder, lock: RunLock) -> Path:
    """``--force``: the old run moves aside only when the new one is ready to be written, so a run refused
    for its data, class weights or ``model.init_from`` leaves the old one where it was. Its lock, ours, goes with
    it (so nothing else took the old run meanwhile) and is dropped there; the new folder is taken in its place.
    Returns where the old run went."""
    moved = move_aside(run.path)
    lock.release()  # its file is in the moved folder now
    (moved / LOCK).unlink(missing_ok=True)
    print(f"moved the old run to {moved}", file=sys.stderr)
    if run.reserve(lock) is None:
        raise ClassLabError(f"run folder '{run.path}' was just made by another process; choose another exp_name")
    return moved


def train(
    config: Config | str | Path | dict | None = None,
    overrides: Overrides = None,
    *,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
    verbose: int = 0,
) -> RunFolder:
    """Train one run (or each stage of a multi-stage run, or each fold of ``data.folds``); return its folder.

    ``config``: a YAML/INI path, a dict of the config's keys, a Config, or None for the defaults.
    ``overrides``: ``["optim.lr=0.05", "epochs=3"]`` as on the command line, one such string, or a dict
    ``{"optim.lr": 0.05}``. ``resume`` and ``force`` are ``--resume`` and ``--force``; ``quiet`` prints nothing (what is
    odd in the config, a file with no keys, stays a UserWarning). Lightning's and torch's own log lines and warnings are
    kept back, as the command line keeps them back: ``verbose=1`` lets them through (``-v``), ``verbose=2`` their debug
    lines too (``-vv``). The process is left as it was found (random states, torch's thread count and deterministic
    mode, environment variables, logging and warnings filters), so a notebook's own work after a run, or a second run,
    is not shaped by the first. Raises ClassLabError/ConfigError on bad input.
    """
    with _kept_for_caller(verbose):
        given = override_list(overrides)
        cfg = coerce_config(config, given)
        if cfg.data.folds and cfg.data.fold is None:
            return train_folds(cfg, resume=resume, force=force, quiet=quiet, verbose=verbose)
        if resume and not cfg.stages:
            cfg = _with_saved_stages(cfg, given)
        if cfg.stages:
            return _train_stages(cfg, resume=resume, force=force, quiet=quiet)
        return _train_one(cfg, config, given, resume=resume, force=force, quiet=quiet)


# Set by a run, or by Lightning; the DDP ones in process 0 too, where a second DDP train() in the same script
# found LOCAL_RANK and WORLD_SIZE set and launched no workers.
RUN_ENV = (RUN_DIR_ENV, "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")
RUN_ENV += ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# mlflow.set_tracking_uri sets this one: a notebook's next call (another run.root) logged into the first run's store.
RUN_ENV += ("MLFLOW_TRACKING_URI",)


@contextlib.contextmanager
def _kept_for_caller(verbose: int) -> Iterator[None]:
    """What a run sets process-wide for itself, given back afterwards: the global random states it seeds,
    Lightning's deterministic mode and cudnn flag, the environment variables it sets, the thread count
    (trainer.threads). Library logs as ``verbose`` asks (``library_logs``), for the call only: the levels of
    Lightning's loggers, the root logger's (``-v``'s basicConfig) and the warnings filters are the caller's again
    afterwards, as the command line sets them for its whole process."""
    env = {name: os.environ.get(name) for name in RUN_ENV}
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
        torch.backends.cudnn.benchmark,
        torch.get_num_threads(),
    )
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    try:
        with warnings.catch_warnings():  # the filters and showwarning, as they were
            library_logs(verbose)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.utils.deterministic.fill_uninitialized_memory = flags[2]
        torch.backends.cudnn.benchmark = flags[3]
        torch.set_num_threads(flags[4])
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _train_stages(cfg: Config, *, resume: bool, force: bool, quiet: bool) -> RunFolder:
    """Stages run in sequence in ``<run>/stageK/``, each starting from the previous stage's final weights.

    This is the FixRes recipe's shape: train at a low resolution, fine-tune at a higher one.
    """
    if cfg.trainer.devices == "auto" and accelerator(cfg) == "gpu" and torch.cuda.device_count() > 1:
        raise ClassLabError(
            f"stages run in one process only and trainer.devices=auto would start {torch.cuda.device_count()} "
            f"(one per GPU): set trainer.devices=1, or run each stage as its own run with model.init_from"
        )
    top, cfg, lock = _make_run(cfg, resume, force)
    if resume:
        lock.acquire()
    else:
        with top.creating():
            top.write_config(cfg.to_dict())
            top.update_summary(status="running", exp_name=top.path.name, stages=[])
    try:
        return _run_stages(top, cfg, quiet=quiet)
    except RunInterrupted as exc:
        exc.run = top.path  # resumed as a whole: its folder, not the stage's
        raise
    finally:
        lock.release()


def _run_stages(top: RunFolder, cfg: Config, *, quiet: bool) -> RunFolder:
    results = []
    previous: Path | None = None
    for k in range(len(cfg.stages)):
        stage = stage_config(cfg, k).model_copy(update={"exp_name": f"stage{k + 1}"})
        stage.run.root = str(top.path)
        folder = RunFolder(top.path / f"stage{k + 1}")
        status = folder.summary(default={}).get("status")
        if status != "finished":
            if not quiet:
                header = RunConsole(soft_wrap=True)
                header.print(f"[bold]stage {k + 1}/{len(cfg.stages)}[/bold]")
                if header.closed:  # the reader left between two stages: stop there, as a stage's own lines would
                    why = f"standard output was closed; stopped before stage {k + 1}"
                    raise RunInterrupted(why, 128 + signal.SIGPIPE)
            _train_one(stage, stage, None, resume=_begun(folder), force=False, quiet=quiet, start_from=previous)
        results.append(folder.summary())
        previous = folder.checkpoint("last")
        top.update_summary(stages=results)
    top.write_classes(RunFolder(top.path / "stage1").read_classes())
    final = results[-1]
    top.update_summary(
        status="finished",
        **{k: final.get(k) for k in ("test_acc", "test_acc5", "best_val_acc", "params") if k in final},
        wall_time_s=round(sum(r.get("wall_time_s", 0.0) for r in results), 2),
    )
    return top


def _with_saved_stages(cfg: Config, given: list[str]) -> Config:
    """``--resume`` of a staged run named without its stages (``classlab train exp_name=X --resume``): its saved
    config, stages and all, with the overrides given, as a single run's --resume reads its saved config. Before,
    the folder was taken for a single run that 'never began', and the line said to move it aside with --force."""
    folder = RunFolder(Path(cfg.run.root) / (cfg.exp_name or ""))
    if not cfg.exp_name or not (folder.path / CONFIG).is_file():
        return cfg
    try:
        tree = saved_tree(folder.read_config_tree())
    except ClassLabError:
        return cfg  # the resume itself says what is wrong with it
    return validate(with_overrides(tree, given), saved=True) if tree.get("stages") else cfg


def _weights_at_start(run: RunFolder, last_ckpt: Path | None, start_from: Path | None) -> dict[str, Any] | None:
    """The pretrained-weights report (summary.json's) of a run whose weights come from a checkpoint: a resumed
    run's own, a later stage's from the stage it starts from. Its weights file or hub is not read again: --resume
    stopped with 'weights file not found' when the file had moved (last.ckpt holds every weight), and a later
    stage printed 'pretrained weights (file): loaded N tensors' for weights the previous stage's then replaced."""
    if last_ckpt is not None:
        folder = run
    elif start_from is not None:
        folder = RunFolder(start_from.parent.parent)  # <stage>/checkpoints/last.ckpt
    else:
        return None
    report = folder.summary(default={}).get("pretrained")
    return report if isinstance(report, dict) and "left" in report else None


def _begun(child: RunFolder) -> bool:
    """Whether a stage or fold its parent comes back to is continued as ``--resume`` continues a run, not started:
    it has its config.yaml, written last of a run's first files. Killed after that and before its summary.json,
    it holds a run that --resume continues (from last.ckpt, or over when nothing trained yet), and a new start
    refused it as 'already exists'; killed before it, it holds none, and a new start takes the folder
    (``RunFolder.never_started``)."""
    return is_run_folder(child.path)


def _is_zero() -> bool:
    """Process 0 of a (possibly distributed) run: the one that writes the run folder."""
    return ddp_worker() is None


# What --resume may not change: what shaped the weights and the data so far (the split is kept by
# index, the schedule counts steps by batch size). Where the data lie and how they are read may change.
RESUME_KEEPS = ("task", "seed", "stages", "model.", "data.")
RESUME_MAY_MOVE = {
    f"data.{key}"
    for key in (
        "root", "csv_file", "test_csv_file", "val_csv_file", "image_dir", "download", "loader", "memory_limit_mb",
        "cache_dir", "cache_verify", "max_image_pixels", "workers", "skip_bad_images",
    )
}  # fmt: skip
RESUME_UNSAID = {"trainer.progress", "trainer.threads", "data.workers", "data.cache_dir", "data.loader", "run.root"}
# How a run executes and where it lives, not what it trains: two configs differing only here train the same run.
NOT_WHAT_TRAINS = RESUME_UNSAID | RESUME_MAY_MOVE | {"exp_name"}


def _resume_changes(saved: Config, cfg: Config, run: RunFolder) -> list[str]:
    """The changes a resumed run takes, as 'key old -> new'; one line refusing any it cannot take."""
    changes = changed_keys(saved, cfg)
    kept = [c for c in changes if c[0].startswith(RESUME_KEEPS) and c[0] not in RESUME_MAY_MOVE]
    if kept:
        key, old, new = kept[0]
        raise ClassLabError(
            f"{option('resume')}: {key} was {old!r} in '{run.path}', here {new!r}{and_others(kept)}; a resumed run "
            "keeps its model, data, seed and task: drop that override, or train a new run (another exp_name, or "
            f"{option('force')} to move this one aside)"
        )
    return [f"{k} {old!r} -> {new!r}" for k, old, new in changes if k not in RESUME_UNSAID]


def _say_file_edits(config: str | Path, cfg: Config, from_file: Config, console: Console) -> None:
    """A config file edited since the run began (epochs: 300) is not what --resume reads: the run goes on with
    its own config.yaml, and only overrides change it. Unsaid, the edit looks applied and is not."""
    edits = [
        (key, run_value, file_value)
        for key, run_value, file_value in changed_keys(cfg, from_file)
        if key not in NOT_WHAT_TRAINS
    ]
    if not edits:
        return
    shown = ", ".join(f"{k} (file {new!r}, run {old!r})" for k, old, new in edits[:3])
    more = f" and {len(edits) - 3} more" if len(edits) > 3 else ""
    key, _, value = edits[0]
    console.print(
        f"note: {config} differs from the run's own config.yaml in {shown}{more}; {option('resume')} goes on with "
        "the run's "
        f"settings: give a change as an override ({key}={yaml_text(value)}), as for any resumed run"
    )


def _resume_state(
    run: RunFolder, lock: RunLock, cfg: Config, config: Config | str | Path | dict | None, overrides: list[str] | None
) -> tuple[Config, Any, Path | None, list[str], tuple[int, int]]:
    """(the run's saved config with any new overrides, its saved split, the checkpoint to continue from, the
    changes the overrides make, the epochs that checkpoint holds and the batches of the next one it holds: 0 but
    for a checkpoint a stop wrote mid-epoch).

    The checkpoint is the newest that loads (a damaged last.ckpt falls back to previous.ckpt;
    none at all: the run starts over). metrics.csv loses the rows of epochs that checkpoint had
    not finished, so the resumed run appends exactly where the checkpoint stands.
    """
    if is_fold_group(run.path) and not (run.path / CONFIG).is_file():
        # The folds were asked for on the command line (--folds K) and not given again with --resume.
        k = run.read_json(FOLDS).get("folds", "K")
        again = spelt(f"--folds {k} (or data.folds={k})", f"the override data.folds={k}")
        raise ClassLabError(f"'{run.path}' is a k-fold folder; continue it with {again}")
    if _is_zero():
        lock.acquire()  # a second process on this folder stops here, before it reads or writes anything
    tree = saved_tree(run.read_config_tree())
    saved = validate(tree, saved=True)
    if not isinstance(config, Config):
        cfg = validate(with_overrides(tree, overrides or []), saved=True)  # a copy: tree stays the saved one
    changes = _resume_changes(saved, cfg, run)
    last_ckpt, done, batches = run.resume_checkpoint(set_damaged_aside=_is_zero())
    if cfg.epochs < done:  # config.yaml said 1 epoch beside a metrics.csv of 2, and "train it longer: epochs=1"
        raise ClassLabError(
            f"{option('resume')}: epochs={cfg.epochs} is fewer than the {done} epochs '{run.path}' has already "
            f"trained; give epochs={done} or more (epochs={done + 1} trains it longer), or train a new run (another "
            f"exp_name, or {option('force')} to move this one aside)"
        )
    if last_ckpt is None and not (run.path / SPLIT).is_file():
        # A run of an earlier version killed between config.yaml and split.json (config.yaml now goes last).
        raise ClassLabError(
            f"{option('resume')}: the run in '{run.path}' never began (it has {CONFIG} but no {SPLIT}; nothing "
            f"trained); start it again with {option('force')} (the folder is moved aside)"
        )
    if _is_zero():
        run.truncate_metrics(done + 1)
        if changes:  # config.yaml says how the run goes on; the summary keeps when it changed, and what
            run.write_config(cfg.to_dict())
            earlier = run.summary(default={}).get("resumed_with", [])
            run.update_summary(resumed_with=[*earlier, {"epochs_done": done, "changes": changes}])
    return cfg, run.read_split(), last_ckpt, changes, (done, batches)


PROCESS_KEYS = ("trainer.devices ", "trainer.num_nodes ", "trainer.strategy ")  # as a change line starts


# Schedules laid over the whole run: another number of epochs reshapes the rest of their curve.
SCHEDULES_BY_LENGTH = ("cosine", "onecycle", "triangle")


def _resume_line(
    last_ckpt: Path | None,
    done: int,
    epochs: int,
    changes: list[str],
    schedule: str | None = None,
    *,
    batches_done: int = 0,
) -> str:
    """Where --resume picks up and what it changes, said before the data loads (a run that starts over looks
    like a fresh one). ``schedule``: sched.name, whose curve a change of epochs may stretch. ``batches_done``:
    the batches of epoch done + 1 a checkpoint written mid-epoch holds (a stop between two batches); the line
    said 'a checkpoint written mid-epoch goes on with its next batch' of every checkpoint, an epoch end's too."""
    if last_ckpt is None:
        line = "resuming: no checkpoint was written yet, so the run starts over"
    elif batches_done:
        line = (
            f"resuming from checkpoints/{last_ckpt.name} ({done} of {epochs} epochs done, and {batches_done} "
            f"batch(es) of epoch {done + 1}: it goes on with batch {batches_done + 1})"
        )
    else:
        line = f"resuming from checkpoints/{last_ckpt.name} ({done} of {epochs} epochs done)"
    line += f"\nresuming with changes: {'; '.join(changes)}" if changes else ""
    if any(c.startswith(PROCESS_KEYS) for c in changes):
        line += (
            "\nnote: the number of processes changed: under DDP a step sees data.batch_size images from each "
            "process, so the batch a step averages and the steps an epoch (and the schedule by steps) change with "
            "it; the run goes on, but not as one never stopped would"
        )
    stretched = next((c.split() for c in changes if c.startswith("epochs ")), None)
    if stretched and schedule in SCHEDULES_BY_LENGTH and last_ckpt is not None:
        # The lr of a finished cosine run was at its floor; --resume epochs=4 took it back up without a word.
        before, after = stretched[1], stretched[3]
        where = "above" if int(after) > int(before) else "below"
        line += (
            f"\nnote: sched.name={schedule} spans the whole run: from epoch {done + 1} on the lr follows the "
            f"{after}-epoch curve, {where} where the {before}-epoch one had it"
        )
    return line


def _write_run_start(run: RunFolder, cfg: Config, data: DataBundle) -> None:
    """The files that say what a run is, written before its first step. config.yaml goes last: a folder that
    has it has the others (a kill between two of them leaves a folder the next run takes, ``never_started``)."""
    run.write_classes(data.classes)
    if cfg.task == "multitask":
        run.write_tasks(TaskLayout.from_config(cfg, data.tasks or {}).to_json())
    run.write_split(data.split)
    if data.bad:
        run.write_skipped(data.bad)
    run.write_config(cfg.to_dict())


def _pretrained_report(net: torch.nn.Module) -> pretrained.LoadReport | None:
    return getattr(net, "pretrained_report", None) or getattr(getattr(net, "backbone", None), "pretrained_report", None)


def _announce(run: RunFolder, cfg: Config, data: DataBundle, net: torch.nn.Module, console: Console) -> None:
    """The summary's first fields and the run's first lines: what trains, how much of it, on what."""
    params = count_params(net)
    weights = _pretrained_report(net)
    carried = getattr(net, "weights_at_start", None)  # loaded by the run or stage this one goes on from
    transfer = getattr(net, "init_report", None)
    trainable = trainable_at_start(net, cfg.model.unfreeze_at_epoch)
    run.update_summary(
        status="running",
        exp_name=run.path.name,
        task=cfg.task,
        dataset=cfg.data.dataset,
        model=cfg.model.name,
        params=params,
        params_trainable=trainable,
        **({"pretrained": weights.summary()} if weights else {"pretrained": carried} if carried else {}),
        **({"init_from": {k: v for k, v in transfer.items() if k != "normalization_note"}} if transfer else {}),
        epochs=cfg.epochs,
        image_size=data.size,
        loader=data.mode,
        images={"train": len(data.train), "val": len(data.val or []), "test": len(data.test or [])},
        skipped_images=len(data.bad),
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        versions=_versions(),
    )
    console.print(
        f"[bold]classlab[/bold] {cfg.task} {cfg.model.name} ({params:,} parameters, {trainable:,} trainable) "
        f"on {cfg.data.dataset}: {len(data.train)} train / {len(data.val or [])} val / {len(data.test or [])} "
        f"test images at {data.size}px, {data.mode} loader -> {run.path}"
    )
    notice = precision_notice(cfg)
    lines = [weights.line(), *weights.notes] if weights else []
    lines += [init_from_line(transfer)] if transfer else []
    lines += [transfer["normalization_note"]] if transfer and transfer.get("normalization_note") else []
    if data.bad:  # data.skip_bad_images: they were left out without a word
        lines.append(f"note: {len(data.bad)} bad file(s) or manifest row(s) skipped, listed in {run.path / SKIPPED}")
    for line in lines + data.notices + ([notice] if notice else []) + unread_settings(cfg, _stage_keys(run)):
        console.print(line)


def _stage_keys(run: RunFolder) -> set[str] | None:
    """The keys a stage after the first sets itself (the rest it inherits, and stage 1 already said what of them goes
    unread), or None for a run that is no such stage."""
    top = run.path.parent / CONFIG
    number = run.path.name.removeprefix("stage")
    if not number.isdigit() or int(number) < 2 or not top.is_file():
        return None
    stages = yaml.safe_load(top.read_text(encoding="utf-8")).get("stages") or []
    own = stages[int(number) - 1] if int(number) <= len(stages) else {}
    return set(flatten(own)) if isinstance(own, dict) else None


def _train_one(
    cfg: Config,
    config: Config | str | Path | dict | None,
    overrides: list[str] | None,
    *,
    resume: bool,
    force: bool,
    quiet: bool,
    start_from: Path | None = None,
) -> RunFolder:
    """One run in one folder, which process 0 holds locked (run.lock) from start to end."""
    tracking.check_loggers(cfg.trainer.loggers)  # a missing package fails before the run folder exists
    run, cfg, lock = _make_run(cfg, resume, force, move_now=False)
    threads = torch.get_num_threads()  # trainer.threads is this run's: a notebook's later work keeps its own
    try:
        return _fit_run(run, lock, cfg, config, overrides, resume=resume, quiet=quiet, start_from=start_from)
    except RunWriteError as exc:
        if lock.held:  # a full disk or a read-only folder outside the fit loop (summary, test)
            run.mark_failed("failed", str(exc))
        raise
    except DistributedStartError:
        if not resume and _is_zero():  # not one step trained: the new folder goes, as a run refused earlier leaves none
            lock.release()
            run.discard()
        raise
    finally:
        if lock.held and not resume and run.never_started():
            # Refused before it began (its data, class weights, a Ctrl-C while loading): the folder taken goes.
            run.discard()
        lock.release()
        torch.set_num_threads(threads)


def _fit_run(
    run: RunFolder,
    lock: RunLock,
    cfg: Config,
    config: Config | str | Path | dict | None,
    overrides: list[str] | None,
    *,
    resume: bool,
    quiet: bool,
    start_from: Path | None,
) -> RunFolder:
    console = RunConsole(quiet=quiet, stderr=False, highlight=False, soft_wrap=True)
    saved_split, last_ckpt = None, None
    if resume:
        cfg, saved_split, last_ckpt, finished = _resume_said(run, lock, cfg, config, overrides, console)
        if finished:
            return run
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    weights_at_start = _weights_at_start(run, last_ckpt, start_from)
    if weights_at_start is None:
        cfg = pretrained.configure(cfg)  # hub weights fetched (or one error line) before any data is read

    data = load_data(cfg, split=saved_split)
    # The model is built (parameter budget, init_from, stage weights) before the run folder exists.
    transfer = run.summary(default={}).get("init_from") if last_ckpt is not None else None
    model = build_network(cfg, data, transfer if isinstance(transfer, dict) else None, weights_at_start)
    if start_from is not None and last_ckpt is None:  # a stage resumed before it trained starts from them too
        load_stage_weights(model.net, start_from)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # The fit's loaders: under DDP each process serves its share (the final test, later, takes every image).
    fit = {"seed": cfg.seed, "size": data.size, "workers": cfg.data.workers, "shard": True}
    train_loader = data.train.loader(cfg.data.batch_size, shuffle=True, sampler=cfg.data.sampler, **fit)
    val_loader = data.val.loader(cfg.data.batch_size, shuffle=False, **fit) if data.val else None
    # The task checks what needs the data's classes (loss.class_weights) before the run folder exists.
    task = build_task(cfg, data, model, len(train_loader))
    task.has_val = val_loader is not None
    if _is_zero() and not resume:
        _create_run(run, lock, cfg, data)
    if _is_zero():
        _announce(run, cfg, data, model.net, console)
    extra_columns = task.metric_columns()
    recorder = RunRecorder(
        run,
        extra={"classes": data.classes, "image_size": data.size, "channels": data.channels, "task": cfg.task},
        keep_every=cfg.trainer.keep_every,
        last_every_s=cfg.trainer.checkpoint_every_s,
        console=console if _is_zero() else None,
        columns=[*METRIC_COLUMNS, *extra_columns] if extra_columns else None,
    )
    os.environ[RUN_DIR_ENV] = str(run.path.resolve())
    loggers = tracking.build_loggers(cfg, run)
    trainer = build_trainer(
        cfg,
        run,
        recorder,
        console,
        has_val=val_loader is not None,
        steps_per_epoch=len(train_loader),
        zero=_is_zero(),
        loggers=loggers,
    )
    _stop_when_output_closed(console, trainer)
    if cfg.trainer.compile:
        task.model.net.compile()  # in place: a wrapper's keys (net._orig_mod.*) fit no model eval or predict builds
    if _is_zero():
        tracking.start(loggers, cfg, run)
    _fit(trainer, task, train_loader, val_loader, last_ckpt, run.path)
    if not trainer.is_global_zero:
        return run
    _finish(run, cfg, data, task, recorder, console)
    tracking.finish(loggers, cfg, run.summary(), trainer.global_step)
    return run


class DistributedStartError(ClassLabError):
    """The DDP processes could not meet (the rendezvous port taken): nothing was trained."""


@contextlib.contextmanager
def _workers_ended_on_failure(trainer: L.Trainer) -> Iterator[None]:
    """The DDP worker processes Lightning started, ended when process 0's fit fails: they were left waiting on it (a
    port in use left one for half an hour, holding its data in memory). A stop asked for ends them itself."""
    try:
        yield
    except Exception:
        for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise


def _distributed_start_error(exc: BaseException) -> DistributedStartError:
    port = os.environ.get("MASTER_PORT")
    first = first_line(exc)
    fix = (
        f"MASTER_PORT={port} is taken by another program: unset MASTER_PORT (a free port is then picked) or set a "
        "free one"
        if "EADDRINUSE" in first or "address already in use" in first.lower()
        else "check MASTER_ADDR / MASTER_PORT and that no other run uses them"
    )
    return DistributedStartError(f"the DDP processes could not start ({first}); {fix}")


def _fit(
    trainer: L.Trainer, task: ClassifyTask, train_loader: Any, val_loader: Any, last_ckpt: Path | None, folder: Path
) -> None:
    try:
        with _workers_ended_on_failure(trainer):
            trainer.fit(
                task, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=last_ckpt, weights_only=True
            )
    except torch.distributed.DistNetworkError as exc:
        if trainer.global_step or trainer.current_epoch:
            raise  # the processes had met and trained: not a start that failed
        raise _distributed_start_error(exc) from exc
    except OSError as exc:
        # A clean-up script or a hand removed the folder under the run: whichever writer noticed first (TensorBoard,
        # metrics.csv, a checkpoint) raised its own FileNotFoundError, which named a file deep inside the folder.
        if folder.is_dir():
            raise
        raise ClassLabError(
            f"the run folder {folder} was removed or moved while the run trained, so nothing more can be written to "
            "it; start the run again (or put run.root where nothing cleans up)"
        ) from exc
    except (SystemExit, KeyboardInterrupt):
        # Lightning ends a stop asked for (SIGTERMException) and a Ctrl-C (sys.exit(1)) after its callbacks
        # ran: RunRecorder wrote what could be written and says what last.ckpt holds.
        if trainer.interrupted:
            raise _interrupted(trainer) from None
        raise
    if trainer.interrupted:
        raise _interrupted(trainer)


def _stop_when_output_closed(console: RunConsole, trainer: L.Trainer) -> None:
    """A closed stdout (``classlab train | head -1``, the reader gone) stops the run as SIGPIPE would stop a Unix
    tool, but between two batches: last.ckpt at that point, the run ``interrupted``, exit 141, resumable."""
    stop = next((c for c in trainer.callbacks if isinstance(c, GracefulStop)), None)
    if stop is None:
        return
    console.on_closed = lambda: stop.ask("SIGPIPE")
    if console.closed:  # closed while the data loaded: the run stops after its first batch
        console.on_closed()


def _interrupted(trainer: L.Trainer) -> RunInterrupted:
    recorder = next((c for c in trainer.callbacks if isinstance(c, RunRecorder)), None)
    note = recorder.stop_note if recorder is not None else ""
    asked = next((c.requested for c in trainer.callbacks if isinstance(c, GracefulStop) and c.requested), None)
    if asked == "SIGPIPE":
        note = f"standard output was closed; {note or 'stopped'}"
    code = 128 + int(getattr(signal, asked or "SIGINT"))
    return RunInterrupted(note or "stopped", code, run=recorder.run.path if recorder is not None else None)


def _resume_said(
    run: RunFolder,
    lock: RunLock,
    cfg: Config,
    config: Config | str | Path | dict | None,
    overrides: list[str] | None,
    console: Console,
) -> tuple[Config, Any, Path | None, bool]:
    """``_resume_state`` and the lines saying where the run goes on: (config, split, checkpoint, finished), the
    last True when there is nothing to do: a finished run resumed as it was keeps its figures, and its data is
    not read again (it reprinted its first lines and 'finished' under 'nothing to train')."""
    from_file = cfg
    cfg, saved_split, last_ckpt, changes, (done, batches) = _resume_state(run, lock, cfg, config, overrides)
    console.print(_resume_line(last_ckpt, done, cfg.epochs, changes, cfg.sched.name, batches_done=batches))
    if isinstance(config, str | Path) and _is_zero():
        _say_file_edits(config, cfg, from_file, console)
    finished = _say_if_finished(run, cfg, console)
    return cfg, saved_split, last_ckpt, finished and not changes


def _say_if_finished(run: RunFolder, cfg: Config, console: Console) -> bool:
    """--resume of a run that has trained all its epochs: without this line it only said 'finished in 3s'.
    True when it has."""
    summary = run.summary(default={})
    finished = len(run.read_metrics()) >= cfg.epochs and summary.get("status") == "finished"
    if finished:
        console.print(
            f"{run.path} already finished its {cfg.epochs} epochs: nothing to train; "
            f"to train it longer: {_resume_with(f'epochs={cfg.epochs + max(1, cfg.epochs // 2)}')}"
        )
    early = summary.get("stopped_early") if summary.get("status") == "finished" else None
    if isinstance(early, dict):  # it trained on as if never stopped, without a word
        console.print(
            f"note: {run.path} stopped early after epoch {early.get('epoch')} (trainer.patience); it trains on, and "
            f"stops again at the first validation whose {early.get('monitor')} does not improve on its best"
        )
    return finished


def _resume_with(override: str) -> str:
    """``--resume epochs=45`` in the reader's words: the override goes with the flag, or in ``overrides``."""
    return spelt(f"--resume {override}", f"resume=True with the override {override}")


def best_row(rows: list[dict[str, Any]], monitor: str) -> dict[str, Any] | None:
    """The metrics.csv row of best.ckpt's epoch: the first best by ``trainer.monitor``, as ModelCheckpoint keeps
    it (lowest for a loss). Picked by val/acc under monitor=val/f1, summary.json's best_epoch and figures were of
    another epoch than the weights tested and shipped. A run whose rows lack the monitor is judged by val/acc."""
    val_rows = [r for r in rows if r.get("val/acc")]
    if not val_rows:
        return None
    if not all(r.get(monitor) for r in val_rows):
        monitor = "val/acc"
    pick = min if "loss" in monitor else max
    return pick(val_rows, key=lambda r: float(r[monitor]))


def _finish(
    run: RunFolder, cfg: Config, data: DataBundle, task: ClassifyTask, recorder: RunRecorder, console: Console
) -> RunFolder:
    """Test on the best checkpoint (by trainer.monitor), write the summary, say where the run is."""
    rows = run.read_metrics()
    best_name = "best" if run.checkpoint_path("best").is_file() else "last"
    summary: dict[str, Any] = {
        "epochs_done": int(rows[-1]["epoch"]) if rows else 0,
        "wall_time_s": round(recorder.elapsed(), 2),
    }
    early = stopped_early(task.trainer, summary["epochs_done"], cfg.epochs)
    if early is not None:
        summary["stopped_early"] = early
        console.print(stopped_early_line(early, cfg.epochs))
    best = best_row(rows, cfg.trainer.monitor)
    if best is not None:
        summary.update(best_val_acc=float(best["val/acc"]), best_epoch=int(best["epoch"]))
        if best.get("val/f1"):
            summary.update(best_val_f1=float(best["val/f1"]))
        # Multitask: each task's validation accuracy at that epoch (val/acc is the combined class).
        summary.update({k: float(v) for k, v in best.items() if k.startswith("val/") and k.count("/") == 2 and v})
    if data.test is not None and len(data.test):
        task.load_state_dict(safe_torch_load(run.checkpoint(best_name))["state_dict"], strict=False)
        loader = data.test.loader(cfg.data.batch_size, shuffle=False, seed=0, size=data.size, workers=cfg.data.workers)
        summary.update(final_test(cfg, task, loader), test_checkpoint=best_name)
    summary.update(status="finished", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    run.update_summary(**summary)
    shown = ", ".join(
        f"{k} {summary[k]:.4f}" for k in ("best_val_acc", "test_acc") if isinstance(summary.get(k), float)
    )
    shown = shown or _nothing_scored(data, cfg)
    console.print(f"finished in {summary['wall_time_s']:.0f}s: {shown}")
    console.print(f"run folder: {run.path}")
    return run


def _nothing_scored(data: DataBundle, cfg: Config) -> str:
    """Why a finished run has no figure: no images to score (data.val_fraction=0, no test set), or a stop by
    trainer.max_steps before the epoch's end, where validation runs ('no validation images' beside 400 of them)."""
    if data.val and len(data.val) and cfg.trainer.max_steps:
        return (
            f"trainer.max_steps={cfg.trainer.max_steps} stopped it before an epoch ended, so its "
            f"{len(data.val)} validation images were never scored"
        )
    return "no validation or test images to score"


# ---------------------------------------------------------------------------------------------
# k-fold cross-validation: ``classlab train CONFIG --folds K`` (or data.folds without data.fold)
#
# Each fold is an ordinary run, ``runs/<exp>/fold{i}``, whose validation set is fold i of a
# seeded split (stratified by class, or grouped by ``data.group_column`` so that one person never
# sits in two folds). The folder above them is not a run: it holds folds.json (the config and K),
# classes.json, oof.csv and a summary.json with each fold's figures and their mean and standard
# deviation. oof.csv holds the out-of-fold predictions: every usable training image once, predicted
# by the one fold model that did not train on it. A second call continues where the first stopped.
# ---------------------------------------------------------------------------------------------


def _take_top(cfg: Config, resume: bool, force: bool) -> tuple[RunFolder, RunLock, Path | None]:
    """The k-fold folder, taken as a run's folder is (``_take_folder``): made and locked before any fold loads its
    data, so two k-fold runs started at once get two folders, or the second stops at once with the 'in use' line.
    A k-fold folder already under the exp_name is continued, its finished folds kept, its lock held; ``--force``
    moves it aside, and where it went is returned (put back if the new folds are refused)."""
    default = f"{_default_name(cfg)}_{cfg.data.folds}fold"
    top, lock = _take_folder(cfg, default, resume=resume, force=force, move_now=False, keep=True)
    try:
        if resume:
            lock.acquire()
        if not top.never_started() and not is_fold_group(top.path):
            raise ClassLabError(f"'{top.path}' exists and is not a k-fold folder; choose another exp_name")
        moved = _replace_old(top, lock) if force and not resume and not top.never_started() else None
    except BaseException:
        lock.release()
        raise
    return top, lock, moved


def _take_back(top: RunFolder, moved: Path | None) -> None:
    """A k-fold run refused before any fold began (its data, a write) leaves the disk as it found it: a folder
    holding only folds.json and a summary saying "running" would read as a run cut off, where nothing ran (a broken
    manifest leaves no run folder). The folder goes if this call made it (``RunFolder.discard``), or loses what this
    call wrote if it was there before (made by hand); the k-fold folder ``--force`` moved aside goes back, as a
    single run refused for its data keeps its old folder in place."""
    for name in (FOLDS, SUMMARY):
        (top.path / name).unlink(missing_ok=True)
    top.discard()
    if moved is not None and not top.path.exists():
        os.replace(moved, top.path)
        print(f"the old k-fold run is back in {top.path}", file=sys.stderr)  # after 'moved the old run to ...'


def _check_same_folds(top: RunFolder, cfg: Config) -> None:
    """A second call continues the folds it finds, so it must train what they trained: finished folds are kept
    as they are, and folds.json would otherwise claim a config (epochs=2) that never trained them."""
    saved = validate(saved_tree(top.read_json(FOLDS)["config"]), saved=True)
    changes = [c for c in changed_keys(saved, cfg) if c[0] not in NOT_WHAT_TRAINS and c[0] != "data.fold"]
    if changes:
        key, old, new = changes[0]
        raise ClassLabError(
            f"'{top.path}' holds k-fold runs trained with {key}={yaml_text(old)}, here {yaml_text(new)}"
            f"{and_others(changes)}; "
            "a second call continues those folds as they were: drop the change, or train new folds "
            f"(another exp_name, or {option('force')} to move this folder aside)"
        )


def train_folds(
    cfg: Config, *, resume: bool = False, force: bool = False, quiet: bool = False, verbose: int = 0
) -> RunFolder:
    """Train every fold in turn, then write the out-of-fold predictions and the mean ± std summary."""
    if cfg.stages:
        raise ClassLabError("data.folds with stages is not supported; run the folds of one stage at a time")
    if cfg.trainer.devices == "auto" and accelerator(cfg) == "gpu" and torch.cuda.device_count() > 1:
        raise ClassLabError(
            f"data.folds trains its folds in one process and trainer.devices=auto would start "
            f"{torch.cuda.device_count()} (one per GPU): set trainer.devices=1, or train each fold as its own run "
            "with data.fold=0, 1, ..."
        )
    top, lock, moved = _take_top(cfg, resume, force)
    fresh = top.never_started()  # taken for this call: nothing of an earlier one in it
    try:
        tree = _start_folds(top, cfg)
        _train_each_fold(top, cfg, tree, quiet=quiet, verbose=verbose)
        top = write_out_of_fold(top)
    except BaseException as exc:
        if isinstance(exc, RunInterrupted):
            exc.run = top.path  # resumed as a whole: the k-fold folder, not the fold's
        if fresh and not any((top.path / f"fold{i}").exists() for i in range(cfg.data.folds or 0)):
            _take_back(top, moved)
        raise
    finally:
        lock.release()
    if not quiet:
        print(_folds_line(top.summary(), cfg.data.folds or 0), flush=True)
        print(f"k-fold folder: {top.path} (oof.csv: each image's out-of-fold prediction)", flush=True)
    return top


def _folds_line(summary: dict[str, Any], folds: int) -> str:
    """The figures a k-fold run is for, said at its end: the last line printed was the last fold's run folder,
    and the out-of-fold and mean ± std figures reached only summary.json."""
    line = (
        f"{folds} folds: out-of-fold accuracy {summary['oof_acc']:.4f}, macro-F1 {summary['oof_f1']:.4f}; "
        f"per fold {summary['mean_acc']:.4f} ± {summary['std_acc']:.4f}"
    )
    tasks = [k.removeprefix("oof_").removesuffix("/acc") for k in summary if k.startswith("oof_") and "/acc" in k]
    return line + "".join(f"\n  task {t}: out-of-fold accuracy {summary[f'oof_{t}/acc']:.4f}" for t in tasks)


def _start_folds(top: RunFolder, cfg: Config) -> dict[str, Any]:
    """folds.json and a summary saying 'running', once the folds already in the folder are those asked for; returns
    the config the folds' own are made from."""
    if is_fold_group(top.path):
        k = top.read_json(FOLDS).get("folds")
        if k != cfg.data.folds:
            raise ClassLabError(f"'{top.path}' holds a {k}-fold run; use {option('force')}")
        _check_same_folds(top, cfg)
    tree = cfg.to_dict()
    tree["exp_name"] = top.path.name
    top.write_json(FOLDS, {"folds": cfg.data.folds, "seed": cfg.seed, "config": tree})
    top.update_summary(status="running", exp_name=top.path.name, folds=cfg.data.folds)
    return tree


def _train_each_fold(top: RunFolder, cfg: Config, tree: dict[str, Any], *, quiet: bool, verbose: int) -> None:
    """Each fold in turn, as an ordinary run in ``top/fold{i}``; a finished fold is kept."""
    for i in range(cfg.data.folds or 0):
        fold_tree = dict(tree, exp_name=f"fold{i}")
        fold_tree["run"] = dict(tree["run"], root=str(top.path))
        fold_tree["data"] = dict(tree["data"], fold=i)
        fold = RunFolder(top.path / f"fold{i}")
        status = fold.summary(default={}).get("status")
        if status == "finished":
            if not quiet:
                print(f"fold {i + 1}/{cfg.data.folds}: finished before, kept ({fold.path})", flush=True)
            continue
        if not quiet:
            print(f"fold {i + 1}/{cfg.data.folds}", flush=True)
        train(validate(fold_tree), resume=_begun(fold), quiet=quiet, verbose=verbose)


def _predict_fold(run: Path) -> dict[str, Any]:
    """The best checkpoint of one fold on its own validation images: probabilities and labels (plain: a
    calibration of the fold run was fitted on these very images, and would flatter the out-of-fold figures)."""
    loaded = load(run, calibrated=False)
    folder = RunFolder(run)
    split = folder.read_split()
    data = load_data(loaded.cfg, split=split, with_test=False)
    if data.val is None:
        raise ClassLabError(f"fold run '{run}' has no validation images")
    loader = data.val.loader(loaded.cfg.data.batch_size, shuffle=False, seed=0, size=data.size)
    task_logits, logits, labels = predict_split(loaded.model, loader, loaded.tasks is not None)
    task_probs = [t.softmax(1) for t in task_logits]
    return {
        "index": list(split["val"]),
        "files": data.train_files,
        "probs": logits.softmax(1),
        "labels": labels,
        "task_probs": task_probs,
        "classes": loaded.classes,
        "layout": loaded.tasks,
    }


def prediction_metrics(
    probs: torch.Tensor, labels: torch.Tensor, layout: Any = None, task_probs: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """acc and macro-F1 of the combined class, and per task (``<task>/acc``, ``<task>/f1``) for multitask."""
    out = {"acc": top_k_accuracy(probs, labels, 1), "f1": macro_f1(probs, labels, probs.shape[1])}
    if layout is not None and task_probs:
        for name, p, target, size in zip(layout.names, task_probs, layout.split(labels), layout.sizes):
            out[f"{name}/acc"] = top_k_accuracy(p, target, 1)
            out[f"{name}/f1"] = macro_f1(p, target, size)
    return out


def _oof_rows(fold: int, pred: dict[str, Any]) -> list[dict[str, Any]]:
    classes, layout = pred["classes"], pred["layout"]
    rows = []
    per_task = pred["layout"].split(pred["labels"]) if layout is not None else []
    for j, index in enumerate(pred["index"]):
        p = pred["probs"][j]
        best = int(p.argmax())
        row: dict[str, Any] = {
            "index": index,
            "path": pred["files"][index] if pred["files"] else "",
            "fold": fold,
            "label": classes[int(pred["labels"][j])],
            "pred": classes[best],
            "prob": round(float(p[best]), 6),
        }
        for t, name in enumerate(layout.names if layout is not None else ()):
            tp = pred["task_probs"][t][j]
            row[f"{name}_label"] = layout.classes[t][int(per_task[t][j])]
            row[f"{name}_pred"] = layout.classes[t][int(tp.argmax())]
            row[f"{name}_prob"] = round(float(tp.max()), 6)
        row.update({f"p:{c}": round(float(v), 6) for c, v in zip(classes, p.tolist())})
        rows.append(row)
    return rows


def write_out_of_fold(top: RunFolder) -> RunFolder:
    """oof.csv (each training image once, by the fold that held it out) and the fold summary."""
    k = int(top.read_json(FOLDS)["folds"])
    rows: list[dict[str, Any]] = []
    per_fold: list[dict[str, float]] = []
    probs, labels, task_probs = [], [], []
    layout = None
    wall = 0.0
    for i in range(k):
        run = top.path / f"fold{i}"
        if RunFolder(run).summary().get("status") != "finished":
            raise ClassLabError(f"fold {i} ('{run}') has not finished; run the same command again to continue it")
        pred = _predict_fold(run)
        layout = pred["layout"]
        rows += _oof_rows(i, pred)
        per_fold.append(prediction_metrics(pred["probs"], pred["labels"], layout, pred["task_probs"]))
        probs.append(pred["probs"])
        labels.append(pred["labels"])
        task_probs.append(pred["task_probs"])
        wall += float(RunFolder(run).summary().get("wall_time_s") or 0.0)
        if i == 0:
            top.write_classes(pred["classes"])
    _check_coverage(rows, RunFolder(top.path / "fold0").read_split())
    rows.sort(key=lambda r: r["index"])
    joined_tasks = [torch.cat([tp[t] for tp in task_probs]) for t in range(len(task_probs[0]))] if layout else []
    overall = prediction_metrics(torch.cat(probs), torch.cat(labels), layout, joined_tasks)
    summary: dict[str, Any] = {f"oof_{key}": round(value, 6) for key, value in overall.items()}
    for key in per_fold[0]:
        values = [m[key] for m in per_fold]
        summary[f"fold_{key}"] = [round(v, 6) for v in values]
        summary[f"mean_{key}"] = round(statistics.fmean(values), 6)
        summary[f"std_{key}"] = round(statistics.stdev(values), 6) if len(values) > 1 else 0.0
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(top.path / OOF, buffer.getvalue())
    top.update_summary(status="finished", images=len(rows), wall_time_s=round(wall, 2), **summary)
    return top


def _check_coverage(rows: list[dict[str, Any]], split: dict[str, Any]) -> None:
    """Every usable training image exactly once: a k-fold run that is not that is a bug, not a result."""
    seen = sorted(r["index"] for r in rows)
    expected = int(split.get("source_images") or len(split["train"]) + len(split["val"]))
    if seen != list(range(expected)):
        raise ClassLabError(
            f"out-of-fold predictions cover {len(set(seen))} of {expected} training images "
            f"({len(seen) - len(set(seen))} twice); the fold runs do not come from one k-fold split"
        )
