"""Training input: the prepared train shards as a Ray Dataset, split exactly once per epoch over the DDP workers,
and turned into model batches on each worker.

The train clips are JPEG-decoded once in Ray's CPU pool (a small split by the driver itself, into the same blocks).
When the decoded split fits in a share of Ray's object store (``materialize``, the quickstart's case) it is kept there
for the whole run, and an epoch only randomises the order of its blocks and splits them over the workers: no file is
read or decoded again. When it does not fit (``stream``, AVA's 1.5 TB of decoded train clips) every epoch reads and
decodes the shards again, streaming. ``data.ingest`` chooses, ``auto`` by the estimate of :func:`plan_ingest`. Either
way each worker iterates its split with a local shuffle buffer, flips clips at random (``data.flip_prob``, its own
generator per epoch and rank) and moves the batch to its device.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist

from evadlab.config import ExperimentConfig
from evadlab.pipelines.clips import (
    absolute_boxes,
    box_array,
    decode_jpegs,
    flip_clip,
    iter_shard_rows,
    multi_hot,
    read_shards,
    split_dir,
    to_model_input,
)
from evadlab.pipelines.prepare import require_prepared

TRAIN_SPLIT = "train"
MATERIALIZE, STREAM = "materialize", "stream"
# The share of Ray's object store the decoded train split may fill: the rest stays free for the evaluation, the
# checkpoints, a sweep's concurrent trials and Ray's own objects.
OBJECT_STORE_SHARE = 0.5
# A materialized split of at most this many decoded bytes is decoded in this process: ~0.7 s of JPEG decoding for the
# quickstart's 14 MB, where Ray Data needs 4-10 s to start its decoding tasks' processes and import torch in them on a
# 2-core machine (benchmarks/RESULTS.md, section 5). The blocks are the same either way.
DECODE_HERE_BYTES = 64 * 2**20


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


@dataclass(frozen=True)
class IngestPlan:
    """How the train split reaches the workers, and the figures that decided it."""

    mode: str  # MATERIALIZE or STREAM
    requested: str  # data.ingest: auto, materialize or stream
    decoded_bytes: int  # the decoded train clips, uint8 frames
    object_store_bytes: int  # the capacity of the cluster's object store
    decode_here: bool = False  # a materialized split decoded in this process rather than by Ray Data tasks

    def describe(self) -> str:
        """One line for the console, e.g. ``ingest: materialize (decoded train clips 19 MB, 1.5 % of the 1.3 GB
        object store; data.ingest=auto; decoded by this process)``."""
        share = self.decoded_bytes / max(self.object_store_bytes, 1)
        where = "; decoded by this process" if self.decode_here else ""
        return (f"ingest: {self.mode} (decoded train clips {self.decoded_bytes / 1e6:,.0f} MB, {100 * share:.1f} % of "
                f"the {self.object_store_bytes / 1e9:.1f} GB object store; data.ingest={self.requested}{where})")


def count_rows(cfg: ExperimentConfig, split: str) -> int:
    """Keyframes of ``split``, as the manifest of completely prepared shards records them. Raises UnpreparedDataError
    for shards that are missing, incomplete or empty."""
    return int(require_prepared(cfg, (split,))["counts"][split])


def decoded_split_bytes(cfg: ExperimentConfig, split: str) -> int:
    """Bytes of a split's clips once decoded: the sum over rows of num_frames x height x width x 3, read from the
    shards' ``height`` and ``width`` columns (a few bytes per row; the JPEGs are not read)."""
    sizes = pq.read_table(split_dir(cfg.data.shards_path, split), columns=["height", "width"])
    pixels = np.asarray(sizes["height"], np.int64) * np.asarray(sizes["width"], np.int64)
    return int(pixels.sum()) * cfg.data.num_frames * 3


def plan_ingest(cfg: ExperimentConfig, object_store_bytes: int | None = None,
                decode_here_bytes: int = DECODE_HERE_BYTES) -> IngestPlan:
    """``data.ingest``, with ``auto`` resolved: materialize when the decoded train split takes at most
    ``OBJECT_STORE_SHARE`` of the object store (``object_store_bytes``, by default the capacity of the Ray cluster
    this process is connected to), else stream. A materialized split of at most ``decode_here_bytes`` is decoded by
    this process (see :data:`DECODE_HERE_BYTES`)."""
    capacity = object_store_bytes
    if capacity is None:
        capacity = int(ray.cluster_resources().get("object_store_memory", 0))
    decoded = decoded_split_bytes(cfg, TRAIN_SPLIT)
    mode = cfg.data.ingest
    if mode == "auto":
        mode = MATERIALIZE if decoded <= OBJECT_STORE_SHARE * capacity else STREAM
    return IngestPlan(mode=mode, requested=cfg.data.ingest, decoded_bytes=decoded, object_store_bytes=capacity,
                      decode_here=mode == MATERIALIZE and decoded <= decode_here_bytes)


def training_dataset(cfg: ExperimentConfig, plan: IngestPlan) -> ray.data.Dataset:
    """The dataset an epoch iterates: decoded train clips in blocks of one batch (so the work spreads over every CPU
    even when the shards are few), in an order randomised every epoch.

    ``materialize`` decodes the split here, once (errors, such as a bad action id, are raised here), by Ray Data's
    tasks or, for a small split (``plan.decode_here``), by this process (:func:`decoded_here`); an epoch then only
    shuffles block references. ``stream`` randomises the order of the shard files and decodes them again
    each epoch (a randomised order of decoded blocks would need them all at once).

    The epoch orders come from ``train.seed`` and the epoch (Ray Data's ``RandomSeedConfig`` with
    ``reseed_after_execution``: the execution index, which
    :class:`~evadlab.platform.data_config.ExactlyOnceDataConfig` starts at the epoch a worker
    group starts at): new every epoch, the same in every run of that seed, resumed or not.
    ``materialize`` keeps the decoded blocks in shard order, so its orders, and the blocks each worker gets (Ray's
    splitter deals blocks to the worker that has fewest rows, in order), are exactly reproducible; ``stream``
    decodes in parallel without waiting for order, so its order also depends on which decoding task ends first."""
    block_order_seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    if plan.decode_here:
        return decoded_here(cfg).randomize_block_order(seed=block_order_seed)
    shards = read_shards(cfg.data.shards_path, TRAIN_SPLIT)
    # The ingest runs every epoch in every worker; its progress bars would drown the training log.
    shards.context.enable_progress_bars = False
    if plan.mode == STREAM:
        return decoded_rows(shards.randomize_block_order(seed=block_order_seed), cfg)
    shards.context.execution_options.preserve_order = True
    return decoded_rows(shards, cfg).materialize().randomize_block_order(seed=block_order_seed)


def decoded_here(cfg: ExperimentConfig) -> ray.data.MaterializedDataset:
    """The train split decoded by this process (:func:`decode_training_row`) into Ray's object store, in the blocks
    :func:`decoded_rows` makes: ``train.batch_size`` rows each, in shard order, the last one shorter."""
    rows = (decode_training_row(row, cfg.model.num_actions)
            for row in iter_shard_rows(cfg.data.shards_path, TRAIN_SPLIT))
    blocks = []
    while chunk := list(itertools.islice(rows, cfg.train.batch_size)):
        blocks.append(ray.data.from_items(chunk, override_num_blocks=1))
    split = blocks[0].union(*blocks[1:]) if len(blocks) > 1 else blocks[0]  # Ray's union needs two or more
    split.context.enable_progress_bars = False
    split.context.execution_options.preserve_order = True
    return split.materialize()


def decoded_rows(shards: ray.data.Dataset, cfg: ExperimentConfig) -> ray.data.Dataset:
    """Shard rows -> decoded training rows (:func:`decode_training_row`), one batch per block."""
    return shards.repartition(target_num_rows_per_block=cfg.train.batch_size).map(
        decode_training_row, fn_kwargs={"num_actions": cfg.model.num_actions})


def decode_training_row(row: dict[str, Any], num_actions: int) -> dict[str, Any]:
    """A shard row -> ``frames`` (T, H, W, 3) uint8, ``boxes`` (n, 4) normalised xyxy, ``actions`` (n, num_actions)
    multi-hot, ``video_id``, ``timestamp``; unflipped (the workers flip, see :func:`to_model_batch`). Raises
    ValueError naming the row for action ids outside 1..num_actions or an undecodable frame."""
    try:
        actions, frames = multi_hot(row["actions"], num_actions), decode_jpegs(row["frames"])
    except ValueError as error:
        raise ValueError(f"row {row['video_id']},{row['timestamp']}: {error}") from None
    return {"frames": frames, "boxes": box_array(row["boxes"]), "actions": actions,
            "video_id": row["video_id"], "timestamp": int(row["timestamp"])}


def epoch_batches(shard, cfg: ExperimentConfig, device: torch.device, epoch: int,
                  rank: int | None = None) -> Iterator[MicroBatch]:
    """One epoch of this worker's split as micro-batches of ``train.batch_size``.

    Workers may hold one batch more than others. Every micro-batch, the workers agree (one all-reduce) on how many
    of them still have data: a worker that has run out repeats its last batch with ``loss_scale`` 0, so DDP's
    collectives stay matched, and the active ones scale their loss by world/active, so the gradient is the mean over
    the samples actually present. The same agreement, one batch ahead, tells every worker which batch is the last.
    The local shuffle buffer's seed and the flips are drawn from a generator of (``train.seed``, ``epoch``,
    ``rank``): new every epoch, reproducible. ``rank`` is torch.distributed's unless given (to replay a worker's
    epoch outside training).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    rng = np.random.default_rng([cfg.train.seed, epoch, rank])
    batches = iter(shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                      local_shuffle_buffer_size=4 * cfg.train.batch_size,
                                      local_shuffle_seed=int(rng.integers(2**32)), drop_last=False))

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
            previous = to_model_batch(numpy_batch, cfg, device, loss_scale=world / active, rng=rng)
        yield MicroBatch(previous.clips, previous.targets, previous.keys,
                         loss_scale=previous.loss_scale if numpy_batch is not None else 0.0,
                         is_last=not following_active)
        numpy_batch, active = following, following_active


def to_model_batch(numpy_batch: dict[str, np.ndarray], cfg: ExperimentConfig, device: torch.device,
                   loss_scale: float, rng: np.random.Generator) -> MicroBatch:
    """Decoded rows (see :func:`decode_training_row`) -> normalised clips and targets (boxes in absolute pixels of
    the clip) on ``device``; each clip flipped horizontally, boxes with it, with probability ``data.flip_prob``."""
    clips, targets = [], []
    flips = rng.random(len(numpy_batch["frames"])) < cfg.data.flip_prob
    for frames, boxes, actions, flip in zip(numpy_batch["frames"], numpy_batch["boxes"], numpy_batch["actions"],
                                            flips):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if flip:
            frames, boxes = flip_clip(frames, boxes)
        height, width = frames.shape[1:3]
        clips.append(to_model_input(frames, cfg.data.mean, cfg.data.std).to(device))
        targets.append({"boxes": torch.as_tensor(absolute_boxes(boxes, height, width), device=device),
                        "actions": torch.as_tensor(np.asarray(actions, np.float32).reshape(-1, cfg.model.num_actions),
                                                   device=device)})
    keys = [(str(v), int(t)) for v, t in zip(numpy_batch["video_id"], numpy_batch["timestamp"])]
    return MicroBatch(clips, targets, keys, loss_scale=loss_scale, is_last=False)
