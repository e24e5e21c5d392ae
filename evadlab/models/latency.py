"""The measured inference latency of a detector on its device, at the input of the paper's table.

GFLOPs (:mod:`evadlab.models.flops`) say what a model costs in arithmetic; this says what it costs in time where it
runs, so sweeps and the compare view can rank by both.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from .flops import REFERENCE_INPUT_SIZE

# Timed forwards stop at this many, or once this many seconds have been spent on them (a tiny model on a CPU takes a
# second, ViT-B about 4.5 s): the latency is measured once per run and must stay a small part of it.
MAX_TIMED_RUNS = 3
TIME_BUDGET_S = 1.0


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued kernels, so a wall-clock interval covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def inference_latency_s(model: nn.Module, device: torch.device, *, amp: bool = False,
                        input_size: tuple[int, int, int] = REFERENCE_INPUT_SIZE) -> float:
    """Median seconds of an eval-mode forward of one (3, T, H, W) clip of ``input_size`` on ``device`` (bf16 autocast
    when ``amp``), after one warm-up forward (CUDA kernels load, caches fill). The model's mode is restored; the input
    comes from a generator of its own, so the global random state (and hence training) is untouched."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    clip = torch.randn(3, *input_size, generator=generator).to(device)

    def forward() -> float:
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model([clip])
        synchronize(device)
        return time.perf_counter() - start

    try:
        forward()
        times = [forward()]
        while len(times) < MAX_TIMED_RUNS and sum(times) < TIME_BUDGET_S:
            times.append(forward())
    finally:
        model.train(was_training)
    return statistics.median(times)
