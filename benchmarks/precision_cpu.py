"""bf16 autocast against fp32 on this CPU: the seconds of one training step of the recipe nets, side by side.

    python benchmarks/precision_cpu.py            # BENCHMARKS.md section "precision_cpu", a row set per machine
    python benchmarks/precision_cpu.py --smoke    # one net, a tiny batch (CI)

bf16 pays where the CPU computes it (AVX512-BF16, AMX) and costs many times over where it is
emulated (AVX2 only); a recipe written on one machine is run on the other, and classlab says so in a
line when it starts a run (``classlab.engine.trainer.precision_notice``). This measures the ratio on the machine at
hand. Rows are kept per machine in ``benchmarks/results/precision_cpu.json`` (committed), so the
table grows with each kind of machine a call runs on.

Each net runs fp32 and bf16 steps alternately, ``--rounds`` blocks of ``--steps`` each after one
warm-up step a precision, on random 32 px batches (the step's cost does not depend on the pixels);
each precision's figure is the median step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    WORK,
    command,
    cpu_flags,
    machine,
    measured_by,
    publish,
    results_path,
    section_head,
    today,
)

NETS = {  # the recipes' nets at 32 px (configs/cifar10_resnet32.yaml, cifar10_template_compare.yaml)
    "resnet_cifar depth 20": {"name": "resnet_cifar", "depth": 20},
    "normal_cnn": {"name": "normal_cnn"},
    "residual_cnn": {"name": "residual_cnn"},
    "mixer_s4": {"name": "mixer_s4"},
}


def step_seconds(spec: dict[str, Any], batch: int, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds of a training step (forward, backward, SGD step) in fp32 and in bf16 autocast."""
    from classlab.models import build_model

    torch.manual_seed(0)
    nets = {p: build_model(dict(spec), 10) for p in ("fp32", "bf16")}
    opts = {p: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for p, n in nets.items()}
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step(p: str) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
            loss = F.cross_entropy(nets[p](x), y)
        loss.backward()
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for p in times:
        step(p)  # warm-up: kernel selection, allocator
    for _ in range(rounds):
        for p in times:
            times[p] += [step(p) for _ in range(steps)]
    return {f"{p}_s": statistics.median(t) for p, t in times.items()}


def markdown(results: dict[str, Any]) -> str:
    meta = {"date": today(), "machine": machine(), "command": command()}
    notes = [
        "One training step (forward, backward, SGD) of each net on a random batch at 32 px, median of the "
        "steps; the ratio is bf16 autocast's step over fp32's, so above 1 means bf16 is slower.",
        "Rows are grouped by the machine that measured them; bf16 instructions are the CPU flags "
        "avx512_bf16 / amx_bf16.",
    ]
    lines = section_head("bf16 autocast against fp32 on the CPU, a step of each recipe net", meta, notes)
    rows = [r for machine_rows in results.values() for r in machine_rows["rows"]]
    lines += [f"{n[0].upper()}{n[1:]}." for n in measured_by(rows)] + [""]
    lines += [
        "| machine | bf16 instructions | net | batch | fp32 s/step | bf16 s/step | bf16 / fp32 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, entry in results.items():
        for r in entry["rows"]:
            lines.append(
                f"| {name} | {entry['bf16_isa'] or 'none'} | {r['net']} | {r['batch']} | {r['fp32_s']:.3f} | "
                f"{r['bf16_s']:.3f} | {r['bf16_s'] / r['fp32_s']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images a step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps a block")
    parser.add_argument("--rounds", type=int, default=2, help="alternating blocks a precision")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="keep the rows here instead of benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="one net, batch 4, one step: no BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = dict(list(NETS.items())[:1]) if args.smoke else NETS
    batch, steps, rounds = (4, 1, 1) if args.smoke else (args.batch, args.steps, args.rounds)
    work = args.work or WORK / ("precision_cpu-smoke" if args.smoke else "precision_cpu")
    store = results_path("precision_cpu", work, args.smoke or args.work is not None)
    results: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    rows, stamp = [], {"command": command(), "date": today()}  # one call, one stamp
    for label, spec in nets.items():
        figures = step_seconds(spec, batch, steps, rounds)
        rows.append({"net": label, "batch": batch, **figures, **stamp})
        print(f"{label}: fp32 {figures['fp32_s']:.3f} s, bf16 {figures['bf16_s']:.3f} s a step", flush=True)
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags()]
    results[machine()] = {"bf16_isa": ", ".join(isa), "rows": rows}
    from classlab.run import atomic_write_text

    store.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(store, json.dumps(results, indent=1) + "\n")
    publish("precision_cpu", markdown(results), args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
