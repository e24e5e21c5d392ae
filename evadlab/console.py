"""What evadlab prints while it works: progress bars, the training's line per epoch, durations.

Ray's own output stays in its session logs (see :mod:`evadlab.ray_session`); these are the lines a user reads. Bars are
tqdm's and show only on a terminal (tqdm's ``disable=None``), so logs and pipes get the summaries without a stream of
redrawn bars.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

# The loss terms of the final stage shown in the epoch line, with their short names.
EPOCH_LINE_TERMS = {"loss_ce": "ce", "loss_giou": "giou", "loss_bbox": "bbox", "loss_bce": "bce"}


def duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(total: int, unit: str, description: str, items: Iterable[Any] | None = None) -> tqdm:
    """A bar over ``total`` ``unit``s with their rate per second and the time left, on stderr, shown only when stderr
    is a terminal; iterating it iterates ``items`` and advances the bar by one per item."""
    return tqdm(items, total=total, unit=unit, desc=description, disable=None, dynamic_ncols=True, leave=False)


def epoch_line(message: dict[str, Any], seconds_left: float) -> str:
    """One epoch as the training worker reported it (see :meth:`EpochProgress.send`), e.g. ``epoch 3/30 step 66:
    loss 2.314 (ce 0.412 giou 0.623 bbox 0.331 bce 0.948), lr 1.0e-04, 21.4 clips/s, 25s, 11m40s left; frame-mAP
    0.4123 (best 0.4123 at epoch 3)``; the mAP only for an epoch that was evaluated."""
    losses = message["losses"]
    terms = " ".join(f"{short} {losses[key]:.3f}" for key, short in EPOCH_LINE_TERMS.items() if key in losses)
    line = (f"epoch {message['epoch'] + 1}/{message['epochs']} step {message['step']}: "
            f"loss {losses.get('loss', float('nan')):.3f}" + (f" ({terms})" if terms else "") +
            f", lr {message['lr']:.1e}, {message['clips_per_s']:.1f} clips/s, {duration(message['seconds'])}, "
            f"{duration(seconds_left)} left")
    if message.get("mAP") is not None:
        line += (f"; frame-mAP {message['mAP']:.4f} (best {message['best_mAP']:.4f} at epoch "
                 f"{message['best_epoch'] + 1})")
    return line


class EpochProgress:
    """The training's line per epoch: rank 0 sends one message per epoch (:meth:`send`) through a Ray queue that the
    driver created, and a thread of the driver prints it (:meth:`start`, :meth:`stop`). The queue is an actor, so
    this works wherever the workers run; their own stdout does not reach the driver (``log_to_driver=False``). The
    queue's actor lives on the driver's node, so that losing a worker node never takes the channel with it.

    ``last`` is the last message printed; the time left is the mean epoch time so far times the epochs to go."""

    def __init__(self):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.channel = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.last: dict[str, Any] | None = None
        self._seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._print_messages, name="evadlab-epoch-progress", daemon=True)

    def __getstate__(self) -> dict[str, Any]:
        # Workers get the queue only; the thread and the event stay with the driver.
        return {"channel": self.channel}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.channel = state["channel"]

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0: ``epoch`` (from 0), ``epochs``, ``step``, ``losses`` (the epoch's mean terms), ``lr``,
        ``clips_per_s``, ``seconds`` (the epoch's wall time with its evaluation), and for an evaluated epoch ``mAP``,
        ``best_mAP`` and ``best_epoch``."""
        self.channel.put(message)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Prints what is still queued, then ends the thread and the queue's actor."""
        import ray

        self._stop.set()
        self._thread.join()
        ray.kill(self.channel.actor)

    def _print_messages(self) -> None:
        from ray.util.queue import Empty

        while not (self._stop.is_set() and self.channel.empty()):
            try:
                message = self.channel.get(timeout=1.0)
            except Empty:
                continue
            self._seconds.append(message["seconds"])
            left = sum(self._seconds) / len(self._seconds) * (message["epochs"] - message["epoch"] - 1)
            print(epoch_line(message, left), flush=True)
            self.last = message
