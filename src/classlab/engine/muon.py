"""Muon for a network's filters and weight matrices, SGD for everything else, as one optimizer.

Muon (Jordan et al. 2024) replaces a weight matrix's momentum step by its nearest orthogonal
matrix (a few Newton-Schulz iterations), which trains convolution filters in fewer steps; it is
meant for the hidden weights only: biases, normalization parameters and the classifier head keep a
first-order optimizer. timm's ``Muon`` falls back to AdamW for those, but airbench94_muon (94% on
CIFAR-10 in 0.68x airbench94's time) keeps them on Nesterov SGD with the tuned lrs of the SGD recipe.
So this class routes each parameter group to timm's functional Muon update or to torch's
functional SGD update: one optimizer, so one lr schedule, one ``state_dict`` (plain tensors: exact
resume) and the Lightning loop's single-optimizer path. Nothing of either algorithm is rewritten here.

``fixed_norm`` is airbench94_muon's one addition: each Muon tensor is rescaled to norm
sqrt(out channels) before its step. A BatchNorm after every convolution makes a filter's scale
meaningless to the output, so fixing it keeps the lr's meaning constant over the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["MuonSGD", "muon_parameter_ids"]


def muon_parameter_ids(model: nn.Module) -> set[int]:
    """The parameters Muon should train: weight tensors of 2 or more dimensions outside the head."""
    head_fn = getattr(model, "head_parameters", None)
    head = {id(p) for p in head_fn()} if callable(head_fn) else set()
    return {id(p) for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in head}


class MuonSGD(Optimizer):
    """Groups with ``muon=True`` take timm's Muon step, the rest torch's SGD step.

    Muon groups use ``muon_momentum``, ``ns_steps``, ``fixed_norm`` and decoupled ``weight_decay``;
    SGD groups ``momentum``, ``nesterov`` and (coupled, as torch's SGD) ``weight_decay``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        muon_momentum: float = 0.95,
        ns_steps: int = 5,
        fixed_norm: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=0.0,
            muon=False,
            muon_momentum=muon_momentum,
            ns_steps=ns_steps,
            fixed_norm=fixed_norm,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        from timm.optim.muon import muon
        from torch.optim.sgd import sgd

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["muon"]:
                if group["fixed_norm"]:
                    for p in params:
                        p.mul_(p.shape[0] ** 0.5 / p.norm().clamp(min=1e-12))
                buffers = [self._buffer(p) for p in params]
                muon(
                    params,
                    grads,
                    buffers,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["muon_momentum"],
                    nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"],
                    ns_coefficients="quintic",
                    eps=1e-7,
                    safety_factor=1.0,
                    adjust_lr_fn="original",  # sqrt(max(1, out/in)): 1 for every filter of a CNN
                    conv_mode="flatten",
                    normalize_spatial=True,
                    scale_eps=False,
                )
            else:
                buffers = [self.state[p].get("momentum_buffer") for p in params]
                sgd(
                    params,
                    grads,
                    buffers,
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    lr=group["lr"],
                    dampening=0.0,
                    nesterov=group["nesterov"] and group["momentum"] > 0,
                    maximize=False,
                )
                if group["momentum"] > 0:
                    for p, buf in zip(params, buffers, strict=True):
                        self.state[p]["momentum_buffer"] = buf
        return loss

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]
