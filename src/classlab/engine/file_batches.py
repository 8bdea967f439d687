"""Image files to model-ready batches, decoded on threads one batch ahead of the model.

``predict`` and ``eval --data`` read files that no data set lists: each file goes through the run's
own preprocessing (``LoadedRun.to_tensor``: the one path training used), and a file that cannot be
read comes back with the reason instead of a tensor, so one bad file never stops the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from classlab.data.preprocess import BadImage, open_image
from classlab.data.sources import unreadable_kind
from classlab.engine.load import LoadedRun
from classlab.engine.tta import TTAPlan, image_views


def decode_file(loaded: LoadedRun, path: Path, plan: TTAPlan | None = None) -> tuple[torch.Tensor | None, str]:
    """The image as the model takes it; with image-level TTA its crops at every scale (V, C, S, S)."""
    if not path.is_file():  # never open a pipe (it would wait for ever)
        return None, unreadable_kind(path)
    try:
        if plan is not None and plan.scales:
            img = open_image(path, max(plan.scales), loaded.max_image_pixels)
            return image_views(img, plan.scales, loaded.image_size, loaded.channels), ""
        return loaded.to_tensor(path), ""
    except BadImage as exc:
        return None, str(exc) or "unreadable image"
    except OSError as exc:  # vanished or unreadable between listing and reading
        return None, (exc.strerror or type(exc).__name__)


def images_a_batch(batch_size: int, plan: TTAPlan | None) -> int:
    """Images decoded together: with image-level views, few enough that their crops make about one batch."""
    return max(1, batch_size // (10 * len(plan.scales))) if plan is not None and plan.scales else batch_size


def file_batches(
    paths: Sequence[Path], loaded: LoadedRun, batch_size: int, threads: int = 2, plan: TTAPlan | None = None
) -> Iterator[tuple[Sequence[Path], torch.Tensor | None, list[str]]]:
    """Decoded batches; unreadable files come back with an error text instead of a tensor.

    Decoding runs on a thread pool one batch ahead of the model (PIL releases the GIL while it
    decodes and resizes), and at most two batches are ever decoded at once, so memory stays
    bounded however many files there are.
    """
    chunks = (paths[s : s + batch_size] for s in range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:

        def submit(chunk: Sequence[Path]) -> list[Future]:
            return [pool.submit(decode_file, loaded, p, plan) for p in chunk]

        current = next(chunks, None)
        pending = submit(current) if current is not None else []
        while current is not None:
            following = next(chunks, None)
            ahead = submit(following) if following is not None else []
            results = [f.result() for f in pending]
            good = [t for t, _ in results if t is not None]
            yield current, (torch.stack(good) if good else None), [e for _, e in results]
            current, pending = following, ahead
