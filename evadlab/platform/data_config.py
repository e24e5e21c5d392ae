"""The training split's Ray Train ``DataConfig``, in a module of its own because of where Ray runs it.

Ray Train hands the ``DataConfig`` to its dataset manager, an actor in a process of its own that unpickles it and
imports the module it comes from before the first worker gets its split. Here that import is Ray alone: from
:mod:`evadlab.platform.ingest` it was torch and the clip pipeline, ~1.6 s of imports on the path to the first step
(~5 s on 2 busy cores, beside the controller and the worker starting; ``tests/test_train.py`` holds it to no torch).
"""

from __future__ import annotations

from collections.abc import Callable

import ray.train


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Ray's default split (``equal=True``) drops the remainder rows to give every worker the same count.
    Equal splits are kept when nothing is lost; otherwise the split is uneven and
    :func:`~evadlab.platform.ingest.epoch_batches` keeps the DDP workers in step, so every row is trained on exactly
    once per epoch.

    Ray Train configures the datasets again for every worker group it starts (a resumed run, a restart after a lost
    worker or node, an elastic resize), and Ray Data numbers the executions of a configured dataset from its
    context's execution index. ``epochs_done`` (called then; by default none) is where that group's training starts,
    and the index is advanced by it, so epoch ``e`` gets the block order
    (:func:`~evadlab.platform.ingest.training_dataset`) of the ``e``-th execution in every attempt: a resumed run
    trains its epochs in the order an uninterrupted run of the seed does."""

    def __init__(self, num_rows: int, epochs_done: Callable[[], int] | None = None):
        super().__init__()
        self.num_rows, self.epochs_done = num_rows, epochs_done

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        splits = [{} for _ in range(world_size)]
        equal = self.num_rows % world_size == 0
        first_epoch = self.epochs_done() if self.epochs_done else 0
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            # Counted on from the executions the driver ran (a materialization), so a run that starts at epoch 0
            # keeps the orders it always had. Ray Data 2.x keeps the index as a private field; tests/test_train.py
            # holds the orders it gives.
            dataset.context._execution_idx += first_epoch
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=equal)):
                splits[rank][name] = split
        return splits
