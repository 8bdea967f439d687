"""From a config to batches: open the source, check every file, split, decode once, serve.

Training and evaluation both come through ``load_data`` so that they see the same images,
the same split and the same preprocessing; evaluation passes the split saved with the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from classlab.config import Config
from classlab.data.loaders import EpochSampler, MemoryLoader, available_cores, decode, decoded_bytes, stream_loader
from classlab.data.preprocess import compute_stats, image_to_tensor
from classlab.data.sources import EMPTY_CLASS, UNLABELED, Source, check_readable, open_dataset, training_size
from classlab.data.splits import make_split
from classlab.data.tasks import task_columns, task_orders
from classlab.errors import ClassLabError, command

ROTATION_CLASSES = ["0", "90", "180", "270"]
MAX_LISTED = 20


class DataProblems(ClassLabError):
    """Every unreadable file, empty class folder and stray file, reported together."""

    def __init__(self, problems: list[str], made: bool = False) -> None:
        self.problems = problems
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        # A run already made (eval, --resume) was trained on these files: skipping them now would change its
        # split ('the data changed since this run was made'), and eval takes no overrides at all.
        empty = [p for p in problems if p.endswith(f": {EMPTY_CLASS}")]
        if made:
            fix = " since the run was made: restore these files, or point data.root at the original data"
        elif len(empty) == len(problems):  # data.skip_bad_images skips files, and then refused the class itself
            fix = "; give each such class folder its images, or remove the folder to train without that class"
        else:
            fix = "; fix them, or set data.skip_bad_images=true to skip these files"
            fix += " (an empty class folder needs images, or removing)" if empty else ""
        super().__init__(f"{len(problems)} problem(s) in the data{fix}:\n  " + "\n  ".join(shown) + more)


@dataclass
class Part:
    """One split, ready to batch: decoded images in memory, or a source and indices to stream."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    source: Source | None = None
    indices: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def loader(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        size: int,
        workers: int = 0,
        sampler: str = "random",
        shard: bool = False,
    ) -> Any:
        """Batches of this part; ``sampler="balanced"`` (training only) draws every class equally often.

        ``shard``: under DDP each process serves its share (the loaders a fit is given). Everything else (the final
        test in process 0, out-of-fold predictions, eval) needs every image, even while the process group lives on.
        """
        if sampler == "balanced":
            from classlab.data.sampler import BalancedMemoryLoader, BalancedSampler

            if self.images is not None:
                return BalancedMemoryLoader(
                    self.images, self.labels, batch_size, shuffle=True, drop_last=True, seed=seed
                )
            draw = BalancedSampler(self.labels, seed)
            return stream_loader(
                self.source, self.indices, size, batch_size, shuffle=False, workers=workers, seed=seed, sampler=draw
            )
        if self.images is not None:
            return MemoryLoader(
                self.images, self.labels, batch_size, shuffle=shuffle, drop_last=shuffle, seed=seed, shard=shard
            )
        # A fit's validation share under DDP: this process's images, none repeated (Lightning's own sampler pads).
        share = EpochSampler(len(self.indices), seed, shuffle=False, pad=False) if shard and not shuffle else None
        return stream_loader(
            self.source, self.indices, size, batch_size, shuffle=shuffle, workers=workers, seed=seed, sampler=share
        )


@dataclass
class DataBundle:
    classes: list[str]
    size: int
    channels: int
    mode: str
    train: Part
    val: Part | None
    test: Part | None
    split: dict[str, Any]
    bad: list[str] = field(default_factory=list)
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    tasks: dict[str, list[str]] | None = None  # multitask: task -> classes; labels are combined indices
    notices: list[str] = field(default_factory=list)  # lines to show the user (ignored files, ...)
    train_files: list[str] | None = None  # the usable training images in split-index order (out-of-fold CSVs)
    # Source index of each usable image, per source ("train", "test"): bad files skipped shift positions.
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _prepare_source(source: Source, size: int, mode: str, cfg: Config) -> tuple[Part, list[str], np.ndarray]:
    """The whole source as a Part (kept images only), the list of its problems, and the kept images' indices."""
    problems = list(source.problems)
    if mode == "memory":
        threads = cfg.trainer.threads or available_cores()
        dec = decode(source, size, cfg.data.cache_dir, threads=threads, verify=cfg.data.cache_verify)
        return Part(labels=dec.labels, images=dec.images), problems + dec.bad, np.asarray(dec.kept, dtype=np.int64)
    bad = check_readable(source)
    kept = np.array([i for i in range(len(source)) if i not in bad], dtype=np.int64)
    part = Part(labels=torch.from_numpy(source.labels[kept]), source=source, indices=kept)
    return part, problems + list(bad.values()), kept


def _subset(part: Part, idx: list[int]) -> Part:
    index = torch.as_tensor(idx, dtype=torch.long)
    if part.images is not None:
        return Part(labels=part.labels[index], images=part.images[index])
    return Part(labels=part.labels[index], source=part.source, indices=part.indices[np.asarray(idx, dtype=np.int64)])


def _new_split(cfg: Config, dataset: Any, whole: Part, train_kept: np.ndarray) -> dict[str, Any]:
    """A fresh split.json: train/val indices into the kept training images, and what made them."""
    # The kept images' groups: a bad file skipped (data.skip_bad_images) takes its group entry with it.
    groups = dataset.train.groups[train_kept] if dataset.train.groups is not None else None
    given = dataset.train.given_val
    split: dict[str, Any] = make_split(
        whole.labels.numpy(),
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        class_names=dataset.classes,
        groups=groups,
        images_per_class=cfg.data.images_per_class,
        folds=cfg.data.folds,
        fold=cfg.data.fold,
        given_val=given[train_kept] if given is not None else None,
    )
    split.update({"seed": cfg.seed, "images_per_class": cfg.data.images_per_class})
    if given is not None:
        split.update({"val_fraction": None, "val_folder": dataset.train.given_val_from})
    else:
        split["val_fraction"] = cfg.data.val_fraction
    if cfg.data.folds:
        split.update({"folds": cfg.data.folds, "fold": cfg.data.fold or 0})
    split["source_images"] = len(whole)
    return split


def _check_every_class_has_images(cfg: Config, whole: Part, classes: list[str]) -> None:
    """data.skip_bad_images skips files; a class folder left with none (empty, or every file unreadable) still
    became an output of the model, one it never saw an image of."""
    labels = whole.labels
    if cfg.task != "classify" or labels.ndim != 1:
        return
    counts = torch.bincount(labels, minlength=len(classes))
    empty = [name for name, n in zip(classes, counts.tolist(), strict=False) if n == 0]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise ClassLabError(
            f"class(es) {shown} have no usable training image (data.skip_bad_images skips files, not classes): "
            "give them images, or remove their folders (or manifest rows) to train without them"
        )


def _unvalidated(cfg: Config, whole: Part, split: dict[str, Any], classes: list[str]) -> list[str]:
    """Notes naming the classes with no validation image (val/acc says nothing about them) and those with no
    training image (the model cannot learn them: a class whose every group fell on the validation side)."""
    labels = whole.labels.numpy()
    if cfg.task != "classify" or not split["val"] or labels.ndim != 1:
        return []
    grouped = cfg.data.group_column is not None and not split.get("val_folder")
    notes = []
    for side, what in (("val", "validation"), ("train", "training")):
        seen = set(labels[split[side]].tolist())
        missing = [name for i, name in enumerate(classes) if i not in seen and (labels == i).any()]
        if not missing:
            continue
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        other = "training" if side == "val" else "validation"
        if grouped:
            why = f"its groups in column {cfg.data.group_column} are all on the {other} side"
            fix = "give it images in more groups" + ("" if split.get("folds") else ", or try another seed")
        elif side == "val":
            why, fix = "too few images to spare one", "add images, or give the data a val/ folder"
        else:
            why, fix = "all its images are in the validation set", "give it training images"
        effect = "val/acc does not cover them" if side == "val" else "the model cannot learn them"
        notes.append(f"note: no {what} image of {len(missing)} class(es): {shown} ({why}); {effect}: {fix}")
    return notes


def load_data(cfg: Config, split: dict[str, Any] | None = None, with_test: bool = True) -> DataBundle:
    """The configured data, checked, split and decoded."""
    dataset = open_dataset(cfg.data, tasks=task_columns(cfg), orders=task_orders(cfg))
    size = training_size(cfg.data, dataset)
    channels = dataset.train.channels
    total = len(dataset.train) + (len(dataset.test) if dataset.test is not None else 0)
    mode = cfg.data.loader
    if mode == "auto":
        fits = decoded_bytes(total, channels, size) <= cfg.data.memory_limit_mb * 2**20
        mode = "memory" if fits else "stream"
    whole, problems, train_kept = _prepare_source(dataset.train, size, mode, cfg)
    kept = {"train": train_kept}
    test = None
    if with_test and dataset.test is not None:
        test, test_problems, kept["test"] = _prepare_source(dataset.test, size, mode, cfg)
        problems += test_problems
    if problems and not cfg.data.skip_bad_images:
        raise DataProblems(problems, made=split is not None)
    train_files = [dataset.train.describe(int(i)) for i in train_kept]
    classes = dataset.classes
    if cfg.task == "classify" and classes == [UNLABELED]:
        raise ClassLabError(
            f"{cfg.data.root} has images but no class folders: put them in <root>/<class>/ to classify, "
            + command(
                "or pretrain on them with `classlab pretrain rotation` (task: rotation)",
                "or pretrain on them with classlab.train and the override task=rotation",
            )
        )
    if cfg.task == "classify" and len(classes) < 2:
        raise ClassLabError(f"found {len(classes)} class(es) ({', '.join(classes)}); classification needs at least 2")
    if split is None:
        _check_every_class_has_images(cfg, whole, classes)
        split = _new_split(cfg, dataset, whole, train_kept)
    elif split.get("source_images") not in (None, len(whole)):
        raise ClassLabError(
            f"the data changed since this run was made: {len(whole)} usable training images now, "
            f"{split['source_images']} then; point data.root at the original data"
        )
    train = _subset(whole, split["train"])
    val = _subset(whole, split["val"]) if split["val"] else None
    if cfg.task == "rotation":
        classes = ROTATION_CLASSES
    bundle = DataBundle(
        classes,
        size,
        channels,
        mode,
        train,
        val,
        test,
        split,
        bad=problems,
        tasks=dataset.tasks,
        train_files=train_files,
        kept=kept,
    )
    bundle.notices = list(dataset.train.notices) + _unvalidated(cfg, whole, split, classes)
    if split.get("val_folder"):
        bundle.notices.append(
            f"note: validating on {split['val_folder']} ({len(split['val'])} images), the data's own validation "
            "folder, in place of data.val_fraction"
        )
    bundle.mean, bundle.std = _stats(train, size, cfg.aug.mean_subtraction == "pixel")
    if cfg.aug.norm_mean is not None and cfg.aug.norm_std is not None:
        bundle.mean, bundle.std = _fixed_stats(cfg.aug.norm_mean, cfg.aug.norm_std, channels)
    if cfg.data.train_source_size not in (None, size) and mode == "memory":
        bundle.train = _at_source_size(dataset.train, cfg, split["train"], train)
    return bundle


def _fixed_stats(mean: list[float], std: list[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A source's own Normalize(mean, std) in place of the training split's statistics."""
    if len(mean) != channels:
        raise ClassLabError(f"aug.norm_mean has {len(mean)} values for {channels}-channel images: give {channels}")
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def _at_source_size(source: Source, cfg: Config, train_idx: list[int], train: Part) -> Part:
    """The training images decoded again at data.train_source_size (the crops then come from them).

    torchvision's RandomResizedCrop crops the original picture and resizes the crop; cropping the
    copy already resized to the training size would lose detail when the original is larger.
    """
    big = decode(
        source,
        cfg.data.train_source_size,
        cfg.data.cache_dir,
        threads=cfg.trainer.threads or 2,
        verify=cfg.data.cache_verify,
    )
    index = torch.as_tensor(train_idx, dtype=torch.long)
    images, labels = big.images[index], big.labels[index]
    if not torch.equal(labels, train.labels):
        raise ClassLabError("data.train_source_size: the images decoded at the two sizes differ; fix the bad files")
    return Part(labels=labels, images=images)


def _stats(train: Part, size: int, per_pixel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if train.images is not None:
        return compute_stats(train.images, per_pixel)
    rng = np.random.default_rng(0)
    take = rng.choice(len(train.indices), size=min(2000, len(train.indices)), replace=False)
    sample = torch.stack(
        [image_to_tensor(train.source.read(int(train.indices[i]), size), size, train.source.channels) for i in take]
    )
    return compute_stats(sample, per_pixel)
