"""fastai against classlab on a folder of photos: fine-tuning ImageNet MobileNetV2, and training from scratch.

    python benchmarks/vs_fastai.py                          # flowers5, both arms, both sides
    python benchmarks/vs_fastai.py --arms scratch --threads 2
    python benchmarks/vs_fastai.py --smoke                  # a small copy, one epoch (CI; fastai only if installed)

The arms, on ../shared/data/flowers5 with one stratified 20% validation split (seed 0) for both sides:

- **finetune**: torchvision's MobileNetV2 with the ImageNet weights of ../shared/weights, ``--finetune-size``
  px (224 by default), ``--finetune-epochs`` epochs in all. fastai: ``vision_learner`` (its own head on
  ``features``) + ``fine_tune(E - 1, freeze_epochs=1)`` at its default ``base_lr`` (2e-3), ``aug_transforms``,
  ImageNet normalisation. classlab: ``configs/photos_finetune.yaml`` with ``data.image_size`` and
  ``epochs`` set to the same.
- **scratch**: 128 px, ``--scratch-epochs`` (5) epochs from random weights. fastai: ``xresnet18`` in a
  ``Learner`` with label-smoothing cross-entropy and ``fit_one_cycle(E, 3e-3)``, ``aug_transforms``.
  classlab: ``configs/photos_scratch.yaml`` with ``epochs`` set.

Each (arm, side) runs in a fresh process and is timed whole, from start to the final validation
figure: imports, decoding (classlab's decode cache starts empty), training and validation. Finished
ones are kept in ``results.json`` under the work folder; a second call runs only what is missing.

fastai is the peer, not a dependency: it is installed into its own virtual environment
(``benchmarks/_work/vs_fastai/venv``, ``--system-site-packages`` so that it runs on the project's
pinned torch rather than downloading another) with ``pip install fastai``; what pip added is
written into ``results.json`` and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    FLOWERS,
    REPO,
    WORK,
    command,
    machine,
    measured_by,
    publish,
    results_path,
    section_head,
    subset_folder,
    today,
)

WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"
ARMS = ("finetune", "scratch")
SIDES = ("fastai", "classlab")
RECIPES = {"finetune": REPO / "configs" / "photos_finetune.yaml", "scratch": REPO / "configs" / "photos_scratch.yaml"}
FASTAI_VENV = WORK / "vs_fastai" / "venv"  # one fastai environment for full and smoke runs, whatever --work says
SMOKE = {"per_class": 12, "finetune_size": 64, "scratch_size": 64, "epochs": 2, "batch_size": 16}


# ---------------------------------------------------------------------------------------------
# The split both sides use, and the fastai environment
# ---------------------------------------------------------------------------------------------


def shared_split(data: Path, work: Path) -> Path:
    """The validation files of classlab's stratified split, as paths relative to ``data``."""
    from classlab.config import load_config
    from classlab.data.sources import open_dataset
    from classlab.data.splits import stratified_split

    out = work / "split.json"
    cfg = load_config(RECIPES["scratch"], [f"data.root={data}"])
    source = open_dataset(cfg.data).train
    assert source.files is not None
    train, val = stratified_split(source.labels, cfg.data.val_fraction, cfg.seed)
    rel = [str(f.relative_to(data)) for f in source.files]
    out.write_text(json.dumps({"train": [rel[i] for i in train], "val": [rel[i] for i in val]}))
    return out


def fastai_python() -> Path | None:
    """The fastai environment's interpreter, made on first use; None where fastai cannot be installed."""
    venv = FASTAI_VENV
    python = venv / "bin" / "python"
    if python.is_file() and _has_fastai(python):
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    before = _pip_freeze(python)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "fastai"], capture_output=True, text=True)
    if pip.returncode != 0 or not _has_fastai(python):
        print(f"fastai could not be installed: {pip.stderr.strip().splitlines()[-1:] or pip.returncode}")
        return None
    added = sorted(set(_pip_freeze(python)) - set(before))
    (venv / "added.txt").write_text("\n".join(added) + "\n")
    return python


def _has_fastai(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import fastai"], capture_output=True).returncode == 0


def _pip_freeze(python: Path) -> list[str]:
    done = subprocess.run([str(python), "-m", "pip", "freeze", "--local"], capture_output=True, text=True)
    return done.stdout.split()


# ---------------------------------------------------------------------------------------------
# Workers: one process per (arm, side)
# ---------------------------------------------------------------------------------------------


def worker_fastai(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the fastai environment; the figures as fastai reports them."""
    import torch
    from fastai.vision.all import (
        CategoryBlock,
        DataBlock,
        FuncSplitter,
        ImageBlock,
        LabelSmoothingCrossEntropy,
        Learner,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        default_split,
        imagenet_stats,
        model_meta,
        parent_label,
        vision_learner,
        xresnet18,
    )

    torch.set_num_threads(spec["threads"])
    root = Path(spec["data"])
    split = json.loads(Path(spec["split"]).read_text())
    val = {str(root / p) for p in split["val"]}
    items = [root / p for p in split["train"] + split["val"]]
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=lambda _: items,
        get_y=parent_label,
        splitter=FuncSplitter(lambda p: str(p) in val),
        item_tfms=Resize(spec["size"]),
        batch_tfms=[*aug_transforms(size=spec["size"]), Normalize.from_stats(*imagenet_stats)],
    )
    dls = block.dataloaders(root, bs=spec["batch_size"])
    epochs = spec["epochs"]
    if spec["arm"] == "finetune":

        def mobilenet_v2(*_: Any, **__: Any) -> torch.nn.Module:
            import torchvision

            net = torchvision.models.mobilenet_v2()
            net.load_state_dict(torch.load(spec["weights"], map_location="cpu", weights_only=True))
            return net

        # vision_learner finds a body's cut from fastai's model_meta (its cut= argument does not reach
        # create_body in 2.8); MobileNetV2's body is its first child, ``features``.
        model_meta[mobilenet_v2] = {"cut": -1, "split": default_split}
        learn = vision_learner(dls, mobilenet_v2, metrics=accuracy)
        learn.fine_tune(max(epochs - 1, 1), freeze_epochs=1)
    else:
        learn = Learner(dls, xresnet18(n_out=dls.c), loss_func=LabelSmoothingCrossEntropy(), metrics=accuracy)
        learn.fit_one_cycle(epochs, 3e-3)
    loss, acc = learn.validate()
    import fastai

    return {"accuracy": float(acc), "fastai": fastai.__version__}


def classlab_overrides(spec: dict[str, Any]) -> list[str]:
    return [
        f"data.root={spec['data']}",
        f"data.image_size={spec['size']}",
        f"data.batch_size={spec['batch_size']}",
        f"data.cache_dir={spec['cache']}",
        f"run.root={spec['runs']}",
        f"epochs={spec['epochs']}",
        f"trainer.threads={spec['threads']}",
        "trainer.progress=false",
        f"exp_name={spec['arm']}",
        *(["model.name=mobilenet_v2", f"model.pretrained_path={spec['weights']}"] if spec["arm"] == "finetune" else []),
    ]


def read_classlab(spec: dict[str, Any]) -> dict[str, Any]:
    import csv

    run = Path(spec["runs"]) / spec["arm"]
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/acc")]
    return {"accuracy": float(rows[-1]["val/acc"]), "best_accuracy": summary["best_val_acc"]}


def run_side(side: str, spec: dict[str, Any], python: Path | None) -> dict[str, Any]:
    """One (arm, side) in a fresh process, timed whole."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(spec["threads"])}
    if side == "classlab":
        shutil.rmtree(spec["cache"], ignore_errors=True)
        shutil.rmtree(Path(spec["runs"]) / spec["arm"], ignore_errors=True)
        cmd = [sys.executable, "-m", "classlab.cli", "train", str(RECIPES[spec["arm"]]), *classlab_overrides(spec)]
    else:
        assert python is not None
        cmd = [str(python), __file__, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(
            f"{side} {spec['arm']} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    if side == "classlab":
        result = read_classlab(spec)
    else:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    # results accumulate over calls: each row keeps the call (and its date) that measured it
    stamp = {"command": command(), "date": today()}
    return {**result, "wall_s": round(wall, 1), "size": spec["size"], "epochs": spec["epochs"], **stamp}


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    notes = [
        "data: flowers5 (4,317 photos, 5 classes, 128 px JPEG); one stratified 20% validation split (seed 0),"
        " the same files on both sides. Wall time: the whole process, start to final validation figure.",
        f"fastai environment: {meta.get('fastai_env', 'not installed')}",
    ]
    notes += measured_by(r for arm in results.values() for r in arm.values())
    lines = [
        *section_head("fastai vs classlab on a photo folder (flowers5)", meta, notes),
        "| arm | side | what | val accuracy (final) | wall | classlab / fastai time | accuracy gap |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    what = {
        ("finetune", "fastai"): "vision_learner(mobilenet_v2, body = features) + fine_tune(E-1, freeze_epochs=1)",
        ("finetune", "classlab"): "configs/photos_finetune.yaml",
        ("scratch", "fastai"): "xresnet18, label smoothing, fit_one_cycle(E, 3e-3)",
        ("scratch", "classlab"): "configs/photos_scratch.yaml",
    }
    for arm in ARMS:
        got = results.get(arm, {})
        for side in SIDES:
            r = got.get(side)
            if r is None:
                continue
            ratio = gap = ""
            if side == "classlab" and "fastai" in got:
                ratio = f"{r['wall_s'] / got['fastai']['wall_s']:.2f}x"
                gap = f"{100 * (r['accuracy'] - got['fastai']['accuracy']):+.1f} pt"
            lines.append(
                f"| {arm} ({r['size']} px, {r['epochs']} epochs) | {side} | {what[arm, side]} | "
                f"{100 * r['accuracy']:.2f}% | {r['wall_s']:.0f} s | {ratio} | {gap} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--data", default=str(FLOWERS), help="a photo folder (root/<class>/*.jpg)")
    parser.add_argument("--weights", default=str(WEIGHTS), help="torchvision mobilenet_v2 state dict")
    parser.add_argument("--finetune-size", type=int, default=224)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--scratch-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", default=None, help="work folder (default benchmarks/_work/vs_fastai[-smoke])")
    parser.add_argument("--smoke", action="store_true", help="a small copy, short runs; no BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_fastai(json.loads(args.worker))))
        return 0
    work = Path(args.work or WORK / ("vs_fastai-smoke" if args.smoke else "vs_fastai")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    if args.smoke:
        data = subset_folder(data, work / "data", SMOKE["per_class"])
    from classlab.run import atomic_write_text

    results_file = results_path("vs_fastai", work, args.smoke or args.work is not None)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    split = shared_split(data, work)
    python = fastai_python() if "fastai" in args.sides else None
    meta = {"date": today(), "machine": machine(), "command": command()}
    added = FASTAI_VENV / "added.txt"
    if python is not None and added.is_file():
        meta["fastai_env"] = "pip install fastai added " + ", ".join(added.read_text().split())
    for arm in args.arms:
        size = args.finetune_size if arm == "finetune" else 128
        epochs = args.finetune_epochs if arm == "finetune" else args.scratch_epochs
        spec = {
            "arm": arm,
            "data": str(data),
            "split": str(split),
            "weights": str(Path(args.weights).resolve()),
            "size": SMOKE[f"{arm}_size"] if args.smoke else size,
            "epochs": SMOKE["epochs"] if args.smoke else epochs,
            "batch_size": SMOKE["batch_size"] if args.smoke else 64,
            "threads": args.threads,
            "cache": str(work / "cache" / arm),
            "runs": str(work / "runs"),
        }
        for side in args.sides:
            if side == "fastai" and python is None:
                continue
            done = results.get(arm, {}).get(side, {})
            if (done.get("size"), done.get("epochs")) == (spec["size"], spec["epochs"]):
                continue  # finished in an earlier call
            print(f"{arm} / {side} ...", flush=True)
            results.setdefault(arm, {})[side] = run_side(side, spec, python)
            atomic_write_text(results_file, json.dumps(results, indent=1) + "\n")
    publish("vs_fastai", markdown(results, meta), args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
