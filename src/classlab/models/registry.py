"""Model names -> builders, and the one entry point that turns a config into a model.

Configs name models, they never hold code: every family registers a builder
under a name here, presets are named bundles of that builder's keywords, and
``timm:<name>`` reaches any timm architecture without a registration.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from classlab.errors import ClassLabError, ConfigError, command, did_you_mean
from classlab.models.net import HEAD_KINDS

# Keys of the ``model:`` section that build_model handles itself; every other
# key is a keyword of the family builder.
GENERIC_KEYS = frozenset(
    {
        "name",
        "preset",
        "max_params",
        "truncate_at",
        "head_conv",
        "head",
        "freeze",
        "pretrained",
        "pretrained_path",
        "weights",
        "unfreeze_at_epoch",
        "init_from",
        "tasks",
        "fusion",
    }
)
# Builder arguments that come from the data, not from the model section.
_DATA_ARGS = ("num_classes", "in_chans", "image_size")
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Preset:
    params: dict[str, Any]
    image_size: int | None = None  # overrides the family default input size
    description: str = ""


@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    presets: dict[str, Preset]
    default_image_size: int
    description: str
    params: tuple[str, ...] = field(default=())

    def image_size(self, preset: str | None) -> int:
        if preset and self.presets[preset].image_size:
            return int(self.presets[preset].image_size)
        return self.default_image_size


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``classlab models``."""

    name: str
    preset: str | None
    params: int
    mflops: float
    image_size: int
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


class InputSizeError(ConfigError):
    """A model that cannot take the configured input size (too small for its poolings, ...)."""


def register_model(
    name: str,
    presets: dict[str, dict[str, Any] | Preset] | None = None,
    default_image_size: int = 32,
    description: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``builder(num_classes, in_chans, image_size, **family_params)`` as ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        sig = inspect.signature(builder)
        params = tuple(p for p in sig.parameters if p not in _DATA_ARGS)
        _REGISTRY[name] = ModelEntry(
            name=name,
            builder=builder,
            presets={k: v if isinstance(v, Preset) else Preset(dict(v)) for k, v in (presets or {}).items()},
            default_image_size=default_image_size,
            description=description or (inspect.getdoc(builder) or "").split("\n")[0],
            params=params,
        )
        return builder

    return wrap


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_preset_alias(spec: dict[str, Any]) -> dict[str, Any]:
    """``name: mixer_s4`` means family mlp_mixer with preset mixer_s4: presets are names users know.

    A family with a preset of its own name (``residual_cnn``) means that preset, so ``model.name:
    residual_cnn`` is the template's network, as ``normal_cnn`` is.
    """
    name = spec.get("name", "")
    if spec.get("preset") or name.startswith(TIMM_PREFIX):
        return spec
    if name in _REGISTRY:
        return {**spec, "preset": name} if name in _REGISTRY[name].presets else spec
    owners = [family for family, entry in _REGISTRY.items() if name in entry.presets]
    if len(owners) == 1:
        return {**spec, "name": owners[0], "preset": name}
    return spec


def _natural(name: str) -> tuple[Any, ...]:
    """resnet20 before resnet110: digits compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _known_names() -> list[str]:
    """Families and their presets: what ``model.name`` takes (a typo is matched against both)."""
    return sorted({*_REGISTRY, *(p for entry in _REGISTRY.values() for p in entry.presets)})


def get_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model.name {name!r}{did_you_mean(name, _known_names())}: "
            f"run {command('`classlab models`')} for the list, or use timm:<name> for any timm model"
        )
    return _REGISTRY[name]


def _shown(value: Any) -> str:
    """A builder default as a config file writes it (false, null, [3, 4])."""
    try:
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    except yaml.YAMLError:
        return str(value)


def explain_family_param(key: str, unknown: ConfigError) -> str:
    """``classlab train --explain model.<key>`` for a key a family's builder reads (``model.tf_same``, ``model.stem``):
    the schema lists only the generic model keys, the builders the rest. Which models read it, its type and default.

    Any other key raises ``unknown`` (the schema's error), its hint then weighing the family keys too."""
    param = key.removeprefix("model.")
    if not key.startswith("model.") or "." in param:
        raise unknown
    takers = [name for name in sorted(_REGISTRY, key=_natural) if param in _REGISTRY[name].params]
    if not takers:
        from classlab.config import ModelSection

        every = {f"model.{p}" for entry in _REGISTRY.values() for p in entry.params}
        hint = did_you_mean(key, sorted(every | {f"model.{f}" for f in ModelSection.model_fields}))
        raise ConfigError(f"unknown config key '{key}'{hint}") if hint else unknown
    kinds: dict[str, None] = {}
    defaults: dict[str, list[str]] = {}
    for name in takers:
        arg = inspect.signature(_REGISTRY[name].builder).parameters[param]
        kinds[str(arg.annotation) if arg.annotation is not inspect.Parameter.empty else "any"] = None
        shown = "(required)" if arg.default is inspect.Parameter.empty else _shown(arg.default)
        defaults.setdefault(shown, []).append(name)
    default = (
        next(iter(defaults))
        if len(defaults) == 1
        else "; ".join(f"{value} ({', '.join(names)})" for value, names in defaults.items())
    )
    return "\n".join(
        [
            f"{key}: family parameter of {', '.join(takers)}: passed to the model's builder; other models refuse it",
            f"  allowed: {' | '.join(kinds)}",
            f"  default: {default}",
        ]
    )


def family_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The builder keywords of ``spec``: the preset's values, then explicit keys on top."""
    name = spec.get("name")
    if not name:
        raise ConfigError(
            f"model.name is missing: set it, e.g. model.name: cnn (run {command('`classlab models`')} for the list)"
        )
    if not isinstance(name, str):
        raise ConfigError(f"model.name must be a string: got {name!r}")
    explicit = {k: v for k, v in spec.items() if k not in GENERIC_KEYS}
    if is_passthrough(name):
        kind = "timm" if name.startswith(TIMM_PREFIX) else "torchvision"
        if explicit:
            key = sorted(explicit)[0]
            raise ConfigError(
                f"model.{key} is not used by {kind} passthrough model {name!r}: remove it "
                f"({kind} models take only the generic model keys)"
            )
        if spec.get("preset"):
            raise ConfigError(f"model.preset is not available for {kind} passthrough model {name!r}: remove it")
        return {}
    entry = get_entry(name)
    for key in explicit:
        if key not in entry.params:
            hint = did_you_mean(key, list(entry.params) + sorted(GENERIC_KEYS))
            valid = ", ".join(entry.params) or "none"
            raise ConfigError(f"model.{key} is not a parameter of model {name!r}{hint}: valid parameters are {valid}")
    merged: dict[str, Any] = {}
    preset = spec.get("preset")
    if preset is not None:
        if preset not in entry.presets:
            if entry.presets:
                fix = f"use one of {', '.join(sorted(entry.presets))}"
            else:
                fix = "this model has no presets: remove model.preset"
            raise ConfigError(
                f"unknown model.preset {preset!r} for model {name!r}{did_you_mean(str(preset), entry.presets)}: "
                f"{fix} (see {command('`classlab models`')})"
            )
        merged.update(entry.presets[preset].params)
    merged.update(explicit)
    return merged


def is_passthrough(name: str) -> bool:
    """``timm:<name>``, or a torchvision classification name that no classlab family claims."""
    if name.startswith(TIMM_PREFIX):
        return True
    from classlab.models.torchvision_net import is_torchvision_name

    return name not in _REGISTRY and is_torchvision_name(name)


def hub_names(pattern: str) -> dict[str, list[str]]:
    """Names a model.name reaches beyond the registered families, containing ``pattern`` (any case): torchvision's
    classification models by their own name, timm's as timm:<name>. Names only: building them to count
    parameters would take minutes for timm's thousand."""
    import timm

    from classlab.models.torchvision_net import torchvision_names

    low = pattern.lower()
    return {
        "torchvision": sorted(n for n in torchvision_names() if low in n.lower() and n not in _REGISTRY),
        "timm": [TIMM_PREFIX + n for n in timm.list_models(f"*{low}*")],
    }


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or frozen, counted once (shared tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_flops(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    """FLOPs of one forward pass on one image (a multiply-add counts as 2).

    Runs on the model's own device; a model built on the meta device is
    counted without any arithmetic, which is how ``classlab models`` stays fast.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, image_size, image_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def check_param_budget(model: nn.Module, max_params: int | None) -> None:
    """Stop before training a model that breaks the stated parameter budget."""
    if max_params is None:
        return
    n = count_params(model)
    if n > max_params:
        name = getattr(model, "registry_name", type(model).__name__)
        raise ConfigError(
            f"model {name!r} has {n:,} parameters, over model.max_params={int(max_params):,}; "
            "choose a smaller model or preset, or raise model.max_params"
        )


def _raw_build(
    entry: ModelEntry, params: dict[str, Any], num_classes: int, in_chans: int, image_size: int
) -> nn.Module:
    try:
        return entry.builder(num_classes=num_classes, in_chans=in_chans, image_size=image_size, **params)
    except ClassLabError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        # A shape that cannot work (e.g. too many poolings for the input size)
        # is a config problem; say which model and input size produced it.
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputSizeError(
            f"model {entry.name!r} cannot be built for {in_chans}x{image_size}x{image_size} inputs: {msg}; "
            "check the model parameters or data.image_size"
        ) from exc


def build_model(spec: dict[str, Any], num_classes: int, in_chans: int = 3, image_size: int = 32) -> nn.Module:
    """The model described by a config's ``model:`` section, ready to train."""
    from classlab.models import pretrained, surgery, timm_net, torchvision_net

    spec = resolve_preset_alias(spec)
    validate_generic_keys(spec)
    params = family_params(spec)
    name = spec["name"]
    if name.startswith(TIMM_PREFIX):
        model: nn.Module = timm_net.create(name[len(TIMM_PREFIX) :], num_classes, in_chans, spec)
    elif is_passthrough(name):
        model = torchvision_net.create(name, num_classes, in_chans, spec)
    else:
        model = _raw_build(get_entry(name), params, num_classes, in_chans, image_size)
        model = surgery.apply(model, spec)
    model.registry_name = name  # type: ignore[assignment]
    if pretrained.wants_weights(spec):
        model.pretrained_report = pretrained.apply(model, spec)  # type: ignore[assignment]
    check_param_budget(model, spec.get("max_params"))
    return model


def validate_generic_keys(spec: dict[str, Any]) -> None:
    """Type and range checks on the keys build_model handles itself."""
    from classlab.models.pretrained import check_spec
    from classlab.models.surgery import parse_freeze

    head = spec.get("head")
    if head is not None and head not in HEAD_KINDS:
        hint = did_you_mean(str(head), HEAD_KINDS)
        raise ConfigError(f"model.head must be one of {', '.join(HEAD_KINDS)}: got {head!r}{hint}")
    for key in ("truncate_at", "max_params"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"model.{key} must be a non-negative integer: got {value!r}")
    for key in ("head_conv", "pretrained"):
        value = spec.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"model.{key} must be true or false: got {value!r}")
    if spec.get("freeze") is not None:
        parse_freeze(spec["freeze"])
    check_spec(spec)


def validate_model_spec(
    spec: dict[str, Any], image_size: int | None = None, num_classes: int | None = None, in_chans: int = 3
) -> None:
    """Catch model config mistakes at config time, before any data is read.

    The model is built on the meta device (shapes only, no memory, no
    arithmetic), so bad family values, impossible truncation points and heads
    that do not fit are reported here rather than minutes into a run. Without
    ``image_size`` the input-size checks are skipped (the family default size
    is used only to exercise the build); without ``num_classes`` so is
    ``max_params``, whose count depends on the number of classes.
    """
    spec = resolve_preset_alias(spec)
    validate_generic_keys(spec)
    family_params(spec)
    name = spec["name"]
    if name.startswith(TIMM_PREFIX):
        from classlab.models import timm_net

        timm_net.check_spec(name[len(TIMM_PREFIX) :], spec)
        # hf-hub: names need the hub for their architecture: they are built at train time only.
        if num_classes is None or name.startswith(TIMM_PREFIX + "hf-hub:"):
            return
    from classlab.models.pretrained import without_weights

    cheap = {k: v for k, v in without_weights(spec).items() if k != "max_params" or num_classes}
    size = image_size or (224 if is_passthrough(name) else get_entry(name).image_size(spec.get("preset")))
    try:
        with torch.device("meta"):
            build_model(cheap, num_classes=num_classes or 10, in_chans=in_chans, image_size=size)
    except InputSizeError:
        if image_size is not None:
            raise


def list_models(pattern: str = "") -> list[ModelInfo]:
    """Every registered model and preset (whose name or preset contains ``pattern``, any case) with its size
    at its default input, 10 classes."""
    rows = []
    low = pattern.lower()
    for name in registered_names():
        entry = _REGISTRY[name]
        for preset in [None, *sorted(entry.presets, key=_natural)]:
            if low not in name.lower() and low not in (preset or "").lower():
                continue
            size = entry.image_size(preset)
            spec = {"name": name, **({"preset": preset} if preset else {})}
            with torch.device("meta"):
                model = build_model(spec, num_classes=10, image_size=size)
                flops = count_flops(model, size)
            desc = entry.presets[preset].description if preset else entry.description
            rows.append(ModelInfo(name, preset, count_params(model), flops / 1e6, size, desc or entry.description))
    return rows
