"""Multi-task heads (``task: multitask``): one backbone, one classifier per label column, one combined class.

Competition labels are often a product of independent questions (mask x gender x age group).
Learning each question with its own small head shares the backbone's features across all
images instead of splitting them over every combination, and a rare combination still gets
the gradients of its common parts.

How the pieces fit the single-label machinery:

- The data layer stores one *combined* label per image, the row-major index into the product
  of the tasks' classes (``combined_index``). Splits stratify on it, caches and loaders batch
  it, ``classes.json`` names it (``mask=wear|gender=female|age=<30``); ``TaskLayout.split``
  takes it apart again here.
- The network returns combined *logits*: the sum of the tasks' log-probabilities over the
  product grid, so ``softmax`` of it is exactly the product of the task probabilities and its
  argmax is the most probable combination. Everything that consumes (B, C) logits (validation
  top-1, best.ckpt, ``eval``, TTA, export) therefore works on the combined class unchanged.
- ``model.fusion: attention`` adds a head in which each task's hidden state attends to the
  others'; the mixed states give a correction to the product rule (initialised at zero, so
  training starts from the product rule and only learns dependence between tasks that the
  data supports).
- ``model.fusion: attention_only`` is the seed's AttentionNet as drawn: the same attention over
  the task hidden states, and the combined prediction comes from the fused states alone (a
  linear layer on them, normally initialised); the task heads are trained beside it and give
  the per-task predictions, but the combined class no longer uses their product.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from classlab.engine.losses import Criterion, build_criterion, class_weight_tensor, task_weight_specs
from classlab.engine.task import ClassifyTask
from classlab.errors import ClassLabError, ConfigError

if TYPE_CHECKING:
    from classlab.config import Config
    from classlab.run import RunFolder

TASKS_FILE = "tasks.json"
JOIN, ASSIGN = "|", "="


# ---------------------------------------------------------------------------------------------
# Labels: per-task classes <-> one combined index
# ---------------------------------------------------------------------------------------------


def task_columns(cfg: Config) -> dict[str, str] | None:
    """task name -> manifest column for a multitask config (the column defaults to the task's name)."""
    if cfg.task != "multitask" or not cfg.model.tasks:
        return None
    return {name: head.column or name for name, head in cfg.model.tasks.items()}


def combined_names(task_classes: dict[str, list[str]]) -> list[str]:
    """Names of every combination, row-major (the last task varies fastest): ``mask=wear|gender=male``."""
    names = list(task_classes)
    return [
        JOIN.join(f"{n}{ASSIGN}{c}" for n, c in zip(names, combo))
        for combo in itertools.product(*task_classes.values())
    ]


def combined_index(task_classes: dict[str, list[str]], values: Iterable[Sequence[str]]) -> list[int]:
    """Each row's task values -> its combined label (mixed-radix number, first task most significant)."""
    lookups = [{c: i for i, c in enumerate(classes)} for classes in task_classes.values()]
    sizes = [len(c) for c in task_classes.values()]
    out = []
    for row in values:
        index = 0
        for lookup, size, value in zip(lookups, sizes, row):
            index = index * size + lookup[value]
        out.append(index)
    return out


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a run in config order: names, manifest columns, classes and loss weights."""

    names: tuple[str, ...]
    columns: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: Config, task_classes: dict[str, list[str]]) -> TaskLayout:
        heads = cfg.model.tasks or {}
        for name, head in heads.items():
            found = len(task_classes[name])
            if head.classes is not None and head.classes != found:
                raise ClassLabError(
                    f"model.tasks.{name}.classes={head.classes} but column '{head.column or name}' has {found} "
                    f"classes ({', '.join(task_classes[name])}); fix the number or the data"
                )
        return cls(
            names=tuple(heads),
            columns=tuple(h.column or n for n, h in heads.items()),
            classes=tuple(tuple(task_classes[n]) for n in heads),
            weights=tuple(float(h.weight) for h in heads.values()),
        )

    @classmethod
    def from_json(cls, obj: Any) -> TaskLayout:
        try:
            tasks = obj["tasks"]
            return cls(
                names=tuple(str(t["name"]) for t in tasks),
                columns=tuple(str(t["column"]) for t in tasks),
                classes=tuple(tuple(str(c) for c in t["classes"]) for t in tasks),
                weights=tuple(float(t["weight"]) for t in tasks),
            )
        except (KeyError, TypeError, ValueError):
            raise ClassLabError(
                f"{TASKS_FILE} is damaged: expected {{'tasks': [{{name, column, classes, weight}}]}}"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": [
                {"name": n, "column": col, "classes": list(c), "weight": w}
                for n, col, c, w in zip(self.names, self.columns, self.classes, self.weights)
            ]
        }

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.classes)

    @property
    def num_combined(self) -> int:
        n = 1
        for size in self.sizes:
            n *= size
        return n

    def combined_names(self) -> list[str]:
        return combined_names({n: list(c) for n, c in zip(self.names, self.classes)})

    def split(self, combined: torch.Tensor) -> list[torch.Tensor]:
        """Combined labels -> one label tensor per task (inverse of ``combined_index``)."""
        out = []
        rest = combined
        for size in reversed(self.sizes):
            out.append(rest % size)
            rest = torch.div(rest, size, rounding_mode="floor")
        return out[::-1]


def joint_log_probs(task_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the tasks' log-probabilities over the product grid, flattened row-major: (B, prod C_t).

    Its softmax is the product of the task probabilities (the sum is already normalised), so
    the argmax is the combination the independent heads find most probable.
    """
    joint = F.log_softmax(task_logits[0].float(), dim=1)
    for logits in task_logits[1:]:
        lp = F.log_softmax(logits.float(), dim=1)
        joint = (joint[:, :, None] + lp[:, None, :]).flatten(1)
    return joint


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


class AttentionFusion(nn.Module):
    """Self-attention across the task hidden states, then a correction over the combined classes.

    The output layer starts at zero, so the combined prediction starts as the product rule and
    the fusion only adds what the tasks' interplay is worth on the data.
    """

    def __init__(self, num_tasks: int, dim: int, num_combined: int, zero_init: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(num_tasks * dim, num_combined)
        if zero_init:  # a correction starts at nothing; a prediction of its own (attention_only) does not
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.out(self.norm(tokens + mixed).flatten(1))


def fusion_dim(num_features: int) -> int:
    """Width of a task's hidden state under fusion: the features' width, kept between 32 and 256."""
    return max(32, min(256, num_features))


class MultiTaskNet(nn.Module):
    """Backbone features -> one classifier per task (-> attention fusion) -> combined logits."""

    def __init__(self, backbone: nn.Module, layout: TaskLayout, fusion: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(layout.names)
        features = int(backbone.num_features)
        self.num_features = features
        self.fused = fusion in ("attention", "attention_only")
        self.fusion_only = fusion == "attention_only"
        if self.fused:
            dim = fusion_dim(features)
            # Each task first gets its own hidden state: the tokens the fusion attends over.
            self.hidden = nn.ModuleList(
                nn.Sequential(nn.Linear(features, dim), nn.ReLU(inplace=True)) for _ in layout.names
            )
            self.heads = nn.ModuleList(nn.Linear(dim, size) for size in layout.sizes)
            self.fusion: nn.Module | None = AttentionFusion(
                len(layout.names), dim, layout.num_combined, zero_init=not self.fusion_only
            )
        else:
            self.hidden = nn.ModuleList(nn.Identity() for _ in layout.names)
            self.heads = nn.ModuleList(nn.Linear(features, size) for size in layout.sizes)
            self.fusion = None

    def forward_tasks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(logits of each task, combined logits) of normalised images."""
        features = self.backbone.forward_features(x)
        hidden = [h(features) for h in self.hidden]
        task_logits = [head(h) for head, h in zip(self.heads, hidden)]
        if self.fusion is not None and self.fusion_only:
            return task_logits, self.fusion(torch.stack(hidden, dim=1)).float()
        combined = joint_log_probs(task_logits)
        if self.fusion is not None:
            combined = combined + self.fusion(torch.stack(hidden, dim=1)).float()
        return task_logits, combined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tasks(x)[1]

    # The optimizer's backbone/head groups (optim.backbone_lr_scale) and the fast-path epoch hook.
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))

    def set_epoch(self, epoch: int) -> None:
        hook = getattr(self.backbone, "set_epoch", None)
        if callable(hook):
            hook(epoch)


def _drop_classifier(backbone: nn.Module) -> None:
    """The backbone's own classifier is never used (the task heads replace it): keep it out of the weights."""
    from classlab.models.net import ClassifierNet

    if isinstance(backbone, ClassifierNet):
        backbone.head.fc = nn.Identity()
        return
    inner = getattr(backbone, "model", None)
    if inner is not None and hasattr(inner, "reset_classifier"):
        inner.reset_classifier(0)


def build_multitask_net(spec: dict[str, Any], layout: TaskLayout, in_chans: int, image_size: int) -> MultiTaskNet:
    """The backbone the ``model:`` section names (surgery, freezing, pretrained weights) with task heads on top."""
    from classlab.models import build_model, check_param_budget

    backbone_spec = {k: v for k, v in spec.items() if k != "max_params"}
    backbone = build_model(backbone_spec, 2, in_chans, image_size)
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_features"):
        raise ConfigError(f"model {spec.get('name')!r} has no pooled features to put task heads on")
    _drop_classifier(backbone)
    net = MultiTaskNet(backbone, layout, spec.get("fusion"))
    check_param_budget(net, spec.get("max_params"))
    return net


def task_class_weights(cfg: Config, layout: TaskLayout, train_labels: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each task's class weights (``loss.class_weights``), counted on the training split's labels."""
    specs = task_weight_specs(cfg.loss.class_weights, layout.names)
    if train_labels is None:
        if any(s is not None for s in specs.values()):
            raise ClassLabError("loss.class_weights needs the training labels to count classes")
        return [None] * len(layout.names)
    per_task = layout.split(torch.as_tensor(train_labels, dtype=torch.long))
    return [
        class_weight_tensor(specs[name], labels, list(classes), f"loss.class_weights.{name}")
        for name, labels, classes in zip(layout.names, per_task, layout.classes)
    ]


def read_layout(run: RunFolder) -> TaskLayout:
    if not (run.path / TASKS_FILE).is_file():
        raise ClassLabError(f"multitask run '{run.path}' has no {TASKS_FILE}; it was not written by this version")
    return TaskLayout.from_json(run.read_json(TASKS_FILE))


# ---------------------------------------------------------------------------------------------
# Loss, metrics, the LightningModule
# ---------------------------------------------------------------------------------------------


def multitask_loss(
    task_logits: Sequence[torch.Tensor],
    combined: torch.Tensor,
    y: torch.Tensor,
    layout: TaskLayout,
    label_smoothing: float = 0.0,
    fused: bool = False,
    criteria: Sequence[Criterion] | None = None,
) -> torch.Tensor:
    """Sum over tasks of weight_t * loss_t; with fusion, plus the CE of the combined prediction.

    Without fusion the combined logits are a function of the task logits, so a combined term
    would only re-weight the task terms; with fusion it is what trains the fusion head.
    ``criteria`` (one per task: focal loss, class weights) replace plain cross-entropy in training.
    """
    targets = layout.split(y)
    loss = sum(
        w
        * (
            criteria[t](logits, target)
            if criteria is not None
            else F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        )
        for t, (w, logits, target) in enumerate(zip(layout.weights, task_logits, targets))
    )
    if fused:
        loss = loss + F.cross_entropy(combined, y, label_smoothing=label_smoothing)
    return loss


class MultiTaskTask(ClassifyTask):
    """ClassifyTask on the combined class (val/acc, best.ckpt), plus each task's loss and accuracy."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        layout: TaskLayout,
        image_size: int,
        steps_per_epoch: int,
        fill: tuple[int, ...] | None = None,
        train_labels: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, cfg, layout.num_combined, image_size, steps_per_epoch, fill=fill)
        self.layout = layout
        self.fused = cfg.model.fusion in ("attention", "attention_only")
        weights = task_class_weights(cfg, layout, train_labels)
        self.task_criteria = nn.ModuleList(build_criterion(cfg.loss, w) for w in weights)
        self.task_acc = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(size, average="micro")
                for stage in ("val", "test")
                for name, size in zip(layout.names, layout.sizes)
            }
        )
        self.task_f1 = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassF1Score(size, average="macro")
                for stage in ("val", "test")
                for name, size in zip(layout.names, layout.sizes)
            }
        )

    def metric_columns(self) -> list[str]:
        return ["val/f1", *(f"val/{name}/{m}" for name in self.layout.names for m in ("acc", "f1"))]

    def _forward_tasks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.model.net.forward_tasks(self.model.normalize(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        task_logits, combined = self._forward_tasks(x)
        loss = multitask_loss(
            task_logits, combined, y, self.layout, self.cfg.loss.label_smoothing, self.fused, self.task_criteria
        )
        self.train_loss.update(loss.detach())
        self.train_acc.update(combined.detach(), y)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.log("acc", (combined.argmax(1) == y).float().mean(), prog_bar=True, on_step=True, logger=False)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=False)
        return loss

    def _stage_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        task_logits, combined = self._forward_tasks(x)
        loss = multitask_loss(task_logits, combined, y, self.layout, 0.0, self.fused)
        loss_metric, acc, acc5 = (
            (self.val_loss, self.val_acc, self.val_acc5)
            if stage == "val"
            else (self.test_loss, self.test_acc, self.test_acc5)
        )
        loss_metric.update(loss, weight=len(y))
        acc.update(combined, y)
        acc5.update(combined, y)
        (self.val_f1 if stage == "val" else self.test_f1).update(combined, y)
        for name, logits, target in zip(self.layout.names, task_logits, self.layout.split(y)):
            self.task_acc[f"{stage}_{name}"].update(logits, target)
            self.task_f1[f"{stage}_{name}"].update(logits, target)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._stage_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._stage_step(batch, "test")

    def _task_metrics(self, stage: str) -> dict[str, float]:
        out = {}
        for name in self.layout.names:
            for kind, metrics in (("acc", self.task_acc), ("f1", self.task_f1)):
                metric = metrics[f"{stage}_{name}"]
                out[f"{stage}/{name}/{kind}"] = float(metric.compute())
                metric.reset()
        for key, value in out.items():
            self.log(key, value, sync_dist=False)
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        super().on_validation_epoch_end()
        self.last_val.update(self._task_metrics("val"))

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.last_test.update(self._task_metrics("test"))


# ---------------------------------------------------------------------------------------------
# Outside Lightning: test after training, eval, predict
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_tasks(model: nn.Module, loader: Iterable) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(each task's logits, combined logits, combined labels) of a whole loader; ``model`` is a ClassifierModel."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_task: list[list[torch.Tensor]] = []
    combined, labels = [], []
    try:
        for x, y in loader:
            task_logits, joint = model.net.forward_tasks(model.normalize(x.to(device)))
            if not per_task:
                per_task = [[] for _ in task_logits]
            for bucket, logits in zip(per_task, task_logits):
                bucket.append(logits.float().cpu())
            combined.append(joint.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not combined:
        return [], torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return [torch.cat(b) for b in per_task], torch.cat(combined), torch.cat(labels)


def task_accuracies(
    layout: TaskLayout, task_logits: Sequence[torch.Tensor], labels: torch.Tensor, prefix: str
) -> dict[str, float]:
    """``{prefix}/<task>/acc`` for every task (NaN for no images)."""
    if len(labels) == 0:
        return {f"{prefix}/{name}/acc": float("nan") for name in layout.names}
    return {
        f"{prefix}/{name}/acc": float((logits.argmax(1) == target).float().mean())
        for name, logits, target in zip(layout.names, task_logits, layout.split(labels))
    }


def task_f1_scores(
    layout: TaskLayout, task_logits: Sequence[torch.Tensor], labels: torch.Tensor, prefix: str
) -> dict[str, float]:
    """``{prefix}/<task>/f1``: each task's macro-F1 (NaN for no images)."""
    from classlab.engine.evaluate import macro_f1

    return {
        f"{prefix}/{name}/f1": macro_f1(logits, target, size) if len(labels) else float("nan")
        for name, logits, target, size in zip(layout.names, task_logits, layout.split(labels), layout.sizes)
    }


@torch.no_grad()
def task_probabilities(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(combined probabilities, each task's probabilities) of a uint8 batch."""
    device = next(model.parameters()).device
    task_logits, combined = model.net.forward_tasks(model.normalize(batch.to(device)))
    return combined.float().softmax(1).cpu(), [t.float().softmax(1).cpu() for t in task_logits]
