"""The experiment configuration: one validated, frozen description of a run.

Everything a run does is decided here, before any folder is created, so a typo fails in a
second with one line instead of an hour into training. YAML files, the older INI files and
``key=value`` overrides all land on the same pydantic schema; its error messages are turned
into one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import configparser
import copy
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from classlab.errors import ConfigError, did_you_mean

DATASETS = ("sample", "cifar10", "cifar100", "stl10", "mnist", "fashion_mnist", "folder", "csv")


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RunSection(Section):
    root: str = Field("runs", description="folder that holds run folders")


class DataSection(Section):
    dataset: Literal["sample", "cifar10", "cifar100", "stl10", "mnist", "fashion_mnist", "folder", "csv"] = "sample"
    root: str | None = Field(None, description="dataset folder; relative paths resolve against the config file")
    csv_file: str | None = None
    test_csv_file: str | None = Field(None, description="manifest of the labelled test images (same columns)")
    path_column: str = "path"
    label_column: str = "label"
    group_column: str | None = None
    classes: list[str] | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=8, le=2048, description="training resolution; None = the data's own")
    batch_size: int = Field(128, ge=1, le=65536)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    images_per_class: int | None = Field(None, ge=1)
    skip_bad_images: bool = False
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_mb: int = Field(4096, ge=1, description="largest decoded dataset the memory loader takes")
    cache_dir: str | None = None
    workers: int = Field(0, ge=0, le=64, description="DataLoader workers of the stream loader")
    sampler: Literal["random", "balanced"] = Field(
        "random",
        description="training order: 'random' (each image once an epoch) or 'balanced' (seeded draws with "
        "replacement, each class equally likely; same number of images an epoch)",
    )
    folds: int | None = Field(
        None, ge=2, le=100, description="k-fold cross-validation: K folds (stratified, grouped by group_column)"
    )
    fold: int | None = Field(None, ge=0, description="which fold (0..K-1) is validation; needs data.folds")


class AugSection(Section):
    crop_padding: int = Field(4, ge=0, le=64, description="random crop with this zero padding (0 = off)")
    translate: int = Field(0, ge=0, le=64, description="random translation by up to this many pixels, reflect padded")
    flip: bool | Literal["alternate"] = Field(
        True, description="random mirror; 'alternate': each image mirrored every other epoch (airbench)"
    )
    vflip: bool = False
    random_resized_crop: tuple[float, float] | None = Field(None, description="scale range, e.g. [0.35, 1.0]")
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="random rotation in degrees")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0)
    autoaugment: Literal["cifar10", "imagenet", "svhn"] | None = None
    randaugment: tuple[int, int] | None = Field(None, description="[num_ops, magnitude]")
    trivialaugment: bool = False
    cutout: int = Field(0, ge=0, le=512, description="cutout square side in pixels (0 = off)")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of random erasing")
    mean_subtraction: Literal["channel", "pixel"] = "channel"
    mixup_alpha: float = Field(0.0, ge=0.0)
    cutmix_alpha: float = Field(0.0, ge=0.0)
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)


class TaskHead(Section):
    classes: int | None = Field(None, ge=2)
    column: str | None = None
    weight: float = Field(1.0, ge=0.0)


class ModelSection(BaseModel):
    """Model keys: the generic ones are listed; family parameters (depth, layers, ...) are checked by the registry."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = "cnn"
    preset: str | None = None
    depth: int | None = None
    layers: list[int | str] | None = None
    widths: list[int] | None = None
    max_params: int | None = Field(None, ge=1)
    truncate_at: int | None = Field(None, ge=0)
    head_conv: bool = True
    head: Literal["linear", "conv_fc", "mlp"] = "linear"
    freeze: str = "none"
    init_from: str | None = None
    pretrained: bool = False
    pretrained_path: str | None = None
    tasks: dict[str, TaskHead] | None = None
    fusion: Literal["none", "attention", "attention_only"] | None = Field(
        None,
        description="multitask: 'attention' = product of the task heads plus an attention correction; "
        "'attention_only' = the combined prediction comes from the attention-fused task features alone",
    )

    @field_validator("freeze")
    @classmethod
    def _freeze_form(cls, value: str) -> str:
        if value in ("none", "all") or (value.startswith("up_to:") and value[6:].isdigit()):
            return value
        raise ValueError("allowed: 'none', 'all' or 'up_to:<block>' such as 'up_to:3'")

    def spec(self) -> dict[str, Any]:
        """The plain dict the model registry builds from."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class OptimSection(Section):
    name: Literal["sgd", "adam", "adamw", "radam", "lars", "lamb", "rangerlars"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=100.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    decay_norm_and_bias: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    lookahead: bool = False
    lookahead_k: int = Field(5, ge=1)
    lookahead_alpha: float = Field(0.5, gt=0.0, le=1.0)
    lookahead_schedule: Literal["constant", "cubic"] = Field(
        "constant", description="cubic: alpha falls from 1 to lookahead_alpha as (step/total)^3, BN stats too"
    )
    backbone_lr_scale: float = Field(1.0, ge=0.0)
    norm_lr_scale: float = Field(
        1.0, gt=0.0, description="lr multiplier of normalization layers' parameters; their weight decay / it"
    )


class SchedSection(Section):
    name: Literal["multistep", "cosine", "restarts", "onecycle", "cyclic", "plateau", "constant", "triangle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    start_factor: float = Field(0.2, ge=0.0, le=1.0, description="triangle: lr at step 0 as a fraction of the peak")
    milestones: list[float] = Field(
        default_factory=list, description="epochs at which multistep multiplies lr by gamma"
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    min_lr: float = Field(0.0, ge=0.0)
    restart_period: float = Field(10.0, gt=0.0, description="epochs of the first cosine cycle")
    restart_mult: float = Field(1.0, ge=1.0, description="each cycle is this much longer than the last")
    restart_decay: float = Field(1.0, gt=0.0, le=1.0, description="each cycle's peak lr is this fraction of the last")
    plateau_patience: int = Field(5, ge=0)


ClassWeights = Literal["balanced"] | dict[str, float]


class LossSection(Section):
    name: Literal["crossentropy", "focal"] = Field(
        "crossentropy", description="'focal': cross-entropy times (1 - p_true)^focal_gamma (Lin et al. 2017)"
    )
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0, description="focal loss focusing exponent (0 = cross-entropy)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: ClassWeights | dict[str, ClassWeights] | None = Field(
        None,
        description="per-class loss weights: 'balanced' (n / (k * n_class) on the training split) or "
        "{class: weight} (unlisted classes 1.0); multitask: the same for every task, or {task: ...}",
    )


class TrainerSection(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | list[int] | Literal["auto"] = 1
    num_nodes: int = Field(1, ge=1)
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_notebook"] = "auto"
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op CPU threads (None = all cores)")
    val_every: int = Field(1, ge=1)
    monitor: str = "val/acc"
    patience: int | None = Field(None, ge=1, description="early stopping after this many validations without gain")
    clip_grad: float | None = Field(None, gt=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    keep_every: int | None = Field(None, ge=1, description="also keep checkpoints/epochN.ckpt every N epochs")
    deterministic: bool = True
    channels_last: bool = True
    compile: bool = False
    progress: bool = True
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    test_tta: str | None = Field(None, description="views for the final test, e.g. 'flip,translate' (engine.tta)")


class Config(Section):
    """The whole experiment. Field names are the config keys of DESIGN.md."""

    exp_name: str | None = Field(None, description="run folder name; default <dataset>_<model>, numbered if taken")
    seed: int = 0
    epochs: int = Field(20, ge=1, le=100000)
    task: Literal["classify", "rotation", "multitask"] = "classify"
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    aug: AugSection = Field(default_factory=AugSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    sched: SchedSection = Field(default_factory=SchedSection)
    loss: LossSection = Field(default_factory=LossSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    stages: list[dict[str, Any]] | None = None

    @field_validator("exp_name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value or value in (".", "..") or any(c in value for c in "/\\\0") or value.strip() != value:
            raise ValueError("a plain folder name: no slashes, not empty, no leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.dataset in ("folder", "csv") and not self.data.root:
            raise ValueError(
                f"data.root is required for data.dataset={self.data.dataset}: the folder holding the images"
            )
        if self.data.dataset == "csv" and not self.data.csv_file:
            raise ValueError("data.csv_file is required for data.dataset=csv: the manifest with path and label columns")
        if self.data.test_csv_file and self.data.dataset != "csv":
            raise ValueError("data.test_csv_file needs data.dataset=csv (folders take their test set from root/test)")
        if self.data.group_column and self.data.dataset != "csv":
            raise ValueError("data.group_column needs data.dataset=csv (groups come from a manifest column)")
        if self.stages and _explicit_processes(self.trainer) > 1:
            raise ValueError(
                "stages run in one process only (DDP re-launches the whole command per stage); run each stage as "
                "its own run instead: the second with the stage's keys as overrides and model.init_from=<first run>"
            )
        _check_folds_and_weights(self)
        if self.task == "multitask" and not self.model.tasks:
            raise ValueError("task=multitask needs model.tasks: a mapping task name -> {column, weight}")
        if self.task == "multitask":
            _check_multitask(self)
        elif self.model.fusion not in (None, "none"):
            raise ValueError("model.fusion needs task=multitask (it mixes the features of several task heads)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _explicit_processes(trainer: TrainerSection) -> int:
    """Training processes the config asks for in so many words ("auto" devices are resolved at train time)."""
    devices = trainer.devices
    per_node = len(devices) if isinstance(devices, list) else (devices if isinstance(devices, int) else 1)
    return per_node * trainer.num_nodes


def _check_folds_and_weights(cfg: Config) -> None:
    """k-fold keys agree with each other; class weights are numbers above zero."""
    if cfg.data.fold is not None and cfg.data.folds is None:
        raise ValueError("data.fold needs data.folds (the number of folds), e.g. data.folds=5 data.fold=0")
    if cfg.data.folds is not None and cfg.data.fold is not None and cfg.data.fold >= cfg.data.folds:
        raise ValueError(
            f"data.fold={cfg.data.fold} but data.folds={cfg.data.folds}: folds are 0..{cfg.data.folds - 1}"
        )
    if cfg.data.folds is not None and cfg.data.images_per_class:
        raise ValueError("data.folds and data.images_per_class cannot be combined: folds cover every image")
    if cfg.task == "rotation" and (cfg.loss.class_weights is not None or cfg.data.sampler != "random"):
        raise ValueError("loss.class_weights / data.sampler=balanced do not apply to task=rotation (no labels)")
    mixing = cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0
    if mixing and (cfg.loss.class_weights is not None or cfg.loss.name != "crossentropy"):
        raise ValueError(
            "loss.class_weights and loss.name=focal need hard labels: set aug.mixup_alpha/cutmix_alpha to 0"
        )
    weights = cfg.loss.class_weights
    maps = list(weights.values()) if isinstance(weights, dict) else []
    for value in [weights, *maps]:
        if isinstance(value, dict) and any(not v > 0 for v in value.values() if isinstance(v, (int, float))):
            raise ValueError("loss.class_weights: every weight must be above 0")


def _check_multitask(cfg: Config) -> None:
    """Multi-task runs read their labels from manifest columns, and task names become metric keys."""
    if cfg.data.dataset != "csv":
        raise ValueError("task=multitask needs data.dataset=csv: a manifest with one label column per task")
    if cfg.data.classes is not None:
        raise ValueError("data.classes does not apply to task=multitask: each task's classes come in natural order")
    if cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0:
        raise ValueError("aug.mixup_alpha / aug.cutmix_alpha are not supported with task=multitask; set them to 0")
    for name in cfg.model.tasks or {}:
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"model.tasks: task name {name!r} must be letters, digits, '_' or '-' (it names metrics)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{part}' holds a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=0.05`` -> ("optim.lr", 0.05); values are read as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (for example optim.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key before '=' (for example epochs=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (exp_name: ..., data: ...)")
    return tree


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _one_line(error: ValidationError, tree: dict[str, Any]) -> str:
    """The first pydantic error as one line a user can act on."""
    err = error.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        known = _known_keys(Config)
        return f"unknown config key '{loc}'{did_you_mean(loc, known)}" + (
            f"; valid keys of '{section}' are listed by `classlab train --print-config`" if section else ""
        )
    value = err.get("input")
    if not loc:
        return err["msg"].removeprefix("Value error, ")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        msg = "allowed: " + msg.removeprefix("Input should be ")
    shown = repr(value) if not isinstance(value, dict) else "a section"
    return f"config key '{loc}' = {shown}: {msg}"


def validate(tree: dict[str, Any]) -> Config:
    """Validate a raw config tree; raise ConfigError with one line on the first problem."""
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, tree)) from None
    _validate_model(cfg)
    for k in range(len(cfg.stages or [])):
        try:
            stage = stage_config(cfg, k)
        except ConfigError as exc:
            raise ConfigError(f"stages[{k}]: {exc}") from None
        if _explicit_processes(stage.trainer) > 1:
            raise ConfigError(
                f"stages[{k}]: stages run in one process only; drop its trainer.devices / trainer.num_nodes"
            )
    return cfg


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``; its keys may be nested sections or dotted paths."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if "." in key:
            _set_dotted(out, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stage_config(cfg: Config, k: int) -> Config:
    """Stage k of a multi-stage run: the base config with the stage's overrides laid over it."""
    base = cfg.to_dict()
    base.pop("stages", None)
    stage = cfg.stages[k]
    if not isinstance(stage, dict):
        raise ConfigError("each stage is a mapping of overrides, e.g. {data.image_size: 64, epochs: 5}")
    tree = deep_merge(base, stage)
    if "stages" in stage:
        raise ConfigError("a stage cannot have stages of its own")
    return validate(tree)


def _validate_model(cfg: Config) -> None:
    from classlab.models import validate_model_spec

    validate_model_spec(cfg.model.spec())


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("root", "csv_file", "cache_dir"):
            value = data.get(key)
            if isinstance(value, str) and value and key != "csv_file":
                data[key] = str((base / Path(value).expanduser()).resolve())
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained_path"), str):
        model["pretrained_path"] = str((base / Path(model["pretrained_path"]).expanduser()).resolve())


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML or INI file (or the defaults), apply overrides and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; give a YAML or INI file, or no file for the defaults")
        if path.suffix.lower() in (".ini", ".cfg"):
            tree = read_ini(path)
        else:
            tree = _read_yaml(path)
        _resolve_paths(tree, path.parent.resolve())
    tree = apply_overrides(tree, overrides or [])
    _resolve_paths(tree, Path.cwd())
    return validate(tree)


# ---------------------------------------------------------------------------------------------
# INI files of RotNet-style projects
# ---------------------------------------------------------------------------------------------

_INI_PLAIN = {
    "seed": "seed",
    "exp_name": "exp_name",
    "batch_size": "data.batch_size",
    "epochs": "epochs",
    "lr": "optim.lr",
    "val_freq": "trainer.val_every",
    "worker": "data.workers",
    "root": "data.root",
    "num_imgs_per_cat": "data.images_per_class",
    "optim": "optim.name",
    "transfer": "model.init_from",
    "block_op": "model.truncate_at",
    "cutmix_alpha": "aug.cutmix_alpha",
    "cutmix_prob": "aug.mix_prob",
    "labelsmooth": "loss.label_smoothing",
    "hflip": "aug.flip",
    "autoaug": "aug.autoaugment",
    "resize": "data.image_size",
}
_INI_SPECIAL = ("model", "depth", "gpus", "unsuper", "dataset", "scheduler", "criterion", "no_head")
_INI_KEYS = tuple(_INI_PLAIN) + _INI_SPECIAL


def _ini_value(raw: str) -> Any:
    raw = raw.strip()
    if raw == "":
        return None
    low = raw.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _ini_model_name(model: str | None, depth: Any) -> str | None:
    if model is None:
        return None
    model = str(model).lower()
    if model == "resnet":
        if depth not in (18, 34, 50, 101, 152):
            raise ConfigError(f"INI: model=resnet needs depth 18, 34, 50, 101 or 152 (got {depth!r})")
        return f"resnet{depth}"
    if model == "efficientnet":
        if depth not in range(8):
            raise ConfigError(f"INI: model=efficientnet needs depth 0..7 for B0..B7 (got {depth!r})")
        return f"efficientnet_b{depth}"
    return model


def read_ini(path: Path) -> dict[str, Any]:
    """Map an ``[EXP] [DATASET] [MODEL]`` INI file onto the config tree (DESIGN.md's table)."""
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigError(f"{path}: not a valid INI file: {str(exc).splitlines()[0]}") from None
    values: dict[str, Any] = {}
    for section in parser.sections():
        if section.upper() not in ("EXP", "DATASET", "MODEL"):
            raise ConfigError(f"{path}: unknown INI section [{section}]; allowed: [EXP], [DATASET], [MODEL]")
        for key, raw in parser.items(section):
            if key not in _INI_KEYS:
                raise ConfigError(
                    f"{path}: INI key '{key}' in [{section}] is not supported{did_you_mean(key, _INI_KEYS)}"
                )
            values[key] = _ini_value(raw)
    tree: dict[str, Any] = {}
    for key, dotted in _INI_PLAIN.items():
        if values.get(key) is not None:
            _set_dotted(tree, dotted, values[key])
    name = _ini_model_name(values.get("model"), values.get("depth"))
    if name:
        _set_dotted(tree, "model.name", name)
    if values.get("unsuper") is True:
        tree["task"] = "rotation"
    if values.get("no_head") is True:
        _set_dotted(tree, "model.head_conv", False)
    dataset = values.get("dataset")
    if dataset is not None:
        _set_dotted(tree, "data.dataset", {"fasion": "folder", "fashion": "folder"}.get(str(dataset).lower(), dataset))
    scheduler = values.get("scheduler")
    if scheduler is not None:
        _set_dotted(tree, "sched.name", {"reducelr": "plateau"}.get(str(scheduler).lower(), scheduler))
    criterion = values.get("criterion")
    if criterion is not None:
        if str(criterion).lower() not in ("crossentropy", "focal"):
            raise ConfigError(f"{path}: criterion={criterion} is not supported; use 'crossentropy' or 'focal'")
        _set_dotted(tree, "loss.name", str(criterion).lower())
    gpus = values.get("gpus")
    if gpus is not None:
        _set_dotted(tree, "trainer.devices", _ini_gpus(gpus))
    return tree


def _ini_gpus(gpus: Any) -> Any:
    """``gpus = 0,1`` -> devices [0, 1] on a GPU machine; on a machine without one, warn once and use the CPU."""
    ids = [int(g) for g in str(gpus).replace(" ", "").split(",") if g != ""]
    import torch

    if not ids:
        return 1
    if not torch.cuda.is_available():
        warnings.warn(f"gpus = {gpus} asked for GPUs but none is available: training on the CPU", stacklevel=2)
        return 1
    return ids


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
