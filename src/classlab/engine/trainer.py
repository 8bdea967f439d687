"""Assembling a fit: the network, the LightningModule, the Lightning Trainer, and the final test.

The verb (``train.py``) decides *what* runs and where it is written; this module decides *how*:
devices and precision, the callbacks that checkpoint and stop early, the loggers, and the test
of the best checkpoint through the same eval loop as ``classlab eval``.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console

from classlab.config import Config, flatten, init_from_parts, yaml_text
from classlab.data.pipeline import DataBundle
from classlab.data.preprocess import Normalize
from classlab.data.tasks import TaskLayout
from classlab.engine import loggers as tracking
from classlab.engine.callbacks import AtomicCheckpointIO, GracefulStop, RunRecorder, ValidateLastEpoch
from classlab.engine.finetune import UnfreezeBackbone
from classlab.engine.losses import class_weight_tensor
from classlab.engine.metrics import macro_f1, rounded, task_accuracies, task_f1_scores, top_k_accuracy
from classlab.engine.nonfinite import NonFiniteGuard
from classlab.engine.optim import ScheduledLookahead, lookahead_k, lookahead_schedule
from classlab.engine.predict import autocast, predict_split
from classlab.engine.task import ClassifyTask, MultiTaskTask
from classlab.engine.tta import test_with_tta
from classlab.errors import ClassLabError, ConfigError, first_line
from classlab.models import build_model, load_backbone_weights, pretrained
from classlab.models.multitask import build_multitask_net
from classlab.models.net import ClassifierModel
from classlab.run import RunFolder, fold_runs, is_fold_group, is_run_folder, open_run, safe_torch_load

# ---------------------------------------------------------------------------------------------
# The network and the LightningModule
# ---------------------------------------------------------------------------------------------


def _one_run(folder: Path) -> None:
    """A k-fold folder or a folder of runs (a sweep's, run.root) is refused naming one of its runs: not with
    open_run's line, whose hint for predict/eval (several runs with --ensemble mean) does not apply to a transfer."""
    if is_run_folder(folder) or not folder.is_dir():
        return
    inner = fold_runs(folder) if is_fold_group(folder) else sorted(p for p in folder.iterdir() if is_run_folder(p))
    if not inner:
        return
    what = "a k-fold folder (one run per fold)" if is_fold_group(folder) else f"a folder of {len(inner)} runs"
    raise ClassLabError(
        f"'{folder}' is {what}, not one run: model.init_from starts from the weights of one run; give one of them "
        f"(model.init_from={inner[0]}, or {inner[0]}:<checkpoint>)"
    )


def resolve_init_from(spec: str) -> Path:
    """``runs/rot:epoch5`` -> runs/rot/checkpoints/epoch5.ckpt (``runs/rot`` alone -> best)."""
    folder, name = init_from_parts(spec)
    if Path(folder).is_file():  # a run's own checkpoint file is read as run:name by the config (ModelSection)
        raise ClassLabError(
            f"'{folder}' is a file, not a run folder: model.init_from takes a run folder, with a checkpoint name "
            "after ':' (runs/rot:epoch5) or as the path of one of its checkpoints/*.ckpt; for a weights file of "
            "your own use model.pretrained_path"
        )
    _one_run(Path(folder))
    return open_run(Path(folder)).checkpoint(name)


def _net_state(path: Path, state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The network's tensors of a classlab checkpoint, under the network's own names."""
    state = safe_torch_load(path)["state_dict"] if state is None else state
    return {k.removeprefix("model.net."): v for k, v in state.items() if k.startswith("model.net.")}


NORMALIZATION_DRIFT = 0.02  # in [0, 1] pixel units: mean or std farther apart than this is worth a note


def _normalization_note(spec: str, state: dict[str, Any], normalize: Normalize) -> str | None:
    """A note when the run ``init_from`` names normalised its inputs otherwise than this run will: the backbone
    learned on inputs of that scale (another data set, a fixed Normalize). The figure stays the user's choice:
    classlab's transfer recipes were measured with the new data's statistics, so this run keeps them."""
    mean, std = state.get("model.normalize.mean"), state.get("model.normalize.std")
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor) or mean.shape != normalize.mean.shape:
        return None
    if mean.shape[-2:] != (1, 1) or std.shape != normalize.std.shape:
        return None  # a per-pixel mean image: nothing a user could set in aug.norm_mean
    drift = max(float((mean - normalize.mean).abs().max()), float((std - normalize.std).abs().max()))
    if drift <= NORMALIZATION_DRIFT:
        return None

    def shown(t: torch.Tensor) -> str:
        return "[" + ",".join(f"{v:.4f}" for v in t.flatten().tolist()) + "]"

    return (
        f"note: model.init_from={spec} normalised its inputs with mean {shown(mean)} std {shown(std)}, this run "
        f"with {shown(normalize.mean)} / {shown(normalize.std)} (its training split's); to feed the backbone "
        f"inputs as it learned them: aug.norm_mean={shown(mean)} aug.norm_std={shown(std)}"
    )


# The keys that shape a backbone: a run that set one of them otherwise has tensors of other shapes.
SHAPE_KEYS = (
    "model.name", "model.preset", "model.depth", "model.layers", "model.widths", "model.activation",
    "model.batchnorm", "model.conv_bias", "model.truncate_at", "model.head_conv",
)  # fmt: skip


def _source_differences(path: Path, cfg: Config, data: DataBundle) -> str:
    """What the run ``path`` comes from was built or fed otherwise than this one: where a shape mismatch comes
    from. The images' channels are none of the model's settings, so 'build the model as that run did' alone sent a
    transfer from greyscale to colour images (or back) looking through model keys for a fix it could not find."""
    try:
        there = flatten(RunFolder(path.parent.parent).read_config_tree())
        meta = safe_torch_load(path).get("classlab") or {}
    except (ClassLabError, OSError, ValueError):
        return ""
    here = flatten(cfg.to_dict())

    def shown(value: Any) -> str:
        return "[" + ",".join(map(shown, value)) + "]" if isinstance(value, list) else yaml_text(value)

    diffs = [f"{k} ({shown(there.get(k))} there, {shown(here.get(k))} here)" for k in SHAPE_KEYS
             if there.get(k) != here.get(k)]  # fmt: skip
    if meta.get("channels") not in (None, data.channels):
        diffs.append(f"the images' channels ({meta['channels']} there, {data.channels} here: no model setting "
                     "changes them; pretrain on images with as many channels as this data has)")  # fmt: skip
    if not diffs and meta.get("image_size") not in (None, data.size):  # a pooling network takes any size
        diffs.append(f"the image size ({meta['image_size']} px there, {data.size} px here: data.image_size)")
    return f"; that run differs from this one in {', '.join(diffs)}" if diffs else ""


def _load_init_from(net: torch.nn.Module, cfg: Config, data: DataBundle) -> dict[str, Any]:
    """The backbone of another run; what was loaded is said in the run's first lines, since a transfer
    that silently took half the tensors (another depth, a truncated source) looks like a poor result.
    A frozen layer the run did not fill would stay random for good, so that is refused."""
    spec, freeze = str(cfg.model.init_from), cfg.model.freeze
    path = None
    try:
        path = resolve_init_from(spec)
        state = safe_torch_load(path)["state_dict"]
        loaded = load_backbone_weights(net, _net_state(path, state))
    except ClassLabError as exc:
        why = _source_differences(path, cfg, data) if path is not None else ""
        raise type(exc)(f"model.init_from={spec}: {exc}{why}") from None
    left = set(loaded["missing"])
    frozen = [k for k, p in net.named_parameters() if not p.requires_grad and k in left]
    if frozen:
        shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
        raise ConfigError(
            f"model.init_from={spec}: model.freeze={freeze} would freeze {len(frozen)} tensor(s) that run's "
            f"checkpoint does not hold ({shown}), leaving them random: build the model as that run did, cut it "
            "to the blocks it has (model.truncate_at), or freeze fewer blocks (model.freeze=up_to:K)"
        )
    source = RunFolder(path.parent.parent)
    return {
        "run": str(source.path),
        "checkpoint": path.name,
        "task": source.read_config_tree().get("task") or "classify",
        "loaded_tensors": len(loaded["loaded"]),
        "left": loaded["missing"],
        "source_state": state,  # for the normalisation note (build_network); not written to the summary
    }


def init_from_line(report: dict[str, Any]) -> str:
    """One line: which run's weights, how many tensors, which backbone tensors kept their initial values."""
    left = report["left"]
    shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    return (
        f"model.init_from: {report['task']} run {report['run']} ({report['checkpoint']}): loaded "
        f"{report['loaded_tensors']} backbone tensors, left {len(left)} at their initial values"
        + (f": {shown}" if left else "")
    )


def _refill_as_at_start(net: torch.nn.Module, report: dict[str, Any]) -> dict[str, Any]:
    """A resumed run's init_from without its source: the tensors the source filled at the start (all but the
    report's ``left``) go through the same loading, so what that froze freezes alike; their values are the model's
    own, as the checkpoint the run resumes from replaces them all. Before, --resume read the source again and
    stopped when it had moved."""
    left = set(report["left"])
    load_backbone_weights(net, {k: v for k, v in net.state_dict().items() if k not in left})
    return {**report, "source_state": {}}


def build_network(
    cfg: Config,
    data: DataBundle,
    resumed: dict[str, Any] | None = None,
    weights_at_start: dict[str, Any] | None = None,
) -> ClassifierModel:
    """Normalisation + the configured network, with init_from weights and data-set layers set.

    ``resumed``: the init_from report (summary.json) of a run resumed from a checkpoint (_refill_as_at_start).
    ``weights_at_start``: the pretrained-weights report (summary.json) of a run whose weights come from a
    checkpoint (resumed, or a later stage): its weights file or hub is not read again.
    """
    spec = cfg.model.spec() if weights_at_start is None else pretrained.without_weights(cfg.model.spec())
    if cfg.task == "multitask":
        net = build_multitask_net(spec, TaskLayout.from_config(cfg, data.tasks or {}), data.channels, data.size)
        inner = net.backbone  # init_from and data-set layers concern the backbone, not the task heads
    else:
        net = inner = build_model(spec, data.num_classes, data.channels, data.size)
    if weights_at_start is not None:
        pretrained.refill_as_at_start(inner, weights_at_start)
        net.weights_at_start = weights_at_start
    if cfg.model.init_from and resumed is not None and "left" in resumed:
        net.init_report = _refill_as_at_start(inner, resumed)
    elif cfg.model.init_from:
        net.init_report = _load_init_from(inner, cfg, data)
    # Pretrained weights bring their own normalisation (ImageNet's, timm's pretrained_cfg), unless aug.norm_mean/std
    # say otherwise: a weights file has no metadata, and weights trained at mean 0.5 / std 0.5 need those.
    weights_own = pretrained.normalization(cfg.model.spec()) if cfg.aug.norm_mean is None else None
    normalize = Normalize(*(weights_own or (data.mean, data.std)))
    if cfg.model.init_from:
        state = net.init_report.pop("source_state")
        if cfg.aug.norm_mean is None and weights_own is None:
            net.init_report["normalization_note"] = _normalization_note(cfg.model.init_from, state, normalize)
    init_from_data = getattr(inner, "init_from_data", None)
    if callable(init_from_data) and not cfg.model.init_from and data.train.images is not None:
        # Layers set from the data before the first step (fastnet's patch whitening): the same
        # normalised images the network will see, a few thousand of them.
        init_from_data(normalize(data.train.images[:5000]))
    return ClassifierModel(normalize, net)


def load_stage_weights(net: torch.nn.Module, path: Path) -> None:
    """All weights of the previous stage whose shapes still fit (a resolution change keeps them all)."""
    own = net.state_dict()
    fitting = {k: v for k, v in _net_state(path).items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ClassLabError(
            f"no weights of {path} fit the next stage's model; stages must keep model.name and its shape"
        )
    net.load_state_dict(fitting, strict=False)


def check_size_schedule(cfg: Config, model: ClassifierModel, channels: int, size: int) -> None:
    """Every size of ``aug.size_schedule`` fits the data and goes through the network, before the first step."""
    sizes = sorted({s for _, s in cfg.aug.size_schedule or ()})
    if not sizes:
        return
    if sizes[-1] > size:
        raise ConfigError(
            f"aug.size_schedule asks for {sizes[-1]} px but images are decoded at {size} px: keep every size "
            f"at most {size}, or raise data.image_size"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in sizes:
                try:
                    model(torch.zeros(1, channels, s, s, dtype=torch.uint8))
                except (RuntimeError, ValueError) as exc:
                    first = first_line(exc)
                    raise ConfigError(
                        f"aug.size_schedule: model {cfg.model.name} cannot take {s} px inputs ({first}); "
                        "progressive resizing needs a network that pools its features (cnn, resnet, fastnet, ...)"
                    ) from exc
    finally:
        model.train(was_training)


def build_task(cfg: Config, data: DataBundle, model: ClassifierModel, steps_per_epoch: int) -> ClassifyTask:
    """The LightningModule of ``cfg.task``; erased boxes are filled with the data's mean colour.

    Everything it refuses (class weights, sizes, early stopping) is refused before the run folder exists.
    """
    if cfg.trainer.patience and not data.val:
        raise ClassLabError("trainer.patience needs a validation set; set data.val_fraction above 0")
    if cfg.sched.name == "plateau" and not data.val:
        raise ClassLabError(
            "sched.name=plateau lowers the lr when val/loss stops falling, so it needs a validation set; set "
            "data.val_fraction above 0, or choose another sched.name (cosine, multistep, ...)"
        )
    check_size_schedule(cfg, model, data.channels, data.size)
    mean = data.mean if data.mean.ndim == 1 else data.mean.mean((1, 2))
    fill = tuple(int(round(float(v) * 255)) for v in mean)
    if cfg.task == "multitask":
        layout = TaskLayout.from_config(cfg, data.tasks or {})
        return MultiTaskTask(
            model, cfg, layout, data.train.labels, image_size=data.size, steps_per_epoch=steps_per_epoch, fill=fill
        )
    # loss.class_weights: counted on the training split
    weights = class_weight_tensor(cfg.loss.class_weights, data.train.labels, data.classes)
    return ClassifyTask(
        model, cfg, data.num_classes, data.size, steps_per_epoch=steps_per_epoch, fill=fill, class_weights=weights
    )


# ---------------------------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------------------------


def accelerator(cfg: Config) -> str:
    if cfg.trainer.accelerator != "auto":
        return "gpu" if cfg.trainer.accelerator == "cuda" else cfg.trainer.accelerator
    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this x86 CPU computes bf16 in hardware (AVX512-BF16 or AMX); other CPUs are not judged (True)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # ARM's bf16 support is not exposed by torch; say nothing rather than guess
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(callable(probe) for probe in probes):
        return True  # a torch without the probes: no claim either way
    return any(callable(probe) and probe() for probe in probes)


def precision_notice(cfg: Config) -> str | None:
    """One line when the chosen precision is emulated on this CPU, where it is slower than fp32, not faster.

    bf16 autocast pays off on CPUs with bf16 instructions (1.7-1.8x on the fast recipe, BENCHMARKS.md);
    on an AVX2-only CPU a step of the recipe nets measured 12-41x *slower* than fp32 (benchmarks/precision_cpu.py), and
    a recipe written on one machine is often run on the other.
    """
    precision = str(cfg.trainer.precision)
    if accelerator(cfg) != "cpu" or not precision.startswith(("bf16", "16")):
        return None
    if precision.startswith("16"):
        return (
            f"note: trainer.precision={precision} on the CPU: float16 has no fast CPU kernels; "
            "use trainer.precision=32-true (or bf16-mixed on a CPU with AVX512-BF16 or AMX)"
        )
    if cpu_has_bf16():
        return None
    return (
        f"note: trainer.precision={precision} on a CPU without bf16 instructions (no AVX512-BF16 or AMX): "
        "bf16 is emulated here, many times slower than fp32; use trainer.precision=32-true on this machine"
    )


def _checkpoint_callbacks(cfg: Config, run: RunFolder, has_val: bool, steps_per_epoch: int) -> list[L.Callback]:
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
            # Decided when validation ends, so RunRecorder sees trainer.should_stop and writes that last epoch.
            stop = EarlyStopping(
                monitor=cfg.trainer.monitor, mode=mode, patience=cfg.trainer.patience, check_on_train_epoch_end=False
            )
            callbacks.append(stop)
    if cfg.trainer.ema_decay:
        from classlab.engine.ema import EMACallback

        callbacks.append(EMACallback(cfg.trainer.ema_decay))
    if lookahead_schedule(cfg.optim) == "cubic":
        total = cfg.epochs * steps_per_epoch
        total = min(total, cfg.trainer.max_steps) if cfg.trainer.max_steps else total
        callbacks.append(ScheduledLookahead(lookahead_k(cfg.optim), cfg.optim.lookahead_alpha, total))
    return callbacks


def stopped_early(trainer: L.Trainer, epochs_done: int, epochs: int) -> dict[str, Any] | None:
    """What ended a run that trainer.patience stopped before its last epoch (epoch, monitor, best value), or None.

    Lightning's EarlyStopping ends the fit without a word: the run said 'finished' after epoch 2 of 8."""
    from lightning.pytorch.callbacks import EarlyStopping

    stop = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    # (a resumed run that then trained to its end keeps the old stopped_epoch in the callback's state)
    if stop is None or not epochs_done < epochs or stop.stopped_epoch + 1 != epochs_done:
        return None
    best = round(float(stop.best_score), 6) if stop.best_score is not None else None
    return {"epoch": epochs_done, "monitor": stop.monitor, "patience": stop.patience, "best": best}


def stopped_early_line(report: dict[str, Any], epochs: int) -> str:
    best = f" on {report['best']:.4f}" if report.get("best") is not None else ""
    return (
        f"stopped early after epoch {report['epoch']} of {epochs}: {report['monitor']} did not improve{best} for "
        f"{report['patience']} validation(s) (trainer.patience={report['patience']})"
    )


def _progress(console: Console, enabled: bool) -> list[L.Callback]:
    if enabled and console.is_terminal:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=False)]
    return []


def build_trainer(
    cfg: Config,
    run: RunFolder,
    recorder: RunRecorder,
    console: Console,
    *,
    has_val: bool,
    steps_per_epoch: int,
    zero: bool = True,
    loggers: list[Any] | None = None,
) -> L.Trainer:
    """The Lightning Trainer of a run: devices, precision, checkpoints, early stopping, progress, logger."""
    device = accelerator(cfg)
    show_progress = cfg.trainer.progress and not console.quiet
    if cfg.trainer.deterministic:
        deterministic: bool | str = True if device == "cpu" else "warn"
    else:
        deterministic = False
    trainer = L.Trainer(
        accelerator=device,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_epochs=cfg.epochs,
        max_steps=cfg.trainer.max_steps or -1,
        check_val_every_n_epoch=cfg.trainer.val_every,
        gradient_clip_val=cfg.trainer.clip_grad,
        deterministic=deterministic,
        callbacks=[
            GracefulStop(),  # first: a stop asked for is seen by the recorder's epoch end
            recorder,
            NonFiniteGuard(
                cfg.trainer.on_nonfinite,
                run if zero else None,
                console if zero else None,
                saved_epochs=lambda: recorder.saved_epochs,
            ),
            *([ValidateLastEpoch()] if cfg.trainer.val_every > 1 else []),
            *_checkpoint_callbacks(cfg, run, has_val, steps_per_epoch),
            *_progress(console, show_progress),
            *tracking.logger_callbacks(loggers or []),
            *([UnfreezeBackbone(cfg.model.unfreeze_at_epoch, console)] if cfg.model.unfreeze_at_epoch else []),
        ],
        logger=loggers if loggers is not None else tracking.build_loggers(cfg, run),
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=True,
        enable_progress_bar=show_progress and console.is_terminal,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(cfg.trainer.log_every, steps_per_epoch)),
        default_root_dir=str(run.path),
        use_distributed_sampler=True,
    )
    # Deterministic mode also makes torch fill every fresh allocation with NaN, a trap for kernels that
    # read memory they never wrote. Torch's kernels do not, so the results are the same without it, and
    # the fill costs: 0.10 s of a 1.0 s step of the fast recipe (benchmarks/step_profile.py), 10%.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


# ---------------------------------------------------------------------------------------------
# The final test
# ---------------------------------------------------------------------------------------------


def final_test(cfg: Config, task: ClassifyTask, loader: Any) -> dict[str, Any]:
    """Test figures of the weights ``task`` holds, for summary.json.

    The test runs in the training precision: bf16 weights were trained to work in bf16, and for
    the fast recipe the (TTA) test is part of the timed run.
    """
    started = time.perf_counter()
    out: dict[str, Any] = {}
    with autocast(cfg, task.device):
        if cfg.trainer.test_tta and cfg.task != "rotation":
            logits, labels, tta_probs = test_with_tta(task.model, loader, cfg.trainer.test_tta, task.image_size)
            out.update(test_acc_tta=top_k_accuracy(tta_probs, labels, 1), test_tta=cfg.trainer.test_tta)
        else:
            multitask = isinstance(task, MultiTaskTask)
            task_logits, logits, labels = predict_split(task.model, loader, multitask, rotation=task.rotation)
            if multitask:
                out.update(task_accuracies(task.layout.names, task_logits, task.layout.split(labels), "test"))
                out.update(task_f1_scores(task.layout, task_logits, labels, "test"))
    out.update(
        test_acc=top_k_accuracy(logits, labels, 1),
        test_acc5=top_k_accuracy(logits, labels, min(5, logits.shape[1])),
        test_f1=macro_f1(logits, labels),
        test_time_s=round(time.perf_counter() - started, 2),
    )
    return rounded(out)
