"""``classlab.train(config)``: validate, load data, make the run folder, fit, test, summarise.

The order matters: the config and the data are checked before the run folder exists, so a
typo or a broken image never leaves a half-made run behind; the config and class map are
written first, so a run folder always says what it is.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from classlab import __version__
from classlab.config import Config, load_config, validate
from classlab.data.pipeline import DataBundle, load_data
from classlab.data.preprocess import Normalize
from classlab.engine.callbacks import METRIC_COLUMNS, AtomicCheckpointIO, RunRecorder
from classlab.engine.evaluate import macro_f1, predict_logits, top_k_accuracy
from classlab.engine.task import ClassifierModel, ClassifyTask
from classlab.errors import ClassLabError
from classlab.models import build_model, count_params, load_backbone_weights
from classlab.run import RunFolder, move_aside, new_run_path, open_run, safe_torch_load

RUN_DIR_ENV = "CLASSLAB_RUN_DIR"  # set by process 0 so that DDP worker processes join its run folder


def coerce_config(config: Config | str | Path | dict | None, overrides: list[str] | None = None) -> Config:
    """Accept a Config, a path to YAML/INI, a plain dict, or nothing (the defaults)."""
    if isinstance(config, Config):
        if overrides:
            from classlab.config import apply_overrides

            return validate(apply_overrides(config.to_dict(), overrides))
        return config
    if isinstance(config, dict):
        from classlab.config import apply_overrides

        return validate(apply_overrides(config, overrides or []))
    return load_config(config, overrides)


def _versions() -> dict[str, str]:
    import lightning
    import timm
    import torchvision

    return {
        "classlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }


def _accelerator(cfg: Config) -> str:
    if cfg.trainer.accelerator != "auto":
        return "gpu" if cfg.trainer.accelerator == "cuda" else cfg.trainer.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_init_from(spec: str, base: Path | None = None) -> Path:
    """``runs/rot:epoch5`` -> runs/rot/checkpoints/epoch5.ckpt (``runs/rot`` alone -> best)."""
    folder, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(folder)
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    return open_run(path).checkpoint(name or "best")


def build_network(cfg: Config, data: DataBundle) -> ClassifierModel:
    if cfg.task == "multitask":
        from classlab.multitask import TaskLayout, build_multitask_net

        net = build_multitask_net(
            cfg.model.spec(), TaskLayout.from_config(cfg, data.tasks or {}), data.channels, data.size
        )
        inner = net.backbone  # init_from and data-set layers concern the backbone, not the task heads
    else:
        net = inner = build_model(cfg.model.spec(), data.num_classes, data.channels, data.size)
    if cfg.model.init_from:
        ckpt = safe_torch_load(resolve_init_from(cfg.model.init_from))
        state = {k.removeprefix("model.net."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.net.")}
        load_backbone_weights(inner, state)
    normalize = Normalize(data.mean, data.std)
    init_from_data = getattr(inner, "init_from_data", None)
    if callable(init_from_data) and not cfg.model.init_from and data.train.images is not None:
        # Layers set from the data before the first step (fastnet's patch whitening): the same
        # normalised images the network will see, a few thousand of them.
        init_from_data(normalize(data.train.images[:5000]))
    return ClassifierModel(normalize, net)


def _load_stage_weights(net: torch.nn.Module, path: Path) -> None:
    """All weights of the previous stage whose shapes still fit (a resolution change keeps them all)."""
    state = safe_torch_load(path)["state_dict"]
    own = net.state_dict()
    fitting = {
        k.removeprefix("model.net."): v
        for k, v in state.items()
        if k.startswith("model.net.")
        and k.removeprefix("model.net.") in own
        and own[k.removeprefix("model.net.")].shape == v.shape
    }
    if not fitting:
        raise ClassLabError(
            f"no weights of {path} fit the next stage's model; stages must keep model.name and its shape"
        )
    net.load_state_dict(fitting, strict=False)


def _checkpoint_callbacks(cfg: Config, run: RunFolder, has_val: bool, steps_per_epoch: int = 1) -> list[L.Callback]:
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    callbacks: list[L.Callback] = []
    if has_val:
        mode = "min" if "loss" in cfg.trainer.monitor else "max"
        callbacks.append(
            ModelCheckpoint(
                dirpath=run.checkpoints,
                filename="best",
                monitor=cfg.trainer.monitor,
                mode=mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
                save_on_train_epoch_end=False,
            )
        )
        if cfg.trainer.patience:
            callbacks.append(EarlyStopping(monitor=cfg.trainer.monitor, mode=mode, patience=cfg.trainer.patience))
    elif cfg.trainer.patience:
        raise ClassLabError("trainer.patience needs a validation set; set data.val_fraction above 0")
    if cfg.trainer.ema_decay:
        from classlab.engine.ema import EMACallback

        callbacks.append(EMACallback(cfg.trainer.ema_decay))
    if cfg.optim.lookahead and cfg.optim.lookahead_schedule == "cubic":
        from classlab.engine.optim import ScheduledLookahead

        total = cfg.epochs * steps_per_epoch
        total = min(total, cfg.trainer.max_steps) if cfg.trainer.max_steps else total
        callbacks.append(ScheduledLookahead(cfg.optim.lookahead_k, cfg.optim.lookahead_alpha, total))
    return callbacks


def _progress(console: Console, enabled: bool) -> list[L.Callback]:
    if enabled and console.is_terminal:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=False)]
    return []


def _make_run(cfg: Config, resume: bool, force: bool) -> tuple[RunFolder, Config]:
    joined = os.environ.get(RUN_DIR_ENV)
    if joined and os.environ.get("LOCAL_RANK", "0") != "0":
        return RunFolder(joined), cfg
    default = f"{cfg.data.dataset}_{cfg.model.name.replace(':', '_')}"
    path, named = new_run_path(cfg.run.root, cfg.exp_name, default, numbered=not resume)
    if resume:
        if not path.is_dir():
            raise ClassLabError(f"--resume: run folder '{path}' does not exist; start it without --resume")
        return RunFolder(path), cfg
    if path.exists():
        if not force:
            raise ClassLabError(
                f"run folder '{path}' already exists; use --resume to continue it, --force to move it aside, "
                f"or choose another exp_name"
            )
        moved = move_aside(path)
        print(f"moved the old run to {moved}", file=sys.stderr)
    return RunFolder(path), cfg.model_copy(update={"exp_name": path.name})


def train(
    config: Config | str | Path | dict | None = None,
    overrides: list[str] | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> RunFolder:
    """Train one run (or each stage of a multi-stage run); return its folder.

    Raises ClassLabError/ConfigError on bad input.
    """
    cfg = coerce_config(config, overrides)
    if cfg.data.folds and cfg.data.fold is None:
        from classlab.folds import train_folds

        return train_folds(cfg, resume=resume, force=force, quiet=quiet)
    if cfg.stages:
        return _train_stages(cfg, resume=resume, force=force, quiet=quiet)
    return _train_one(cfg, config, overrides, resume=resume, force=force, quiet=quiet)


def _train_stages(cfg: Config, *, resume: bool, force: bool, quiet: bool) -> RunFolder:
    """Stages run in sequence in ``<run>/stageK/``, each starting from the previous stage's final weights.

    This is the FixRes recipe's shape: train at a low resolution, fine-tune at a higher one.
    """
    from classlab.config import stage_config

    if cfg.trainer.devices == "auto" and _accelerator(cfg) == "gpu" and torch.cuda.device_count() > 1:
        raise ClassLabError(
            f"stages run in one process only and trainer.devices=auto would start {torch.cuda.device_count()} "
            f"(one per GPU): set trainer.devices=1, or run each stage as its own run with model.init_from"
        )
    top, cfg = _make_run(cfg, resume, force)
    if not resume:
        top.path.mkdir(parents=True, exist_ok=False)
        top.write_config(cfg.to_dict())
        top.update_summary(status="running", exp_name=top.path.name, stages=[])
    results = []
    previous: Path | None = None
    for k in range(len(cfg.stages)):
        stage = stage_config(cfg, k).model_copy(update={"exp_name": f"stage{k + 1}"})
        stage.run.root = str(top.path)
        folder = RunFolder(top.path / f"stage{k + 1}")
        status = folder.summary().get("status") if (folder.path / "summary.json").is_file() else None
        if status != "finished":
            if not quiet:
                Console(soft_wrap=True).print(f"[bold]stage {k + 1}/{len(cfg.stages)}[/bold]")
            _train_one(stage, stage, None, resume=status is not None, force=False, quiet=quiet, start_from=previous)
        results.append(folder.summary())
        previous = folder.checkpoint("last")
        top.update_summary(stages=results)
    if (top.path / "stage1" / "classes.json").is_file():
        top.write_classes(RunFolder(top.path / "stage1").read_classes())
    final = results[-1]
    top.update_summary(
        status="finished",
        **{k: final.get(k) for k in ("test_acc", "test_acc5", "best_val_acc", "params") if k in final},
        wall_time_s=round(sum(r.get("wall_time_s", 0.0) for r in results), 2),
    )
    return top


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
    console = Console(quiet=quiet, stderr=False, highlight=False, soft_wrap=True)
    run, cfg = _make_run(cfg, resume, force)
    saved_split = None
    last_ckpt = None
    if resume:
        from classlab.config import apply_overrides

        saved = run.read_config_tree()
        cfg = validate(apply_overrides(saved, overrides or [])) if not isinstance(config, Config) else cfg
        saved_split = run.read_json("split.json")
        last = run.checkpoints / "last.ckpt"
        if last.is_file():
            last_ckpt = last
            done = int(safe_torch_load(last).get("classlab", {}).get("epochs_done", 0))
            if os.environ.get("LOCAL_RANK", "0") == "0":
                run.truncate_metrics(done + 1)
        elif os.environ.get("LOCAL_RANK", "0") == "0":
            run.truncate_metrics(1)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    data = load_data(cfg, split=saved_split)
    # The model is built (parameter budget, init_from, stage weights) before the run folder exists.
    model = build_network(cfg, data)
    if start_from is not None and not resume:
        _load_stage_weights(model.net, start_from)
    is_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    if is_zero and not resume:
        run.path.mkdir(parents=True, exist_ok=False)
        run.write_config(cfg.to_dict())
        run.write_classes(data.classes)
        if cfg.task == "multitask":
            from classlab.multitask import TASKS_FILE, TaskLayout

            run.write_json(TASKS_FILE, TaskLayout.from_config(cfg, data.tasks or {}).to_json())
        run.write_json("split.json", data.split)
        if data.bad:
            from classlab.run import atomic_write_text

            atomic_write_text(run.path / "skipped_images.txt", "\n".join(data.bad) + "\n")
    params = count_params(model.net)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)

    batch = cfg.data.batch_size
    train_loader = data.train.loader(
        batch, shuffle=True, seed=cfg.seed, size=data.size, workers=cfg.data.workers, sampler=cfg.data.sampler
    )
    val_loader = (
        data.val.loader(batch, shuffle=False, seed=cfg.seed, size=data.size, workers=cfg.data.workers)
        if data.val
        else None
    )
    mean = data.mean if data.mean.ndim == 1 else data.mean.mean((1, 2))
    fill = tuple(int(round(float(v) * 255)) for v in mean)
    if cfg.task == "multitask":
        from classlab.multitask import MultiTaskTask, TaskLayout

        layout = TaskLayout.from_config(cfg, data.tasks or {})
        task: ClassifyTask = MultiTaskTask(
            model, cfg, layout, data.size, steps_per_epoch=len(train_loader), fill=fill, train_labels=data.train.labels
        )
    else:
        task = _classify_task(cfg, model, data, len(train_loader), fill)
    task.has_val = val_loader is not None
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if is_zero:
        run.update_summary(
            status="running",
            exp_name=run.path.name,
            task=cfg.task,
            dataset=cfg.data.dataset,
            model=cfg.model.name,
            params=params,
            epochs=cfg.epochs,
            image_size=data.size,
            loader=data.mode,
            images={"train": len(data.train), "val": len(data.val or []), "test": len(data.test or [])},
            skipped_images=len(data.bad),
            started_at=started,
            versions=_versions(),
        )
        console.print(
            f"[bold]classlab[/bold] {cfg.task} {cfg.model.name} ({params:,} parameters) on {cfg.data.dataset}: "
            f"{len(data.train)} train / {len(data.val or [])} val / {len(data.test or [])} test images at "
            f"{data.size}px, {data.mode} loader -> {run.path}"
        )
    metric_columns = getattr(task, "metric_columns", None)
    extra_columns = metric_columns() if callable(metric_columns) else []
    recorder = RunRecorder(
        run,
        extra={"classes": data.classes, "image_size": data.size, "channels": data.channels, "task": cfg.task},
        keep_every=cfg.trainer.keep_every,
        console=console if is_zero else None,
        columns=[*METRIC_COLUMNS, *extra_columns] if extra_columns else None,
    )
    os.environ[RUN_DIR_ENV] = str(run.path.resolve())
    accelerator = _accelerator(cfg)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_epochs=cfg.epochs,
        max_steps=cfg.trainer.max_steps or -1,
        check_val_every_n_epoch=cfg.trainer.val_every,
        gradient_clip_val=cfg.trainer.clip_grad,
        deterministic=True
        if accelerator == "cpu" and cfg.trainer.deterministic
        else ("warn" if cfg.trainer.deterministic else False),
        callbacks=[
            recorder,
            *_checkpoint_callbacks(cfg, run, val_loader is not None, len(train_loader)),
            *_progress(console, cfg.trainer.progress and not quiet),
        ],
        logger=_tb_logger(run),
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=True,
        enable_progress_bar=cfg.trainer.progress and not quiet and console.is_terminal,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, len(train_loader))),
        default_root_dir=str(run.path),
        use_distributed_sampler=True,
    )
    if cfg.trainer.compile:
        task.model.net = torch.compile(task.model.net)
    try:
        trainer.fit(
            task, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=last_ckpt, weights_only=True
        )
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after its callbacks ran (RunRecorder saved last.ckpt).
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        raise KeyboardInterrupt
    if not trainer.is_global_zero:
        return run
    return _finish(run, cfg, data, task, recorder, console)


def _classify_task(
    cfg: Config, model: ClassifierModel, data: DataBundle, steps: int, fill: tuple[int, ...]
) -> ClassifyTask:
    """The single-label LightningModule, with ``loss.class_weights`` counted on the training split."""
    from classlab.engine.losses import class_weight_tensor

    weights = class_weight_tensor(cfg.loss.class_weights, data.train.labels, data.classes)
    return ClassifyTask(
        model, cfg, data.num_classes, data.size, steps_per_epoch=steps, fill=fill, class_weights=weights
    )


def _tb_logger(run: RunFolder) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(run.path), name="tb", version="", default_hp_metric=False)


def _autocast(cfg: Config, device: torch.device) -> Any:
    import contextlib

    if cfg.trainer.precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _tta_test(
    model: torch.nn.Module, loader: Any, modes: str, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain logits, labels, TTA probabilities) in one pass: the first view is the image itself."""
    from classlab.engine.tta import average_softmax, parse_tta, tta_views

    plan = parse_tta(modes, size)
    if plan.scales:
        raise ClassLabError(f"trainer.test_tta={modes!r}: only batch-level views (flip, translate) at the final test")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    plain, probs, labels = [], [], []
    try:
        for x, y in loader:
            views = tta_views(x.to(device), plan.batch_modes, size)
            plain.append(model(views[0]).float().cpu())
            probs.append(
                ((average_softmax(model, views[1:]) * (len(views) - 1)).cpu() + plain[-1].softmax(1)) / len(views)
            )
            labels.append(y)
    finally:
        model.train(was_training)
    return torch.cat(plain), torch.cat(labels), torch.cat(probs)


def _finish(
    run: RunFolder, cfg: Config, data: DataBundle, task: ClassifyTask, recorder: RunRecorder, console: Console
) -> RunFolder:
    """Test on the best checkpoint (by trainer.monitor), write the summary, say where the run is."""
    rows = run.read_metrics()
    best_name = "best" if (run.checkpoints / "best.ckpt").is_file() else "last"
    summary: dict[str, Any] = {
        "epochs_done": int(rows[-1]["epoch"]) if rows else 0,
        "wall_time_s": round(recorder.elapsed(), 2),
    }
    val_rows = [r for r in rows if r.get("val/acc")]
    if val_rows:
        best = max(val_rows, key=lambda r: float(r["val/acc"]))
        summary.update(best_val_acc=float(best["val/acc"]), best_epoch=int(best["epoch"]))
        if best.get("val/f1"):
            summary.update(best_val_f1=float(best["val/f1"]))
        # Multitask: each task's validation accuracy at that epoch (val/acc is the combined class).
        summary.update({k: float(v) for k, v in best.items() if k.startswith("val/") and k.count("/") == 2 and v})
    if data.test is not None and len(data.test):
        tested = time.perf_counter()
        state = safe_torch_load(run.checkpoint(best_name))["state_dict"]
        task.load_state_dict(state, strict=False)
        loader = data.test.loader(cfg.data.batch_size, shuffle=False, seed=0, size=data.size, workers=cfg.data.workers)
        # The test runs in the training precision: bf16 weights were trained to work in bf16, and
        # for the fast recipe the (TTA) test is part of the timed run.
        with _autocast(cfg, task.device):
            if cfg.trainer.test_tta and cfg.task != "rotation":
                logits, labels, tta_probs = _tta_test(task.model, loader, cfg.trainer.test_tta, data.size)
                summary.update(test_acc_tta=top_k_accuracy(tta_probs, labels, 1), test_tta=cfg.trainer.test_tta)
            elif cfg.task == "multitask":
                from classlab.multitask import predict_tasks, task_accuracies, task_f1_scores

                task_logits, logits, labels = predict_tasks(task.model, loader)
                summary.update(task_accuracies(task.layout, task_logits, labels, "test"))
                summary.update(task_f1_scores(task.layout, task_logits, labels, "test"))
            else:
                logits, labels = predict_logits(task.model, loader, rotation=cfg.task == "rotation")
        summary.update(
            test_acc=top_k_accuracy(logits, labels, 1),
            test_acc5=top_k_accuracy(logits, labels, min(5, logits.shape[1])),
            test_f1=macro_f1(logits, labels),
            test_checkpoint=best_name,
            test_time_s=round(time.perf_counter() - tested, 2),
        )
    summary.update(status="finished", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    run.update_summary(**summary)
    shown = ", ".join(
        f"{k} {summary[k]:.4f}" for k in ("best_val_acc", "test_acc") if isinstance(summary.get(k), float)
    )
    console.print(f"finished in {summary['wall_time_s']:.0f}s: {shown}")
    console.print(f"run folder: {run.path}")
    return run
