"""A trained run back in memory: ``classlab.load(run)``.

Everything is rebuilt from the run folder alone (config.yaml, classes.json, a checkpoint), and
images go through the very preprocessing training used (``data.preprocess``), so a prediction
here matches what validation measured. eval, predict and export all start here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from classlab.config import Config, saved_tree, validate
from classlab.data.preprocess import Normalize, array_to_tensor, image_to_tensor, open_image
from classlab.data.tasks import read_layout
from classlab.engine.predict import probabilities, task_probabilities
from classlab.errors import ClassLabError
from classlab.models import build_model
from classlab.models.multitask import build_multitask_net
from classlab.models.net import ClassifierModel
from classlab.run import RunFolder, open_run_at, safe_torch_load


def rotation_note(where: object, run: object = None) -> str:
    """What a rotation pretext run's predictions mean, said wherever one is predicted or exported: its classes are
    angles, which a user who meant its classifier would otherwise take for class names. ``run``: the run folder to
    train a classifier from (None for an exported file, whose folder may be elsewhere)."""
    return (
        f"note: {where} is a rotation pretext model: its class is the quarter turn each image shows (degrees "
        f"anticlockwise from upright; turn it back clockwise by that); to classify images, train from its run: "
        f"classlab train model.init_from={run or 'RUN'}"
    )


class LoadedRun:
    """A trained model with its class names and preprocessing: call it on images.

    For a multitask run ``classes`` are the combined classes and ``tasks`` the TaskLayout.
    """

    tasks: Any = None
    checkpoint: str = "best"  # the checkpoint the weights came from (the run's file name, without .ckpt)

    def __init__(
        self, run: RunFolder, cfg: Config, model: ClassifierModel, classes: list[str], size: int, channels: int
    ):
        self.run, self.cfg, self.model, self.classes = run, cfg, model, classes
        self.image_size, self.channels = size, channels
        self.max_image_pixels = cfg.data.max_image_pixels if cfg is not None else None

    @property
    def task(self) -> str:
        """What the model predicts: 'classify', 'multitask', or 'rotation' (a pretext run: how far each image
        is turned from upright, its classes the angles in degrees anticlockwise)."""
        return self.cfg.task if self.cfg is not None else "classify"

    def to_tensor(self, image: Any) -> torch.Tensor:
        """PIL image, HWC array, CHW uint8 tensor or a path -> the uint8 tensor the model takes."""
        if isinstance(image, (str, Path)):
            image = open_image(image, self.image_size, self.max_image_pixels)
            return image_to_tensor(image, self.image_size, self.channels)
        if isinstance(image, Image.Image):
            return image_to_tensor(image, self.image_size, self.channels)
        return array_to_tensor(image, self.image_size, self.channels)

    def _batch(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype == torch.uint8:
            return images if images.shape[-1] == self.image_size else torch.stack([self.to_tensor(i) for i in images])
        return torch.stack([self.to_tensor(i) for i in images])

    def probabilities(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        return probabilities(self.model, self._batch(images))

    def task_probabilities(self, images: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Multitask runs: (combined probabilities, each task's probabilities) of the images."""
        if self.tasks is None:
            raise ClassLabError(f"run '{self.run.path}' is not a multitask run; use probabilities()")
        return task_probabilities(self.model, self._batch(images))

    def __call__(self, images: Any) -> list[tuple[str, float]]:
        """One image or a list -> [(class name, probability)] of the top class for each."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
        probs = self.probabilities([images] if single else images)
        top = probs.max(1)
        out = [(self.classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
        return out[0] if single else out


def load(run: str | Path | RunFolder, checkpoint: str | None = None, device: str = "cpu") -> LoadedRun:
    """Rebuild a run's model from its folder, or from one of its checkpoint files (weights only, no code executed).

    ``checkpoint``: best, last, epochN; None: best, or the file ``run`` names."""
    run, checkpoint = open_run_at(run, checkpoint)
    cfg = validate(saved_tree(run.read_config_tree()))
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
    for key in ("init_from", "pretrained", "pretrained_path", "weights"):
        spec.pop(key, None)  # the checkpoint holds the weights; the source may be gone
    layout = None
    if cfg.task == "multitask":
        layout = read_layout(run)
        net = build_multitask_net(spec, layout, channels, size)
    else:
        net = build_model(spec, num_classes, channels, size)
    mean, std = state["model.normalize.mean"], state["model.normalize.std"]
    model = ClassifierModel(Normalize(mean.clone(), std.clone()), net)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise ClassLabError(_misfit(run, checkpoint, meta, classes, cfg.task, model, weights)) from None
    model.eval().to(device)
    loaded = LoadedRun(run, cfg, model, classes, size, channels)
    loaded.tasks = layout
    loaded.checkpoint = checkpoint
    return loaded


def _misfit(
    run: RunFolder,
    checkpoint: str,
    meta: dict[str, Any],
    classes: list[str],
    task: str,
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
) -> str:
    """Why a checkpoint's weights do not fit the run's model, in one line.

    torch's own message is a multi-line list whose first line says nothing; the usual cause is a
    checkpoint copied from another run, which its saved task and classes show.
    """
    path = run.checkpoint(checkpoint)
    theirs = meta.get("classes")
    if isinstance(theirs, list) and (theirs != classes or meta.get("task", task) != task):
        shown = ", ".join(map(str, theirs[:4])) + (", ..." if len(theirs) > 4 else "")
        return (
            f"{path} comes from another run: a {meta.get('task', 'classify')} run with {len(theirs)} classes "
            f"({shown}), while '{run.path}' is a {task} run with {len(classes)}; give the run folder that "
            "wrote it, or that run's checkpoint file"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if shapes:
        key = shapes[0]
        problem = f"{key} is {list(weights[key].shape)} in it, {list(own[key].shape)} in the model"
    elif missing:
        problem = f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    else:
        problem = f"it has {extra[0]} the model lacks" if extra else "its tensors differ"
    return (
        f"{path} does not fit the model of '{run.path}' ({problem}); it was written by another run or another "
        "classlab version: give the run folder that wrote it"
    )
