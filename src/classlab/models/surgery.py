"""Operations on a built model: truncate, swap the head, freeze, load weights.

They rely only on the ClassifierNet shape (stem / blocks / neck / head), so a
new family gets all of them by building itself in that shape.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from classlab.errors import ClassLabError, ConfigError
from classlab.models.net import ClassifierNet, Head


def parse_freeze(value: Any) -> tuple[str, int]:
    """``none`` / ``all`` / ``up_to:K`` -> (mode, K)."""
    text = str(value).strip().lower()
    if text in ("none", "false"):
        return "none", 0
    if text in ("all", "true"):
        return "all", 0
    if text.startswith("up_to:"):
        tail = text[len("up_to:") :]
        if tail.isdigit():
            return "up_to", int(tail)
    raise ConfigError(f"model.freeze must be none, all or up_to:<block number>: got {value!r}")


def _name(model: nn.Module) -> str:
    return getattr(model, "registry_name", type(model).__name__)


def truncate(model: ClassifierNet, n: int, name: str) -> None:
    """Keep the stem and the first ``n`` blocks; the neck is rebuilt or dropped."""
    total = len(model.blocks)
    if not 0 <= n <= total:
        raise ConfigError(
            f"model.truncate_at={n} is out of range for model {name!r}, which has {total} blocks: use 0..{total}"
        )
    model.blocks = nn.Sequential(*list(model.blocks.children())[:n])
    if n < total:
        channels = _block_output_channels(model)
        model.neck = model.make_neck(channels) or nn.Identity()
        # A rebuilt neck is new: weights of the full model's neck may not fit it.
        model._fresh = ["neck."]


def _block_output_channels(model: ClassifierNet) -> int:
    neck, model.neck = model.neck, nn.Identity()
    try:
        return model.infer_features()
    finally:
        model.neck = neck


def rebuild_head(model: ClassifierNet, kind: str | None = None) -> None:
    """A fresh head sized for whatever the backbone now outputs."""
    kind = kind or model.head_kind
    model.num_features = model.infer_features()
    device = next(model.parameters()).device
    model.head = Head(kind, model.num_features, model.num_classes, model.layout, model.head_dropout).to(device)
    model.head_kind = kind


def freeze(model: nn.Module, value: Any) -> None:
    """Stop gradient flow into the backbone (all of it, or stem + first K blocks)."""
    mode, k = parse_freeze(value)
    if mode == "none":
        return
    if not isinstance(model, ClassifierNet):
        raise ConfigError(f"model.freeze is not supported for model {_name(model)!r}: remove model.freeze")
    if mode == "all":
        # A neck rebuilt by truncation holds no weights yet: frozen it would be a fixed random projection.
        # It trains unless a weights file fills it later (load_backbone_weights then freezes it too).
        fresh_neck = "neck." in model._fresh and not isinstance(model.neck, nn.Identity)
        names = ["stem", "blocks"] + ([] if fresh_neck else ["neck"])
        model._freeze_when_loaded = ["neck"] if fresh_neck else []
    else:
        total = len(model.blocks)
        if k > total:
            raise ConfigError(
                f"model.freeze=up_to:{k} is beyond the {total} blocks of model {_name(model)!r}: use up_to:0..{total}"
            )
        names = ["stem"] + [f"blocks.{i}" for i in range(k)]
    model._frozen = []
    _freeze_parts(model, names)


def _freeze_parts(model: ClassifierNet, names: list[str]) -> None:
    """No gradient into these submodules, and BatchNorm in them kept in eval mode (ClassifierNet.train)."""
    for name in names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)
    model._frozen += names
    model.train(model.training)


def apply(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Truncation, neck, head kind and freezing as the config asks, in that order."""
    if not isinstance(model, ClassifierNet):
        return model
    name = spec.get("name", _name(model))
    changed = False
    if spec.get("truncate_at") is not None:
        truncate(model, int(spec["truncate_at"]), name)
        changed = True
    if spec.get("head_conv") is False and not isinstance(model.neck, nn.Identity):
        # The neck (e.g. EfficientNet's 1x1 conv to 1280) is optional: without
        # it the head sits directly on the last kept block's channels.
        model.neck = nn.Identity()
        changed = True
    kind = spec.get("head") or "linear"
    if changed or kind != model.head_kind:
        rebuild_head(model, kind)
    if spec.get("freeze") is not None:
        freeze(model, spec["freeze"])
    return model


# -- weights ---------------------------------------------------------------------


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier head (the timm wrapper keeps its model under ``model.``)."""
    if isinstance(model, ClassifierNet):
        return ("head.",)
    return tuple(f"model.{p}" for p in getattr(model, "head_prefixes", ())) or ("head.",)


def _align(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Rename checkpoint keys so they match the model's own key names.

    Checkpoints wrap the model differently (Lightning's ``model.``, DDP's
    ``module.``, our timm wrapper's ``model.``); the prefix under which the
    most tensors fit (same name and shape) wins, in either direction.
    Returns the renamed dict and how many of its tensors fit.
    """

    def fits(key: str, value: torch.Tensor) -> bool:
        return key in own and tuple(own[key].shape) == tuple(value.shape)

    candidates = {("", "")}
    for key in state:
        candidates.update((key[: i + 1], "") for i, ch in enumerate(key) if ch == "." and key[i + 1 :] in own)
    for shared in _shared_prefixes(state):
        # Both at once: DDP's ``module.`` on every file key, our wrapper's ``model.`` on every model key.
        rest = {k[len(shared) :] for k in state}
        for key in own:
            candidates.update((shared, key[: i + 1]) for i, ch in enumerate(key) if ch == "." and key[i + 1 :] in rest)
    best: tuple[tuple[int, int], dict[str, torch.Tensor]] = ((-1, -1), {})
    for strip, add in sorted(candidates):  # sorted: a tie goes the same way in every process
        renamed = {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
        score = (sum(fits(k, v) for k, v in renamed.items()), sum(k in own for k in renamed))
        if score > best[0]:
            best = (score, renamed)
    return best[1], best[0][0]


def _shared_prefixes(keys: Any) -> list[str]:
    """``""`` and each leading dotted part that every key shares (``module.``, ``module.model.``)."""
    keys = list(keys)
    out, prefix = [""], ""
    for part in keys[0].split(".")[:-1] if keys else []:
        prefix += part + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        out.append(prefix)
    return out


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every backbone tensor of ``state_dict`` into ``model``; the head is left alone.

    Returns the model keys ``loaded``, the checkpoint keys ``skipped`` (head,
    blocks the model no longer has) and the backbone keys ``missing`` from the
    checkpoint (left at their initial values). Shape mismatches are all
    reported together, so one fix covers them.
    """
    own = model.state_dict()
    heads = _head_prefixes(model)
    aligned, fit = _align(state_dict, own)
    convert = getattr(model, "convert_state_dict", None)
    if convert is not None:
        # Weights saved from the original library (torchvision, timm) use its key names.
        converted, fit_converted = _align(convert(state_dict), own)
        if fit_converted > fit:
            aligned = converted
    backbone = {k for k in own if not k.startswith(heads)}
    take = {k: v for k, v in aligned.items() if k in backbone}
    fresh = tuple(getattr(model, "_fresh", ()))
    for prefix in fresh:
        # A rebuilt part takes the weights whole or not at all: the BatchNorm of a conv that did not fit
        # describes that conv's outputs, not the new one's.
        if any(k.startswith(prefix) and v.shape != own[k].shape for k, v in take.items()):
            take = {k: v for k, v in take.items() if not k.startswith(prefix)}
    bad = [
        f"{k} (checkpoint {list(v.shape)} vs model {list(own[k].shape)})"
        for k, v in take.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ClassLabError(
            f"cannot load backbone weights into model {_name(model)!r}: {len(bad)} shape mismatch(es): "
            + "; ".join(bad)
            + " — build the model with the same settings as the run the weights come from"
        )
    if not take:
        raise ClassLabError(
            f"no tensor of the weights file matches the backbone of model {_name(model)!r}: "
            "check that model.name and its parameters match the run the weights come from"
        )
    model.load_state_dict(take, strict=False)
    used = set(take)
    _freeze_filled(model, used)
    return {
        "loaded": sorted(used),
        "skipped": sorted(k for k in aligned if k not in used),
        "missing": sorted(backbone - used),
    }


def _freeze_filled(model: nn.Module, loaded: set[str]) -> None:
    """Freeze the parts that ``freeze(all)`` left trainable only because they had no weights, once weights fill them."""
    waiting = getattr(model, "_freeze_when_loaded", [])
    filled = [n for n in waiting if any(k.startswith(n + ".") for k in loaded)]
    if filled:
        model._freeze_when_loaded = [n for n in waiting if n not in filled]
        _freeze_parts(model, filled)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file, never executing code from it."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ClassLabError(
            f"weights file {str(p)!r} is a folder: set model.pretrained_path to the .pth/.safetensors file in it"
        )
    if not p.is_file():
        raise ClassLabError(f"weights file {str(p)!r} not found: set model.pretrained_path to an existing local file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(p))
        else:
            # The checkpoints of torchvision's reference scripts and timm's train.py keep their command line
            # (an argparse.Namespace of plain values) beside the weights: data, not code.
            with torch.serialization.safe_globals([argparse.Namespace]):
                data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError, torch's errors: a file it cannot read
        text = str(exc)
        first = text.splitlines()[0] if text else type(exc).__name__
        if "weights only load failed" in first.lower() and "GLOBAL" in text:
            raise ClassLabError(
                f"weights file {str(p)!r} holds pickled objects that need code to load, which classlab never runs "
                "(weights_only): save a plain state dict (torch.save(model.state_dict(), path)) or safetensors"
            ) from None
        if "weights only load failed" in first.lower() or isinstance(exc, KeyError):
            first = "not a file torch.save wrote"  # a pickle opcode torch does not know (KeyError '105' for text)
        if p.stat().st_size == 0:
            first = "an empty file (0 bytes)"  # torch says EOFError
        raise ClassLabError(
            f"cannot read weights file {str(p)!r} ({first.split('. ')[0][:160]}): it is cut short or of another "
            "format; use a state dict saved with torch.save, or safetensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise ClassLabError(f"weights file {str(p)!r} does not hold a state dict: save model.state_dict() instead")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def set_backbone_frozen(net: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) everything but the classifier, with the frozen BatchNorm kept in eval.

    Used by ``model.unfreeze_at_epoch``: the head trains alone on top of the pretrained
    features first, so its random start does not push large gradients into the backbone.
    """
    from classlab.models.timm_net import WrappedNet

    if isinstance(net, WrappedNet):
        net.freeze_backbone(frozen)
        return
    inner = getattr(net, "backbone", None)  # multi-task: the shared backbone
    if isinstance(inner, nn.Module) and not isinstance(net, ClassifierNet):
        set_backbone_frozen(inner, frozen)
        return
    if not isinstance(net, ClassifierNet):
        raise ConfigError(f"model.unfreeze_at_epoch is not supported for model {_name(net)!r}: remove it")
    names = ["stem", "blocks", "neck"]
    for name in names:
        for p in net.get_submodule(name).parameters():
            p.requires_grad_(not frozen)
    net._frozen = names if frozen else []
    net.train(net.training)
