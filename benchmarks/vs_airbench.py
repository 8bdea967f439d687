"""airbench94 against classlab's fast recipe on the same machine, the same data, one command.

    python benchmarks/vs_airbench.py --seeds 0 1 --threads 2   # full: 20-40 min a side and seed on 2 cores
    python benchmarks/vs_airbench.py --sides airbench-bf16 classlab --seeds 0 1 --threads 2
    python benchmarks/vs_airbench.py --sides classlab --set epochs=10 --threads 2   # one lever on its own
    python benchmarks/vs_airbench.py --smoke               # a few steps on a small copy (CI)

What it does, in order:

1. writes ../shared/data/cifar10-jpeg (decoded once by classlab's own decoder, so both sides see
   the same pixels) as airbench's ``cifar10/train.pt`` and ``cifar10/test.pt``: ``images`` uint8
   (N, 32, 32, 3), ``labels`` int64, ``classes``;
2. installs ``airbench==0.1.8`` with ``--no-deps`` into ``benchmarks/_work/airbench/site``, so it
   runs on the project's own torch (nothing of airbench is copied into classlab);
3. runs each (side, seed) in a fresh process, skipping those already in the results file, so an
   interrupted benchmark resumes where it stopped. airbench runs unmodified except for the device
   and dtype map: ``.cuda()`` is a no-op, CUDA events become a wall clock, ``torch.load`` maps to
   the CPU, and ``.half()`` means ``.float()`` (side ``airbench``, the fp32 port) or bf16 (side
   ``airbench-bf16``: airbench's own half-precision design, BatchNorm kept fp32 as it keeps it);
4. writes, per side, the mean and spread of the final (TTA) accuracy, the wall time from the
   first training step to the final TTA accuracy (decoding and warm-up excluded on both sides),
   and the time to 90% and 93% test accuracy (at epoch ends, evaluation not timed); then
   classlab's wall-time ratio against each airbench side, the headline against the faster one,
   to BENCHMARKS.md.

Timing on each side. airbench: its own clock (whitening init + training epochs + final TTA).
classlab: the run's ``wall_time_s`` (the training loop, per-epoch checkpoints included) +
``test_time_s`` (loading the final weights and the TTA test) + the whitening init, which
classlab does before its clock starts and is therefore timed separately and added.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    WORK,
    command,
    machine,
    measured_by,
    publish,
    results_path,
    run_worker,
    section_head,
    subset_folder,
    today,
)

AIRBENCH = "airbench==0.1.8"
AIRBENCH_SDIST = Path("/tmp/ab/airbench-0.1.8.tar.gz")  # used when present: no network needed
FAST_CONFIG = REPO / "configs" / "cifar10_fast.yaml"
THRESHOLDS = (0.90, 0.93)
SIDES = ("airbench", "airbench-bf16", "classlab", "classlab-muon")
# classlab's sides: its recipes for this race
RECIPES = {"classlab": FAST_CONFIG, "classlab-muon": REPO / "configs" / "cifar10_fast_muon.yaml"}
# airbench's own precision is half (``.half()`` weights and inputs, BatchNorm kept fp32); on a CPU half
# maps to bf16, the 16-bit type it computes in. "airbench" is the fp32 port.
HALF_AS = {"airbench": "float32", "airbench-bf16": "bfloat16"}
PRECISION = {
    "airbench": "fp32 (its .half() as .float())",
    "airbench-bf16": "bf16 weights and inputs, BatchNorm fp32",
}

# --smoke: how small (images per class) and how short (steps)
SMOKE = {"train_per_class": 8, "test_per_class": 5, "batch_size": 20, "epochs": 1}
SMOKE_FP32 = "fp32 in this smoke run: no bf16 instructions on this CPU (the side's own: {})"


def smoke_in_fp32(smoke: bool) -> bool:
    """A smoke run checks the wiring; on a CPU without bf16 instructions a bf16 step is emulated, 12-41x
    slower than fp32 (BENCHMARKS.md "precision_cpu"), so there the bf16 sides' smoke steps run in fp32."""
    from classlab.engine.trainer import cpu_has_bf16

    return smoke and not cpu_has_bf16()


# ---------------------------------------------------------------------------------------------
# Data and installation
# ---------------------------------------------------------------------------------------------


def write_airbench_data(data: Path, dest: Path) -> None:
    """``dest/train.pt`` and ``dest/test.pt`` in airbench's format, from classlab's decoded cache."""

    from classlab.config import load_config
    from classlab.data.loaders import decode
    from classlab.data.sources import open_dataset
    from classlab.run import atomic_torch_save

    if (dest / "train.pt").is_file() and (dest / "test.pt").is_file():
        return
    cfg = load_config(None, ["data.dataset=folder", f"data.root={data}", "data.image_size=32"])
    dataset = open_dataset(cfg.data)
    for name, source in (("train", dataset.train), ("test", dataset.test)):
        dec = decode(source, 32, cfg.data.cache_dir)
        if dec.bad:
            raise SystemExit(f"error: {len(dec.bad)} unreadable images in {data}/{name}, e.g. {dec.bad[0]}")
        blob = {
            "images": dec.images.permute(0, 2, 3, 1).contiguous(),  # airbench wants (N, H, W, C) uint8
            "labels": dec.labels.long(),
            "classes": list(dataset.classes),
        }
        atomic_torch_save(blob, dest / f"{name}.pt")


def install_airbench(site: Path) -> None:
    if (site / "airbench" / "lib_airbench94.py").is_file():
        return
    target = str(AIRBENCH_SDIST) if AIRBENCH_SDIST.is_file() else AIRBENCH
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(site)]
    done = subprocess.run([*cmd, target], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: could not install {AIRBENCH}: {done.stderr.strip().splitlines()[-1:]}")


# ---------------------------------------------------------------------------------------------
# Workers: one (side, seed) in a fresh process; they print one JSON line
# ---------------------------------------------------------------------------------------------


def _map_cuda_to_cpu(half: str) -> None:
    """The device and dtype map, and nothing else: airbench's code runs as published.

    ``half`` is the dtype that airbench's ``.half()`` becomes: ``float32`` (the fp32 port) or
    ``bfloat16`` (its own 16-bit design on a CPU). See ``_half_means`` for the one name airbench's
    own module must also see.
    """
    import torch
    from torch import nn

    dtype = getattr(torch, half)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.Tensor.half = lambda self, *a, **k: self.to(dtype)  # type: ignore[method-assign]
    nn.Module.half = lambda self: self.to(dtype)  # type: ignore[method-assign]

    class WallEvent:
        """torch.cuda.Event's timing interface on the wall clock (CPU work is synchronous)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.t = 0.0

        def record(self, *args: Any) -> None:
            self.t = time.perf_counter()

        def elapsed_time(self, end: WallEvent) -> float:
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA events report

    torch.cuda.Event = WallEvent  # type: ignore[misc, assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    load = torch.load
    torch.load = lambda f, *a, map_location=None, **k: load(f, *a, map_location="cpu", **k)  # type: ignore[assignment]


def _half_means(module: Any, dtype: Any) -> None:
    """Inside ``module`` only, ``torch.half`` names ``dtype``.

    airbench's Lookahead averages the parameters whose dtype is ``torch.half`` or ``torch.float``;
    with bf16 weights it would skip them all. Rebinding ``torch.half`` itself breaks torch (its
    pickle loader looks the name up), so the module gets a view of torch that differs in that name.
    """
    import types

    torch = module.torch

    class TorchView(types.ModuleType):
        half = dtype

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    module.torch = TorchView("torch")


def worker_airbench(seed: int, smoke: bool, half: str) -> dict[str, Any]:
    import torch

    _map_cuda_to_cpu(half)
    import airbench
    import airbench.utils as utils

    _half_means(utils, getattr(torch, half))

    epochs: list[dict[str, Any]] = []
    show = utils.print_training_details

    def record(variables: dict[str, Any], is_final_entry: bool) -> None:
        if variables.get("epoch") is not None:
            keep = ("epoch", "val_acc", "tta_val_acc", "total_time_seconds", "train_acc", "train_loss")
            epochs.append({k: variables[k] for k in keep if isinstance(variables.get(k), int | float | str)})
        show(variables, is_final_entry)

    utils.print_training_details = record  # observe the per-epoch table airbench prints
    kwargs: dict[str, Any] = {}
    if smoke:
        kwargs = {
            "train_loader": airbench.CifarLoader(
                "cifar10", train=True, batch_size=SMOKE["batch_size"], aug={"flip": True, "translate": 2}, altflip=True
            ),
            "epochs": SMOKE["epochs"],
        }
    torch.manual_seed(seed)
    airbench.warmup94(**kwargs)  # one step, untimed: what airbench's own main does first
    epochs.clear()
    torch.manual_seed(seed)
    airbench.train94(run=seed, **kwargs)
    final = next(e for e in epochs if e.get("epoch") == "eval")
    per_epoch = [e for e in epochs if isinstance(e.get("epoch"), int)]
    return {
        "accuracy": float(final["tta_val_acc"]),
        "wall_s": float(final["total_time_seconds"]),
        "epochs": [
            {"epoch": e["epoch"] + 1, "acc": e["val_acc"], "time_s": e["total_time_seconds"]} for e in per_epoch
        ],
    }


def worker_classlab(
    seed: int, smoke: bool, data: Path, runs: Path, config: Path = FAST_CONFIG, sets: list[str] | None = None
) -> dict[str, Any]:
    import torch

    import classlab
    from classlab.cli import _quiet_libraries
    from classlab.config import load_config
    from classlab.data.pipeline import load_data
    from classlab.engine.load import load
    from classlab.engine.metrics import top_k_accuracy
    from classlab.engine.predict import predict_logits
    from classlab.models import build_model

    _quiet_libraries()
    base = [f"data.root={data}", f"seed={seed}", f"run.root={runs}", "trainer.progress=false", *(sets or [])]
    if smoke:
        base += [f"data.batch_size={SMOKE['batch_size']}", f"epochs={SMOKE['epochs']}"]
    own_precision = load_config(config, base).trainer.precision
    fp32 = smoke_in_fp32(smoke) and own_precision != "32-true"
    if fp32:
        base.append("trainer.precision=32-true")
    if torch.get_num_threads():
        base.append(f"trainer.threads={torch.get_num_threads()}")
    # Warm-up, untimed: loads the decoded cache and creates the oneDNN kernels, as airbench's warmup94 does.
    if not smoke:
        classlab.train(
            config, [*base, "exp_name=warmup", "trainer.max_steps=1", "trainer.test_tta="], force=True, quiet=True
        )

    # The whitening init happens before classlab's run clock starts: time it on its own and add it.
    cfg = load_config(config, base)
    bundle = load_data(cfg, with_test=False)
    net = build_model(cfg.model.spec(), bundle.num_classes, bundle.channels, bundle.size)
    from classlab.data.preprocess import Normalize

    started = time.perf_counter()
    net.init_from_data(Normalize(bundle.mean, bundle.std)(bundle.train.images[:5000]))
    whiten_s = time.perf_counter() - started
    del bundle

    run = classlab.train(
        config, [*base, f"exp_name={config.stem}_seed{seed}", "trainer.keep_every=1"], force=True, quiet=True
    )
    summary = run.read_json("summary.json")
    test = load_data(cfg, split=run.read_json("split.json")).test
    per_epoch = []
    for row in run.read_metrics():  # accuracy of each epoch's weights, untimed, as airbench's per-epoch val_acc
        epoch = int(row["epoch"])
        if not (run.checkpoints / f"epoch{epoch}.ckpt").is_file():
            continue
        model = load(run, f"epoch{epoch}").model
        logits, labels = predict_logits(model, test.loader(1000, shuffle=False, seed=0, size=32))
        per_epoch.append(
            {"epoch": epoch, "acc": top_k_accuracy(logits, labels), "time_s": float(row["time"]) + whiten_s}
        )
    return {
        "accuracy": float(summary["test_acc_tta"]),
        "accuracy_no_tta": float(summary["test_acc"]),
        "wall_s": float(summary["wall_time_s"]) + float(summary["test_time_s"]) + whiten_s,
        "whiten_s": whiten_s,
        "test_time_s": float(summary["test_time_s"]),
        "epochs": per_epoch,
        "run": str(run.path),
        "precision": own_precision,
        "smoke_fp32": fp32,
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def result_key(side: str, sets: list[str]) -> str:
    """Where a side's results are kept: overrides (``--set``) make a side of their own."""
    return f"{side} [{' '.join(sets)}]" if sets and side in RECIPES else side


def time_to(epochs: list[dict[str, Any]], threshold: float) -> float | None:
    for e in epochs:
        if e["acc"] >= threshold:
            return float(e["time_s"])
    return None


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _precision(runs: dict[str, Any]) -> str:
    found = {r.get("precision", "?") for r in runs.values()}
    return ", ".join(sorted(found)) + " (the recipe's trainer.precision)"


def _label(side: str, runs: dict[str, Any]) -> str:
    own = PRECISION.get(side.split(" [")[0]) or _precision(runs)
    return SMOKE_FP32.format(own) if any(r.get("smoke_fp32") for r in runs.values()) else own


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    notes = [
        "wall time: first training step to the final TTA accuracy; decoding and warm-up excluded on both sides",
        "time to X: the first epoch end whose test accuracy (no TTA) reaches X; evaluation itself not timed",
    ]
    notes += measured_by(r for runs in results.values() for r in runs.values())
    lines = [
        *section_head("airbench94 vs classlab fast recipe (CIFAR-10 from cifar10-jpeg, CPU)", meta, notes),
        "| side | precision | seeds | accuracy (TTA) | wall time s | time to 90% s | time to 93% s |",
        "|---|---|---|---|---|---|---|",
    ]
    walls: dict[str, float] = {}
    for side in sorted(results, key=lambda k: (SIDES.index(k.split(" [")[0]), k)):
        runs = results[side]
        if not runs:
            continue
        acc = [r["accuracy"] for r in runs.values()]
        wall = [r["wall_s"] for r in runs.values()]
        walls[side] = statistics.mean(wall)
        t90 = [t for r in runs.values() if (t := time_to(r["epochs"], 0.90)) is not None]
        t93 = [t for r in runs.values() if (t := time_to(r["epochs"], 0.93)) is not None]
        lines.append(
            f"| {side} | {_label(side, runs)} | {', '.join(sorted(runs))} "
            f"| {_stats(acc)} | {_stats(wall)} "
            f"| {_stats(t90)} ({len(t90)}/{len(runs)}) | {_stats(t93)} ({len(t93)}/{len(runs)}) |"
        )
    peers = [side for side in HALF_AS if side in walls]
    ours = [side for side in walls if side.split(" [")[0] in RECIPES]
    for mine in ours:
        for side in peers:
            lines.append(f"\n{mine} / {side} wall time: {walls[mine] / walls[side]:.3f}")
    if peers:
        fastest = min(peers, key=walls.__getitem__)
        for mine in (m for m in ours if "[" not in m):
            lines.append(
                f"\n**Headline, {mine} against the faster airbench ({fastest}): {walls[mine] / walls[fastest]:.3f}**"
            )
    return "\n".join(lines) + "\n"


def work_and_data(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """The work folder and the data of a CIFAR benchmark run (a small copy with ``--smoke``); in a worker
    process, also its thread count. vs_airbench and step_profile share it, so their smoke data is one copy."""
    work = Path(args.work or WORK / (f"{name}-smoke" if args.smoke else name)).resolve()
    data = Path(args.data).resolve()
    if args.smoke:
        per_class = SMOKE["train_per_class"]
        data = subset_folder(data, WORK / f"smoke-data-vs{per_class}", per_class, SMOKE["test_per_class"])
    if args.worker:
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    return work, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="image folder with train/ and test/")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads, both sides (default: all)")
    parser.add_argument("--work", default=None, help="work folder (default benchmarks/_work/vs_airbench[-smoke])")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a small copy; no BENCHMARKS.md")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for classlab's sides (a lever measured on its own; its results are kept apart)",
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    work, data = work_and_data(args, "vs_airbench")
    if args.worker:
        if args.worker in HALF_AS:
            sys.path.insert(0, str(work / "site"))
            os.chdir(work)  # airbench reads ./cifar10/{train,test}.pt
            fp32 = smoke_in_fp32(args.smoke) and HALF_AS[args.worker] != "float32"
            out = worker_airbench(args.seed, args.smoke, "float32" if fp32 else HALF_AS[args.worker])
            out["smoke_fp32"] = fp32
        else:
            out = worker_classlab(args.seed, args.smoke, data, work / "runs", RECIPES[args.worker], args.set)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    if not (data / "train").is_dir() or not (data / "test").is_dir():
        print(f"error: {data} needs train/<class>/ and test/<class>/ image folders")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    write_airbench_data(data, work / "cifar10")
    if set(args.sides) & set(HALF_AS):
        install_airbench(work / "site")
    from classlab.run import atomic_write_text

    results_file = results_path("vs_airbench", work, args.smoke or args.work is not None)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in args.seeds:
        for plain in args.sides:
            side = result_key(plain, args.set)
            if str(seed) in results.get(side, {}):
                print(f"[{side} seed {seed}] done earlier: {results[side][str(seed)]['accuracy']:.4f}", flush=True)
                continue
            print(f"[{side} seed {seed}] running ...", flush=True)
            cmd = [sys.executable, __file__, "--worker", plain, "--seed", str(seed), "--work", str(work)]
            cmd += [f"--set={kv}" for kv in args.set if plain in RECIPES]
            cmd += ["--data", str(args.data)] + (["--smoke"] if args.smoke else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out, tail = run_worker(cmd)
            if out is None:
                print(f"error: {side} seed {seed} failed:\n  {tail}")
                return 1
            out.update(command=command(), date=today())  # results accumulate over calls: each row names its call
            results.setdefault(side, {})[str(seed)] = out
            atomic_write_text(results_file, json.dumps(results, indent=2) + "\n")  # resumable per side and seed
            r = results[side][str(seed)]
            print(f"[{side} seed {seed}] accuracy {r['accuracy']:.4f} in {r['wall_s']:.1f} s", flush=True)
    meta = {"date": today(), "machine": machine(), "command": command()}
    table = markdown(results, meta)
    publish("vs_airbench", table, args.smoke)
    print(f"results: {results_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
