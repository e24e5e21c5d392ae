"""The quickstart model's training step with torch's default AdamW against evadlab's ``build_optimizer`` (the fused
kernel), on the same parameter groups, alternating step by step in one process so both see the same machine.

The batch is the quickstart's: 4 clips of 16 frames at 64x85 (the synthetic mini-AVA's 4:3 frames at short side 64),
two persons each. The first ``--warmup`` steps of each are left out of the medians.

    python benchmarks/optimizer_step.py [--steps 25] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evadlab.config import load_config
from evadlab.platform.modeling import build_model
from evadlab.platform.recipe import ADAM_BETAS, build_optimizer, parameter_groups

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def quickstart_batch(num_actions: int) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    clips = [torch.randn(3, 16, 64, 85, generator=generator) for _ in range(4)]
    boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [30.0, 5.0, 80.0, 60.0]])
    targets = [{"boxes": boxes, "actions": (torch.rand(2, num_actions, generator=generator) < 0.1).float()}
               for _ in range(4)]
    return clips, targets


def quickstart_training(threads: int = 1):
    """The quickstart's model (seed 0, training mode), its ``build_optimizer`` AdamW and a batch, with ``threads``
    torch threads as a Ray Train worker of 1 CPU has: (model, optimizer, clips, targets)."""
    torch.set_num_threads(threads)
    cfg = load_config(QUICKSTART)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    return (model, build_optimizer(model, cfg.train), *quickstart_batch(cfg.model.num_actions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    cfg = load_config(QUICKSTART)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizers = {
        "torch default AdamW": torch.optim.AdamW(parameter_groups(model, cfg.train), lr=cfg.train.base_lr,
                                                 betas=ADAM_BETAS),
        "build_optimizer (fused)": build_optimizer(model, cfg.train),
    }
    clips, targets = quickstart_batch(cfg.model.num_actions)
    step_s: dict[str, list[float]] = {name: [] for name in optimizers}
    optimizer_s: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            model(clips, targets)["loss"].backward()
            stepped = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            step_s[name].append(end - start)
            optimizer_s[name].append(end - stepped)
    medians = {name: {"step_ms": 1000 * statistics.median(times[args.warmup:]),
                      "optimizer_ms": 1000 * statistics.median(optimizer_s[name][args.warmup:])}
               for name, times in step_s.items()}
    fused, default = medians["build_optimizer (fused)"], medians["torch default AdamW"]
    print(json.dumps({"threads": torch.get_num_threads(), "steps": args.steps - args.warmup, **medians,
                      "step_ratio": fused["step_ms"] / default["step_ms"]}, indent=1))


if __name__ == "__main__":
    main()
