"""Training input: the prepared train shards as a Ray Dataset, split exactly once per epoch over the DDP workers,
and turned into model batches on each worker.

The Ray Data part (read shards, randomise block order, JPEG decode and random flip) runs in Ray's CPU pool beside
the workers; each worker iterates its split with a local shuffle buffer and moves the batch to its device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from evadlab.config import ExperimentConfig
from evadlab.pipelines.clips import decode_clip, multi_hot, read_shards, to_model_input
from evadlab.pipelines.prepare import require_prepared

TRAIN_SPLIT = "train"


@dataclass
class MicroBatch:
    """One worker's share of one DDP step, on the worker's device.

    ``loss_scale`` is 0 for a repeated batch of a worker that has run out (see :func:`epoch_batches`);
    ``is_last`` is True, on every worker at once, for the last micro-batch of the epoch.
    """

    clips: list[torch.Tensor]  # (3, T, H_i, W_i) normalised clips of any sizes
    targets: list[dict[str, torch.Tensor]]  # boxes (n, 4) absolute xyxy of the clip, actions (n, num_actions)
    keys: list[tuple[str, int]]  # (video_id, timestamp) of each clip
    loss_scale: float
    is_last: bool


def count_rows(cfg: ExperimentConfig, split: str) -> int:
    """Keyframes of ``split``, as the manifest of completely prepared shards records them. Raises UnpreparedDataError
    for shards that are missing, incomplete or empty."""
    return int(require_prepared(cfg, (split,))["counts"][split])


def training_dataset(cfg: ExperimentConfig) -> ray.data.Dataset:
    """The train shards, decoded and randomly flipped in Ray Data's CPU pool, in blocks of one batch so the work
    spreads over every CPU even when the shards are few."""
    dataset = read_shards(cfg.data.shards_path, TRAIN_SPLIT).randomize_block_order().repartition(
        target_num_rows_per_block=cfg.train.batch_size)
    dataset = dataset.map(decode_training_row,
                          fn_kwargs={"flip_prob": cfg.data.flip_prob, "num_actions": cfg.model.num_actions})
    # The ingest re-runs every epoch in every worker; its progress bars would drown the training log.
    dataset.context.enable_progress_bars = False
    return dataset


def decode_training_row(row: dict[str, Any], flip_prob: float, num_actions: int,
                        rng: np.random.Generator | None = None) -> dict[str, Any]:
    """A shard row -> ``frames`` (T, H, W, 3) uint8, ``boxes`` (n, 4) absolute xyxy of the stored frames,
    ``actions`` (n, num_actions) multi-hot, ``video_id``, ``timestamp``; flipped horizontally (frames and boxes)
    with probability ``flip_prob``. Raises ValueError naming the row for action ids outside 1..num_actions."""
    flip = bool((rng or np.random.default_rng()).random() < flip_prob)
    frames, boxes = decode_clip(row, flip=flip)
    try:
        actions = multi_hot(row["actions"], num_actions)
    except ValueError as error:
        raise ValueError(f"row {row['video_id']},{row['timestamp']}: {error}") from None
    return {"frames": frames, "boxes": boxes, "actions": actions, "video_id": row["video_id"],
            "timestamp": int(row["timestamp"])}


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Ray's default split (``equal=True``) drops the remainder rows to give every worker the same count.
    Equal splits are kept when nothing is lost; otherwise the split is uneven and :func:`epoch_batches` keeps the
    DDP workers in step, so every row is trained on exactly once per epoch."""

    def __init__(self, num_rows: int):
        super().__init__()
        self.num_rows = num_rows

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        splits = [{} for _ in range(world_size)]
        equal = self.num_rows % world_size == 0
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=equal)):
                splits[rank][name] = split
        return splits


def epoch_batches(shard, cfg: ExperimentConfig, device: torch.device) -> Iterator[MicroBatch]:
    """One epoch of this worker's split as micro-batches of ``train.batch_size``.

    Workers may hold one batch more than others. Every micro-batch, the workers agree (one all-reduce) on how many
    of them still have data: a worker that has run out repeats its last batch with ``loss_scale`` 0, so DDP's
    collectives stay matched, and the active ones scale their loss by world/active, so the gradient is the mean over
    the samples actually present. The same agreement, one batch ahead, tells every worker which batch is the last.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = iter(shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                      local_shuffle_buffer_size=4 * cfg.train.batch_size, drop_last=False))

    def fetch() -> tuple[dict | None, int]:
        numpy_batch = next(batches, None)
        active = int(numpy_batch is not None)
        if world > 1:
            flag = torch.tensor([float(active)], device=device)
            dist.all_reduce(flag)
            active = int(flag.item())
        return numpy_batch, active

    numpy_batch, active = fetch()
    previous: MicroBatch | None = None
    while active:
        following, following_active = fetch()
        if numpy_batch is not None:
            previous = to_model_batch(numpy_batch, cfg, device, loss_scale=world / active)
        yield MicroBatch(previous.clips, previous.targets, previous.keys,
                         loss_scale=previous.loss_scale if numpy_batch is not None else 0.0,
                         is_last=not following_active)
        numpy_batch, active = following, following_active


def to_model_batch(numpy_batch: dict[str, np.ndarray], cfg: ExperimentConfig, device: torch.device,
                   loss_scale: float) -> MicroBatch:
    """Decoded rows (see :func:`decode_training_row`) -> normalised clips and targets on ``device``."""
    clips = [to_model_input(frames, cfg.data.mean, cfg.data.std).to(device) for frames in numpy_batch["frames"]]
    targets = [{"boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=device),
                "actions": torch.as_tensor(np.asarray(actions, np.float32).reshape(-1, cfg.model.num_actions),
                                           device=device)}
               for boxes, actions in zip(numpy_batch["boxes"], numpy_batch["actions"])]
    keys = [(str(v), int(t)) for v, t in zip(numpy_batch["video_id"], numpy_batch["timestamp"])]
    return MicroBatch(clips, targets, keys, loss_scale=loss_scale, is_last=False)
