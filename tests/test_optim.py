"""Optimizers, schedules and EMA: curves against their formulas, exact resume, safe checkpoints."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from classlab.config import OptimSection, SchedSection
from classlab.engine.optim import build_optimizer, build_scheduler, lr_curve
from classlab.errors import ConfigError

SPE = 10  # steps per epoch in the schedule tests


def curve(epochs: int = 10, lr: float = 1.0, **sched) -> list[float]:
    return lr_curve(SchedSection(**sched), epochs=epochs, steps_per_epoch=SPE, base_lr=lr)


class TwoPart(nn.Module):
    """A tiny model with a backbone (weights, a norm) and a head, like a real classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def backbone_parameters(self):
        return self.body.parameters()

    def head_parameters(self):
        return self.head.parameters()


def loss_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        opt.zero_grad()
        loss_of(model, seed=s).backward()
        opt.step()


# -- schedules ------------------------------------------------------------------------------


def test_warmup_is_a_linear_ramp_then_the_schedule():
    lrs = curve(name="constant", warmup_epochs=2, lr=0.4)
    assert lrs[:20] == pytest.approx([0.4 * (s + 1) / 20 for s in range(20)])
    assert lrs[20:] == pytest.approx([0.4] * 80)
    cos = curve(name="cosine", warmup_epochs=1)
    assert cos[4] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 100)))


def test_multistep_drops_at_fractional_milestones():
    lrs = curve(name="multistep", milestones=[2.5, 6], gamma=0.1, lr=1.0)
    assert lrs[24] == pytest.approx(1.0) and lrs[25] == pytest.approx(0.1)
    assert lrs[59] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01)
    # He et al.: drops at 32k and 48k iterations of 391-step epochs land on exactly those steps.
    he = lr_curve(
        SchedSection(name="multistep", milestones=[32000 / 391, 48000 / 391]),
        epochs=164,
        steps_per_epoch=391,
        base_lr=1,
    )
    assert he[31999] == 1.0 and he[32000] == pytest.approx(0.1) and he[48000] == pytest.approx(0.01)


def test_cosine_endpoints_and_midpoint():
    lrs = curve(name="cosine", min_lr=0.01, lr=0.5)
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[50] == pytest.approx((0.5 + 0.01) / 2)
    assert lrs[-1] == pytest.approx(0.01 + 0.49 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert min(lrs) >= 0.01 and lrs == sorted(lrs, reverse=True)


def test_restarts_peaks_decay_at_each_cycle_start():
    lrs = curve(name="restarts", epochs=14, restart_period=2, restart_mult=2, restart_decay=0.5, lr=1.0)
    starts = [0, 20, 60]  # cycles of 2, 4, 8 epochs
    for i, s in enumerate(starts):
        assert lrs[s] == pytest.approx(0.5**i)
        if s:
            assert lrs[s - 1] < 0.01 < lrs[s]  # the end of a cycle, then the jump back up
    assert lrs[10] == pytest.approx(0.5)  # middle of the first cycle
    assert lrs[20 + 20] == pytest.approx(0.25)  # middle of the second: half its peak of 0.5


def test_onecycle_matches_torch():
    lrs = curve(name="onecycle", lr=0.8)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.8)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.8, total_steps=100, cycle_momentum=False)
    ref = []
    for _ in range(100):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    assert lrs == pytest.approx(ref, rel=1e-9)
    assert max(lrs) == pytest.approx(0.8) and lrs.index(max(lrs)) == 29


def test_cyclic_is_triangular():
    lrs = curve(name="cyclic", restart_period=2, min_lr=0.1, lr=1.0)
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.55)


def test_scheduler_drives_the_optimizer_and_resumes_exactly():
    cfg = SchedSection(name="cosine", warmup_epochs=1, min_lr=0.001)
    model = TwoPart()
    opt = build_optimizer(model, OptimSection(lr=0.1, backbone_lr_scale=0.5))
    conf = build_scheduler(opt, cfg, epochs=3, steps_per_epoch=SPE)
    assert conf["interval"] == "step"
    sched = conf["scheduler"]
    expected = lr_curve(cfg, epochs=3, steps_per_epoch=SPE, base_lr=0.1)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [row[-1] for row in seen] == pytest.approx(expected[:12])  # head group
    assert [row[0] for row in seen] == pytest.approx([x / 2 for x in expected[:12]])  # backbone at half
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # lr closures are left out: plain data only
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = build_scheduler(build_optimizer(model, OptimSection(lr=0.1)), cfg, epochs=3, steps_per_epoch=SPE)
    fresh["scheduler"].load_state_dict(state)
    assert fresh["scheduler"].get_last_lr()[-1] == pytest.approx(expected[12])


def test_plateau_config():
    opt = build_optimizer(TwoPart(), OptimSection())
    conf = build_scheduler(
        opt, SchedSection(name="plateau", gamma=0.5, plateau_patience=2), epochs=5, steps_per_epoch=3
    )
    assert conf["monitor"] == "val/loss" and conf["interval"] == "epoch"
    assert isinstance(conf["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)


# -- optimizers -----------------------------------------------------------------------------

OPTIMIZERS = ["sgd", "adam", "adamw", "radam", "lars", "lamb", "rangerlars", "muon"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_a_loss(name):
    torch.manual_seed(0)
    model = TwoPart()
    lr = {"sgd": 0.1, "lars": 1.0, "muon": 0.1}.get(name, 0.01)
    opt = build_optimizer(model, OptimSection(name=name, lr=lr))
    before = loss_of(model).item()
    for _ in range(10):
        opt.zero_grad()
        loss_of(model).backward()
        opt.step()
    assert loss_of(model).item() < before


def test_no_decay_groups_and_backbone_scale():
    model = TwoPart()
    opt = build_optimizer(model, OptimSection(name="adamw", lr=0.1, weight_decay=0.05, backbone_lr_scale=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    for name, group in groups.items():
        assert all(p.ndim > (1 if "no_decay" not in name else -1) for p in group["params"])
        assert group["weight_decay"] == (0.0 if "no_decay" in name else 0.05)
        assert group["lr"] == pytest.approx(0.01 if name.startswith("backbone") else 0.1)
    assert all(p.ndim <= 1 for p in groups["backbone_no_decay"]["params"])  # LayerNorm and biases
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    decay_all = build_optimizer(model, OptimSection(decay_norm_and_bias=True, weight_decay=0.05))
    assert {g["weight_decay"] for g in decay_all.param_groups} == {0.05}


def test_zero_backbone_lr_and_frozen_params_are_fine():
    model = TwoPart()
    for p in model.head.bias, model.body[1].weight:
        p.requires_grad_(False)
    opt = build_optimizer(model, OptimSection(name="sgd", backbone_lr_scale=0.0, lookahead=True))
    body_before = [p.detach().clone() for p in model.body.parameters()]
    train_steps(model, opt, range(6))
    assert all(torch.equal(a, b) for a, b in zip(body_before, model.body.parameters()))
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    plain = nn.Linear(3, 2)  # no backbone_parameters(): all of it is head at full lr
    assert {g["name"] for g in build_optimizer(plain, OptimSection()).param_groups} == {"head", "head_no_decay"}


def test_muon_takes_the_body_weights_and_sgd_the_rest():
    """airbench94_muon's split: Muon steps for the body's weight matrices (at muon_lr, no weight decay,
    held at norm sqrt(out) with fixed_norm), plain SGD steps for biases, norms and the head."""
    torch.manual_seed(0)
    model = TwoPart()
    cfg = OptimSection(name="muon", lr=0.1, muon_lr=0.05, weight_decay=0.01, muon_fixed_norm=True, momentum=0.0)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone_muon"]["params"] == [model.body[0].weight] and groups["backbone_muon"]["muon"]
    assert groups["backbone_muon"]["lr"] == 0.05 and groups["backbone_muon"]["weight_decay"] == 0.0
    assert [p for g in opt.param_groups if not g["muon"] for p in g["params"]] == [
        *[p for n, p in model.named_parameters() if n != "body.0.weight" and n.startswith("body")],
        *model.head.parameters(),
    ]
    head_before = model.head.weight.detach().clone()
    opt.zero_grad()
    loss_of(model).backward()
    expected_head = head_before - 0.1 * (model.head.weight.grad + 0.01 * head_before)  # SGD, no momentum
    opt.step()
    assert torch.allclose(model.head.weight, expected_head)
    w = model.body[0].weight
    assert w.norm().item() != pytest.approx(8**0.5, rel=1e-3)  # moved after the rescale
    opt.zero_grad()
    loss_of(model, 1).backward()
    before = w.detach().clone()
    opt.step()
    # The Muon step of a renormalised weight: an orthogonalised (8 x 4) update, Frobenius norm sqrt(4), times
    # lr and Muon's shape factor sqrt(max(1, out / in)) = sqrt(2). Newton-Schulz leaves the singular values
    # near 1, not at 1: a loose tolerance.
    step = w.detach() - before * (8**0.5 / before.norm())
    assert step.norm().item() == pytest.approx(0.05 * 4**0.5 * 2**0.5, rel=0.2)


def test_muon_needs_weight_matrices_outside_the_head():
    model = TwoPart()
    model.body[0].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable weight matrices outside its head"):
        build_optimizer(model, OptimSection(name="muon"))


def test_nesterov_only_with_momentum():
    opt = build_optimizer(TwoPart(), OptimSection(name="sgd", momentum=0.0, nesterov=True))
    assert opt.param_groups[0]["nesterov"] is False


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="sgd", lookahead=True, lookahead_k=2),
        dict(name="rangerlars", lookahead_k=3),
        dict(name="lamb"),
        dict(name="muon", muon_lr=0.05, muon_fixed_norm=True),
    ],
)
def test_resumed_optimizer_continues_identically(kwargs, tmp_path):
    cfg = OptimSection(lr=0.05, **kwargs)
    torch.manual_seed(1)
    straight = TwoPart()
    resumed = copy.deepcopy(straight)
    opt = build_optimizer(straight, cfg)
    train_steps(straight, opt, range(7))

    opt_a = build_optimizer(resumed, cfg)
    train_steps(resumed, opt_a, range(4))
    torch.save({"model": resumed.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    again = TwoPart()
    again.load_state_dict(saved["model"])
    opt_b = build_optimizer(again, cfg)
    opt_b.load_state_dict(saved["opt"])
    train_steps(again, opt_b, range(4, 7))
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)


# -- EMA in a Lightning run -----------------------------------------------------------------

pl = pytest.importorskip("lightning.pytorch")


class TinyTask(pl.LightningModule):
    """A BatchNorm model (buffers to average) on random tensors, trained by our optimizer stack."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.val_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("val/loss", loss)
        self.val_losses.append(loss.item())

    def configure_optimizers(self):
        opt = build_optimizer(self.net, OptimSection(name="sgd", lr=0.1, lookahead=True, lookahead_k=3))
        sched = build_scheduler(opt, SchedSection(name="cosine", warmup_epochs=1), epochs=4, steps_per_epoch=4)
        return {"optimizer": opt, "lr_scheduler": sched}


def _loader(seed: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(max_epochs: int, root: Path, ckpt: Path | None = None, decay: float = 0.9):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from classlab.engine.ema import EMACallback

    torch.manual_seed(0)
    task = TinyTask()
    ema = EMACallback(decay=decay)
    trainer = pl.Trainer(
        accelerator="cpu",
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        max_epochs=max_epochs,
        callbacks=[ema, ModelCheckpoint(dirpath=root, save_last=True)],
    )
    trainer.fit(task, _loader(0), _loader(1), ckpt_path=ckpt)
    return task, ema, trainer


def test_ema_resume_is_exact_and_checkpoints_are_safe(tmp_path):
    straight, ema_s, _ = _fit(4, tmp_path / "a")
    _fit(2, tmp_path / "b")
    last = tmp_path / "b" / "last.ckpt"
    resumed, ema_r, _ = _fit(4, tmp_path / "b", ckpt=last)

    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for k, a in ema_s.ema_state_dict.items():
        assert torch.equal(a, ema_r.ema_state_dict[k]), k
    assert ema_s.num_updates == ema_r.num_updates == 16

    ck = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    raw = straight.state_dict()
    # "state_dict" holds the average (what eval/predict load); the raw weights travel alongside.
    assert all(torch.equal(ck["state_dict"][k], ema_s.ema_state_dict[k]) for k in raw)
    assert all(torch.equal(ck["raw_state_dict"][k], v) for k, v in raw.items())
    assert not torch.equal(ck["state_dict"]["net.0.weight"], raw["net.0.weight"])
    # BatchNorm statistics are copied, not averaged.
    assert torch.equal(ck["state_dict"]["net.1.running_mean"], raw["net.1.running_mean"])


def test_validation_runs_on_the_ema_weights(tmp_path):
    task, ema, trainer = _fit(1, tmp_path, decay=0.5)
    raw = {k: v.clone() for k, v in task.state_dict().items()}
    task.val_losses.clear()
    trainer.validate(task, _loader(1), verbose=False)
    reference = copy.deepcopy(task.net)
    reference.load_state_dict({k.removeprefix("net."): v for k, v in ema.ema_state_dict.items()})
    reference.eval()
    x, y = next(iter(_loader(1)))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(reference(x), y).item()
    assert task.val_losses[0] == pytest.approx(expected)
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in raw.items())  # swapped back
