"""Pretrained weights from the hubs (torchvision, timm / Hugging Face) or a file, and the preprocessing they expect.

Where weights come from, by ``model.name``:

- a torchvision name (``mobilenet_v2``, ``convnext_tiny``, ... and classlab's ``resnet18``..``resnet152``,
  which are torchvision's modules): torchvision's weights API, tag ``model.weights`` (default: the
  model's ``DEFAULT``), cached under ``$TORCH_HOME/hub/checkpoints``;
- ``timm:<name>`` (also ``timm:<name>.<tag>`` and ``timm:hf-hub:<repo>``) and classlab's
  ``efficientnet_b*`` (timm's modules): timm's pretrained configs, cached under ``$HF_HOME``;
- ``model.pretrained_path``: a local ``.pth``/``.pt``/``.safetensors`` state dict in classlab,
  torchvision, timm or ``efficientnet_pytorch`` key layout, read without executing code.

Every tensor of the model but its classifier must be matched by name and shape; a file for
another architecture is refused with a few of the tensors that do not match, so a backbone
never half-loads silently. The weights' mean/std and input size (ImageNet's, or timm's
``pretrained_cfg``) become the run's normalisation and default ``data.image_size``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from classlab.config import Config
from classlab.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
SHOWN = 3  # mismatched tensors named in the one-line error


@dataclass(frozen=True)
class Preprocessing:
    """What the weights were trained on: normalisation in [0, 1] units and the square input side."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    source: str  # e.g. "torchvision MobileNet_V2_Weights.IMAGENET1K_V2", "timm resnet18.a1_in1k"


@dataclass
class LoadReport:
    """What loading did, for the run's first lines and summary.json."""

    source: str
    loaded: int
    left: list[str]
    layout: str
    file: str | None = None
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = {"source": self.source, "layout": self.layout, "loaded_tensors": self.loaded, "left": self.left}
        if self.file:
            out.update(file=Path(self.file).name, sha256=self.sha256)
        return out

    def line(self) -> str:
        left = ", ".join(self.left) if self.left else "none"
        where = f" from {Path(self.file).name} (sha256 {self.sha256[:12]})" if self.file and self.sha256 else ""
        return f"pretrained weights ({self.source}){where}: loaded {self.loaded} tensors, left {len(self.left)}: {left}"


WEIGHT_KEYS = ("pretrained", "pretrained_path", "weights")


def without_weights(spec: dict[str, Any]) -> dict[str, Any]:
    """The model ``spec`` describes, built without reading its weights (they come from a checkpoint)."""
    return {k: v for k, v in spec.items() if k not in WEIGHT_KEYS}


def refill_as_at_start(model: nn.Module, report: dict[str, Any]) -> None:
    """A model built ``without_weights`` whose weights were loaded once (``report``: that load's summary) and now
    come from a checkpoint: what the load filled freezes as it froze then (``freeze: all`` leaves a rebuilt neck
    training only while no weights fill it); the values are the checkpoint's."""
    from classlab.models.surgery import _freeze_filled

    left = set(report.get("left") or [])
    _freeze_filled(model, {k for k in model.state_dict() if k not in left})


def wants_weights(spec: dict[str, Any]) -> bool:
    """``pretrained: true``, or a ``pretrained_path`` without ``pretrained: false``."""
    pretrained = spec.get("pretrained")
    return bool(pretrained) or (pretrained is None and bool(spec.get("pretrained_path")))


def check_spec(spec: dict[str, Any]) -> None:
    """Config-time checks of the weight keys (no file is read, nothing is downloaded)."""
    pretrained, path, tag = spec.get("pretrained"), spec.get("pretrained_path"), spec.get("weights")
    if pretrained is False and path:
        raise ConfigError("model.pretrained=false contradicts model.pretrained_path: remove one of them")
    if tag is not None and path:
        raise ConfigError("model.weights picks hub weights, model.pretrained_path a file: set only one of them")
    if tag is not None and not pretrained:
        raise ConfigError(f"model.weights={tag!r} needs model.pretrained=true")
    if pretrained and not path:
        _hub(spec)  # unknown names and tags fail here, before any data is read
    if spec.get("unfreeze_at_epoch") is not None and str(spec.get("freeze") or "none") != "none":
        raise ConfigError("model.unfreeze_at_epoch freezes the backbone itself until that epoch: remove model.freeze")


# ---------------------------------------------------------------------------------------------
# Which hub, which weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hub:
    library: str  # "torchvision" or "timm"
    name: str  # torchvision model name, or the timm name with its tag
    tag: str | None = None  # torchvision weights enum member


def _timm_name(spec: dict[str, Any]) -> str | None:
    """The timm name whose weights fit this model, or None."""
    name, tag = spec["name"], spec.get("weights")
    if name.startswith(TIMM_PREFIX):
        base = name[len(TIMM_PREFIX) :]
    elif re.fullmatch(r"efficientnet_b\d", name):
        base = f"tf_{name}" if spec.get("tf_same") else name
    else:
        return None
    if tag is not None:
        if "." in base or base.startswith("hf-hub:"):
            raise ConfigError(f"model.weights={tag!r} and the tag in model.name {name!r}: give the tag once")
        base = f"{base}.{tag}"
    return base


def _hub(spec: dict[str, Any]) -> _Hub:
    from classlab.models.torchvision_net import is_torchvision_name

    name = spec["name"]
    timm_name = _timm_name(spec)
    if timm_name is not None:
        if not timm_name.startswith("hf-hub:"):
            import timm

            if not timm.is_model(timm_name) or _timm_cfg(timm_name) is None:
                raise ConfigError(
                    f"timm has no pretrained weights {timm_name!r} for model.name {name!r}: "
                    f"see timm.list_pretrained('{timm_name.split('.')[0]}*') for the tags"
                )
        return _Hub("timm", timm_name)
    if is_torchvision_name(name):
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        tag = spec.get("weights") or "DEFAULT"
        if tag not in enum.__members__ and tag != "DEFAULT":
            raise ConfigError(
                f"unknown model.weights {tag!r} for {name}: torchvision has {', '.join(enum.__members__)}"
            )
        return _Hub("torchvision", name, enum[tag].name)
    raise ConfigError(
        f"model {name!r} has no published pretrained weights: set model.pretrained_path to a weights file, "
        "model.init_from to a run, or use a torchvision name (mobilenet_v2, resnet18, ...) or timm:<name>"
    )


@cache
def _timm_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def preprocessing(spec: dict[str, Any]) -> Preprocessing | None:
    """The mean/std and input size the weights expect; None for weights of classlab's own families.

    Hub weights say so in their metadata (torchvision's transforms, timm's pretrained_cfg); a
    file has no metadata, so an ImageNet architecture gets the metadata of its default weights
    (ImageNet mean/std), and a classlab family (cnn, resnet_cifar, ...) keeps the data's own.
    """
    if not wants_weights(spec):
        return None
    try:
        hub = _hub({k: v for k, v in spec.items() if k != "pretrained_path"})
    except ConfigError:
        if spec.get("pretrained_path"):
            return None
        raise
    if hub.library == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(hub.name)[hub.tag]
        t = weights.transforms()
        src = f"torchvision {type(weights).__name__}.{weights.name}"
        return Preprocessing(tuple(t.mean), tuple(t.std), int(t.crop_size[0]), src)
    cfg = _hf_hub_cfg(hub.name) if hub.name.startswith("hf-hub:") else _timm_cfg(hub.name).to_dict()
    tag = hub.name if "." in hub.name or hub.name.startswith("hf-hub:") else f"{hub.name}.{_timm_cfg(hub.name).tag}"
    return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), int(cfg["input_size"][-1]), f"timm {tag}")


def _hf_hub_cfg(name: str) -> dict[str, Any]:
    from timm.models._hub import load_model_config_from_hf

    repo = name[len("hf-hub:") :]
    try:
        cfg = load_model_config_from_hf(repo)[0]
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, no network: one line either way
        raise _offline_error(f"timm:{name}", _hf_cache(), exc) from None
    return cfg


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _offline_error(model: str, cache_dir: Path, exc: BaseException | None) -> ConfigError:
    why = "offline (HF_HUB_OFFLINE=1)" if _offline() else "download failed"
    if exc is not None and not _offline():
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        why = f"download failed: {first}"
    # Exit 2: the fix is in the configuration (model.pretrained_path), as for a wrong file.
    return ConfigError(
        f"cannot get pretrained weights for model {model!r} ({why}) and they are not in the cache folder "
        f"{cache_dir}: connect once to fill the cache, or set model.pretrained_path to a local weights file"
    )


def _download(url: str, cached: Path) -> None:
    """Into torch's cache as ``get_state_dict`` would fill it (hash checked), without the "Downloading: <url>" line
    torch prints before it even connects: offline, that line came before classlab's one-line error. The progress
    bar starts only once the bytes come."""
    match = torch.hub.HASH_REGEX.search(cached.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=True)


@cache
def fetch(hub: _Hub) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """(state dict, cached file or None, description) of hub weights; downloads once into the standard cache."""
    if hub.library == "torchvision":
        import torchvision

        weights = torchvision.models.get_model_weights(hub.name)[hub.tag]
        cached = _torch_cache() / os.path.basename(urlparse(weights.url).path)
        desc = f"torchvision {type(weights).__name__}.{weights.name}"
        if not cached.is_file() and _offline():
            raise _offline_error(hub.name, _torch_cache(), None)
        try:
            if not cached.is_file():
                _download(weights.url, cached)
            state = weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, timeouts, hash errors: one line
            raise _offline_error(hub.name, _torch_cache(), exc) from None
        return state, str(cached) if cached.is_file() else None, desc
    import timm

    try:
        source = timm.create_model(hub.name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, ConnectionError, HTTPError: one line
        raise _offline_error(f"timm:{hub.name}", _hf_cache(), exc) from None
    return source.state_dict(), _timm_file(source), f"timm {source.pretrained_cfg.get('hf_hub_id') or hub.name}"


def _timm_file(model: nn.Module) -> str | None:
    """The cached file timm read, to hash it for the run's summary."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            if filename:
                hit = try_to_load_from_cache(cfg["hf_hub_id"], filename)
                if isinstance(hit, str):
                    return hit
    if cfg.get("url"):
        cached = _torch_cache() / os.path.basename(urlparse(cfg["url"]).path)
        return str(cached) if cached.is_file() else None
    return None


def prefetch(spec: dict[str, Any]) -> None:
    """Download hub weights (or fail with one line) before any data is decoded or folder made."""
    if wants_weights(spec) and not spec.get("pretrained_path"):
        fetch(_hub(spec))


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------

# efficientnet_pytorch (lukemelas) names -> timm's, inside one block. Blocks with an expansion
# conv are timm InvertedResidual (conv_pw, bn1, conv_dw, bn2, se, conv_pwl, bn3); the first
# stage's are DepthwiseSeparable (conv_dw, bn1, se, conv_pw, bn2).
_EFFNET_PT_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_PT_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_EFFNET_PT_TOP = {
    "_conv_stem": "stem.conv_stem",
    "_bn0": "stem.bn1",
    "_conv_head": "neck.conv_head",
    "_bn1": "neck.bn2",
    "_fc": "head.fc",
}


def from_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch`` key names (``_blocks.N._depthwise_conv``) -> classlab's EfficientNet's."""
    expanded = {int(m[1]) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.*)", key)
        if m:
            table = _EFFNET_PT_EXPANDED if int(m[1]) in expanded else _EFFNET_PT_DEPTHWISE
            key = f"blocks.{m[1]}.{table.get(m[2], m[2])}.{m[3]}"
        else:
            head, _, rest = key.partition(".")
            key = f"{_EFFNET_PT_TOP.get(head, head)}.{rest}"
        out[key] = value
    return out


def _layouts(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor], int]]:
    """Each key layout the file may be in, converted to the model's names: (layout, tensors, collisions)."""
    out = [("classlab", state, 0)]
    convert = getattr(model, "convert_state_dict", None)
    if convert is not None:
        converted = convert(state)
        out.append(("torchvision/timm", converted, len(state) - len(converted)))
    if any(k.startswith("_conv_stem.") for k in state):
        out.append(("efficientnet_pytorch", from_efficientnet_pytorch(state), 0))
    return out


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    from classlab.models.surgery import _head_prefixes as heads

    return heads(model)


def _mismatches(
    aligned: dict[str, torch.Tensor], own: dict[str, torch.Tensor], heads: tuple[str, ...], strict_extra: bool
) -> list[str]:
    """Every backbone tensor of the model without a same-named, same-shaped tensor in the file (and vice versa)."""
    bad = []
    for key, value in own.items():
        if key.startswith(heads):
            continue
        if key not in aligned:
            bad.append(f"{key} (not in the file)")
        elif tuple(aligned[key].shape) != tuple(value.shape):
            bad.append(f"{key} (file {list(aligned[key].shape)} vs model {list(value.shape)})")
    if strict_extra:
        bad += [f"{k} (file tensor not in the model)" for k in aligned if k not in own and not k.startswith(heads)]
    return bad


def _unless_unfit(
    aligned: dict[str, torch.Tensor], own: dict[str, torch.Tensor], fresh: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Without the file's tensors for each part truncation rebuilt (EfficientNet's 1x1 conv to 1280 after fewer
    blocks) unless they fit all of it: the full model's neck has more input channels, and its BatchNorm
    describes that conv's outputs, so the new part keeps its initial values, as ``model.init_from`` does."""
    for prefix in fresh:
        part = [k for k in own if k.startswith(prefix)]
        if any(k not in aligned or tuple(aligned[k].shape) != tuple(own[k].shape) for k in part):
            aligned = {k: v for k, v in aligned.items() if not k.startswith(prefix)}
    return aligned


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], spec: dict[str, Any], origin: str
) -> tuple[int, list[str], str, list[str]]:
    """Copy ``state`` into ``model``: every backbone tensor must match; the classifier loads only if it fits.

    Returns (tensors loaded, model tensors left at their initial values, layout, notes).
    """
    from classlab.models.surgery import _align, _freeze_filled

    own = model.state_dict()
    heads = _head_prefixes(model)
    fresh = tuple(getattr(model, "_fresh", ()))  # rebuilt by truncation: it loads only if the file's tensors fit it
    # A truncated model (or one without its neck) legitimately leaves file tensors unused.
    strict_extra = spec.get("truncate_at") is None and spec.get("head_conv") is not False
    best: tuple[tuple[int, int], str, dict[str, torch.Tensor], list[str]] | None = None
    for layout, converted, collisions in _layouts(model, state):
        aligned, fit = _align(converted, own)
        aligned = _unless_unfit(aligned, own, fresh)
        bad = _mismatches(aligned, own, heads + fresh, strict_extra)
        bad += [f"{collisions} file tensors that land on the same model tensor"] if collisions else []
        score = (fit - len(bad), fit)
        if best is None or score > best[0]:
            best = (score, layout, aligned, bad)
    assert best is not None
    _, layout, aligned, bad = best
    if bad:
        # A few of each kind (missing, other shape, extra), so the line shows what the file holds.
        kinds = [[b for b in bad if tag in b] for tag in ("(not in the file)", " vs model ", "not in the model)")]
        picked = [b for group in zip(*(k + [""] * len(bad) for k in kinds)) for b in group if b][:SHOWN]
        bad = picked + [b for b in bad if b not in picked]
        shown = "; ".join(bad[:SHOWN]) + (f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
        raise ConfigError(
            f"{origin} does not fit model {spec['name']!r}: {len(bad)} tensor(s) do not match by name and shape "
            f"({shown}); these weights are for another architecture: set model.name to the one they were saved from"
        )
    take = {k: v for k, v in aligned.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(take, strict=False)
    _freeze_filled(model, set(take))  # a rebuilt neck that freeze: all left training, now that weights fill it
    notes = []
    if layout == "efficientnet_pytorch" and not spec.get("tf_same"):
        notes.append(
            "efficientnet_pytorch weights were trained with TensorFlow 'same' padding: set model.tf_same=true "
            "for the source model's exact outputs"
        )
    return len(take), sorted(k for k in own if k not in take), layout, notes


def apply(model: nn.Module, spec: dict[str, Any]) -> LoadReport:
    """Load the weights the spec asks for into ``model``; the report says what was loaded and from where."""
    from classlab.models.surgery import read_weights

    path = spec.get("pretrained_path")
    if path:
        state, file, source = read_weights(path), str(Path(path).expanduser()), "file"
        origin = f"weights file {Path(path).name!r}"
    else:
        hub = _hub(spec)
        state, file, source = fetch(hub)
        origin = f"{source} weights"
    loaded, left, layout, notes = load_into(model, state, spec, origin)
    return LoadReport(source, loaded, left, layout, file, sha256(file) if file else None, notes)


def configure(cfg: Config) -> Config:
    """Before any data is read: fetch hub weights (or stop with one line), and default
    ``data.image_size`` to the weights' input size. The size lands in the run's config.yaml and
    checkpoints, so eval, predict, TTA and export use it unchanged."""
    spec = cfg.model.spec()
    prefetch(spec)
    prep = preprocessing(spec)
    if prep is None or cfg.data.image_size:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": prep.input_size})})


def normalization(spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weights' (mean, std) as tensors, or None to use the data's own statistics."""
    prep = preprocessing(spec)
    return None if prep is None else (torch.tensor(prep.mean), torch.tensor(prep.std))
