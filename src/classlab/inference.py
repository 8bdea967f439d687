"""Using a trained run: ``classlab.load(run)`` and ``classlab.predict(run, paths)``.

Everything is rebuilt from the run folder alone (config.yaml, classes.json, a checkpoint), and
images go through the very preprocessing training used (``data.preprocess``), so a prediction
here matches what validation measured.
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from classlab.config import Config, validate
from classlab.data.preprocess import IMAGE_EXTENSIONS, BadImage, Normalize, array_to_tensor, image_to_tensor, open_image
from classlab.data.sources import natural_key
from classlab.engine.task import ClassifierModel
from classlab.errors import ClassLabError
from classlab.models import build_model
from classlab.run import RunFolder, open_run, safe_torch_load


class LoadedRun:
    """A trained model with its class names and preprocessing: call it on images.

    For a multitask run ``classes`` are the combined classes and ``tasks`` the TaskLayout.
    """

    tasks: Any = None

    def __init__(
        self, run: RunFolder, cfg: Config, model: ClassifierModel, classes: list[str], size: int, channels: int
    ):
        self.run, self.cfg, self.model, self.classes = run, cfg, model, classes
        self.image_size, self.channels = size, channels

    def to_tensor(self, image: Any) -> torch.Tensor:
        """PIL image, HWC array, CHW uint8 tensor or a path -> the uint8 tensor the model takes."""
        if isinstance(image, (str, Path)):
            return image_to_tensor(open_image(image, self.image_size), self.image_size, self.channels)
        if isinstance(image, Image.Image):
            return image_to_tensor(image, self.image_size, self.channels)
        return array_to_tensor(image, self.image_size, self.channels)

    def _batch(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype == torch.uint8:
            return images if images.shape[-1] == self.image_size else torch.stack([self.to_tensor(i) for i in images])
        return torch.stack([self.to_tensor(i) for i in images])

    @torch.no_grad()
    def probabilities(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        batch = self._batch(images)
        device = next(self.model.parameters()).device
        return self.model(batch.to(device)).float().softmax(1).cpu()

    def task_probabilities(self, images: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Multitask runs: (combined probabilities, each task's probabilities) of the images."""
        if self.tasks is None:
            raise ClassLabError(f"run '{self.run.path}' is not a multitask run; use probabilities()")
        from classlab.multitask import task_probabilities

        return task_probabilities(self.model, self._batch(images))

    def __call__(self, images: Any) -> list[tuple[str, float]]:
        """One image or a list -> [(class name, probability)] of the top class for each."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
        probs = self.probabilities([images] if single else images)
        top = probs.max(1)
        out = [(self.classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
        return out[0] if single else out


def load(run: str | Path | RunFolder, checkpoint: str = "best", device: str = "cpu") -> LoadedRun:
    """Rebuild a run's model from its folder (weights only, no code executed)."""
    run = run if isinstance(run, RunFolder) else open_run(run)
    cfg = validate(run.read_config_tree())
    classes = run.read_classes()
    ckpt = safe_torch_load(run.checkpoint(checkpoint))
    meta = ckpt.get("classlab", {})
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or "model.normalize.mean" not in state:
        raise ClassLabError(f"{run.checkpoint(checkpoint)} is not a classlab checkpoint (no model weights found)")
    size = int(meta.get("image_size") or cfg.data.image_size or 32)
    channels = int(meta.get("channels") or 3)
    num_classes = len(classes)
    spec = cfg.model.spec()
    spec.pop("init_from", None)
    spec.pop("pretrained", None)
    layout = None
    if cfg.task == "multitask":
        from classlab.multitask import build_multitask_net, read_layout

        layout = read_layout(run)
        net = build_multitask_net(spec, layout, channels, size)
    else:
        net = build_model(spec, num_classes, channels, size)
    mean, std = state["model.normalize.mean"], state["model.normalize.std"]
    model = ClassifierModel(Normalize(mean.clone(), std.clone()), net)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ClassLabError(
            f"{run.checkpoint(checkpoint)} does not fit the run's model: {str(exc).splitlines()[0]}"
        ) from None
    model.eval().to(device)
    loaded = LoadedRun(run, cfg, model, classes, size, channels)
    loaded.tasks = layout
    return loaded


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders walked recursively for image files, in natural order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            out.extend(sorted(found, key=lambda p: natural_key(str(p))))
        elif path.exists():
            out.append(path)
        else:
            raise ClassLabError(f"'{path}' does not exist; give image files or folders")
    return out


def _decode(loaded: LoadedRun, path: Path) -> tuple[torch.Tensor | None, str]:
    try:
        return loaded.to_tensor(path), ""
    except BadImage as exc:
        return None, str(exc) or "unreadable image"
    except OSError as exc:  # vanished or unreadable between listing and reading
        return None, (exc.strerror or type(exc).__name__)


def _batches(
    paths: Sequence[Path], loaded: LoadedRun, batch_size: int, threads: int = 2
) -> Iterator[tuple[Sequence[Path], torch.Tensor | None, list[str]]]:
    """Decoded batches; unreadable files come back with an error text instead of a tensor.

    Decoding runs on a thread pool one batch ahead of the model (PIL releases the GIL while it
    decodes and resizes), and at most two batches are ever decoded at once, so memory stays
    bounded however many files there are.
    """
    chunks = (paths[s : s + batch_size] for s in range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:

        def submit(chunk: Sequence[Path]) -> list[Future]:
            return [pool.submit(_decode, loaded, p) for p in chunk]

        current = next(chunks, None)
        pending = submit(current) if current is not None else []
        while current is not None:
            following = next(chunks, None)
            ahead = submit(following) if following is not None else []
            results = [f.result() for f in pending]
            good = [t for t, _ in results if t is not None]
            yield current, (torch.stack(good) if good else None), [e for _, e in results]
            current, pending = following, ahead


@dataclass
class Predictions:
    """What ``predict`` did: counts, the unreadable files, speed and (when kept) the rows.

    Rows are kept only when there is no CSV to stream them into, or when asked (``keep_rows``),
    so a folder of millions of images costs no more memory than one batch.
    """

    out: Path | None
    count: int
    failed: list[tuple[str, str]]
    failed_count: int
    seconds: float
    columns: list[str]
    rows: list[dict[str, Any]] | None = None

    @property
    def images_per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.rows is None:
            raise ClassLabError("the rows were streamed to the CSV only; pass keep_rows=True to keep them in memory")
        return iter(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return list(self)[i] if self.rows is None else self.rows[i]


MAX_FAILED_KEPT = 1000


def load_runs(run: Any, checkpoint: str = "best") -> LoadedRun:
    """One run, or several runs / a k-fold folder as their mean ensemble (``classlab.ensemble``); a LoadedRun as is."""
    from classlab.folds import is_fold_group

    if isinstance(run, LoadedRun):
        return run
    if isinstance(run, (list, tuple)) or (not isinstance(run, RunFolder) and is_fold_group(run)):
        from classlab.ensemble import load_ensemble

        return load_ensemble(run if isinstance(run, (list, tuple)) else [run], checkpoint)
    return load(run, checkpoint)


def predict(
    run: str | Path | RunFolder | Sequence[str | Path | RunFolder],
    paths: Iterable[str | Path],
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    top: int = 3,
    batch_size: int = 256,
    progress: bool = False,
    backend: str = "torch",
    keep_rows: bool | None = None,
    threads: int | None = None,
) -> Predictions:
    """Predict every image; stream the predictions CSV (``path,class,prob,top2_class,...,error``) to ``out``.

    The CSV is written to a temporary file beside ``out`` and renamed at the end, so a reader
    never sees half a file. Unreadable images do not stop the run: they get an ``error`` and
    are listed in the result. ``backend="onnx"`` runs the run's exported ONNX file (exported
    first if missing) in onnxruntime instead of PyTorch.
    """
    if backend not in ("torch", "onnx"):
        raise ClassLabError(f"--backend {backend}: choose 'torch' or 'onnx'")
    loaded = load_runs(run, checkpoint)
    scorer: Any = loaded.probabilities
    if backend == "onnx" and getattr(loaded, "members", None):
        raise ClassLabError("--backend onnx runs one exported model; an ensemble predicts with --backend torch")
    layout = loaded.tasks
    if layout is not None and backend == "onnx":
        raise ClassLabError("--backend onnx does not give the per-task predictions of a multitask run; use torch")
    if backend == "onnx":
        from classlab.export import OnnxModel, ensure_onnx

        onnx_model = OnnxModel(ensure_onnx(loaded.run, checkpoint))
        if onnx_model.classes and onnx_model.classes != loaded.classes:
            raise ClassLabError(f"{onnx_model.path} has other class names than the run; delete it to re-export")
        scorer = lambda batch: onnx_model.logits(batch).softmax(1)  # noqa: E731
    files = expand_paths(paths)
    keep = out is None if keep_rows is None else keep_rows
    k = max(1, min(top, len(loaded.classes)))
    columns = ["path", "class", "prob"]
    for i in range(2, k + 1):
        columns += [f"top{i}_class", f"top{i}_prob"]
    if layout is not None:
        for name in layout.names:
            columns += [f"{name}_class", f"{name}_prob"]
    columns.append("error")
    rows: list[dict[str, Any]] | None = [] if keep else None
    failed: list[tuple[str, str]] = []
    failed_count = 0
    started, done, shown = time.time(), 0, 0.0
    writer = _AtomicCsv(out, columns) if out is not None else None
    try:
        for chunk, batch, errors in _batches(files, loaded, batch_size, threads or min(4, os.cpu_count() or 1)):
            task_probs: list[torch.Tensor] = []
            if batch is not None and layout is not None:
                probs, task_probs = loaded.task_probabilities(batch)
            else:
                probs = scorer(batch) if batch is not None else None
            batch_rows = []
            j = 0
            for path, error in zip(chunk, errors):
                row: dict[str, Any] = dict.fromkeys(columns, "")
                row["path"], row["error"] = str(path), error
                if error:
                    failed_count += 1
                    if len(failed) < MAX_FAILED_KEPT:
                        failed.append((str(path), error))
                else:
                    values, indices = probs[j].topk(k)
                    j += 1
                    row["class"], row["prob"] = loaded.classes[int(indices[0])], round(float(values[0]), 6)
                    for r in range(1, k):
                        row[f"top{r + 1}_class"] = loaded.classes[int(indices[r])]
                        row[f"top{r + 1}_prob"] = round(float(values[r]), 6)
                    for t, tp in enumerate(task_probs):
                        best_p, best_i = tp[j - 1].max(0)
                        row[f"{layout.names[t]}_class"] = layout.classes[t][int(best_i)]
                        row[f"{layout.names[t]}_prob"] = round(float(best_p), 6)
                batch_rows.append(row)
            if writer is not None:
                writer.write(batch_rows)
            if rows is not None:
                rows.extend(batch_rows)
            done += len(chunk)
            now = time.time()
            if progress and (now - shown > 0.5 or done == len(files)):
                shown = now
                rate = done / max(1e-9, now - started)
                bad = f", {failed_count} unreadable" if failed_count else ""
                print(f"\r{done}/{len(files)} images, {rate:.0f} images/s{bad}", end="", file=sys.stderr, flush=True)
        if writer is not None:
            writer.commit()
    finally:
        if writer is not None:
            writer.discard()
    if progress and files:
        print(file=sys.stderr)
    return Predictions(
        out=Path(out) if out is not None else None,
        count=done,
        failed=failed,
        failed_count=failed_count,
        seconds=time.time() - started,
        columns=columns,
        rows=rows,
    )


class _AtomicCsv:
    """A CSV written row by row into a temporary file and renamed onto its name only when complete."""

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.handle = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=columns, lineterminator="\n")
        self.writer.writeheader()
        self.done = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        self.done = True

    def discard(self) -> None:
        if not self.done:
            self.handle.close()
            Path(self.tmp).unlink(missing_ok=True)


__all__ = ["LoadedRun", "Predictions", "load", "predict", "expand_paths", "np"]
