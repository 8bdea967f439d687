"""Using a trained run: ``classlab.load(run)`` and ``classlab.predict(run, paths)``.

Everything is rebuilt from the run folder alone (config.yaml, classes.json, a checkpoint), and
images go through the very preprocessing training used (``data.preprocess``), so a prediction
here matches what validation measured.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
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
from classlab.run import RunFolder, atomic_write_text, open_run, safe_torch_load


class LoadedRun:
    """A trained model with its class names and preprocessing: call it on images."""

    def __init__(
        self, run: RunFolder, cfg: Config, model: ClassifierModel, classes: list[str], size: int, channels: int
    ):
        self.run, self.cfg, self.model, self.classes = run, cfg, model, classes
        self.image_size, self.channels = size, channels

    def to_tensor(self, image: Any) -> torch.Tensor:
        """PIL image, HWC array, CHW uint8 tensor or a path -> the uint8 tensor the model takes."""
        if isinstance(image, (str, Path)):
            return image_to_tensor(open_image(image), self.image_size, self.channels)
        if isinstance(image, Image.Image):
            return image_to_tensor(image, self.image_size, self.channels)
        return array_to_tensor(image, self.image_size, self.channels)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype == torch.uint8:
            batch = images if images.shape[-1] == self.image_size else torch.stack([self.to_tensor(i) for i in images])
        else:
            batch = torch.stack([self.to_tensor(i) for i in images])
        device = next(self.model.parameters()).device
        return self.model(batch.to(device)).float().softmax(1).cpu()

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
    return LoadedRun(run, cfg, model, classes, size, channels)


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


def _batches(
    paths: list[Path], loaded: LoadedRun, batch_size: int
) -> Iterator[tuple[list[Path], torch.Tensor | None, list[str]]]:
    """Decoded batches; unreadable files come back with an error text instead of a tensor."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        tensors, errors = [], []
        for p in chunk:
            try:
                tensors.append(loaded.to_tensor(p))
                errors.append("")
            except BadImage as exc:
                tensors.append(None)
                errors.append(str(exc))
        good = [t for t in tensors if t is not None]
        yield chunk, (torch.stack(good) if good else None), errors


def predict(
    run: str | Path | RunFolder,
    paths: Iterable[str | Path],
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    top: int = 3,
    batch_size: int = 256,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Predict every image; write the predictions CSV (``path,class,prob,top2_class,...,error``) if ``out``."""
    loaded = load(run, checkpoint)
    files = expand_paths(paths)
    k = max(1, min(top, len(loaded.classes)))
    columns = ["path", "class", "prob"]
    for i in range(2, k + 1):
        columns += [f"top{i}_class", f"top{i}_prob"]
    columns.append("error")
    rows: list[dict[str, Any]] = []
    started, done = time.time(), 0
    for chunk, batch, errors in _batches(files, loaded, batch_size):
        probs = loaded.probabilities(batch) if batch is not None else None
        j = 0
        for path, error in zip(chunk, errors):
            row: dict[str, Any] = dict.fromkeys(columns, "")
            row["path"], row["error"] = str(path), error
            if not error:
                values, indices = probs[j].topk(k)
                j += 1
                row["class"], row["prob"] = loaded.classes[int(indices[0])], round(float(values[0]), 6)
                for r in range(1, k):
                    row[f"top{r + 1}_class"] = loaded.classes[int(indices[r])]
                    row[f"top{r + 1}_prob"] = round(float(values[r]), 6)
            rows.append(row)
        done += len(chunk)
        if progress:
            rate = done / max(1e-9, time.time() - started)
            print(f"\r{done}/{len(files)} images, {rate:.0f} images/s", end="", file=sys.stderr, flush=True)
    if progress and files:
        print(file=sys.stderr)
    if out is not None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out, buffer.getvalue())
    return rows


__all__ = ["LoadedRun", "load", "predict", "expand_paths", "np"]
