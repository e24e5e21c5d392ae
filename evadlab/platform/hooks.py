"""Hooks into the training worker loop, and the ones the tests install.

Production runs use :class:`TrainingHooks` itself, which does nothing. Tests pass instances of the subclasses
below to ``train(cfg, hooks=[...])`` to kill a worker on purpose or to record what each worker did; they live in
the package (not under tests/) because Ray pickles them by reference into worker processes, which must import them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class TrainingHooks:
    """Called by every worker; ``rank`` is the worker's DDP rank and ``world`` the number of workers."""

    def after_micro_batch(self, epoch: int, rank: int, keys: list[tuple[str, int]]) -> None:
        """A micro-batch that counted (not a zero-weight repeat) was trained on."""

    def after_optimizer_step(self, epoch: int, step: int, rank: int, world: int) -> None:
        """The optimiser has stepped; ``step`` counts steps over the whole run."""

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        """The epoch's last optimiser step is done (before evaluation and the checkpoint)."""


class FailOnceAtEpoch(TrainingHooks):
    """The last worker exits once, after its first optimiser step in ``epoch``, like a lost node. A marker file in
    ``folder`` (shared by all attempts) keeps the replacement worker from failing again."""

    def __init__(self, epoch: int, folder: str | Path):
        self.epoch = epoch
        self.marker = Path(folder) / f"failure_injected_epoch_{epoch}"

    def after_optimizer_step(self, epoch: int, step: int, rank: int, world: int) -> None:
        if epoch != self.epoch or rank != world - 1 or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text("worker killed on purpose by FailOnceAtEpoch\n")
        os._exit(1)


class RecordSeenSamples(TrainingHooks):
    """Writes the keyframes each worker trained on in each epoch to ``folder/epoch_EEE_rank_R.txt``, one
    ``video_id,timestamp`` per line, so that "every keyframe exactly once per epoch" can be checked."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.seen: list[tuple[str, int]] = []

    def after_micro_batch(self, epoch: int, rank: int, keys: list[tuple[str, int]]) -> None:
        self.seen += keys

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"{video},{timestamp}\n" for video, timestamp in self.seen)
        (self.folder / f"epoch_{epoch:03d}_rank_{rank}.txt").write_text(lines)
        self.seen = []


class RecordWeights(TrainingHooks):
    """Saves each worker's weights at the end of each epoch to ``folder/epoch_EEE_rank_R.pt``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
        torch.save(state, self.folder / f"epoch_{epoch:03d}_rank_{rank}.pt")
