"""Optimizers and learning-rate schedules from the ``optim`` and ``sched`` config sections.

Two properties drive the shape of this file:

* Exact resume. Every schedule except ``plateau`` is one ``LambdaLR`` over a pure function of
  the optimizer step, so its state is a step counter and the base lrs: a run resumed from a
  checkpoint sees the same lr at the same step as an uninterrupted one. The lr functions are
  closures (not callable objects) because ``LambdaLR.state_dict`` would pickle a callable
  object's attributes into the checkpoint, and checkpoints hold only tensors and plain types.
* Schedules per step, not per epoch, so warmup and milestones may be fractional epochs (He et
  al.'s drops at 32k and 48k iterations are milestones in epochs) and the curve is smooth
  however few epochs a run has.

Units: ``optim.lr`` is the peak lr of the head parameters; ``sched.min_lr`` is the floor of the
same parameters; the backbone group follows the same curve scaled by ``optim.backbone_lr_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from classlab.config import OptimSection, SchedSection
from classlab.engine.muon import MuonSGD, muon_parameter_ids
from classlab.errors import ConfigError

__all__ = [
    "RAdamLars",
    "ScheduledLookahead",
    "build_optimizer",
    "build_scheduler",
    "head_lr",
    "lr_curve",
    "lookahead_k",
    "lookahead_schedule",
    "muon_groups",
    "lr_factor_fn",
    "param_groups",
]


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict[str, Any]]:
    """Split trainable parameters by (backbone | head) x (decay | no decay).

    Weight decay on biases and normalization scales only pulls them towards zero, which hurts
    (Goyal et al. 2017, "no bias decay"), so tensors of ndim <= 1 (and names a timm model lists
    in ``no_weight_decay()``) are left undecayed unless ``decay_norm_and_bias``. A model that
    exposes ``backbone_parameters()`` gets those at ``lr * backbone_lr_scale``; everything else is
    head, so a parameter in neither list still trains. Frozen parameters are left out so the
    optimizer state holds only what trains. Empty groups are dropped: some optimizers reject
    them, and they would only add noise to the lr logs.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters (is model.freeze=all with no head?)")
    backbone_fn = getattr(model, "backbone_parameters", None)
    backbone_ids = {id(p) for p in backbone_fn()} if callable(backbone_fn) else set()
    no_wd_fn = getattr(model, "no_weight_decay", None)
    no_wd_names = set(no_wd_fn()) if callable(no_wd_fn) else set()

    # ``norm_lr_scale`` (airbench's "bias scaler"): normalization layers' parameters take larger
    # steps, and their weight decay is divided by the same factor so that the shrink per step,
    # lr * weight_decay, stays that of every other parameter (decoupled from the lr).
    norm_ids = (
        {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
        if cfg.norm_lr_scale != 1.0
        else set()
    )
    buckets: dict[tuple[str, bool, bool], list[nn.Parameter]] = {}
    for name, p in named:
        part = "backbone" if id(p) in backbone_ids else "head"
        decay = cfg.decay_norm_and_bias or (p.ndim > 1 and name not in no_wd_names)
        buckets.setdefault((part, decay, id(p) in norm_ids), []).append(p)

    groups = []
    for part in ("backbone", "head"):
        scale = cfg.backbone_lr_scale if part == "backbone" else 1.0
        for decay in (True, False):
            for norm in (False, True):
                params = buckets.get((part, decay, norm))
                if not params:
                    continue
                name = part if decay else f"{part}_no_decay"
                groups.append(
                    {
                        "params": params,
                        "lr": cfg.lr * scale * (cfg.norm_lr_scale if norm else 1.0),
                        "weight_decay": (cfg.weight_decay if decay else 0.0) / (cfg.norm_lr_scale if norm else 1.0),
                        "name": f"{name}_norm" if norm else name,
                    }
                )
    return groups


def head_lr(optimizer: Optimizer) -> float:
    """The lr ``optim.lr`` and the schedule give at this step: the head's group's. The first group was the
    backbone's (``optim.backbone_lr_scale`` times it) or Muon's (``optim.muon_lr``), which metrics.csv showed."""
    groups = optimizer.param_groups
    named = [g for g in groups if str(g.get("name", "")) in ("head", "head_no_decay")]
    plain = [g for g in groups if not str(g.get("name", "")).endswith(("_norm", "_muon"))]
    return float((named or plain or groups)[0]["lr"])


# ---------------------------------------------------------------------------------------------
# RAdam + LARS trust ratio (the inner optimizer of rangerlars)
# ---------------------------------------------------------------------------------------------


class RAdamLars(Optimizer):
    """RAdam whose per-tensor step is rescaled by a LARS/LAMB trust ratio ("Ralamb").

    timm has RAdam and a SGD-based Lars, but no way to put a trust ratio on an adaptive update,
    so the composition is written out here: ``u`` is the rectified Adam direction (plain bias-
    corrected momentum while the variance estimate is untrustworthy, rho_t <= 5) plus
    ``weight_decay * p``; the step is ``lr * trust * u`` with ``trust = ||p|| / ||u||``, ||p||
    clamped to 10 as in LAMB, and 1 when either norm is 0 (fresh zero-initialized layers would
    otherwise never move). The trust ratio is applied to weight tensors (ndim > 1) only: for
    biases and norm scales ||p|| says nothing about a sensible step size. RangerLars
    (mgrankin/over9000) is this wrapped in Lookahead, which ``build_optimizer`` does.

    State per parameter is ``step`` (int), ``exp_avg`` and ``exp_avg_sq``: plain values and
    tensors, so ``state_dict`` round-trips exactly and loads with ``weights_only=True``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_weight_norm: float = 10.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError("RAdamLars: lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"RAdamLars: betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_weight_norm=max_weight_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            rho_inf = 2.0 / (1.0 - beta2) - 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                bias1 = 1.0 - beta1**t
                beta2_t = beta2**t
                rho_t = rho_inf - 2.0 * t * beta2_t / (1.0 - beta2_t)
                if rho_t > 5.0:
                    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                    denom = (exp_avg_sq / (1.0 - beta2_t)).sqrt_().add_(group["eps"])
                    update = exp_avg / denom * (rect / bias1)
                else:
                    update = exp_avg / bias1
                weight = p.float()
                if group["weight_decay"] != 0:
                    update.add_(weight, alpha=group["weight_decay"])
                if p.ndim > 1:
                    w_norm = weight.norm().clamp(max=group["max_weight_norm"])
                    u_norm = update.norm()
                    trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                    update.mul_(trust)
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: OptimSection) -> Optimizer:
    """The optimizer ``cfg`` names, over ``param_groups(model, cfg)``, optionally in Lookahead.

    ``rangerlars`` is ``RAdamLars`` in Lookahead (k, alpha from the config) whatever
    ``cfg.lookahead`` says; other optimizers get Lookahead only when asked. Which Lookahead is
    ``lookahead_schedule``'s: timm's wrapper here for ``constant``, the ``ScheduledLookahead``
    callback for ``cubic`` (then the optimizer is left bare: one Lookahead a run). timm's Lookahead
    keeps its slow weights and step counters inside the wrapped optimizer's state and param groups,
    so ``state_dict`` / ``load_state_dict`` of the wrapper resume it exactly.
    """
    from timm.optim import Lamb, Lars, Lookahead

    groups = param_groups(model, cfg)
    name = cfg.name
    if name == "sgd":
        opt: Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
        )
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    elif name == "radam":
        opt = torch.optim.RAdam(groups, lr=cfg.lr, betas=cfg.betas)
    elif name == "lars":
        # timm's Lars adapts only groups with weight decay: biases and norms take plain SGD steps.
        opt = Lars(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    elif name == "lamb":
        opt = Lamb(groups, lr=cfg.lr, betas=cfg.betas)
    elif name == "rangerlars":
        opt = RAdamLars(groups, lr=cfg.lr, betas=cfg.betas)
    elif name == "muon":
        opt = MuonSGD(
            muon_groups(model, groups, cfg),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            muon_momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            fixed_norm=cfg.muon_fixed_norm,
        )
    else:  # pragma: no cover - the config's Literal already rejects other names
        raise ConfigError(f"optim.name={name!r} is not an optimizer classlab knows")
    if lookahead_schedule(cfg) == "constant":
        # (the cubic schedule is a callback, ScheduledLookahead: it also averages BatchNorm statistics)
        opt = Lookahead(opt, alpha=cfg.lookahead_alpha, k=lookahead_k(cfg))
    return opt


def muon_groups(model: nn.Module, groups: list[dict[str, Any]], cfg: OptimSection) -> list[dict[str, Any]]:
    """Each group split in two: its Muon tensors (at ``muon_lr``, the group's share of it, and
    ``muon_weight_decay``) and the rest, which keep the group's SGD lr and weight decay."""
    ids = muon_parameter_ids(model)
    if not ids:
        raise ConfigError("optim.name=muon: the model has no trainable weight matrices outside its head; use sgd")
    out = []
    for group in groups:
        chosen = [p for p in group["params"] if id(p) in ids]
        rest = [p for p in group["params"] if id(p) not in ids]
        if chosen:
            share = group["lr"] / cfg.lr  # backbone_lr_scale (and norm_lr_scale, never set for weights)
            out.append(
                {
                    "params": chosen,
                    "lr": cfg.muon_lr * share,
                    "weight_decay": cfg.muon_weight_decay,
                    "muon": True,
                    "name": f"{group['name']}_muon",
                }
            )
        if rest:
            out.append({**group, "params": rest})
    return out


def lookahead_schedule(cfg: OptimSection) -> str | None:
    """The run's one Lookahead: None (off), ``constant`` (timm's wrapper) or ``cubic`` (ScheduledLookahead).

    rangerlars is RAdam + LARS in Lookahead (over9000's RangerLars, the RotNet-style project's optimizer), so it
    has Lookahead with or without ``optim.lookahead``, and ``lookahead_schedule: cubic`` replaces its built-in
    constant one. (rangerlars with lookahead=true and cubic took timm's wrapper and the callback, two Lookaheads
    pulling the same weights; without lookahead=true, cubic was left unread.)"""
    if not (cfg.lookahead or cfg.name == "rangerlars"):
        return None
    return cfg.lookahead_schedule


def lookahead_k(cfg: OptimSection) -> int:
    """Fast steps per slow update: as set, else 6 for rangerlars (mgrankin/over9000's RangerLars, the
    optimizer the RotNet-style project used) and 5 for the rest (Zhang et al. 2019's default)."""
    if cfg.lookahead_k is not None:
        return cfg.lookahead_k
    return 6 if cfg.name == "rangerlars" else 5


# ---------------------------------------------------------------------------------------------
# Lookahead with a schedule (airbench's)
# ---------------------------------------------------------------------------------------------


class ScheduledLookahead(L.Callback):
    """Every ``k`` steps pull the weights to ``slow + alpha * (fast - slow)`` and keep that as ``slow``.

    Unlike timm's Lookahead (``lookahead_schedule: constant``), alpha follows the run: it is 1
    (plain SGD) at the start, when averaging would only drag the weights back to their random
    start, and falls as ``1 - (1 - final_alpha) * (step / total)^3`` towards ``final_alpha`` at the
    end, when averaging the last iterates is worth most. BatchNorm running statistics are
    averaged with the weights, so they keep describing the weights they sit with. On the last
    step the model takes the slow weights, before the epoch-end checkpoint is written, so
    ``last.ckpt`` and the test see them. The slow copy is callback state: resume is exact.
    """

    def __init__(self, k: int, final_alpha: float, total_steps: int) -> None:
        self.k, self.final_alpha, self.total = int(k), float(final_alpha), max(1, int(total_steps))
        self._slow: dict[str, torch.Tensor] | None = None

    def alpha(self, step: int) -> float:
        return 1.0 - (1.0 - self.final_alpha) * min(step / self.total, 1.0) ** 3

    def _live(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        state = pl_module.model.state_dict(keep_vars=True)
        return {key: t for key, t in state.items() if t.is_floating_point()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._slow is None:
            self._slow = {key: t.detach().clone() for key, t in self._live(pl_module).items()}

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._slow is None or (step % self.k and step < self.total):
            return
        live = self._live(pl_module)
        slow = [self._slow[key] for key in live]
        fast = [t.detach() for t in live.values()]
        if step % self.k == 0:
            torch._foreach_lerp_(slow, fast, self.alpha(step))
        torch._foreach_copy_(fast, slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self._slow or {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._slow = dict(state_dict["slow"]) or None


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

ONECYCLE_PCT_START = 0.3  # fraction of the run spent rising, when warmup_epochs does not say (torch's default)
ONECYCLE_DIV = 25.0  # start lr = peak / 25 (torch's div_factor)
ONECYCLE_FINAL_DIV = 1e4  # end lr = start / 1e4 unless min_lr is set (torch's final_div_factor)


def _cosine(frac: float) -> float:
    """1 -> 0 along half a cosine as ``frac`` goes 0 -> 1."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


def _cycle_at(s: float, period: float, mult: float) -> tuple[int, float, float]:
    """(index, first step, length) of the cosine-restart cycle that step ``s`` falls in.

    Cycle i starts at period * (mult^i - 1) / (mult - 1) steps (i * period when mult = 1).
    """
    if mult == 1.0:
        i = int(s // period)
        return i, i * period, period
    i = int(math.log1p(s * (mult - 1.0) / period) / math.log(mult))
    start = period * (mult**i - 1.0) / (mult - 1.0)
    while start > s and i > 0:  # float guard near cycle boundaries
        i -= 1
        start = period * (mult**i - 1.0) / (mult - 1.0)
    while period * (mult ** (i + 1) - 1.0) / (mult - 1.0) <= s:
        i += 1
        start = period * (mult**i - 1.0) / (mult - 1.0)
    return i, start, period * mult**i


def _onecycle(cfg: SchedSection, epochs: int, total: int, lo: float) -> Callable[[int], float]:
    """torch's OneCycleLR with cosine annealing in both phases (step ``up_end`` is the peak)."""
    pct = cfg.warmup_epochs / epochs if cfg.warmup_epochs > 0 else ONECYCLE_PCT_START
    up_end = min(max(pct * total - 1.0, 1.0), total - 2.0) if total > 2 else 1.0
    start_ratio = 1.0 / ONECYCLE_DIV
    end_ratio = lo if lo > 0 else start_ratio / ONECYCLE_FINAL_DIV
    down_len = max(total - 1.0 - up_end, 1.0)

    def main(s: int) -> float:
        if s <= up_end:
            return 1.0 + (start_ratio - 1.0) * _cosine(s / up_end)
        return end_ratio + (1.0 - end_ratio) * _cosine((s - up_end) / down_len)

    return main


def lr_factor_fn(cfg: SchedSection, *, epochs: int, steps_per_epoch: int, min_ratio: float) -> Callable[[int], float]:
    """The lr at optimizer step ``s`` (0-based) as a fraction of the peak lr.

    ``min_ratio`` is ``min_lr / peak lr``. Warmup multiplies every schedule by ``(s + 1) / W``
    for the first ``W = warmup_epochs * steps_per_epoch`` steps (so the first step already moves
    and step W-1 is at full height) except ``onecycle``, whose rising phase is its warmup: there
    ``warmup_epochs``, when set, is the length of that phase. Time is measured from step 0 for
    all schedules, so milestones and restart periods are the epochs a user would count.
    Steps past the end of the run hold the final value, which a few extra batches from
    rounding may need.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ConfigError(f"a schedule needs epochs >= 1 and steps per epoch >= 1 (got {epochs}, {steps_per_epoch})")
    spe = float(steps_per_epoch)
    total = epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * spe)
    name = cfg.name
    lo = min_ratio

    if name in ("constant", "plateau"):

        def main(s: int) -> float:
            return 1.0

    elif name == "multistep":
        drops = sorted(round(m * spe) for m in cfg.milestones)
        gamma = cfg.gamma

        def main(s: int) -> float:
            return gamma ** sum(1 for d in drops if s >= d)

    elif name == "cosine":

        def main(s: int) -> float:
            return lo + (1.0 - lo) * _cosine(s / total)

    elif name == "restarts":
        period, mult, decay = cfg.restart_period * spe, cfg.restart_mult, cfg.restart_decay

        def main(s: int) -> float:
            i, start, length = _cycle_at(s, period, mult)
            peak = max(decay**i, lo)
            return lo + (peak - lo) * _cosine((s - start) / length)

    elif name == "onecycle":
        main = _onecycle(cfg, epochs, total, lo)
        warmup = 0  # the rising phase is the warmup

    elif name == "triangle":
        # airbench's schedule: linear from start_factor up to the peak at warmup_epochs, then
        # linear down to min_lr at the last step (its own warmup, like onecycle's).
        peak_at = max(1.0, min(float(warmup), total - 1.0))
        start, tail = cfg.start_factor, max(total - peak_at, 1.0)
        warmup = 0

        def main(s: int) -> float:
            if s <= peak_at:
                return start + (1.0 - start) * s / peak_at
            return 1.0 + (lo - 1.0) * min((s - peak_at) / tail, 1.0)

    elif name == "cyclic":
        period = cfg.restart_period * spe

        def main(s: int) -> float:
            x = (s % period) / period
            return lo + (1.0 - lo) * (1.0 - abs(2.0 * x - 1.0))

    else:  # pragma: no cover - the config's Literal already rejects other names
        raise ConfigError(f"sched.name={name!r} is not a schedule classlab knows")

    def factor(s: int) -> float:
        value = main(s)
        if s < warmup:
            value *= (s + 1) / warmup
        return value

    return factor


def lr_curve(cfg: SchedSection, *, epochs: int, steps_per_epoch: int, base_lr: float) -> list[float]:
    """The lr of every optimizer step of a run (``plateau``: flat, it depends on the metric)."""
    ratio = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    factor = lr_factor_fn(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, min_ratio=ratio)
    return [base_lr * factor(s) for s in range(epochs * steps_per_epoch)]


def build_scheduler(
    optimizer: Optimizer,
    cfg: SchedSection,
    *,
    epochs: int,
    steps_per_epoch: int,
    base_lrs: list[float] | None = None,
    val_every: int = 1,
) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config for ``configure_optimizers``.

    ``base_lrs`` (one per param group) replaces the groups' peak lrs, for a stage that reuses
    an optimizer; by default each group's current lr is its peak. ``min_lr`` is relative to the
    largest peak (the head's), so the backbone's floor is scaled like its peak. ``plateau``
    steps once per validation (``val_every`` epochs), on ``val/loss``.
    """
    groups = optimizer.param_groups
    if base_lrs is not None:
        if len(base_lrs) != len(groups):
            raise ValueError(f"base_lrs has {len(base_lrs)} values for {len(groups)} param groups")
        for group, lr in zip(groups, base_lrs, strict=True):
            group["lr"] = float(lr)
    for group in groups:
        group["initial_lr"] = group["lr"]

    if cfg.name == "plateau":
        if cfg.warmup_epochs > 0:
            raise ConfigError("sched.warmup_epochs is not supported with sched.name=plateau; set it to 0")
        if cfg.gamma >= 1.0:
            raise ConfigError("sched.gamma must be < 1 with sched.name=plateau (it is the factor lr is cut by)")
        plateau = ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=cfg.gamma,
            patience=cfg.plateau_patience,
            cooldown=cfg.plateau_cooldown,
            min_lr=cfg.min_lr,
        )
        return {"scheduler": plateau, "interval": "epoch", "frequency": val_every, "monitor": "val/loss"}

    # (groups scaled up by norm_lr_scale do not count: min_lr is a floor for the ordinary weights)
    plain = [group["initial_lr"] for group in groups if not str(group.get("name", "")).endswith("_norm")]
    peak = max(plain or [group["initial_lr"] for group in groups])
    ratio = cfg.min_lr / peak if peak > 0 else 0.0
    factor = lr_factor_fn(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, min_ratio=ratio)

    def lr_lambda(step: int) -> float:
        return factor(step)

    return {"scheduler": LambdaLR(optimizer, lr_lambda), "interval": "step", "frequency": 1}
