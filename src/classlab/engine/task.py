"""The LightningModule: what one training step, one validation step and one test step mean.

Batches arrive as uint8 images. Augmentation runs here, a whole batch at a time on the
training device (``on_after_batch_transfer``), with a generator seeded from (seed, epoch,
rank) so that a resumed run replays exactly the randomness an uninterrupted one would have
used. The float conversion and normalisation sit inside ``self.model`` (``Normalize`` first),
so every checkpoint and export carries them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from classlab.config import Config
from classlab.data.augment import build_batch_augment
from classlab.data.rotation import rotate_batch
from classlab.engine.losses import build_criterion
from classlab.engine.mixing import build_mixing
from classlab.engine.optim import build_optimizer, build_scheduler


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
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        # Macro-F1, the usual competition metric on skewed labels: every class counts the same.
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.last_val: dict[str, float] = {}
        self.validated_epoch = -1
        self.has_val = True
        self.last_test: dict[str, float] = {}

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

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.trainer.training and self.alternate_flip:
            x = self._alternate_flip(x)
        if self.trainer.training and self.augment is not None:
            x = self.augment(x, self._generator)
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
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixing is not None:
            mixed, soft = self.mixing(self.model.normalize(x), y, self._generator)
            logits = self.model.net(mixed)
            loss = self.mixing.loss(logits, soft)
            target = soft.argmax(1)
        else:
            logits = self(x)
            loss = self.criterion(logits, y, smoothing=0.0 if self.rotation else None)
            target = y
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), target)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self.log("acc", (logits.argmax(1) == target).float().mean(), prog_bar=True, on_step=True, logger=False)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=False)
        return loss

    def _eval_step(
        self, batch: Any, loss_metric: MeanMetric, acc: MulticlassAccuracy, acc5: MulticlassAccuracy, f1: Any
    ) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        loss_metric.update(loss, weight=len(y))
        acc.update(logits, y)
        acc5.update(logits, y)
        f1.update(logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_loss, self.val_acc, self.val_acc5, self.val_f1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_loss, self.test_acc, self.test_acc5, self.test_f1)

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

    def on_test_epoch_end(self) -> None:
        self.last_test = {
            "test/loss": float(self.test_loss.compute()),
            "test/acc": float(self.test_acc.compute()),
            "test/acc5": float(self.test_acc5.compute()),
            "test/f1": float(self.test_f1.compute()),
        }
        for metric in (self.test_loss, self.test_acc, self.test_acc5, self.test_f1):
            metric.reset()
        for key, value in self.last_test.items():
            self.log(key, value)

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


class ClassifierModel(nn.Module):
    """Normalisation + network: the whole function from uint8 (or [0, 1] float) images to logits."""

    def __init__(self, normalize: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
