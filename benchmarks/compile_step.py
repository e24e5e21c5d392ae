"""The quickstart model's training step, eager against ``torch.compile`` (inductor), on this machine's CPU: is
``model.compile`` worth offering here?

The batches are the quickstart's (4 clips of 16 frames at 64x85) with 1, 2 or 3 persons per clip in turn, as the
synthetic mini-AVA has: the person count sets the size of the RoI pooling and of the set matching, so a compiled
model meets new shapes. Both models start from the same weights (seed 0); the eager steps run first, then the
compiled ones, in one process. Prints the first step (the compile), the steps that compiled again, and the medians
of the last ``--steps // 2`` steps.

    python benchmarks/compile_step.py [--steps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from optimizer_step import QUICKSTART

from evadlab.config import load_config
from evadlab.platform.modeling import build_model
from evadlab.platform.recipe import build_optimizer

RECOMPILE_S = 2.0  # a step this much slower than the steady median compiled again


def batches(steps: int, num_actions: int) -> list[tuple[list[torch.Tensor], list[dict]]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        clips, targets = [], []
        for clip in range(4):
            persons = 1 + (step + clip) % 3
            corner = torch.rand(persons, 2, generator=generator) * 40
            targets.append({"boxes": torch.cat([corner, corner + 20], dim=1),
                            "actions": (torch.rand(persons, num_actions, generator=generator) < 0.1).float()})
            clips.append(torch.randn(3, 16, 64, 85, generator=generator))
        out.append((clips, targets))
    return out


def step_times(compiled: bool, steps: int) -> list[float]:
    cfg = load_config(QUICKSTART)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model, cfg.train)
    forward = torch.compile(model) if compiled else model
    times = []
    for clips, targets in batches(steps, cfg.model.num_actions):
        start = time.perf_counter()
        forward(clips, targets)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "steps": args.steps}
    for name, compiled in (("eager", False), ("compiled", True)):
        times = step_times(compiled, args.steps)
        steady = statistics.median(times[-(args.steps // 2):])
        report[name] = {"first_step_s": times[0], "steady_step_ms": 1000 * steady, "total_s": sum(times),
                        "slow_steps_s": [round(t, 1) for t in times[1:] if t > steady + RECOMPILE_S]}
    report["steady_ratio"] = report["compiled"]["steady_step_ms"] / report["eager"]["steady_step_ms"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
