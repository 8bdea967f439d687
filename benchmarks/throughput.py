"""Training throughput on the CPU, three ways side by side, and how close it gets to the machine's peak.

    python benchmarks/throughput.py                     # CIFAR at 32 px: BENCHMARKS.md section "throughput"
    python benchmarks/throughput.py --workload photos   # photos at 224 px: section "throughput_photos"
    python benchmarks/throughput.py --smoke             # a few steps on a small copy of the data (CI)

Two workloads. ``cifar``: resnet_cifar depth 20 and fastnet on cifar10-jpeg at 32 px, crop + flip.
``photos``: torchvision's mobilenet_v2 and resnet18 (random weights: throughput does not depend on
them) on flowers5 at 224 px, RandomResizedCrop + flip, the photo recipes' augmentation. For each
model a fixed number of training steps is timed

  (a) as a user script does it: torchvision ImageFolder + transforms + DataLoader with 2 workers,
      decoding and augmenting every JPEG per image, in the workers, on the same cores as the model;
  (b) through classlab: the decoded uint8 cache, MemoryLoader, batch augmentation in
      ``ClassifyTask.on_after_batch_transfer``, the Lightning training loop with its logging;
  (c) the model alone: float batches already in memory, forward + backward + optimizer step.

(b) and (c) run alternately, ``--rounds`` times each (2 by default), and each reports the median of
its rounds, so that the machine's drift over a run does not decide their ratio. (b) / (c) is the share
of a step that is model work: the data path and Lightning's per-step overhead cost the rest. Achieved
GFLOP/s is the training FLOPs of a step (3 x the forward FLOPs
that ``torch.utils.flop_counter`` counts, a multiply-add as 2) divided by its time, next to
the machine's measured matmul GFLOP/s. bf16 autocast and ``torch.compile`` (with its compile
time) are measured on (c) and (b).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    FLOWERS,
    WORK,
    command,
    machine,
    publish,
    section_head,
    subset_folder,
    today,
)

# ---------------------------------------------------------------------------------------------
# Settings (the full run; --smoke shrinks steps, batch and data)
# ---------------------------------------------------------------------------------------------

HYP = {
    "batch_size": 256,  # images per step: large enough that per-step overheads show as a fraction
    "warmup_steps": 2,  # untimed steps first: oneDNN primitive creation, worker start-up, allocator
    "steps": 12,  # timed steps per measurement
    "user_workers": 2,  # DataLoader workers of the user-script baseline
    "matmul_size": 2048,  # square matmul for the peak GFLOP/s
    "rounds": 2,  # (b) and (c) measured this many times each, alternately; the median of each is reported
}
SMOKE = {
    "batch_size": 16,
    "warmup_steps": 1,
    "steps": 2,
    "rounds": 1,
    "train_per_class": 8,
    "test_per_class": 2,
    "photo_batch": 4,
}

MODELS = {
    "resnet20": {
        "spec": ["model.name=resnet_cifar", "model.depth=20"],
        "aug": ["aug.crop_padding=4", "aug.flip=true"],
    },
    "fastnet": {
        "spec": ["model.name=fastnet"],
        "aug": ["aug.crop_padding=0", "aug.translate=2", "aug.flip=true"],
    },
}
PHOTO_AUG = ["aug.crop_padding=0", "aug.random_resized_crop=[0.08,1.0]", "aug.flip=true"]
PHOTO_MODELS = {
    name: {"spec": [f"model.name={name}", "model.pretrained=false"], "aug": PHOTO_AUG, "torchvision": name}
    for name in ("mobilenet_v2", "resnet18")
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


TITLES = {"cifar": "CIFAR-10 at 32 px", "photos": "photos at 224 px"}


@dataclass(frozen=True)
class Workload:
    """What differs between the CIFAR and the photo measurement: data layout, size, default batch, models."""

    name: str
    data: Path
    size: int
    batch: int  # the workload's default; --batch-size and --smoke choose the run's own
    models: dict[str, Any]
    flat: bool  # class folders directly under data (a photo folder), not under data/train

    @property
    def train_dir(self) -> Path:
        return self.data if self.flat else self.data / "train"

    @property
    def section(self) -> str:
        return "throughput" if self.name == "cifar" else f"throughput_{self.name}"


WORKLOADS = {
    "cifar": Workload("cifar", DEFAULT_DATA, 32, HYP["batch_size"], MODELS, flat=False),
    "photos": Workload("photos", FLOWERS, 224, 64, PHOTO_MODELS, flat=True),
}


def _config(wl: Workload, model: str, batch: int, precision: str) -> Any:
    from classlab.config import load_config

    return load_config(
        None,
        [
            "data.dataset=folder",
            f"data.root={wl.data}",
            "data.val_fraction=0",
            "data.loader=memory",
            f"data.image_size={wl.size}",
            f"data.batch_size={batch}",
            f"trainer.precision={precision}",
            "trainer.progress=false",
            *wl.models[model]["spec"],
            *wl.models[model]["aug"],
        ],
    )


# ---------------------------------------------------------------------------------------------
# (a) the user script
# ---------------------------------------------------------------------------------------------


def _user_transform(wl: Workload, model: str) -> Any:
    import torchvision.transforms as T

    if wl.name == "photos":  # what a torchvision fine-tuning tutorial writes
        return T.Compose(
            [
                T.RandomResizedCrop(wl.size),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    crop = T.RandomCrop(32, padding=4) if model == "resnet20" else T.RandomCrop(32, padding=2, padding_mode="reflect")
    return T.Compose(
        [crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )


def _user_model(wl: Workload, model: str, num_classes: int, batch: int) -> torch.nn.Module:
    """The photo script builds torchvision's model itself; the CIFAR one takes classlab's (no torchvision twin)."""
    if "torchvision" in wl.models[model]:
        import torchvision

        return torchvision.models.get_model(wl.models[model]["torchvision"], num_classes=num_classes)
    from classlab.models import build_model

    return build_model(_config(wl, model, batch, "32-true").model.spec(), num_classes)


def user_script(wl: Workload, model: str, batch: int, warmup: int, steps: int, workers: int) -> float:
    """Images/s of the classic per-image pipeline, fp32, default memory format."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(wl.train_dir), transform=_user_transform(wl, model))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    net = _user_model(wl, model, len(dataset.classes), batch)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    start, done = 0.0, 0
    while done < steps:  # a small smoke folder may need more than one pass
        for i, (x, y) in enumerate(loader):
            if i == warmup and not start:
                start = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if start:
                done += 1
            if done == steps:
                break
    return done * batch / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# (b) through classlab
# ---------------------------------------------------------------------------------------------


def classlab_loop(wl: Workload, model: str, batch: int, warmup: int, steps: int, precision: str) -> float:
    """Images/s of classlab's own training path, Lightning loop included."""
    import lightning as L

    from classlab.data.pipeline import load_data
    from classlab.engine.task import ClassifyTask
    from classlab.engine.trainer import build_network

    cfg = _config(wl, model, batch, precision)
    bundle = load_data(cfg, with_test=False)
    net = build_network(cfg, bundle).to(memory_format=torch.channels_last)
    loader = bundle.train.loader(batch, shuffle=True, seed=0, size=bundle.size)
    task = ClassifyTask(net, cfg, bundle.num_classes, bundle.size, steps_per_epoch=len(loader))
    task.has_val = False

    class Clock(L.Callback):
        """From the end of the last warm-up step to the end of the last step: whole iterations only."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step in (warmup, warmup + steps):
                self.marks.append(time.perf_counter())

    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=warmup + steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[clock],
    )
    trainer.fit(task, train_dataloaders=loader)
    return steps * batch / (clock.marks[1] - clock.marks[0])


# ---------------------------------------------------------------------------------------------
# (c) the model alone
# ---------------------------------------------------------------------------------------------


def _model_and_batches(
    wl: Workload, model: str, batch: int, count: int = 1
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """The network and ``count`` different batches, normalized and in memory.

    Different batches, not one batch again and again: on one repeated batch the loss falls towards
    zero within a few steps, the gradients become denormal floats, and fp32 arithmetic on denormals
    is many times slower on a CPU (measured: resnet18 at 224 px fell from 25 to 1 image/s).
    """
    from classlab.data.pipeline import load_data
    from classlab.engine.trainer import build_network

    cfg = _config(wl, model, batch, "32-true")
    bundle = load_data(cfg, with_test=False)
    full = build_network(cfg, bundle).to(memory_format=torch.channels_last)
    order = torch.randperm(len(bundle.train.images), generator=torch.Generator().manual_seed(0))
    batches = []
    for i in range(count):
        idx = order[torch.arange(i * batch, (i + 1) * batch) % len(order)]
        x = full.normalize(bundle.train.images[idx])
        if x.shape[-1] != wl.size:  # decoded larger than the training size (train_source_size)
            x = F.interpolate(x, size=(wl.size, wl.size), mode="bilinear", antialias=True)
        batches.append((x.contiguous(memory_format=torch.channels_last), bundle.train.labels[idx]))
    return full.net, batches, cfg


def model_alone(
    wl: Workload, model: str, batch: int, warmup: int, steps: int, bf16: bool = False, compile: bool = False
) -> tuple[float, float | None]:
    """(images/s, compile seconds or None) of forward + backward + step on batches already in memory."""
    from classlab.engine.optim import build_optimizer

    net, batches, cfg = _model_and_batches(wl, model, batch, warmup + steps)
    opt = build_optimizer(net, cfg.optim)
    fn = torch.compile(net) if compile else net
    compile_s = None
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(fn(x), y, label_smoothing=cfg.loss.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i == 0 and compile:
            compile_s = time.perf_counter() - t  # the first call compiles forward and backward
    return steps * batch / (time.perf_counter() - start), compile_s


def train_gflop_per_image(wl: Workload, model: str) -> float:
    """Training FLOPs of one image: 3 x the forward FLOPs (multiply-add = 2) that torch's flop counter gives.

    The backward pass costs two forwards (the gradient of the input and of the weights). It is not
    counted from the backward itself because torch's counter overstates grouped convolutions' backward
    (mobilenet_v2 at 224 px: 12.3 GFLOP counted against 1.8), which would flatter its GFLOP/s.
    """
    from torch.utils.flop_counter import FlopCounterMode

    net, [(x, _)], _ = _model_and_batches(wl, model, 4)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return 3 * counter.get_total_flops() / len(x) / 1e9


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int = 5, as_conv: bool = False) -> float:
    """Best of ``repeats`` n x n x n products. ``as_conv``: the same product as a 1x1 convolution, which
    runs on oneDNN like the models' convolutions (``torch.mm`` in fp32 may take another BLAS, slower on
    some CPUs), so the two together bound what the convolutions can reach."""
    if as_conv:
        a = torch.randn(1, n, n // 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
        b = torch.randn(n, n, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)

        def op() -> torch.Tensor:
            return F.conv2d(a, b)
    else:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

        def op() -> torch.Tensor:
            return a @ b

    op()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = WORKLOADS[args.workload]
    hyp = {**HYP, "batch_size": base.batch, "image_size": base.size}
    data = Path(args.data).resolve() if args.data else base.data
    if args.smoke:
        hyp.update({k: SMOKE[k] for k in ("warmup_steps", "steps", "rounds")})
        hyp["batch_size"] = SMOKE["photo_batch"] if base.flat else SMOKE["batch_size"]
        test = None if base.flat else SMOKE["test_per_class"]
        data = subset_folder(data, WORK / f"smoke-data-{base.name}", SMOKE["train_per_class"], test)
    wl = replace(base, data=data)
    if args.steps:
        hyp["steps"] = args.steps
    if args.batch_size:
        hyp["batch_size"] = args.batch_size
    if args.rounds:
        hyp["rounds"] = args.rounds
    b, w, s = hyp["batch_size"], hyp["warmup_steps"], hyp["steps"]
    out: dict[str, Any] = {
        "workload": wl.name,
        "date": today(),
        "machine": machine(),
        "command": command(),
        "settings": hyp,
        "matmul_gflops": {
            f"{name}{suffix}": matmul_gflops(dtype, hyp["matmul_size"] if not args.smoke else 256, as_conv=conv)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            for suffix, conv in (("", False), ("_1x1conv", True))
        },
        "models": {},
    }
    for name in args.models or list(wl.models):
        row: dict[str, Any] = {"train_gflop_per_image": train_gflop_per_image(wl, name)}
        print(f"[{name}] {row['train_gflop_per_image']:.3f} GFLOP per training image", flush=True)
        row["a_user_script"] = user_script(wl, name, b, w, s, hyp["user_workers"])
        for suffix, precision in (("", "32-true"), ("_bf16", "bf16-mixed")):
            # (b) and (c) alternate, round after round: a drift in the machine's speed (another
            # tenant, the clock) then lands on both sides instead of deciding their ratio.
            runs_b, runs_c = [], []
            for _ in range(hyp["rounds"]):
                runs_b.append(classlab_loop(wl, name, b, w, s, precision))
                runs_c.append(model_alone(wl, name, b, w, s, bf16=bool(suffix))[0])
            row[f"b_classlab{suffix}"] = statistics.median(runs_b)
            row[f"c_model_alone{suffix}"] = statistics.median(runs_c)
            row[f"rounds_b_over_c{suffix}"] = [x / y for x, y in zip(runs_b, runs_c)]
        if args.compile:
            row["c_model_alone_compiled"], row["compile_s"] = model_alone(wl, name, b, w, s, compile=True)
        for key in [k for k in row if k.startswith(("b_", "c_"))]:
            row[f"gflops_{key}"] = row[key] * row["train_gflop_per_image"]
        row["b_over_c"] = row["b_classlab"] / row["c_model_alone"]
        row["b_over_c_bf16"] = row["b_classlab_bf16"] / row["c_model_alone_bf16"]
        row["b_over_a"] = row["b_classlab"] / row["a_user_script"]
        out["models"][name] = row
        print(f"[{name}] " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    mm = res["matmul_gflops"]
    notes = [
        f"settings: {json.dumps(res['settings'])}",
        f"measured matmul GFLOP/s (torch.mm / as a oneDNN 1x1 conv): fp32 {mm['fp32']:.0f} / "
        f"{mm['fp32_1x1conv']:.0f}, bf16 {mm['bf16']:.0f} / {mm['bf16_1x1conv']:.0f}",
        "(b)/(c): the share of a training step that is the model's own work; the goal is >= 0.95. "
        "(b) and (c) ran alternately, round after round; each figure is the median of its rounds",
    ]
    for name, r in res["models"].items():
        if "rounds_b_over_c" in r:
            per_round = [", ".join(f"{v:.3f}" for v in r[f"rounds_b_over_c{p}"]) for p in ("", "_bf16")]
            notes.append(f"{name}: (b)/(c) round by round: fp32 {per_round[0]}; bf16 {per_round[1]}")
    title = f"Throughput: user script vs classlab vs the model alone ({TITLES[res.get('workload', 'cifar')]})"
    lines = [
        *section_head(title, res, notes),
        "| model | GFLOP/img (train) | (a) user script img/s | (b) classlab img/s | (c) model alone img/s | (b)/(c) "
        "| (b)/(a) | (b) GFLOP/s | (b) bf16 img/s | (c) bf16 img/s | (b)/(c) bf16 | (b) bf16 GFLOP/s "
        "| compiled (c) img/s (compile s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        compiled = (
            f"{r['c_model_alone_compiled']:.0f} ({r['compile_s']:.0f} s)" if "c_model_alone_compiled" in r else "-"
        )
        lines.append(
            f"| {name} | {r['train_gflop_per_image']:.3f} | {r['a_user_script']:.0f} | {r['b_classlab']:.0f} "
            f"| {r['c_model_alone']:.0f} | {r['b_over_c']:.3f} | {r['b_over_a']:.2f} | {r['gflops_b_classlab']:.0f} "
            f"| {r['b_classlab_bf16']:.0f} | {r['c_model_alone_bf16']:.0f} | {r['b_over_c_bf16']:.3f} "
            f"| {r['gflops_b_classlab_bf16']:.0f} | {compiled} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="cifar", help="CIFAR at 32 px or photos at 224")
    parser.add_argument("--data", default=None, help="default: cifar10-jpeg (cifar) or flowers5 (photos)")
    parser.add_argument("--models", nargs="+", default=None, help="default: the workload's two models")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps (default {HYP['steps']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {HYP['batch_size']}")
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"alternate (b) and (c) this many times (default {HYP['rounds']})"
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on 2 cores)")
    parser.add_argument(
        "--smoke", action="store_true", help="a few steps on a small copy of the data; no BENCHMARKS.md"
    )
    parser.add_argument("--json", default=None, help="where to write the results (default benchmarks/_work/)")
    args = parser.parse_args(argv)
    wl = WORKLOADS[args.workload]
    data = Path(args.data) if args.data else wl.data
    if not (data if wl.flat else data / "train").is_dir():
        layout = "<class>/ folders" if wl.flat else "train/<class>/ folders"
        print(f"error: {data} is not an image folder with {layout} (the {wl.name} workload needs one)")
        return 2
    unknown = [m for m in args.models or [] if m not in wl.models]
    if unknown:
        names = ", ".join(wl.models)
        print(f"error: {', '.join(unknown)}: not a model of the {wl.name} workload (choose from {names})")
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from classlab.cli import _quiet_libraries

    _quiet_libraries()
    res = run(args)
    from classlab.run import atomic_write_text

    stem = wl.section.replace("_", "-") + ("-smoke" if args.smoke else "")
    json_path = Path(args.json) if args.json else WORK / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    publish(wl.section, table, args.smoke)
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
