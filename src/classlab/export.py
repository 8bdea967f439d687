"""``classlab export RUN --format onnx|pt2``: a run's model as a file other runtimes can serve.

The exported model takes float32 NCHW RGB in [0, 1] with any batch size, and returns logits. The
normalisation is the model's own ``Normalize`` (its first layer), so a deployment only has to
decode, resize the shorter side, centre-crop and divide by 255: the same steps as
``data.preprocess``, with no statistics to copy by hand. Class names and the input size travel
inside the file (ONNX ``metadata_props``; the pt2 archive's extra files), so the file alone is
enough to name its predictions.

ONNX goes through ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript) with a dynamic
batch dimension. Only when that fails (a model torch.export cannot capture, onnxscript missing) is the
legacy TorchScript exporter used, with a warning that says why; ``classlab.exporter`` in the file's
metadata records which one wrote it.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from classlab.engine.calibration import temperature_in_use
from classlab.engine.exported import INSTALL_HINT, TEMPERATURE_KEY, OnnxModel, is_exported_file, not_a_run
from classlab.engine.load import LoadedRun, load
from classlab.errors import ClassLabError, first_line, option
from classlab.run import RunFolder, atomic_write_bytes, open_run_at

FORMATS = ("onnx", "pt2")
__all__ = [
    "FORMATS",
    "OnnxModel",
    "baked_temperature",
    "export",
    "ensure_onnx",
    "exported_metadata",
    "input_layout",
    "load_pt2",
    "read_onnx_metadata",
]
OPSET = 18  # the dynamo exporter's lowest
LEGACY_OPSET = 17


def default_path(run: RunFolder, fmt: str, checkpoint: str = "best") -> Path:
    suffix = "" if checkpoint == "best" else f"-{checkpoint.removesuffix('.ckpt')}"
    return run.path / "export" / f"model{suffix}.{fmt}"


ROTATION = "rotation"
ROTATION_OUTPUT = " over the quarter turns each image shows; classes: degrees anticlockwise from upright"


def input_layout(channels: int) -> str:
    """The input tensor a run's exported file takes, in a few words: its channels as the run was trained (a
    greyscale run's file takes one; `classlab export` said 'RGB' of every file)."""
    colour = {3: "RGB", 1: "greyscale (1 channel)"}.get(channels, f"{channels} channels")
    return f"float32 NCHW {colour} in [0, 1]"


def input_recipe(size: int, channels: int) -> str:
    """The preprocessing the exported file expects, with this run's numbers, for whoever deploys the file alone:
    the bare steps without the size left the reader to guess the resize target and the crop. The decode steps
    are data.preprocess's own: without the JPEG draft a full decode of a large photo gives slightly other
    pixels, and without the EXIF turn a phone photo arrives on its side. Transparency as data.preprocess.to_mode
    treats it: laid on white for RGB, dropped by a greyscale run's convert('L')."""
    alpha = (
        "lay transparency on white"
        if channels == 3
        else "make it greyscale with img.convert('L') (transparency dropped, not laid on white)"
    )
    return (
        f"{input_layout(channels)}, any batch size: decode a JPEG at PIL's reduced DCT scale "
        f"(img.draft(img.mode, ({size}, {size})) before img.load()), turn it upright by its EXIF orientation, "
        f"{alpha}; resize the shorter side to {size} px (bilinear), "
        f"centre-crop {size}x{size}, divide by 255; the normalisation is inside the model"
    )


def metadata(loaded: LoadedRun, checkpoint: str) -> dict[str, str]:
    """What a consumer needs besides the weights: names, input layout and where it came from."""
    return {
        "classlab.classes": json.dumps(loaded.classes),
        "classlab.image_size": str(loaded.image_size),
        "classlab.channels": str(loaded.channels),
        "classlab.input": input_recipe(loaded.image_size, loaded.channels),
        "classlab.output": output_text(loaded),
        "classlab.task": loaded.task,
        "classlab.run": str(loaded.run.path.resolve()),  # a relative path means nothing beside a copied file
        "classlab.checkpoint": checkpoint,
        **({"classlab.tasks": json.dumps(loaded.tasks.to_json())} if loaded.tasks is not None else {}),
        **({TEMPERATURE_KEY: repr(loaded.temperature)} if loaded.temperature is not None else {}),
    }


def output_text(loaded: LoadedRun) -> str:
    """What the file's output is. A calibrated run's T is baked into the graph, so a deployment that takes the
    softmax gets the probabilities ``classlab predict RUN`` writes; the metadata keeps T, for the raw logits."""
    if loaded.temperature is None:
        return "logits (softmax for probabilities)" + (ROTATION_OUTPUT if loaded.task == ROTATION else "")
    return (
        f"calibrated logits: the model's logits divided by the temperature T={loaded.temperature!r} "
        f"(classlab eval --calibrate), softmax for calibrated probabilities; times T for the raw logits"
    )


class _Float01(nn.Module):
    """Pins the exported input to float [0, 1]: the uint8 branch of ``Normalize`` is not traced."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class _Float01Tasks(nn.Module):
    """A multitask run: the combined logits first (what a one-output consumer reads), then each task's.

    Without the task outputs the exported file could only name the combined class, and a copy of it
    would predict less than the run it came from (``predict`` writes every task's class).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        task_logits, combined = self.model.net.forward_tasks(self.model.normalize(images))
        return (combined, *task_logits)


def output_names(loaded: LoadedRun) -> list[str]:
    """``logits``, then ``logits_<task>`` for each task of a multitask run."""
    return ["logits", *(f"logits_{name}" for name in (loaded.tasks.names if loaded.tasks is not None else ()))]


def export(
    run: str | Path | RunFolder,
    fmt: str | None = None,
    out: str | Path | None = None,
    *,
    checkpoint: str | None = None,
) -> Path:
    """Export a run's checkpoint (None: best, or the file ``run`` names); returns the written file (default
    ``RUN/export/model.<fmt>``). ``fmt``: onnx or pt2; None: as ``out``'s suffix says, else onnx."""
    fmt = _format(fmt, out)
    if isinstance(run, (str, Path)) and is_exported_file(run) and Path(run).is_file():
        raise not_a_run(run, "export")
    run, checkpoint = open_run_at(run, checkpoint)
    loaded = load(run, checkpoint)
    path = Path(out) if out else default_path(run, fmt, checkpoint)
    model = (_Float01Tasks if loaded.tasks is not None else _Float01)(loaded.model).eval()
    example = torch.rand(2, loaded.channels, loaded.image_size, loaded.image_size)
    meta = metadata(loaded, checkpoint)
    if fmt == "onnx":
        atomic_write_bytes(path, _onnx_bytes(model, example, meta, output_names(loaded)), output=True)
    else:
        atomic_write_bytes(path, _pt2_bytes(model, example, meta), output=True)
    return path


def _format(fmt: str | None, out: str | Path | None) -> str:
    """The format asked for, or the one ``out``'s suffix names; a file named for one format never holds the other
    (an ONNX graph in ``m.pt2`` was written, then failed as a pt2 archive where it was read back)."""
    named = Path(out).suffix.lower().lstrip(".") if out else ""
    if fmt is None:
        return named if named in FORMATS else "onnx"
    if fmt not in FORMATS:
        raise ClassLabError(f"{option('format', fmt)}: choose one of {', '.join(FORMATS)}")
    if named in FORMATS and named != fmt:
        raise ClassLabError(
            f"{option('out', out, quoted=True)} names a .{named} file, and {option('format', fmt)} was asked for: "
            f"name the file .{fmt}, or ask for {option('format', named)}"
        )
    return fmt


def _onnx_bytes(model: nn.Module, example: torch.Tensor, meta: dict[str, str], outputs: list[str]) -> bytes:
    """ONNX through the dynamo exporter (torch.export + onnxscript), the TorchScript one only as a fallback."""
    try:
        import onnx
    except ImportError:
        raise ClassLabError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    try:
        proto, exporter = _onnx_dynamo(model, example, outputs), "dynamo"
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back, saying why
        first = first_line(exc, 200)
        if isinstance(exc, ImportError):
            first = f"onnxscript is not installed: {INSTALL_HINT}"
        warnings.warn(
            f"the dynamo ONNX exporter failed ({first}); exported with the legacy TorchScript exporter instead",
            UserWarning,
            stacklevel=3,
        )
        proto, exporter = onnx.load_from_string(_onnx_legacy(model, example, outputs)), "torchscript"
    for key, value in {**meta, "classlab.exporter": exporter}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "classlab"
    return proto.SerializeToString()


INPUT_NAME = "images"  # what a consumer feeds; it reads ``logits`` (and ``logits_<task>``, see output_names)


def _onnx_dynamo(model: nn.Module, example: torch.Tensor, outputs: list[str]) -> Any:
    import onnxscript  # noqa: F401  (the dynamo exporter's dependency: fail early and clearly without it)

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = {"dynamic_shapes": ({0: batch},), "opset_version": OPSET, "verbose": False}
    names = {"input_names": [INPUT_NAME], "output_names": outputs}
    return torch.onnx.export(model, (example,), None, dynamo=True, **names, **dynamic).model_proto


def _onnx_legacy(model: nn.Module, example: torch.Tensor, outputs: list[str]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice: the fallback already said so
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
            opset_version=LEGACY_OPSET,
        )
    return buffer.getvalue()


def _pt2_bytes(model: nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - tracing failures are model-specific; name the model's limit
        first = first_line(exc, 200)
        raise ClassLabError(
            f"torch.export could not capture this model ({first}); try {option('format', 'onnx')}"
        ) from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"classlab.json": json.dumps(meta)})
    return buffer.getvalue()


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def load_pt2(path: str | Path) -> tuple[Any, dict[str, str]]:
    """(ExportedProgram, metadata) of a pt2 file written by :func:`export`."""
    extra = {"classlab.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra["classlab.json"] or "{}")


def ensure_onnx(run: RunFolder, checkpoint: str = "best") -> Path:
    """The run's ONNX file for ``checkpoint``, exported first if missing, older than the checkpoint, or baked
    with another calibration than the run's now: ``--backend onnx`` gives the probabilities torch gives."""
    path = default_path(run, "onnx", checkpoint)
    if _needs_export(run, checkpoint, path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*probabilities are not calibrated")  # the caller's load said it
            export(run, "onnx", path, checkpoint=checkpoint)
    return path


def _needs_export(run: RunFolder, checkpoint: str, path: Path) -> bool:
    if not path.is_file() or path.stat().st_mtime < run.checkpoint(checkpoint).stat().st_mtime:
        return True
    want = temperature_in_use(run, checkpoint)  # load() warns about an unusable calibration
    try:
        return baked_temperature(path) != want
    except Exception:  # noqa: BLE001 - a file that cannot be read back is exported again
        return True


def exported_metadata(path: str | Path) -> dict[str, str]:
    """The classlab metadata of an exported file, ONNX or pt2."""
    return load_pt2(path)[1] if Path(path).suffix == ".pt2" else read_onnx_metadata(path)


def baked_temperature(path: str | Path) -> float | None:
    """The calibration T an exported file's logits are divided by (its metadata), None for an uncalibrated one."""
    meta = exported_metadata(path)
    return float(meta[TEMPERATURE_KEY]) if TEMPERATURE_KEY in meta else None
