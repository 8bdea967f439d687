"""The experiment configuration: one validated, frozen description of a run.

Everything a run does is decided here, before any folder is created, so a typo fails in a
second with one line instead of an hour into training. YAML files, the older INI files and
``key=value`` overrides all land on the same pydantic schema; its error messages are turned
into one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import configparser
import copy
import json
import re
import types
import warnings
from collections.abc import Collection
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from classlab.errors import ConfigError, command, did_you_mean, nearest, utf8_text


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too; nan and inf are no
    number a key takes (optim.lr=nan was refused as 'less than or equal to 100', weight_decay=inf was taken)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class RunSection(Section):
    root: str = Field("runs", description="folder that holds the run folders (relative to where you run classlab)")


def class_names(value: list[Any] | tuple[Any, ...], takes: str) -> list[str]:
    """Class names as a config lists them: numbers YAML read from [0, 1, 2] are the names '0', '1', '2', as a
    manifest's column or a folder holds them; yes/no/null and decimals, which YAML turned into other values,
    are refused with the quoting that keeps them names."""
    odd = [v for v in value if not isinstance(v, (str, int)) or isinstance(v, bool)]
    if odd and (odd[0] is None or isinstance(odd[0], (bool, float))):
        raise ValueError(
            f"{odd[0]!r} is not a class name: YAML reads yes/no/true/false/null and decimals as other values; "
            'quote such names, e.g. ["yes", "no", "1.5"]'
        )
    if odd:
        raise ValueError(f"{odd[0]!r} is not a class name; {takes}")
    return [v if isinstance(v, str) else str(v) for v in value]


class DataSection(Section):
    dataset: Literal["sample", "cifar10", "cifar100", "stl10", "mnist", "fashion_mnist", "folder", "csv"] = Field(
        "sample",
        description="where images come from: the embedded sample, a torchvision set, a folder or a CSV "
        "(unset with data.root given: folder, or csv with data.csv_file)",
    )
    root: str | None = Field(None, description="dataset folder; relative paths resolve against the config file")
    csv_file: str | None = Field(None, description="csv: the manifest, relative to data.root")
    test_csv_file: str | None = Field(None, description="csv: manifest of the labelled test images (same columns)")
    val_csv_file: str | None = Field(
        None,
        description="csv: manifest of the labelled validation images (same columns), used as they are in place of "
        "data.val_fraction",
    )
    image_dir: str | None = Field(
        None,
        description="csv: folder the manifests' paths are relative to, itself relative to data.root "
        "(default: data.root itself); e.g. train_images",
    )
    path_column: str = Field(
        "path",
        description="csv: column holding each image's path (or its name without extension), relative to data.image_dir",
    )
    label_column: str = Field("label", description="csv: column holding each image's class name")
    group_column: str | None = Field(
        None, description="csv: images sharing this column's value (a person) stay on one side of every split"
    )
    classes: list[str] | None = Field(None, description="explicit class order (default: natural order of the names)")

    @field_validator("classes", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """data.classes=[0,1] for a manifest labelled 0 and 1 (YAML reads numbers)."""
        takes = "data.classes takes the class names in order, e.g. [cat, dog]"
        return class_names(value, takes) if isinstance(value, (list, tuple)) else value

    download: bool = Field(False, description="let torchvision download its data sets (needs internet)")
    image_size: int | None = Field(
        None, ge=8, le=2048, description="training resolution in pixels (shorter side resized, then centre-cropped)"
    )
    batch_size: int = Field(128, ge=1, le=65536, description="images per optimizer step (per process under DDP)")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of the training images held out for validation (stratified)"
    )
    images_per_class: int | None = Field(
        None, ge=1, description="keep only N training images a class (few-shot); val and test stay whole"
    )
    skip_bad_images: bool = Field(
        False, description="skip unreadable images (listed in the run folder) instead of stopping"
    )
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decode once and augment whole batches; stream: read per batch (large sets)"
    )
    memory_limit_mb: int = Field(4096, ge=1, description="largest decoded dataset the memory loader takes, in MiB")
    cache_dir: str | None = Field(None, description="where decoded images are cached (default: the user cache folder)")
    cache_verify: bool = Field(
        False, description="key the decode cache by a hash of every file's bytes too (files changed in place)"
    )
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="an image declaring more pixels (width x height) than this is a bad file, never decoded; "
        "None = PIL's limit (89,478,485 pixels unless changed)",
    )
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes of the stream loader")
    train_source_size: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="decode the training images at this shorter side in pixels (e.g. STL-10's original 96) so "
        "random_resized_crop/rotation crop the original and resample to data.image_size, as torchvision's "
        "RandomResizedCrop does; val/test stay at data.image_size (memory loader only)",
    )
    sampler: Literal["random", "balanced"] = Field(
        "random",
        description="training order: 'random' (each image once an epoch) or 'balanced' (seeded draws with "
        "replacement, each class equally likely; same number of images an epoch)",
    )
    folds: int | None = Field(
        None, ge=2, le=100, description="k-fold cross-validation: K folds (stratified, grouped by group_column)"
    )
    fold: int | None = Field(None, ge=0, description="which fold (0..K-1) is validation; needs data.folds")

    @model_validator(mode="before")
    @classmethod
    def _dataset_meant(cls, data: Any) -> Any:
        """``data.root=photos/`` alone means that folder (or, with a manifest, that CSV), not the embedded sample;
        the one place that infers data.dataset (a manifest given alone gets its root in _root_from_manifest)."""
        if isinstance(data, dict) and data.get("root") and "dataset" not in data:
            data = {**data, "dataset": "csv" if data.get("csv_file") else "folder"}
        return data


class AugSection(Section):
    crop_padding: int = Field(4, ge=0, le=64, description="random crop with this zero padding, in pixels (0 = off)")
    translate: int = Field(0, ge=0, le=64, description="random translation by up to this many pixels, reflect padded")
    flip: bool | Literal["alternate"] = Field(
        True, description="random mirror; 'alternate': each image mirrored every other epoch (airbench)"
    )
    vflip: bool = Field(False, description="random vertical flip")
    random_resized_crop: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop area scale range, e.g. [0.35, 1.0] (fractions of the image)"
    )
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="random rotation by up to this many degrees")
    rotate_first: bool = Field(
        False,
        description="rotate the whole image, then take the random resized crop (torchvision's RandomRotation "
        "before RandomResizedCrop); false: rotate within the crop",
    )
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="brightness/contrast/saturation jitter strength")
    autoaugment: Literal["cifar10", "imagenet", "svhn"] | None = Field(None, description="AutoAugment policy")
    randaugment: tuple[int, int] | None = Field(None, description="RandAugment [num_ops, magnitude 0-30]")
    trivialaugment: bool = Field(False, description="TrivialAugment (wide)")
    cutout: int = Field(0, ge=0, le=512, description="cutout square side in pixels (0 = off)")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of random erasing per image")
    mean_subtraction: Literal["channel", "pixel"] = Field(
        "channel", description="normalise by channel statistics, or subtract the per-pixel mean (He et al.)"
    )
    norm_mean: list[float] | None = Field(
        None,
        description="fixed per-channel mean in [0, 1] pixel units instead of the training split's, "
        "e.g. [0.5, 0.5, 0.5] (torchvision's Normalize((0.5,)*3, (0.5,)*3)); needs aug.norm_std",
    )
    norm_std: list[float] | None = Field(
        None, description="fixed per-channel std in [0, 1] pixel units, e.g. [0.5, 0.5, 0.5] or [1, 1, 1]"
    )
    size_schedule: list[tuple[int, int]] | None = Field(
        None,
        description="progressive resizing within one run: [[epoch, size], ...], from each epoch on the "
        "augmented training batches are resized to size px (e.g. [[0, 24], [4, 32]]); one lr schedule and "
        "optimizer throughout; validation and test stay at data.image_size",
    )
    mixup_alpha: float = Field(0.0, ge=0.0, description="mixup Beta(alpha, alpha) (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="CutMix Beta(alpha, alpha) (0 = off)")
    mix_prob: float = Field(1.0, ge=0.0, le=1.0, description="probability that a batch is mixed (mixup/CutMix)")

    # Checked with the config, not when the first batch is augmented: that failed the run folder it had made.
    @field_validator("random_resized_crop")
    @classmethod
    def _crop_scale(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError(
                "[low, high] with 0 < low <= high <= 1: the fractions of the image a crop may cover, e.g. [0.35, 1.0]"
            )
        return value

    @field_validator("randaugment")
    @classmethod
    def _randaugment(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not (1 <= value[0] <= 16 and 0 <= value[1] <= 30):
            raise ValueError("[num_ops, magnitude]: 1 to 16 operations an image, magnitude 0 to 30, e.g. [2, 9]")
        return value


class TaskHead(Section):
    classes: int | list[str] | None = Field(
        None,
        description="this task's classes: their number (checked against the data), or their names in the order "
        "the head, classes.json and predictions use, e.g. [<30, 30-59, 60+] (checked against the data as "
        "data.classes is; default: natural order)",
    )
    column: str | None = Field(None, description="manifest column of this task's labels (default: the task's name)")
    weight: float = Field(1.0, ge=0.0, description="weight of this task's loss in the sum")

    @field_validator("classes", mode="before")
    @classmethod
    def _count_or_names(cls, value: Any) -> Any:
        """A count of 2 or more, or a list of 2 or more names (numbers YAML read from [0, 1, 2] are the names
        '0', '1', '2', as a manifest's column holds them); anything else one line saying what the key takes."""
        takes = "takes the number of classes (2 or more) or their names in order, e.g. [<30, 30-59, 60+]"
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
            return value
        if isinstance(value, str) and "," in value:
            raise ValueError(f"{takes}; write the list in brackets: [{value.strip('()[] ')}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(takes)
        if len(value) < 2:
            raise ValueError(f"{takes}; a task has at least 2 classes")
        return class_names(value, takes)


class ModelSection(BaseModel):
    """Model keys: the generic ones are listed; family parameters (depth, layers, ...) are checked by the registry."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)

    name: str = Field("cnn", description="registry name (`classlab models`), a torchvision name or timm:<name>")
    preset: str | None = Field(None, description="a named preset of the family (stl10_2m, normal_cnn, mixer_s4, ...)")
    depth: int | None = Field(None, description="family parameter: depth (resnet_cifar: 20, 32, 44, 56, 110, ...)")
    layers: list[int | str] | None = Field(None, description="family parameter: layer list of mlp/cnn, e.g. [32,p,64]")
    widths: list[int] | None = Field(None, description="family parameter: channel widths per stage")
    max_params: int | None = Field(None, ge=1, description="parameter budget, checked before training")
    truncate_at: int | None = Field(None, ge=0, description="keep the stem and the first N blocks")
    head_conv: bool = Field(True, description="EfficientNet: keep the final 1x1 conv to 1280 channels")
    conv_bias: bool | None = Field(
        None,
        description="family parameter (cnn, residual_cnn): convolutions carry a bias even before BatchNorm, "
        "as the model-template project's layers do (null: a bias only where no BatchNorm follows)",
    )
    batchnorm: bool | None = Field(
        None,
        description="family parameter (cnn, mlp): BatchNorm after each conv/linear layer (template: "
        "batch_normalization_use)",
    )
    activation: str | None = Field(None, description="family parameter (cnn, mlp, bottleneck_resnet): relu, leaky_relu")
    head: str = Field("linear", description="classifier on top: linear, conv_fc or mlp")
    freeze: str = Field(
        "none",
        description="none, all (the backbone; a neck rebuilt by truncate_at trains unless weights fill it) "
        "or up_to:<block> (stem and blocks 0..block-1)",
    )
    init_from: str | None = Field(
        None, description="start from a run's weights: <run>[:<checkpoint>], e.g. runs/rot:epoch5"
    )
    pretrained: bool | None = Field(
        None,
        description="true: pretrained weights from the torchvision/timm hub (or pretrained_path when set); "
        "default: true exactly when pretrained_path is set",
    )
    pretrained_path: str | None = Field(None, description="weights file (.pth/.pt/.safetensors) in any known layout")
    weights: str | None = Field(
        None,
        description="hub weights tag: a torchvision weights name (IMAGENET1K_V2) or a timm tag (a1_in1k); "
        "default: the model's default weights",
    )
    unfreeze_at_epoch: int | None = Field(None, ge=1, description="epochs of head-only training (backbone frozen)")
    tasks: dict[str, TaskHead] | None = Field(
        None, description="task=multitask: name -> {column, weight, classes (a count, or the names in order)}"
    )
    fusion: Literal["none", "attention", "attention_only"] | None = Field(
        None,
        description="multitask: 'attention' = product of the task heads plus an attention correction; "
        "'attention_only' = the combined prediction comes from the attention-fused task features alone",
    )

    @field_validator("init_from")
    @classmethod
    def _checkpoint_file(cls, value: str | None) -> str | None:
        """A run's checkpoint file (``runs/rot/checkpoints/epoch5.ckpt``, what tab completion gives, and what the
        RotNet-style INI's ``transfer`` named) is that run and checkpoint, ``runs/rot:epoch5``: one spelling for the
        summary, the sweep's folder names and compare's legends. Before, the file was refused as 'not a run folder'
        with a hint about images to classify."""
        if not value:
            return value
        if value.endswith(".ckpt"):
            from classlab.run import run_of  # here: run.py imports torch, which --explain must not wait for

            folder, picked = run_of(value)
            if picked is not None:
                return init_from_value(folder, picked)
        return init_from_value(*init_from_parts(value))  # runs/rot:best is runs/rot: one point of a sweep, not two

    def spec(self) -> dict[str, Any]:
        """The plain dict the model registry builds from."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def init_from_parts(value: str, base: Path | None = None) -> tuple[str, str]:
    """(run folder, checkpoint name) of a ``model.init_from`` value: ``runs/rot:epoch5`` -> (runs/rot, epoch5), and a
    run alone is its best checkpoint, ``runs/rot`` -> (runs/rot, best). The one reading of the key, for its spelling
    in the config, a sweep's points and the weights loaded. A folder that exists as given (a ':' in its own name, or
    a Windows drive) stays whole; ``base``: the folder a relative value is read from (the working directory)."""
    folder, sep, name = value.rpartition(":")
    if not sep or "/" in name or "\\" in name or ((base or Path()) / Path(value).expanduser()).exists():
        return value, "best"
    return folder, name or "best"


def init_from_value(folder: str, name: str) -> str:
    """The one spelling of (run folder, checkpoint): best, the default, is left unsaid (runs/rot, not runs/rot:best)."""
    return folder if name == "best" else f"{folder}:{name}"


class OptimSection(Section):
    name: Literal["sgd", "adam", "adamw", "radam", "lars", "lamb", "rangerlars", "muon"] = Field(
        "sgd", description="optimizer (muon: Muon for the body's weight matrices and filters, SGD for the rest)"
    )
    lr: float = Field(0.05, gt=0.0, le=100.0, description="peak learning rate (per batch of data.batch_size)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD/LARS momentum")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 weight decay (decoupled for adamw/lamb)")
    decay_norm_and_bias: bool = Field(False, description="also decay normalisation weights and biases")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam-family (beta1, beta2)")
    lookahead: bool = Field(
        False, description="wrap the optimizer in Lookahead (rangerlars, RAdam + LARS in Lookahead, always has it)"
    )
    lookahead_k: int | None = Field(
        None, ge=1, description="Lookahead: fast steps per slow update (null: 6 for rangerlars as in over9000, else 5)"
    )
    lookahead_alpha: float = Field(0.5, gt=0.0, le=1.0, description="Lookahead: slow weights' step toward the fast")
    lookahead_schedule: Literal["constant", "cubic"] = Field(
        "constant",
        description="cubic: alpha falls from 1 to lookahead_alpha as (step/total)^3, BN stats too (under "
        "rangerlars it replaces the built-in constant Lookahead: a run has one Lookahead)",
    )
    backbone_lr_scale: float = Field(1.0, ge=0.0, description="lr multiplier of the backbone (fine-tuning; 0 = frozen)")
    norm_lr_scale: float = Field(
        1.0, gt=0.0, description="lr multiplier of normalization layers' parameters; their weight decay / it"
    )
    muon_lr: float = Field(0.02, gt=0.0, le=10.0, description="muon: peak lr of the Muon parameters (same schedule)")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="muon: momentum of the Muon parameters")
    muon_ns_steps: int = Field(5, ge=1, le=10, description="muon: Newton-Schulz iterations per step")
    muon_weight_decay: float = Field(0.0, ge=0.0, description="muon: decoupled weight decay of the Muon parameters")
    muon_fixed_norm: bool = Field(
        False,
        description="muon: rescale each Muon tensor to norm sqrt(out channels) before its step (airbench94_muon; "
        "only where a normalization layer follows, which makes the scale meaningless)",
    )

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("[beta1, beta2], each at least 0 and below 1, e.g. [0.9, 0.999]")
        return value


class SchedSection(Section):
    name: Literal["multistep", "cosine", "restarts", "onecycle", "cyclic", "plateau", "constant", "triangle"] = Field(
        "cosine", description="learning-rate schedule"
    )
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warmup length in epochs (onecycle: rising phase)")
    start_factor: float = Field(0.2, ge=0.0, le=1.0, description="triangle: lr at step 0 as a fraction of the peak")
    milestones: list[float] = Field(
        default_factory=list, description="epochs at which multistep multiplies lr by gamma"
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="multistep/plateau: lr multiplier at each drop")
    min_lr: float = Field(0.0, ge=0.0, description="lowest learning rate of the decaying schedules")
    restart_period: float = Field(10.0, gt=0.0, description="restarts/cyclic: epochs of the first cycle")
    restart_mult: float = Field(1.0, ge=1.0, description="each cycle is this much longer than the last")
    restart_decay: float = Field(1.0, gt=0.0, le=1.0, description="each cycle's peak lr is this fraction of the last")
    plateau_patience: int = Field(5, ge=0, description="plateau: validations without gain before lr drops")
    plateau_cooldown: int = Field(
        0, ge=0, description="plateau: validations after a drop before patience counts again (torch's cooldown)"
    )


ClassWeights = Literal["balanced"] | dict[str, float]


class LossSection(Section):
    name: Literal["crossentropy", "focal"] = Field(
        "crossentropy", description="'focal': cross-entropy times (1 - p_true)^focal_gamma (Lin et al. 2017)"
    )
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0, description="focal loss focusing exponent (0 = cross-entropy)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="label smoothing epsilon (0 = hard labels)")
    class_weights: ClassWeights | dict[str, ClassWeights] | None = Field(
        None,
        description="per-class loss weights: 'balanced' (n / (k * n_class) on the training split) or "
        "{class: weight} (unlisted classes 1.0); multitask: the same for every task, or {task: ...}",
    )


PRECISION_SPELLINGS = {
    "bf16": "bf16-mixed",
    "16": "16-mixed",
    "fp16": "16-mixed",
    "float16": "16-mixed",
    "half": "16-mixed",
    "fp32": "32-true",
    "float32": "32-true",
    "32": "32-true",
    "32-mixed": "32-true",
}


class TrainerSection(Section):
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        "auto", description="hardware to train on (auto: a GPU when there is one)"
    )
    devices: int | list[int] | Literal["auto"] = Field(1, description="processes/devices per node (>1: DDP)")
    num_nodes: int = Field(1, ge=1, description="machines in a multi-node DDP run")
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = Field(
        "32-true",
        description="numeric precision (bf16-mixed: bfloat16 autocast, fp32 weights; "
        "bf16, 16 and fp32 are read as bf16-mixed, 16-mixed and 32-true)",
    )
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_notebook"] = Field("auto", description="Lightning strategy")

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_spelling(cls, value: Any) -> Any:
        """The spellings people bring from Lightning and papers (bf16, 16, fp16, fp32) mean their mixed/true forms."""
        return PRECISION_SPELLINGS.get(str(value).strip().lower(), value) if isinstance(value, str | int) else value

    threads: int | None = Field(None, ge=1, le=1024, description="intra-op CPU threads (None = all cores)")
    val_every: int = Field(1, ge=1, description="validate every N epochs (and always the last epoch)")
    monitor: str = Field("val/acc", description="metric that picks best.ckpt and drives early stopping")
    patience: int | None = Field(None, ge=1, description="early stopping after this many validations without gain")
    clip_grad: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="keep an exponential moving average of weights")
    keep_every: int | None = Field(None, ge=1, description="also keep checkpoints/epochN.ckpt every N epochs")
    checkpoint_every_s: float = Field(
        10.0,
        ge=0.0,
        description="least seconds of training between two last.ckpt writes (0 = every epoch): short epochs then "
        "train instead of writing; the final epoch is always written, a kill loses at most this much training",
    )
    deterministic: bool = Field(True, description="deterministic kernels (exact reruns and resume)")
    channels_last: bool = Field(True, description="NHWC memory layout (faster convolutions on CPU and GPU)")
    compile: bool = Field(False, description="torch.compile the network")
    progress: bool = Field(True, description="live progress bar on a terminal")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    test_tta: str | None = Field(None, description="views for the final test, e.g. 'flip,translate' (engine.tta)")
    on_nonfinite: Literal["stop", "skip_batch"] = Field(
        "stop", description="a NaN/infinite training loss: stop the run (status diverged) or skip that batch"
    )
    loggers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers; the run's own metrics.csv is written whatever this says",
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<run.root>/mlflow.db"
    )
    project: str = Field("classlab", description="MLflow experiment / W&B project the runs are logged under")
    log_every: int = Field(
        50, ge=1, description="optimizer steps between logged training loss and learning rate (capped at an epoch)"
    )

    @field_validator("loggers", mode="before")
    @classmethod
    def _one_logger(cls, value: Any) -> Any:
        """trainer.loggers=mlflow: one tracker named as itself, not refused for not being a list of one."""
        return [value] if isinstance(value, str) and value.strip() and not set(",[]") & set(value) else value


class Config(Section):
    """The whole experiment. Field names are the config keys of DESIGN.md."""

    exp_name: str | None = Field(None, description="run folder name; default <dataset>_<model>, numbered if taken")
    seed: int = Field(0, description="seed of splits, initialisation, batch order and augmentation")
    epochs: int = Field(20, ge=1, le=100000, description="passes over the training images")
    task: Literal["classify", "rotation", "multitask"] = Field(
        "classify", description="classify, rotation (self-supervised pretext) or multitask (a head per label column)"
    )
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    aug: AugSection = Field(default_factory=AugSection)
    model: ModelSection = Field(default_factory=ModelSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    sched: SchedSection = Field(default_factory=SchedSection)
    loss: LossSection = Field(default_factory=LossSection)
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    stages: list[dict[str, Any]] | None = Field(
        None, description="overrides run in sequence, each stage starting from the previous one's weights (FixRes)"
    )

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
        if self.data.dataset == "sample" and self.data.root:
            raise ValueError(
                f"data.root={self.data.root} is not read by data.dataset=sample (the embedded sample); "
                "set data.dataset=folder (or csv) to train on it, or drop data.root"
            )
        if self.data.csv_file and self.data.dataset != "csv":
            raise ValueError(
                f"data.csv_file={self.data.csv_file} is not read by data.dataset={self.data.dataset}; "
                "set data.dataset=csv to train on the manifest, or drop data.csv_file"
            )
        if self.data.dataset in ("folder", "csv") and not self.data.root:
            raise ValueError(
                f"data.root is required for data.dataset={self.data.dataset}: the folder holding the images"
            )
        if self.data.dataset == "csv" and not self.data.csv_file:
            raise ValueError("data.csv_file is required for data.dataset=csv: the manifest with path and label columns")
        if self.data.test_csv_file and self.data.dataset != "csv":
            raise ValueError("data.test_csv_file needs data.dataset=csv (folders take their test set from root/test)")
        if self.data.val_csv_file and self.data.dataset != "csv":
            raise ValueError("data.val_csv_file needs data.dataset=csv (folders: root/val/ is the validation set)")
        if self.data.image_dir and self.data.dataset != "csv":
            raise ValueError("data.image_dir needs data.dataset=csv (a folder data set's images are under data.root)")
        if self.data.group_column and self.data.dataset != "csv":
            raise ValueError("data.group_column needs data.dataset=csv (groups come from a manifest column)")
        if self.stages and _explicit_processes(self.trainer) > 1:
            raise ValueError(
                "stages run in one process only (DDP re-launches the whole command per stage); run each stage as "
                "its own run instead: the second with the stage's keys as overrides and model.init_from=<first run>"
            )
        if self.data.folds and self.data.fold is None and _explicit_processes(self.trainer) > 1:
            raise ValueError(
                f"data.folds trains its {self.data.folds} folds one after another in one process (DDP re-launches the "
                "whole command, and its second process followed the first fold's folder into the next): train the "
                "folds with trainer.devices=1, or each fold as its own DDP run with data.fold=0, 1, ..."
            )
        _check_folds_and_weights(self)
        if self.task == "multitask" and not self.model.tasks:
            raise ValueError("task=multitask needs model.tasks: a mapping task name -> {column, weight}")
        if self.task == "multitask":
            _check_multitask(self)
        elif self.model.fusion not in (None, "none"):
            raise ValueError("model.fusion needs task=multitask (it mixes the features of several task heads)")
        elif self.task == "classify" and self.model.tasks:  # unread, the run looked for a 'label' column instead
            raise ValueError(
                f"model.tasks ({', '.join(self.model.tasks)}) are read by task=multitask: set task=multitask, "
                "or drop model.tasks to classify data.label_column"
            )
        _check_monitor(self)
        _check_source_fidelity(self)
        if not _READING_SAVED.get():
            _check_one_policy(self.aug)
            _check_rotation_pretext(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _explicit_processes(trainer: TrainerSection) -> int:
    """Training processes the config asks for in so many words ("auto" devices are resolved at train time)."""
    devices = trainer.devices
    per_node = len(devices) if isinstance(devices, list) else (devices if isinstance(devices, int) else 1)
    return per_node * trainer.num_nodes


def _check_source_fidelity(cfg: Config) -> None:
    """Keys that reproduce a source's preprocessing exactly, and the keys they need beside them."""
    aug = cfg.aug
    if (aug.norm_mean is None) != (aug.norm_std is None):
        raise ValueError("aug.norm_mean and aug.norm_std go together: set both (e.g. [0.5, 0.5, 0.5] each) or neither")
    if aug.norm_mean is not None:
        if len(aug.norm_mean) != len(aug.norm_std or []) or not aug.norm_mean:
            raise ValueError("aug.norm_mean and aug.norm_std need one value per channel each, of the same length")
        if any(s <= 0 for s in aug.norm_std or []):
            raise ValueError(f"aug.norm_std = {aug.norm_std}: every value must be > 0")
        if aug.mean_subtraction == "pixel":
            raise ValueError("aug.norm_mean/norm_std replace the data's statistics; drop aug.mean_subtraction=pixel")
    _check_size_schedule(cfg)
    if aug.rotate_first and not (aug.random_resized_crop is not None and aug.rotation > 0):
        raise ValueError("aug.rotate_first orders rotation before the crop: it needs aug.rotation and "
                         "aug.random_resized_crop")  # fmt: skip
    if cfg.data.train_source_size is not None:
        if aug.random_resized_crop is None and aug.rotation == 0:
            raise ValueError(
                "data.train_source_size needs aug.random_resized_crop or aug.rotation: they resample the larger "
                "training images to data.image_size"
            )
        if aug.mean_subtraction == "pixel" or cfg.data.loader == "stream":
            raise ValueError("data.train_source_size needs data.loader memory/auto and channel normalisation")


def _check_one_policy(aug: AugSection) -> None:
    """AutoAugment, RandAugment and TrivialAugment are each a whole policy: set together they ran one after the
    other on every image (no recipe of ours or of the source projects stacks them)."""
    given = {
        "aug.autoaugment": aug.autoaugment,
        "aug.randaugment": list(aug.randaugment) if aug.randaugment is not None else None,
        "aug.trivialaugment": aug.trivialaugment or None,
    }
    named = [f"{key}={_plain(value)}" for key, value in given.items() if value is not None]
    if len(named) < 2:
        return
    drops = [f"{key}={'false' if key == 'aug.trivialaugment' else 'null'}" for key in given if given[key] is not None]
    both = " and ".join(named) if len(named) == 2 else f"{', '.join(named[:-1])} and {named[-1]}"
    raise ValueError(
        f"{both} are each a whole augmentation policy, and would run one after the other on every image; keep "
        f"one of them, e.g. {named[0]} alone with {' '.join(drops[1:])}"
    )


def _check_size_schedule(cfg: Config) -> None:
    """A progressive-resizing schedule starts at epoch 0, moves forward, and never exceeds the decoded size."""
    schedule = cfg.aug.size_schedule
    if schedule is None:
        return
    example = "e.g. aug.size_schedule=[[0,24],[4,32]]"
    if not schedule or schedule[0][0] != 0:
        raise ValueError(f"aug.size_schedule must start at epoch 0 ({example})")
    epochs = [epoch for epoch, _ in schedule]
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        raise ValueError(f"aug.size_schedule epochs must increase, got {epochs} ({example})")
    limit = cfg.data.image_size
    for _, size in schedule:
        if size < 8 or (limit is not None and size > limit):
            bound = f"data.image_size={limit}" if limit is not None else "the decoded size"
            raise ValueError(
                f"aug.size_schedule size {size} px: sizes run from 8 up to {bound} (training images are "
                "resized down; test-time size stays data.image_size)"
            )


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


ROTATION_LIMIT = 45.0  # degrees: a random turn this large takes an image halfway to the next pretext label


def _check_rotation_pretext(cfg: Config) -> None:
    """The pretext's labels are the quarter turns of an upright image: an augmentation that turns images itself
    makes them ambiguous, and the run trained on without a word. A vertical flip is a half turn of the mirror image
    (0 and 180 degrees, 90 and 270 look alike); a random turn of 45 degrees or more meets the next label, as
    TrivialAugment's turns of up to 135 degrees do (AutoAugment's and RandAugment's stop at 30 degrees)."""
    if cfg.task != "rotation":
        return
    if cfg.aug.vflip:
        raise ValueError(
            "aug.vflip with task=rotation: a vertical flip is the mirror image turned by 180 degrees, so the "
            "pretext could no longer tell 0 from 180 degrees (nor 90 from 270); set aug.vflip=false"
        )
    if cfg.aug.rotation >= ROTATION_LIMIT:
        raise ValueError(
            f"aug.rotation={_plain(cfg.aug.rotation)} with task=rotation: a random turn of {ROTATION_LIMIT:g} degrees "
            "or more reaches the next quarter turn the pretext predicts, so its labels overlap; keep aug.rotation "
            f"below {ROTATION_LIMIT:g} (0 in RotNet)"
        )
    if cfg.aug.trivialaugment:  # torchvision's AutoAugment and RandAugment policies turn by 30 degrees at most
        raise ValueError(
            "aug.trivialaugment with task=rotation: TrivialAugment (wide) turns images by up to 135 degrees, past the "
            "next quarter turn the pretext predicts, so its labels overlap; set aug.trivialaugment=false "
            "(aug.autoaugment and aug.randaugment turn by 30 degrees at most, and stay allowed)"
        )


def _check_multitask(cfg: Config) -> None:
    """Multi-task runs read their labels from manifest columns, and task names become metric keys."""
    if cfg.data.dataset != "csv":
        raise ValueError("task=multitask needs data.dataset=csv: a manifest with one label column per task")
    if cfg.data.classes is not None:
        first = next(iter(cfg.model.tasks or {}), "TASK")
        names = ",".join(map(yaml_text, cfg.data.classes))
        raise ValueError(
            "data.classes does not apply to task=multitask: each task has its own class order; give it as "
            f"model.tasks.<task>.classes, e.g. model.tasks.{first}.classes=[{names}]"
        )
    if cfg.aug.mixup_alpha > 0 or cfg.aug.cutmix_alpha > 0:
        raise ValueError("aug.mixup_alpha / aug.cutmix_alpha are not supported with task=multitask; set them to 0")
    for name in cfg.model.tasks or {}:
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"model.tasks: task name {name!r} must be letters, digits, '_' or '-' (it names metrics)")
    if cfg.model.tasks and all(head.weight == 0 for head in cfg.model.tasks.values()):
        raise ValueError(
            "model.tasks: every task's weight is 0, so the loss is 0 and nothing would train; "
            "give at least one task a weight above 0"
        )


# A key that only one choice of another key reads: (key, the choosing key, the choices that read it). Set on a run
# that chose otherwise it was accepted and did nothing (sched.milestones under the default cosine schedule).
_MUON_KEYS = ("muon_lr", "muon_momentum", "muon_ns_steps", "muon_weight_decay", "muon_fixed_norm")
_ADAM_FAMILY = ("adam", "adamw", "radam", "lamb", "rangerlars")
READ_ONLY_BY: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("sched.milestones", "sched.name", ("multistep",)),
    ("sched.gamma", "sched.name", ("multistep", "plateau")),
    ("sched.start_factor", "sched.name", ("triangle",)),
    ("sched.restart_period", "sched.name", ("restarts", "cyclic")),
    ("sched.restart_mult", "sched.name", ("restarts",)),
    ("sched.restart_decay", "sched.name", ("restarts",)),
    ("sched.plateau_patience", "sched.name", ("plateau",)),
    ("sched.plateau_cooldown", "sched.name", ("plateau",)),
    ("sched.min_lr", "sched.name", ("cosine", "restarts", "onecycle", "cyclic", "plateau", "triangle")),
    ("optim.momentum", "optim.name", ("sgd", "lars", "muon")),
    ("optim.nesterov", "optim.name", ("sgd", "lars", "muon")),
    ("optim.betas", "optim.name", _ADAM_FAMILY),
    *((f"optim.{key}", "optim.name", ("muon",)) for key in _MUON_KEYS),
    ("loss.focal_gamma", "loss.name", ("focal",)),
    # the rotation pretext trains on its own four labels with plain cross-entropy
    ("loss.label_smoothing", "task", ("classify", "multitask")),
    ("aug.mixup_alpha", "task", ("classify",)),
    ("aug.cutmix_alpha", "task", ("classify",)),
)


def _plain(value: Any) -> str:
    """A value as the user wrote it: 10, not 10.0 (the schema stores epochs as floats)."""
    if isinstance(value, list):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return yaml_text(int(value) if isinstance(value, float) and value.is_integer() else value)


def unread_settings(cfg: Config, only: Collection[str] | None = None) -> list[str]:
    """One note line for each setting this run's other choices never read, and for a schedule that cannot do
    what it says within the run's epochs (a warmup as long as the run, milestones after its end). ``only``: the
    keys to look at (a later stage's own overrides, not the base config's keys it inherits)."""
    flat, default = flatten(cfg.to_dict()), flatten(Config().to_dict())
    if only is not None:
        default = {key: value if key in only else flat[key] for key, value in default.items()}

    def shown(key: str) -> str:
        return f"{key}={_plain(flat[key])}"

    notes = [
        f"note: {shown(key)} has no effect with {shown(chooser)}: only {chooser}={' or '.join(readers)} reads it"
        for key, chooser, readers in READ_ONLY_BY
        if flat[key] != default[key] and flat[chooser] not in readers
    ]
    lookahead = ("optim.lookahead_k", "optim.lookahead_alpha", "optim.lookahead_schedule")
    if not (cfg.optim.lookahead or cfg.optim.name == "rangerlars"):
        notes += [
            f"note: {shown(key)} has no effect: Lookahead is off (set optim.lookahead=true)"
            for key in lookahead
            if flat[key] != default[key]
        ]
    if flat["aug.mix_prob"] != default["aug.mix_prob"] and cfg.aug.mixup_alpha <= 0 and cfg.aug.cutmix_alpha <= 0:
        notes.append(f"note: {shown('aug.mix_prob')} has no effect: it is the chance of aug.mixup_alpha/cutmix_alpha")
    return notes + _schedule_notes(cfg) + _imbalance_notes(cfg, only)


def _imbalance_notes(cfg: Config, only: Collection[str] | None = None) -> list[str]:
    """loss.class_weights=balanced beside data.sampler=balanced: the sampler already shows every class equally
    often, so the weights then tilt the loss towards the rare classes; the run took both without a word."""
    weights = cfg.loss.class_weights
    balanced = weights == "balanced" or (isinstance(weights, dict) and "balanced" in weights.values())
    if cfg.data.sampler != "balanced" or not balanced:
        return []
    if only is not None and not any(key.startswith(("data.sampler", "loss.class_weights")) for key in only):
        return []  # a later stage that inherits both: said at the run's start
    return [
        f"note: loss.class_weights={_plain(weights)} with data.sampler=balanced corrects the class imbalance twice: "
        "the sampler already draws every class equally often, so the weights then favour the rare classes over "
        "the common ones; keep one: data.sampler=balanced (rare images drawn more often) or "
        "loss.class_weights=balanced (every image once an epoch, rare classes weighted up)"
    ]


def _schedule_notes(cfg: Config) -> list[str]:
    sched, epochs = cfg.sched, cfg.epochs
    notes = []
    if sched.name != "plateau" and sched.warmup_epochs >= epochs:
        notes.append(
            f"note: sched.warmup_epochs={_plain(sched.warmup_epochs)} is not shorter than the run (epochs={epochs}): "
            f"the lr is still rising when it ends and never reaches optim.lr={_plain(cfg.optim.lr)}"
        )
    if sched.name == "multistep" and not sched.milestones:
        notes.append(
            "note: sched.name=multistep without sched.milestones keeps the lr at optim.lr throughout; give the "
            "epochs it drops at, e.g. sched.milestones=[30,60]"
        )
    late = [m for m in sched.milestones if m >= epochs]
    if sched.name == "multistep" and late:
        notes.append(
            f"note: sched.milestones {', '.join(_plain(m) for m in late)} fall at or after the run's end "
            f"(epochs={epochs}): the lr never drops there"
        )
    return notes


def monitor_keys(cfg: Config) -> list[str]:
    """The validation metrics a run logs, so the ones ``trainer.monitor`` can pick best.ckpt by."""
    keys = ["val/acc", "val/acc5", "val/f1", "val/loss"]
    if cfg.task == "multitask":
        keys += [f"val/{name}/{kind}" for name in cfg.model.tasks or {} for kind in ("acc", "f1")]
    return keys


def _check_monitor(cfg: Config) -> None:
    """A monitor no metric answers to would fail only after the first epoch's training (Lightning's
    ModelCheckpoint looks it up at validation end), with a run folder left behind: refuse it now."""
    keys = monitor_keys(cfg)
    if cfg.trainer.monitor not in keys:
        hint = did_you_mean(cfg.trainer.monitor, keys)
        raise ValueError(
            f"trainer.monitor={cfg.trainer.monitor} is not a metric this run logs{hint}; "
            f"choose one of {', '.join(keys)}"
        )


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


def yaml_text(value: Any) -> str:
    """A value as override text that reads back as the same value."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "," not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


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
    glued = _glued_key(value)
    if glued is not None:
        spaced = re.sub(r":(?=[^\s])", ": ", raw.strip())
        raise ConfigError(
            f"override '{text}': YAML reads '{glued}' as one key with no value; put a space after each colon: "
            f"{key}={spaced}"
        )
    return key, _bounded(value, f"override '{key}'")


def _glued_key(value: Any) -> str | None:
    """A mapping key like 'black:3.0' with no value: {black:3.0} typed without YAML's space after the colon."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v is None and isinstance(k, str) and ":" in k:
                return k
            inner = _glued_key(v)
            if inner is not None:
                return inner
    return None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


def with_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A config tree with overrides applied and its paths resolved against the working directory, as
    load_config resolves them: a run's config.yaml never holds a path that means something else elsewhere."""
    tree = apply_overrides(tree, overrides)
    _resolve_paths(tree, Path.cwd())
    return tree


MAX_CONFIG_VALUES = 100_000  # far above any real config; YAML aliases can expand a few lines into billions


def _bounded(tree: Any, where: str) -> Any:
    """``tree`` unchanged, or ConfigError when its aliases expand past MAX_CONFIG_VALUES ("billion laughs")."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors and aliases nested "
                "inside each other); write the values out"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    ``optim:`` block would drop the first one's every key without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                first = seen[key_node.value].start_mark.line + 1
                problem = f"key '{key_node.value}' given twice (first on line {first}): keep one"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key_node.value] = key_node
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = utf8_text(path, ConfigError)
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", exc))
        if "'\\t'" in problem:
            problem += ": YAML indents with spaces, not tabs"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if tree is None:
        _say_empty(path, text)
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (exp_name: ..., data: ...)")
    return _bounded(tree, str(path))


def _say_empty(path: Path, text: str) -> None:
    """A config file with no keys (saved empty by mistake, or before its keys were written) gives the defaults, as
    no file does: one line says so, where before the defaults trained without a word."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    content = [line for line in lines if not line.startswith("#")]
    what = "is empty" if not lines else "holds only comments" if not content else f"holds no keys (only {content[0]!r})"
    warnings.warn(f"{path} {what}: every key takes its default ({_key_list()} lists them)", stacklevel=3)


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def key_named(word: str) -> str | None:
    """The config key a command-line word names (``epochs``, ``batch-size``, ``optim.lr``, ``lr``), if exactly one."""
    word = word.replace("-", "_")
    keys = _known_keys(Config)
    if word in keys:
        return word
    leaf = [k for k in keys if k.rsplit(".", 1)[-1] == word]
    return leaf[0] if len(leaf) == 1 else None


# What other tools call classlab's keys (Lightning, timm's train.py, Keras, the replaced projects' scripts): spelling
# distance cannot find optim.lr from learning_rate.
KEY_SYNONYMS = {
    "learning_rate": "lr",
    "max_epochs": "epochs",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "bs": "batch_size",
    "wd": "weight_decay",
    "num_workers": "workers",
    "img_size": "image_size",
    "input_size": "image_size",
    "arch": "model.name",
    "model_name": "model.name",
    "optimizer": "optim.name",
    "scheduler": "sched.name",
    "lr_scheduler": "sched.name",
    "seed_everything": "seed",
    "early_stopping": "patience",
    "early_stop": "patience",
    "amp": "precision",
    "mixed_precision": "precision",
    "balanced": "sampler",
    "balanced_sampler": "sampler",
}


def key_hint(key: str) -> str:
    """' (did you mean X?)' for an unknown key: a section's key given bare (``lr`` for ``optim.lr``) or under
    another tool's name (``learning_rate``) first, as spelling distance finds nothing there; several sections'
    keys of that name are all listed."""
    known = _known_keys(Config)
    section, _, word = key.replace("-", "_").rpartition(".")
    word = KEY_SYNONYMS.get(word, word)
    if "." in word:
        return f" (did you mean '{word}'?)"
    if f"{section}.{word}" in known and f"{section}.{word}" != key:
        return f" (did you mean '{section}.{word}'?)"
    leaf = [k for k in known if k.rsplit(".", 1)[-1] == word and k != key]
    if len(leaf) == 1:
        return f" (did you mean '{leaf[0]}'?)"
    if leaf:
        return f" (keys named '{word}': {', '.join(leaf)})"
    # A key's first word alone (aug.mixup for aug.mixup_alpha): spelling distance picked aug.mix_prob.
    longer = [k for k in known if k.startswith(f"{section}.{word}_" if section else f"{word}_")]
    if len(longer) == 1:
        return f" (did you mean '{longer[0]}'?)"
    return did_you_mean(key, known)


def _field(key: str) -> Any:
    """The pydantic field of a dotted key, or a ConfigError naming the nearest key."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    if parts[:2] == ["model", "tasks"] and len(parts) == 4:  # one task's key: model.tasks.<task>.<key>
        model, parts = TaskHead, parts[3:]
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            raise ConfigError(f"unknown config key '{key}'{key_hint(key)}")
        ann = field.annotation
        if i == len(parts) - 1:
            return field
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
        model = ann
    raise ConfigError(f"unknown config key '{key}'")  # pragma: no cover - the loop always returns


def explain(key: str) -> str:
    """``classlab train --explain KEY``: what a key means, its allowed values, bounds and default."""
    field = _field(key)
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"{key}: a section; its keys: " + ", ".join(ann.model_fields)
    default = field.get_default(call_default_factory=True)
    lines = [
        f"{key}: {field.description or '(no description)'}",
        f"  allowed: {_allowed(field)}",
        f"  default: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}",
    ]
    return "\n".join(lines)


def _key_list() -> str:
    """What lists every key with its default and allowed values, in the reader's words."""
    return command("`classlab train --print-config`", "print(classlab.train.print_config(None))")


def _one_line(error: ValidationError, tree: dict[str, Any]) -> str:
    """The first pydantic error as one line a user can act on."""
    err = error.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in err["loc"][:-1])
        if tuple(err["loc"][:2]) == ("model", "tasks") and len(err["loc"]) == 4:
            # One task's keys: the schema's key list has only 'model.tasks', which the nearest spelling would name.
            close = nearest(str(err["loc"][-1]), TaskHead.model_fields)
            hint = f"did you mean '{section}.{close}'? " if close else ""
            return f"unknown config key '{loc}' ({hint}a task's keys: {', '.join(TaskHead.model_fields)})"
        return f"unknown config key '{loc}'{key_hint(loc)}" + (
            f"; valid keys of '{section}' are listed by {_key_list()}" if section else ""
        )
    value = err.get("input")
    if not loc:
        return err["msg"].removeprefix("Value error, ")
    if err["type"] == "model_type" and not isinstance(value, dict):  # model=resnet18: a section given one value
        one_task = tuple(err["loc"][:2]) == ("model", "tasks") and len(err["loc"]) == 3  # model.tasks={mask: 3}
        section = TaskHead if one_task else _field(loc).annotation
        key = _key_taking(section, value)
        if one_task:
            key = "column" if isinstance(value, str) else "weight" if isinstance(value, float) else "classes"
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        return (
            f"'{loc}' is a section, not a value: set one of its keys, e.g. {loc}.{key}={shown} "
            f"(its keys: {', '.join(section.model_fields)})"
        )
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        msg = "allowed: " + msg.removeprefix("Input should be ")
        near = nearest(value, re.findall(r"'([^']*)'", msg)) if isinstance(value, str) else None
        msg += f"; did you mean {near}?" if near else ""
    keys = [str(p) for p in err["loc"] if not _UNION_TAG.match(str(p))]
    if len(keys) < len(err["loc"]) or err["type"] in ("tuple_type", "list_type"):
        loc, msg = ".".join(keys), _allowed_line(keys, value, msg)
    shown = _short(repr(value)) if not isinstance(value, dict) else "a section"
    return f"config key '{loc}' = {shown}: {msg}{_as_fraction(loc, value, err)}"


def _key_taking(section: type[BaseModel], value: Any) -> str:
    """The section's first key that takes ``value`` (data=photos: data.root, optim=0.1: optim.lr), else its name
    key: data.dataset=photos, the first key's, was the suggestion, and a second error."""
    for key, field in section.model_fields.items():
        try:
            kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            TypeAdapter(kind).validate_python(value)
        except ValidationError:
            continue
        return key
    return "name" if "name" in section.model_fields else next(iter(section.model_fields))


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


def _as_fraction(loc: str, value: Any, err: Any) -> str:
    """A share written as a percentage (10% or a whole 10 where the key takes 0..1): the fraction it meant."""
    if not _takes_a_fraction(loc):
        return ""
    match = _PERCENT.match(value) if isinstance(value, str) else None
    if match:
        percent = float(match.group(1))
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and 1 < value <= 100 and value == int(value):
        percent = float(value)
    else:
        return ""
    return f"; takes a fraction of 1: {loc}={percent / 100:g} for {percent:g}%"


def _takes_a_fraction(key: str) -> bool:
    """A float key bounded above by 1 (val_fraction, label_smoothing, random_erasing, ...)."""
    try:
        field = _field(key)
    except ConfigError:
        return False
    bounds = [getattr(m, name, None) for m in field.metadata for name in ("le", "lt")]
    return field.annotation is float and 1 in bounds


# pydantic names the member of a union that failed in the error's path (aug.flip.bool); a user never wrote it
_UNION_TAG = re.compile(r"^(bool|int|float|str|none|list|dict|tuple|.*\[.*\])$")


def _allowed_line(keys: list[str], value: Any, msg: str) -> str:
    """For a key with several forms (true | false | alternate) or a list, what it takes, not pydantic's first miss."""
    try:
        field = _field(".".join(k for k in keys if not k.isdigit()))
    except ConfigError:
        return msg
    line = "allowed: " + _allowed(field)
    if isinstance(value, str) and "," in value and _allowed(field).startswith("["):
        line += f"; write a list in brackets: {'.'.join(keys)}=[{value.strip('()[] ')}]"
    return line


def _short(text: str, limit: int = 80) -> str:
    """An error line stays one readable line whatever value was given."""
    if len(text) <= limit:
        return text
    return text[: limit - 5] + " ...]" if text.startswith("[") else text[: limit - 4] + " ..."


def saved_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A run folder's config.yaml less what an earlier classlab saved but never read (a data.csv_file beside
    another data set, refused since), so that run still loads and resumes."""
    data = tree.get("data")
    if isinstance(data, dict) and data.get("csv_file") and data.get("dataset") not in (None, "csv"):
        tree = {**tree, "data": {k: v for k, v in data.items() if k != "csv_file"}}
    return tree


# A run folder's saved config is read as it trained (``validate(..., saved=True)``): the checks added since for new
# runs (two augmentation policies at once, a rotation pretext's own turns) do not lock an earlier run out of eval,
# predict, export and --resume.
_READING_SAVED: ContextVar[bool] = ContextVar("classlab_reading_saved", default=False)


def validate(tree: dict[str, Any], *, saved: bool = False) -> Config:
    """Validate a raw config tree; raise ConfigError with one line on the first problem. ``saved``: a run folder's
    config.yaml (or a sweep's, a k-fold folder's), checked as a config is, less the checks only new runs pass."""
    token = _READING_SAVED.set(saved or _READING_SAVED.get())  # its stages' configs are read alike
    try:
        return _validated(tree)
    finally:
        _READING_SAVED.reset(token)


def _validated(tree: dict[str, Any]) -> Config:
    _bounded(tree, "the config")  # a run folder's config.yaml reaches here without _read_yaml
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, tree)) from None
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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def and_others(changes: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    """' (and k2, k3)' after the first of several changed keys an error names; past ``shown`` of them, how many more."""
    rest = [key for key, _, _ in changes[1:]]
    if not rest:
        return ""
    more = f" and {len(rest) - shown} more" if len(rest) > shown else ""
    return f" (and {', '.join(rest[:shown])}{more})"


def changed_keys(before: Config, after: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, value before, value after) for each key whose value differs, in key order."""
    a, b = flatten(before.to_dict()), flatten(after.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


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
    staged = validate(tree)
    before, after = flatten(base), flatten(staged.to_dict())
    # A task's column and class order are its labels' meaning (classes.json and the head are stage 1's).
    labels = sorted(k for k in before.keys() | after.keys() if re.match(r"model\.tasks\..+\.(classes|column)$", k))
    moved = [key for key in (*STAGE_KEEPS, *labels) if before.get(key) != after.get(key)]
    if moved:
        key = moved[0]
        raise ConfigError(
            f"{key}={after.get(key)!r} where the run has {before.get(key)!r}: every stage trains and validates on the "
            "run's own data and split (else a later stage validates on images an earlier one trained on); set "
            f"{key} at the top of the config, and in a stage only what changes (size, epochs, optimiser)"
        )
    return staged


# What draws the data, its labels and its validation split: one value for all of a run's stages (the run folder's
# classes.json is stage 1's, and each stage starts from the previous one's head).
STAGE_KEEPS = (
    "seed",
    "task",
    "data.dataset",
    "data.root",
    "data.csv_file",
    "data.val_csv_file",
    "data.image_dir",
    "data.path_column",
    "data.label_column",
    "data.classes",
    "data.val_fraction",
    "data.group_column",
    "data.folds",
)


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_url(text: str) -> bool:
    """``text`` is an address (https://, s3://), not a path: people paste them where a file goes."""
    return bool(_URL.match(text))


def _local(key: str, value: str, base: Path) -> str:
    """A path key made absolute; a URL pasted there is named (resolved, it became 'cwd/https:/...')."""
    if is_url(value):
        raise ConfigError(
            f"{key} '{value}' is a URL; classlab reads local files: download (and unpack) it once and give its path"
        )
    return str((base / Path(value).expanduser()).resolve())


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    data = tree.get("data")
    if isinstance(data, dict):
        _root_from_manifest(data)
        for key in ("root", "csv_file", "val_csv_file", "cache_dir"):
            value = data.get(key)
            if isinstance(value, str) and value:
                resolved = _local(f"data.{key}", value, base)
                if key in ("root", "cache_dir"):
                    data[key] = resolved
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained_path"), str):
        model["pretrained_path"] = _local("model.pretrained_path", model["pretrained_path"], base)
    if isinstance(model, dict) and isinstance(model.get("init_from"), str) and model["init_from"]:
        # A run folder, read from the config file's folder as data.root is (runs/rot:epoch5: the folder part).
        folder, name = init_from_parts(model["init_from"], base)
        model["init_from"] = init_from_value(_local("model.init_from", folder, base), name)


def _root_from_manifest(data: dict[str, Any]) -> None:
    """``data.csv_file=comp/train.csv`` alone means that manifest, its paths read from its own folder (the
    embedded sample was trained instead, the key unread); a path matter, so here, before paths are resolved
    against the config file's folder. That root and manifest make it a CSV data set: DataSection._dataset_meant."""
    csv_file = data.get("csv_file")
    if isinstance(csv_file, str) and csv_file and not data.get("root") and data.get("dataset", "csv") == "csv":
        data["root"] = str(Path(csv_file).parent)
        data["csv_file"] = Path(csv_file).name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML or INI file (or the defaults), apply overrides and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; give a YAML or INI file, or no file for the defaults")
        _not_a_data_file(path)
        if path.suffix.lower() in (".ini", ".cfg"):
            tree = read_ini(path)
        else:
            tree = _read_yaml(path)
        _resolve_paths(tree, path.parent.resolve())
    return validate(with_overrides(tree, overrides or []))


# The file suffixes read as images, everywhere (folders, manifests, predict, and a picture given as the config);
# here at the ground so that the config's checks and the data layer share one list.
# .heic/.heif: phone cameras' default format, read through the optional pillow-heif package (extra "heic").
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".ppm", ".pgm"} | HEIF_EXTENSIONS
)
_WEIGHTS_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")


def train_command(override: str) -> str:
    """``classlab train data.root=photos`` in the reader's words: the command, or the call with that override."""
    return command(f"classlab train {override}", f"classlab.train(None, [{override!r}])")


def _not_a_data_file(path: Path) -> None:
    """An image, a manifest or a weights file given where the config goes: what it is and the key it belongs to
    (read as YAML, an image gave a 'not UTF-8 text' line that pointed at text encodings)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        root = path.parent.parent if path.parent.name else "FOLDER"  # photos/cat/0.jpg: photos holds the classes
        fix = f"to train on its folder of class folders: {train_command(f'data.root={root}')}"
        raise ConfigError(f"'{path}' is an image, not a config file; {fix}")
    if suffix in (".csv", ".tsv"):
        fix = f"to train on the images it lists: {train_command(f'data.csv_file={path}')}"
        raise ConfigError(f"'{path}' is a CSV manifest, not a config file; {fix}")
    if suffix in _WEIGHTS_SUFFIXES:
        fix = f"to start from these weights: {train_command(f'model.pretrained_path={path}')}"
        raise ConfigError(f"'{path}' is a weights file, not a config file; {fix}")


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
    "cutmix_alpha": "aug.cutmix_alpha",
    "cutmix_prob": "aug.mix_prob",
    "labelsmooth": "loss.label_smoothing",
    "hflip": "aug.flip",
    "resize": "data.image_size",
    "rot": "aug.rotation",  # the source's RandomRotation (its degrees), with crop and flip
}
_INI_SPECIAL = (
    "model",
    "depth",
    "gpus",
    "unsuper",
    "dataset",
    "scheduler",
    "criterion",
    "no_head",
    "block_op",
    "autoaug",
)
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


# INI keys whose value is a name from a fixed list: read in any case (optim = RangerLars, scheduler = Cosine), as
# model and criterion always were; the YAML keys keep their one spelling, and their error names it.
_INI_CHOICES = ("model", "optim", "scheduler", "criterion", "dataset", "autoaug")


def _ini_choice(key: str, value: Any) -> Any:
    return value.lower() if key in _INI_CHOICES and isinstance(value, str) else value


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
        parser.read_string(utf8_text(path, ConfigError), source=str(path))
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
            values[key] = _ini_choice(key, _ini_value(raw))
    if values.get("rot") is True:
        raise ConfigError(f"{path}: rot = true: give the rotation's degrees (rot = 15), as aug.rotation takes them")
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
    _ini_criterion(path, values.get("criterion"), tree)
    _ini_block_and_autoaug(path, values, tree)
    gpus = values.get("gpus")
    if gpus is not None:
        _set_dotted(tree, "trainer.devices", _ini_gpus(path, gpus))
    return tree


def _ini_criterion(path: Path, criterion: Any, tree: dict[str, Any]) -> None:
    """criterion -> loss.name (crossentropy is the default; focal is Lin et al.'s)."""
    if criterion is None:
        return
    if str(criterion).lower() not in ("crossentropy", "focal"):
        raise ConfigError(f"{path}: criterion={criterion} is not supported; use 'crossentropy' or 'focal'")
    _set_dotted(tree, "loss.name", str(criterion).lower())


def _ini_block_and_autoaug(path: Path, values: dict[str, Any], tree: dict[str, Any]) -> None:
    """block_op and autoaug as the RotNet-style project meant them.

    ``block_op`` is an inclusive 0-based block index: block_op = 15 keeps blocks 0..15, all 16 of
    EfficientNet-B0 ("block 15 = the same structure as EfficientNet"), so it keeps block_op + 1
    blocks (model.truncate_at counts blocks). ``autoaug = true`` takes torchvision's policy for the
    data: the CIFAR-10 one on CIFAR-10, the ImageNet one (torchvision's default) on anything else.
    """
    block_op = values.get("block_op")
    if block_op is not None:
        if isinstance(block_op, bool) or not isinstance(block_op, int) or block_op < 0:
            raise ConfigError(f"{path}: block_op = {block_op!r} must be a block index 0, 1, 2, ... (15: all of B0)")
        _set_dotted(tree, "model.truncate_at", block_op + 1)
    autoaug = values.get("autoaug")
    if autoaug is True:
        dataset = str(values.get("dataset") or "").lower()
        _set_dotted(tree, "aug.autoaugment", "cifar10" if dataset in ("cifar10", "cifar100") else "imagenet")
    elif autoaug not in (None, False):
        _set_dotted(tree, "aug.autoaugment", autoaug)


def _ini_gpus(path: Path, gpus: Any) -> Any:
    """``gpus = 0,1`` -> devices [0, 1] on a GPU machine; on a machine without one, warn once and use the CPU."""
    given = [g for g in str(gpus).replace(" ", "").split(",") if g != ""]
    if not all(g.isdigit() for g in given):
        raise ConfigError(
            f"{path}: gpus = {gpus} is not a list of GPU numbers; write gpus = 0 or gpus = 0,1 "
            "(or trainer.devices=auto in a YAML config for every GPU)"
        )
    ids = [int(g) for g in given]
    import torch

    if not ids:
        return 1
    if not torch.cuda.is_available():
        warnings.warn(f"gpus = {gpus} asked for GPUs but none is available: training on the CPU", stacklevel=2)
        return 1
    return ids


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def _allowed(info: Any) -> str:
    """The values a field takes, in a few words: its Literal choices, its numeric range, its type."""
    import typing

    def describe(tp: Any) -> list[str]:
        origin = typing.get_origin(tp)
        if origin is Literal:
            return [str(a) for a in typing.get_args(tp)]
        if origin in (typing.Union, types.UnionType):
            return [d for a in typing.get_args(tp) for d in describe(a)]
        if origin is list and typing.get_args(tp):
            return ["[" + " | ".join(describe(typing.get_args(tp)[0])) + ", ...]"]
        if origin is tuple and typing.get_args(tp):
            return ["[" + ", ".join("/".join(describe(a)) for a in typing.get_args(tp)) + "]"]
        if origin is dict:
            return ["{name: ...}"]
        if tp is type(None):
            return ["null"]
        if tp is bool:
            return ["true", "false"]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return ["{...}"]
        return [getattr(tp, "__name__", None) or str(tp).replace("typing.", "")]

    choices = list(dict.fromkeys(describe(info.annotation)))
    bounds = []
    for item in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attr, None) is not None:
                bounds.append(f"{sign}{getattr(item, attr)}")
    return " | ".join(choices) + (f" ({', '.join(bounds)})" if bounds else "")


def _described(info: Any) -> str:
    """A field's allowed values and what it means: the comment beside it in ``--print-config``."""
    return _allowed(info) + (f"; {info.description}" if info.description else "")


def annotated_yaml(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by a comment with its allowed values (``--print-config``).

    Loading the text back gives the same config: the comments are only for the reader.
    """
    lines: list[str] = []

    def emit(model: BaseModel, indent: str) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                emit(value, indent + "  ")
                continue
            plain = model.model_dump(mode="json")[name]
            text = yaml.safe_dump({name: plain}, default_flow_style=True, width=10_000, sort_keys=False).strip()
            lines.append(f"{indent}{text[1:-1]}  # {_described(info)}")
        for name, value in (model.model_extra or {}).items():  # family keys of model.* (checked by the registry)
            text = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()
            lines.append(f"{indent}{text[1:-1]}  # family parameter")

    emit(cfg, "")
    return "\n".join(lines) + "\n"
