"""Where a training step's time goes: airbench94 (in its own half precision as bf16) against classlab's fast recipe.

    python benchmarks/step_profile.py --threads 2           # about 10 minutes: BENCHMARKS.md "step_profile"
    python benchmarks/step_profile.py --smoke               # a few steps on a small copy (CI)

The whole-run benchmark (vs_airbench.py) says how much slower or faster a run is; this says why.
Each side trains ``n1`` and then ``n2`` steps in fresh runs of its own code path (airbench's
``train94`` with ``verbose=False``, so no evaluation; ``classlab.train`` with ``trainer.max_steps``).
The cost of one step is the median time between two optimizer steps (torch's global post-step
hook observes both sides); beside it, the difference of the two runs' wall times over ``n2 - n1``,
in which start-up, data loading, the whitening init and the end-of-run work cancel. The same two runs under
``torch.profiler`` give, by the same difference, each operator's own time per step; what is left of
the step is time outside operators (Python: Lightning's loop, callbacks, the optimizer's loop).
Operators are grouped into convolutions, batch norm, casts and copies, optimizer arithmetic, the
augmentation's indexing, and the rest, and the top operators of each side are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    command,
    machine,
    publish,
    run_worker,
    section_head,
    today,
)
from vs_airbench import (  # noqa: E402
    FAST_CONFIG,
    HALF_AS,
    SMOKE,
    SMOKE_FP32,
    _half_means,
    _map_cuda_to_cpu,
    install_airbench,
    smoke_in_fp32,
    work_and_data,
    write_airbench_data,
)

SIDES = ("airbench-bf16", "classlab")
STEPS = {"full": (4, 20), "smoke": (1, 3)}
# Operator name fragments by group, first match wins (names as torch.profiler reports them).
GROUPS = (
    ("convolutions", ("convolution", "conv2d", "conv_depthwise")),
    ("batch norm", ("batch_norm",)),
    ("casts and copies", ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous")),
    ("optimizer arithmetic", ("_foreach", "aten::lerp", "aten::addcmul", "aten::addcdiv")),
    ("indexing (augmentation, batches)", ("index", "gather", "flip", "pad", "slice", "narrow", "where")),
)


def _group(name: str) -> str:
    for group, fragments in GROUPS:
        if any(f in name for f in fragments):
            return group
    return "other operators"


def _profiled(fn: Any, profile: bool) -> tuple[float, dict[str, float], list[float]]:
    """(wall seconds, {operator: own CPU seconds}, seconds between optimizer steps) of ``fn()``.

    The step clock is torch's global optimizer post-step hook, so neither side's code is touched;
    where an optimizer wraps another (Lookahead), only the optimizer that steps most often counts.
    """
    import statistics

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: dict[int, list[float]] = {}
    hook = register_optimizer_step_post_hook(lambda opt, *_: stamps.setdefault(id(opt), []).append(time.perf_counter()))
    try:
        if not profile:
            started = time.perf_counter()
            fn()
            wall, ops = time.perf_counter() - started, {}
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                fn()
                wall = time.perf_counter() - started
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    finally:
        hook.remove()
    times = max(stamps.values(), key=len) if stamps else []
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return wall, ops, gaps if len(gaps) < 2 else [statistics.median(gaps), *gaps]


def worker(side: str, steps: int, profile: bool, work: Path, data: Path, smoke: bool) -> dict[str, Any]:
    """One run of ``steps`` training steps, after an untimed one-step warm-up in the same process."""
    if side == "classlab":
        import classlab
        from classlab.cli import _quiet_libraries

        _quiet_libraries()
        base = [f"data.root={data}", f"run.root={work / 'runs'}", "trainer.progress=false", "trainer.test_tta="]
        base.append("trainer.val_every=1000")
        if smoke:
            base.append(f"data.batch_size={SMOKE['batch_size']}")
        if smoke_in_fp32(smoke):
            base.append("trainer.precision=32-true")

        def train(n: int) -> None:
            classlab.train(FAST_CONFIG, [*base, f"exp_name=steps{n}", f"trainer.max_steps={n}"], force=True, quiet=True)

    else:
        import torch

        half = "float32" if smoke_in_fp32(smoke) else HALF_AS[side]
        _map_cuda_to_cpu(half)
        sys.path.insert(0, str(work / "site"))
        os.chdir(work)
        import airbench
        import airbench.utils as utils

        _half_means(utils, getattr(torch, half))
        kwargs: dict[str, Any] = {}
        if smoke:
            kwargs["train_loader"] = airbench.CifarLoader(
                "cifar10", train=True, batch_size=SMOKE["batch_size"], aug={"flip": True, "translate": 2}, altflip=True
            )
        per_epoch = len(kwargs.get("train_loader") or airbench.CifarLoader("cifar10", train=True, batch_size=1024))

        def train(n: int) -> None:  # train94 runs ceil(len(loader) * epochs) steps
            airbench.train94(epochs=n / per_epoch, verbose=False, **kwargs)

    train(1)
    wall, ops, gaps = _profiled(lambda: train(steps), profile)
    return {"wall_s": wall, "ops": ops, "step_gaps_s": gaps[1:], "median_step_s": gaps[0] if gaps else None}


def per_step(short: dict[str, Any], long: dict[str, Any], n1: int, n2: int) -> dict[str, float]:
    return {
        k: (long["ops"].get(k, 0.0) - short["ops"].get(k, 0.0)) / (n2 - n1)
        for k in set(long["ops"]) | set(short["ops"])
    }


def summarize(runs: dict[str, Any], n1: int, n2: int) -> dict[str, Any]:
    step = (runs["plain"][str(n2)]["wall_s"] - runs["plain"][str(n1)]["wall_s"]) / (n2 - n1)
    median = runs["plain"][str(n2)]["median_step_s"]
    ops = per_step(runs["profiled"][str(n1)], runs["profiled"][str(n2)], n1, n2)
    groups: dict[str, float] = {}
    for name, seconds in ops.items():
        groups[_group(name)] = groups.get(_group(name), 0.0) + seconds
    profiled_step = (runs["profiled"][str(n2)]["wall_s"] - runs["profiled"][str(n1)]["wall_s"]) / (n2 - n1)
    groups["outside operators (Python, the loop)"] = profiled_step - sum(groups.values())
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])
    return {
        "step_s": median if median is not None else step,
        "step_s_by_difference": step,
        "profiled_step_s": profiled_step,
        "groups": groups,
        "top": ranked[:8],
        "ops": ranked,
        "step_gaps_s": runs["plain"][str(n2)]["step_gaps_s"],
    }


def markdown(summary: dict[str, Any], meta: dict[str, str], n1: int, n2: int) -> str:
    notes = [
        f"a step's cost: the median time between optimizer steps in a run of {n2} steps (torch's global"
        f" optimizer post-step hook); beside it (wall of {n2} steps - wall of {n1} steps) / {n2 - n1}, each a"
        " fresh run after a warm-up step, which also counts what happens once a run but scales with it",
        "groups: operators' own CPU time per step from torch.profiler, by the same difference; shares are of the"
        " profiled step (the profiler itself adds a little to the 'outside operators' share)",
    ]
    if any(summary[s].get("smoke_fp32") for s in summary):
        notes.append(SMOKE_FP32.format("bf16"))
    sides = [s for s in SIDES if s in summary]
    lines = [*section_head("Where a fast-recipe step goes: airbench94-bf16 vs classlab", meta, notes)]
    lines += ["| | " + " | ".join(sides) + " |", "|---" * (len(sides) + 1) + "|"]
    lines.append("| step, s (median, unprofiled) | " + " | ".join(f"{summary[s]['step_s']:.3f}" for s in sides) + " |")
    lines.append(
        "| step, s (by difference, unprofiled) | "
        + " | ".join(f"{summary[s]['step_s_by_difference']:.3f}" for s in sides)
        + " |"
    )
    group_names = [g for g, _ in GROUPS] + ["other operators", "outside operators (Python, the loop)"]
    for g in group_names:
        cells = []
        for s in sides:
            sec, total = summary[s]["groups"].get(g, 0.0), summary[s]["profiled_step_s"]
            cells.append(f"{sec:.3f} ({100 * sec / total:.0f}%)")
        lines.append(f"| {g}, s | " + " | ".join(cells) + " |")
    if len(sides) == 2:
        lines += [
            "",
            f"classlab / airbench-bf16 per step: {summary['classlab']['step_s'] / summary[sides[0]]['step_s']:.3f}",
        ]
    for s in sides:
        gaps = summary[s].get("step_gaps_s") or []
        slow = sorted(gaps)[-3:]
        lines += [
            "",
            f"Steps of {s}, s: mean {sum(gaps) / max(1, len(gaps)):.3f}, slowest "
            + ", ".join(f"{g:.3f}" for g in slow),
        ]
    for s in sides:
        lines += [
            "",
            f"Top operators, {s} (own s per step): " + ", ".join(f"`{k}` {v:.3f}" for k, v in summary[s]["top"]),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="image folder with train/ and test/")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads, both sides (default: all)")
    parser.add_argument("--work", default=None, help="work folder (default benchmarks/_work/step_profile[-smoke])")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a small copy; no BENCHMARKS.md")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    work, data = work_and_data(args, "step_profile")
    if args.worker:
        out = worker(args.worker, args.steps, args.profile, work, data, args.smoke)
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    if not (data / "train").is_dir():
        print(f"error: {data} needs train/<class>/ and test/<class>/ image folders")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    write_airbench_data(data, work / "cifar10")
    install_airbench(work / "site")
    n1, n2 = STEPS["smoke" if args.smoke else "full"]
    summary: dict[str, Any] = {}
    for side in SIDES:
        runs: dict[str, dict[str, Any]] = {"plain": {}, "profiled": {}}
        for mode in runs:
            for n in (n1, n2):
                cmd = [sys.executable, __file__, "--worker", side, "--steps", str(n), "--work", str(work)]
                cmd += ["--data", str(args.data)] + (["--smoke"] if args.smoke else [])
                cmd += (["--threads", str(args.threads)] if args.threads else []) + (
                    ["--profile"] if mode == "profiled" else []
                )
                out, tail = run_worker(cmd)
                if out is None:
                    print(f"error: {side} ({mode}, {n} steps) failed:\n  {tail}")
                    return 1
                runs[mode][str(n)] = out
                print(f"[{side}] {mode} {n} steps: {runs[mode][str(n)]['wall_s']:.2f} s", flush=True)
        summary[side] = summarize(runs, n1, n2)
        summary[side]["smoke_fp32"] = smoke_in_fp32(args.smoke)
    from classlab.run import atomic_write_text

    atomic_write_text(work / "summary.json", json.dumps(summary, indent=2) + "\n")
    meta = {"date": today(), "machine": machine(), "command": command()}
    publish("step_profile", markdown(summary, meta, n1, n2), args.smoke)
    return 0 if all(math.isfinite(s["step_s"]) for s in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
