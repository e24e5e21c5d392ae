"""The quickstart model's training step with glibc's default malloc against :func:`evadlab.memory.reuse_freed_memory`,
as a Ray Train worker runs it (one torch thread, the fused AdamW of ``build_optimizer``).

The allocator's settings belong to the process, so each measurement is a fresh interpreter; the two alternate for
``--rounds`` rounds so both see the same machine. Per round and setting: the median step time after ``--warmup``
steps, and the page faults and system CPU time per step.

    python benchmarks/allocator_step.py [--rounds 3] [--steps 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("glibc defaults", "reuse_freed_memory")


def measure(setting: str, steps: int, warmup: int) -> dict[str, float]:
    """In this process: ``steps`` quickstart training steps under ``setting``; the figures after ``warmup``."""
    from evadlab.memory import reuse_freed_memory

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from optimizer_step import quickstart_training

    if setting == "reuse_freed_memory" and not reuse_freed_memory():
        raise SystemExit("this C library has no usable mallopt")
    model, optimizer, clips, targets = quickstart_training(threads=1)
    times = []
    for index in range(steps):
        if index == warmup:
            before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        model(clips, targets)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    after, timed = resource.getrusage(resource.RUSAGE_SELF), steps - warmup
    return {"step_ms": 1000 * statistics.median(times[warmup:]),
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / timed,
            "system_ms_per_step": 1000 * (after.ru_stime - before.ru_stime) / timed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup: the figures are of the steps after the warm-up")
    if args.setting:
        print(json.dumps(measure(args.setting, args.steps, args.warmup)))
        return
    runs: dict[str, list[dict[str, float]]] = {setting: [] for setting in SETTINGS}
    for round_index in range(args.rounds):
        for setting in SETTINGS:
            child = subprocess.run([sys.executable, __file__, "--setting", setting, "--steps", str(args.steps),
                                    "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(child.stdout.splitlines()[-1]))
            print(f"round {round_index} {setting}: {runs[setting][-1]}", flush=True)
    medians = {setting: {key: statistics.median(run[key] for run in results) for key in results[0]}
               for setting, results in runs.items()}
    print(json.dumps({**medians, "step_ratio": medians["reuse_freed_memory"]["step_ms"]
                      / medians["glibc defaults"]["step_ms"]}, indent=1))


if __name__ == "__main__":
    main()
