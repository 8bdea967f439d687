"""Batches for training and evaluation.

Small data (most of what our users train on) is decoded once into a uint8 tensor, cached on
disk by content, and served a whole batch at a time: the per-image work of a PIL pipeline
would otherwise compete with the model for the same two CPU cores. Augmentation happens a
batch at a time on the training device (see ``engine.task``). Data that does not fit in memory
streams through a DataLoader that runs the very same preprocessing per image.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data import Dataset as TorchDataset

from classlab.data.preprocess import BadImage, array_to_tensor, image_to_tensor
from classlab.data.sources import Source
from classlab.errors import ClassLabError
from classlab.run import atomic_torch_save, safe_torch_load

CACHE_VERSION = 3  # 2: entries carry their index and a checksum of the pixels; 3: 16-bit and float images scaled


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(base) / "classlab" / "decoded"


def available_cores() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decoded_bytes(n: int, channels: int, size: int) -> int:
    return n * channels * size * size


class Decoded:
    """A source decoded at one resolution: images (N, C, S, S) uint8, labels, and what failed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, kept: np.ndarray, bad: list[str]) -> None:
        self.images, self.labels, self.kept, self.bad = images, labels, kept, bad


def content_digest(source: Source) -> str:
    """A hash of every byte of the source's images (``data.cache_verify``): catches files changed in place."""
    h = hashlib.blake2b(digest_size=16)
    if source.files:
        for path in source.files:
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")
    elif source.array is not None:
        h.update(np.ascontiguousarray(source.array).data)
    return h.hexdigest()


def _pixels_crc(images: torch.Tensor) -> int:
    return zlib.crc32(images.contiguous().numpy().data) if images.numel() else 0


def _cache_problem(blob: Any, index: dict[str, Any], source: Source) -> str | None:
    """Why a cache entry cannot be trusted, or None. Every field is checked against the source it claims to be."""
    if not isinstance(blob, dict) or not {"images", "labels", "kept", "bad", "index", "crc"} <= set(blob):
        return "is not a decode cache entry"
    if blob["index"] != index:
        return "does not match its index (another source, size or version)"
    images, kept = blob["images"], np.asarray(blob["kept"], dtype=np.int64)
    expected = (len(kept), index["channels"], index["size"], index["size"])
    if images.dtype != torch.uint8 or tuple(images.shape) != expected:
        return f"holds images of shape {tuple(images.shape)}, not {expected}"
    if len(kept) + len(blob["bad"]) != len(source) or (len(kept) and (kept.min() < 0 or kept.max() >= len(source))):
        return "does not cover the source's images"
    if _pixels_crc(images) != blob["crc"]:
        return "has pixels that fail their checksum (cut short or overwritten)"
    return None


def decode(
    source: Source, size: int, cache_dir: str | Path | None = None, threads: int | None = None, verify: bool = False
) -> Decoded:
    """Decode every image of ``source`` once (or load the cached result of an earlier run).

    Files are decoded in parallel threads (PIL releases the GIL while decoding and resizing),
    JPEGs at the reduced scale that still covers ``size`` (a 12-megapixel photo bound for 128
    pixels decodes at 1/8 scale), with a progress bar on a terminal.

    The cache is keyed by the source's fingerprint (file names, sizes, modification times) and,
    with ``verify`` (``data.cache_verify``), a hash of the files' bytes. An entry that does not
    load, does not match its index or fails its checksum is reported and rebuilt.
    """
    channels = source.channels
    if source.array is not None:
        arr = source.array
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.shape[1] == size and arr.shape[2] == size and arr.shape[3] == channels:
            images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
            return Decoded(images, torch.from_numpy(source.labels), np.arange(len(source)), [])
    cache_path = None
    key = source.fingerprint + (f"-{content_digest(source)}" if verify else "")
    index = {"fingerprint": key, "count": len(source), "size": size, "channels": channels, "version": CACHE_VERSION}
    if cache_dir is not False:
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        name = hashlib.sha1(key.encode()).hexdigest()[:16] if verify else source.fingerprint
        cache_path = folder / f"{name}-{size}px-{channels}ch-v{CACHE_VERSION}.pt"
        if cache_path.is_file():
            try:
                blob = safe_torch_load(cache_path)
                problem = _cache_problem(blob, index, source)
            except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
                problem = f"does not load ({str(exc)[:120]})"
            if problem is None:  # labels come from the source: relabelling the same files reuses their pixels
                kept = np.asarray(blob["kept"], dtype=np.int64)
                return Decoded(blob["images"], torch.from_numpy(source.labels[kept].copy()), kept, list(blob["bad"]))
            warnings.warn(f"decode cache {cache_path} {problem}; decoding the images again", stacklevel=2)

    def one(i: int) -> torch.Tensor | str:
        try:
            if source.array is not None:
                return array_to_tensor(source.array[i], size, channels)
            return image_to_tensor(source.read(i, size), size, channels)
        except BadImage as exc:
            return f"{source.describe(i)}: {exc}"

    with ThreadPoolExecutor(max_workers=max(1, threads or available_cores())) as pool:
        results = _with_progress(pool.map(one, range(len(source))), len(source), f"decoding {source.name} at {size}px")
    kept = np.array([i for i, r in enumerate(results) if isinstance(r, torch.Tensor)], dtype=np.int64)
    bad = [r for r in results if isinstance(r, str)]
    images = (
        torch.stack([results[i] for i in kept])
        if len(kept)
        else torch.empty(0, channels, size, size, dtype=torch.uint8)
    )
    labels = torch.from_numpy(source.labels[kept].copy())
    if cache_path is not None:
        try:
            blob = {"images": images, "labels": labels, "kept": kept.tolist(), "bad": bad, "index": index}
            atomic_torch_save(dict(blob, crc=_pixels_crc(images)), cache_path)
        except (OSError, ClassLabError):
            pass  # a read-only cache folder only costs the next run a decode
    return Decoded(images, labels, kept, bad)


def _with_progress(items: Iterator[torch.Tensor | str], total: int, label: str) -> list[torch.Tensor | str]:
    """Collect ``items``, with a progress bar on stderr when it is a terminal and the work is worth one."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if total < 500 or not console.is_terminal:
        return list(items)
    out = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in items:
            out.append(item)
            bar.advance(task)
    return out


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MemoryLoader:
    """Batches of uint8 images straight from a tensor in memory.

    The order of epoch ``e`` is a pure function of (seed, e), so a resumed run sees exactly the
    batches an uninterrupted one would. Under DDP each process takes every world_size-th sample
    of the same permutation (padded to equal length so no process waits on another). It keeps
    how many batches of the epoch it has handed out (``state_dict``): a run stopped between two
    batches (Ctrl-C) resumes with the next one, not with the epoch's first. ``shard=False`` serves every
    image whatever the process group: the final test after a DDP fit runs in process 0 alone, and a
    sharded test loader scored half the test set there.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        shard: bool = True,
    ) -> None:
        self.images, self.labels = images, labels
        self.shard = shard
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # Dropping a ragged last batch keeps BatchNorm away from batches of one; never drop everything.
        self.drop_last = drop_last and len(images) > batch_size
        self.epoch = 0
        self.position = EpochPosition()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict(self.epoch)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = self.position.load_state_dict(state)

    def _epoch_order(self, n: int) -> torch.Tensor:
        """The epoch's order of all n images (a subclass may draw it differently: data.sampler)."""
        return epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)

    def _indices(self) -> torch.Tensor:
        order = self._epoch_order(len(self.images))
        return share_of(order, pad=self.shuffle) if self.shard else order

    def __len__(self) -> int:
        n = share_size(len(self.images), pad=self.shuffle) if self.shard else len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        for b in self.position.batches(self.epoch, len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[idx], self.labels[idx]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: the same for a run and its resumption."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def share_of(order: torch.Tensor, pad: bool = True) -> torch.Tensor:
    """This process's share of an epoch's order under DDP: every world_size-th, padded to equal length for training
    (every process takes the same number of steps). Validation is not padded: the repeated images were counted
    twice in val/acc (metrics are summed over the processes at the epoch's end, so shares may differ by one)."""
    rank, world = _rank_world()
    if world == 1:
        return order
    if not pad:
        return order[rank::world]
    n = len(order)
    per = -(-n // world)
    return torch.cat([order, order[: per * world - n]])[rank::world]


def share_size(n: int, pad: bool = True) -> int:
    """How many of ``n`` images ``share_of`` gives this process."""
    rank, world = _rank_world()
    return -(-n // world) if pad else len(range(rank, n, world))


class EpochPosition:
    """How far into an epoch a training loader has served: saved in a checkpoint, it resumes there.

    Lightning asks a loader for ``state_dict`` when it writes a checkpoint and hands it back when
    it resumes mid-epoch; a loader that cannot skip would restart the epoch's order from its first
    batch and show some images twice. Lightning's own fetcher does not read ahead of a loader
    with a length, so the batches served are the batches trained.
    """

    def __init__(self) -> None:
        self.served = 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self, epoch: int) -> dict[str, int]:
        return {"epoch": epoch, "batches": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Remember where to start; returns the epoch the state belongs to."""
        self._resume = (int(state["epoch"]), int(state["batches"]))
        return self._resume[0]

    def start(self, epoch: int) -> int:
        """The first batch to serve in ``epoch``: past the saved position if it is this epoch's."""
        resume, self._resume = self._resume, None
        self.served = resume[1] if resume is not None and resume[0] == epoch else 0
        return self.served

    def batches(self, epoch: int, total: int) -> Iterator[int]:
        for b in range(self.start(epoch), total):
            self.served = b + 1
            yield b


class EpochSampler(DistributedSampler):
    """The streaming loader's order: epoch ``e``'s is a pure function of (seed, e), as in memory.

    A DistributedSampler, so that Lightning calls ``set_epoch`` and leaves it in place instead of
    wrapping it in a second distributed split; rank and world size are read when iterating, after
    the processes have joined. ``skip`` images at the start of the next iteration are passed over
    (a resumed epoch), without being read.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, pad: bool = True) -> None:
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
        self.n = n
        self.pad = pad  # False: a validation share, every world_size-th image with none repeated (share_of)
        self.skip = 0

    def _epoch_order(self) -> torch.Tensor:
        return epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else torch.arange(self.n)

    def __len__(self) -> int:
        return share_size(self.n, pad=self.pad)

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
        return iter(share_of(self._epoch_order(), pad=self.pad)[start:].tolist())


class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: it counts the batches it hands out, and a restored
    position starts its sampler (an EpochSampler) past them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = EpochPosition()

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict(getattr(self.sampler, "epoch", 0))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch = self.position.load_state_dict(state)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        first = self.position.start(epoch)
        if isinstance(self.sampler, EpochSampler):
            self.sampler.skip = first * self.batch_size  # type: ignore[operator]
        else:
            first = 0
        self.position.served = first
        for batch in super().__iter__():
            self.position.served += 1
            yield batch


class StreamDataset(TorchDataset):
    """Per-image decoding for data too large to hold decoded; same preprocessing as the memory path."""

    def __init__(self, source: Source, indices: np.ndarray, size: int) -> None:
        self.source, self.indices, self.size = source, indices, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return image_to_tensor(self.source.read(j, self.size), self.size, self.source.channels), int(
            self.source.labels[j]
        )


def stream_loader(
    source: Source,
    indices: np.ndarray,
    size: int,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    seed: int,
    sampler: EpochSampler | None = None,
) -> DataLoader:
    """Per-image reading; a training loader (shuffled or with a sampler) orders each epoch as the memory path does."""
    if sampler is None and shuffle:
        sampler = EpochSampler(len(indices), seed)
    training = sampler is not None and getattr(sampler, "pad", True)  # a validation share is never cut short
    return ResumableLoader(
        StreamDataset(source, indices, size),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=training and len(indices) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
