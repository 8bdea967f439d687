"""The LightningModule: what one training step, one validation step and one test step mean.

Batches arrive as uint8 images. Augmentation runs here, a whole batch at a time on the
training device (``on_after_batch_transfer``), with a generator seeded from (seed, epoch,
rank) so that a resumed run replays exactly the randomness an uninterrupted one would have
used. The float conversion and normalisation sit inside ``self.model`` (``Normalize`` first),
so every checkpoint and export carries them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from classlab.config import Config
from classlab.data.augment import build_batch_augment, resize_batch, scheduled_size
from classlab.data.rotation import rotate_batch
from classlab.data.tasks import TaskLayout
from classlab.engine.losses import Criterion, build_criterion, class_weight_tensor, task_weight_specs
from classlab.engine.mixing import build_mixing
from classlab.engine.optim import build_optimizer, build_scheduler
from classlab.errors import ClassLabError


def seed_for(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed for each (run seed, epoch, process, purpose)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + stream) % (2**63 - 1)


class ClassifyTask(L.LightningModule):
    """Supervised classification, or the rotation pretext (``task: rotation``) on the same images."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        num_classes: int,
        image_size: int,
        steps_per_epoch: int,
        fill: tuple[int, ...] | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # loss.name / focal_gamma / class_weights / label_smoothing: the training loss (validation stays plain CE).
        self.criterion = build_criterion(cfg.loss, class_weights)
        self.cfg = cfg
        self.num_classes = num_classes
        self.image_size = image_size
        self.steps_per_epoch = steps_per_epoch
        self.rotation = cfg.task == "rotation"
        # Cutout/erasing boxes get the mean colour, which normalises to 0 as in the papers.
        self.alternate_flip = cfg.aug.flip == "alternate"
        aug = cfg.aug.model_copy(update={"flip": False}) if self.alternate_flip else cfg.aug
        self.augment = build_batch_augment(aug, image_size, fill=fill)
        self.mixing = None if self.rotation else build_mixing(cfg.aug, num_classes, cfg.loss.label_smoothing)
        self._generator: torch.Generator | None = None
        self._flip_weights: torch.Tensor | None = None
        self._flip_where = torch.zeros(1, dtype=torch.long)
        top5 = min(5, num_classes)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        # Macro-F1, the usual competition metric on skewed labels: every class counts the same.
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.last_val: dict[str, float] = {}
        self.validated_epoch = -1
        self.has_val = True
        self._resume_mid_epoch: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- batches ----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        epoch, rank = self.current_epoch, self.global_rank
        # Dropout and friends draw from the global generator: reseed it per epoch for exact resume.
        torch.manual_seed(seed_for(self.cfg.seed, epoch, rank, 1))
        self._generator = torch.Generator(device=self.device).manual_seed(seed_for(self.cfg.seed, epoch, rank, 2))
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        # A network whose parts train only in some epochs (fastnet's whitening bias) is told the epoch.
        net_epoch = getattr(self.model.net, "set_epoch", None)
        if callable(net_epoch):
            net_epoch(epoch)

    # -- stopping between two batches and resuming there (engine.callbacks.GracefulStop) -----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mid-epoch, also what the epoch has drawn and summed so far: the random streams and the train metrics."""
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        if not 0 < done < self.trainer.num_training_batches or self._generator is None:
            return
        state = {
            "batches_done": done,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "generator": self._generator.get_state(),
            "generator_device": str(self._generator.device),
            "metrics": {name: _metric_state(m) for name, m in self._train_metrics().items()},
        }
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # Under DDP each process draws its own augmentation stream and sums its own share of the train
            # metrics: process 0's alone, restored in every process, resumed into a different run.
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, state)
            state = dict(state, by_rank=every)
        checkpoint["classlab_mid_epoch"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_mid_epoch = checkpoint.get("classlab_mid_epoch")

    def on_train_start(self) -> None:
        # A restart mid-epoch skips on_train_epoch_start (Lightning's loop), so the epoch's streams come back here.
        state, self._resume_mid_epoch = self._resume_mid_epoch, None
        if state is None or self.trainer.fit_loop.epoch_loop.batch_progress.current.completed != state["batches_done"]:
            return
        by_rank = state.get("by_rank")
        if by_rank and len(by_rank) == self.trainer.world_size:
            state = by_rank[self.global_rank]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        device = self.device if state["generator_device"] != "cpu" else torch.device("cpu")
        self._generator = torch.Generator(device=device)
        self._generator.set_state(state["generator"])
        for name, metric in self._train_metrics().items():
            if name in state["metrics"]:
                _load_metric_state(metric, state["metrics"][name], self.device)

    def _train_metrics(self) -> dict[str, Any]:
        return {"train_loss": self.train_loss, "train_acc": self.train_acc}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training and self.alternate_flip:
            x = self._alternate_flip(x)
        if self.trainer.training and self.augment is not None:
            x = self.augment(x, self._generator)
        if self.trainer.training and self.cfg.aug.size_schedule:
            # aug.size_schedule (progressive resizing): this epoch's size, after every augmentation.
            size = scheduled_size(self.cfg.aug.size_schedule, self.current_epoch)
            if size is not None:
                x = resize_batch(x, size)
        if self.rotation:
            x, y = rotate_batch(x)
        if self.cfg.trainer.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _alternate_flip(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror each image in every other epoch, starting from a random half (airbench's altflip).

        Random flips show some images the same way several epochs running; alternating shows
        both sides of every image within any two epochs. The loaders do not say which image is
        which, so each image's starting side is a bit hashed from its own pixels with weights
        drawn from the run's seed: fixed across epochs, different between images and seeds.
        """
        flat = x.reshape(len(x), -1)
        if self._flip_weights is None or self._flip_where.max() >= flat.shape[1]:
            # 256 pixel values hashed identify an image well enough and cost ~nothing per batch.
            g = torch.Generator().manual_seed(seed_for(self.cfg.seed, 0, 0, 3))
            self._flip_where = torch.randint(0, flat.shape[1], (256,), generator=g).to(x.device)
            self._flip_weights = torch.randint(0, 2**31, (256,), generator=g).to(x.device)
        start = ((flat[:, self._flip_where].long() * self._flip_weights).sum(1) >> 20) & 1
        chosen = (start ^ (self.current_epoch % 2)).bool()[:, None, None, None]
        return torch.where(chosen, x.flip(-1), x)

    # -- steps ------------------------------------------------------------------------------
    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a batch of uint8 images: the configured loss in training, plain CE in validation."""
        logits = self(x)
        if not training:
            return F.cross_entropy(logits, y), logits
        return self.criterion(logits, y, smoothing=0.0 if self.rotation else None), logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixing is not None:
            mixed, soft = self.mixing(self.model.normalize(x), y, self._generator)
            logits = self.model.net(mixed)
            loss = self.mixing.loss(logits, soft)
            target = soft.argmax(1)
        else:
            loss, logits = self.compute_loss(x, y, training=True)
            target = y
        self.track_train_loss(loss)
        self.train_acc.update(logits.detach(), target)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.log("acc", (logits.argmax(1) == target).float().mean(), prog_bar=True, on_step=True, logger=False)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=False)
        return loss

    def track_train_loss(self, loss: torch.Tensor) -> None:
        """Add a step's loss to the epoch's mean; a non-finite one (skipped by the guard) stays out, without a sync."""
        finite = torch.isfinite(loss.detach())
        self.train_loss.update(torch.where(finite, loss.detach(), 0.0), weight=finite.float())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss, logits = self.compute_loss(x, y, training=False)
        self.update_val(loss, logits, y)

    def update_val(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.val_loss.update(loss, weight=len(y))
        self.val_acc.update(logits, y)
        self.val_acc5.update(logits, y)
        self.val_f1.update(logits, y)

    def metric_columns(self) -> list[str]:
        """metrics.csv columns beyond the common ones."""
        return ["val/f1"]

    # -- epoch ends -------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.last_val = {
            "val/loss": float(self.val_loss.compute()),
            "val/acc": float(self.val_acc.compute()),
            "val/acc5": float(self.val_acc5.compute()),
            "val/f1": float(self.val_f1.compute()),
        }
        for metric in (self.val_loss, self.val_acc, self.val_acc5, self.val_f1):
            metric.reset()
        self.validated_epoch = self.current_epoch
        for key, value in self.last_val.items():
            self.log(key, value, prog_bar=key == "val/acc", sync_dist=False)

    def epoch_train_metrics(self) -> dict[str, float]:
        """Train loss/accuracy of the epoch that just ended (synced across processes), then reset."""
        out = {"train/loss": float(self.train_loss.compute()), "train/acc": float(self.train_acc.compute())}
        self.train_loss.reset()
        self.train_acc.reset()
        return out

    # -- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model.net, self.cfg.optim)
        scheduler = build_scheduler(
            optimizer,
            self.cfg.sched,
            epochs=self.cfg.epochs,
            steps_per_epoch=max(1, self.steps_per_epoch),
            val_every=self.cfg.trainer.val_every,
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


# ---------------------------------------------------------------------------------------------
# Multi-task runs (``task: multitask``): one loss per task head, metrics per task
# ---------------------------------------------------------------------------------------------


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

    ``criteria`` (one per task: focal loss, class weights) replace plain cross-entropy in training.
    Without fusion the combined logits are a function of the task logits, so a combined term
    would only re-weight the task terms; with fusion it is what trains the fusion head.
    """
    loss = sum(
        w
        * (
            criteria[t](logits, target)
            if criteria is not None
            else F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        )
        for t, (w, logits, target) in enumerate(zip(layout.weights, task_logits, layout.split(y)))
    )
    if fused:
        loss = loss + F.cross_entropy(combined, y, label_smoothing=label_smoothing)
    return loss


def _metric_state(metric: Any) -> dict[str, Any]:
    """A torchmetrics metric's running sums (not part of its state_dict), on the CPU."""
    state = {name: getattr(metric, name) for name in metric._defaults}
    return {
        "update_count": metric._update_count,
        "state": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()},
    }


def _load_metric_state(metric: Any, saved: dict[str, Any], device: torch.device) -> None:
    for name, value in saved["state"].items():
        setattr(metric, name, value.to(device) if isinstance(value, torch.Tensor) else value)
    metric._update_count = saved["update_count"]
    metric._computed = None


class MultiTaskTask(ClassifyTask):
    """ClassifyTask on the combined class (val/acc, best.ckpt), plus each task's loss and accuracy."""

    def __init__(
        self, model: nn.Module, cfg: Config, layout: TaskLayout, train_labels: torch.Tensor | None = None, **task: Any
    ) -> None:
        """``train_labels`` count the classes of ``loss.class_weights``; ``task``: ClassifyTask's sizes and fill."""
        super().__init__(model, cfg, layout.num_combined, **task)
        self.layout = layout
        self.fused = cfg.model.fusion in ("attention", "attention_only")
        self.task_criteria = nn.ModuleList(
            build_criterion(cfg.loss, w) for w in task_class_weights(cfg, layout, train_labels)
        )
        self.task_acc = nn.ModuleDict(
            {name: MulticlassAccuracy(size, average="micro") for name, size in zip(layout.names, layout.sizes)}
        )
        self.task_f1 = nn.ModuleDict(
            {name: MulticlassF1Score(size, average="macro") for name, size in zip(layout.names, layout.sizes)}
        )

    def metric_columns(self) -> list[str]:
        return ["val/f1", *(f"val/{name}/{m}" for name in self.layout.names for m in ("acc", "f1"))]

    def _forward_tasks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.model.net.forward_tasks(self.model.normalize(x))

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        task_logits, combined = self._forward_tasks(x)
        smoothing = self.cfg.loss.label_smoothing if training else 0.0
        criteria = self.task_criteria if training else None
        return multitask_loss(task_logits, combined, y, self.layout, smoothing, self.fused, criteria), combined

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        task_logits, combined = self._forward_tasks(x)
        self.update_val(multitask_loss(task_logits, combined, y, self.layout, 0.0, self.fused), combined, y)
        for name, logits, target in zip(self.layout.names, task_logits, self.layout.split(y)):
            self.task_acc[name].update(logits, target)
            self.task_f1[name].update(logits, target)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        super().on_validation_epoch_end()
        for name in self.layout.names:
            for kind, metrics in (("acc", self.task_acc), ("f1", self.task_f1)):
                key = f"val/{name}/{kind}"
                self.last_val[key] = float(metrics[name].compute())
                metrics[name].reset()
                self.log(key, self.last_val[key], sync_dist=False)
