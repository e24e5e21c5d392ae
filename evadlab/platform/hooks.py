"""Hooks into the training worker loop, and the ones the tests install.

Production runs use :class:`TrainingHooks` itself, which does nothing. Tests pass instances of the subclasses
below to ``train(cfg, hooks=[...])`` to kill a worker on purpose or to record what each worker did; they live in
the package (not under tests/) because Ray pickles them by reference into worker processes, which must import them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import ray.train
import torch

from evadlab import storage
from evadlab.platform.runs import CHECKPOINT_FOLDER, committed_epochs


class TrainingHooks:
    """Called by every worker; ``rank`` is the worker's DDP rank and ``world`` the number of workers."""

    def after_micro_batch(self, epoch: int, rank: int, keys: list[tuple[str, int]]) -> None:
        """A micro-batch that counted (not a zero-weight repeat) was trained on."""

    def after_optimizer_step(self, epoch: int, step: int, rank: int, world: int) -> None:
        """The optimiser has stepped; ``step`` counts steps over the whole run."""

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        """The epoch's last optimiser step is done (before evaluation and the checkpoint)."""


def wait_for_committed_epochs(run_storage: str | os.PathLike, epochs: int, timeout_s: float = 120.0) -> None:
    """Waits until Ray Train has committed the checkpoint of ``epochs`` epochs (see :func:`committed_epochs`).
    Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while committed_epochs(run_storage) < epochs:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray Train did not commit the checkpoint of epoch {epochs} in {run_storage} "
                               f"in {timeout_s:g} s")
        time.sleep(0.2)


class FailOnceAtEpoch(TrainingHooks):
    """The last worker exits once, after its first optimiser step in ``epoch``, like a lost node, once Ray Train has
    committed the previous epoch's checkpoint (a worker lost within Ray's report poll after the report would take the
    report with it: see :func:`committed_epochs`). A marker file in ``folder`` (shared by all attempts) keeps the
    replacement worker from failing again."""

    def __init__(self, epoch: int, folder: str | Path):
        self.epoch = epoch
        self.marker = Path(folder) / f"failure_injected_epoch_{epoch}"

    def after_optimizer_step(self, epoch: int, step: int, rank: int, world: int) -> None:
        if epoch != self.epoch or rank != world - 1 or self.marker.exists():
            return
        run_storage = ray.train.get_context().get_storage()
        wait_for_committed_epochs(storage.uri_of(run_storage.storage_filesystem, run_storage.experiment_fs_path),
                                  self.epoch)
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text("worker killed on purpose by FailOnceAtEpoch\n")
        os._exit(1)


class BlockCheckpointAtEpoch(TrainingHooks):
    """Rank 0 puts a file where the checkpoint folder of ``epoch`` is to be written (the run folder of the attempt's
    storage), so that writing that checkpoint fails, as on a full or read-only storage."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        if epoch != self.epoch or rank != 0:
            return
        run_storage = ray.train.get_context().get_storage()
        run_folder = storage.uri_of(run_storage.storage_filesystem, run_storage.experiment_fs_path)
        storage.write_text(storage.join(run_folder, CHECKPOINT_FOLDER.format(epochs=epoch + 1)), "in the way\n")


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


class RecordEnvironment(TrainingHooks):
    """Appends a line ``name=value`` for each of the environment variables ``names`` as each worker sees them to
    ``path`` at the end of each epoch: what Ray Train passed on from the driver through its controller to the
    workers."""

    def __init__(self, path: str | Path, *names: str):
        self.path, self.names = Path(path), names

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        with open(self.path, "a") as out:
            out.writelines(f"{name}={os.environ.get(name)}\n" for name in self.names)


class RecordWeights(TrainingHooks):
    """Saves each worker's weights at the end of each epoch to ``folder/epoch_EEE_rank_R.pt``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
        torch.save(state, self.folder / f"epoch_{epoch:03d}_rank_{rank}.pt")


def tracking_server_answers(uri: str) -> bool:
    """Whether the MLflow server at ``uri`` answers its health check now."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2):
            return True
    except OSError:
        return False


def wait_for_tracking_server(uri: str, up: bool, timeout_s: float = 120.0) -> None:
    """Waits until the server at ``uri`` answers (``up``) or refuses (not ``up``). Raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while tracking_server_answers(uri) != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the MLflow server at {uri} did not {'start' if up else 'stop'} in {timeout_s:g} s")
        time.sleep(0.5)


class StopTrackingServer(TrainingHooks):
    """Rank 0 stops the MLflow server at ``uri`` (process group ``pid``) after epoch ``stop_after_epoch``, before the
    epoch is reported, and starts it again with ``command`` after the first optimiser step of epoch
    ``restart_in_epoch``, waiting until it answers. The new server's pid goes to ``folder/server.pid`` (its starter
    stops it). ``folder/backlogs_before_restart.txt``, and ``backlogs_after_restart.txt`` at the end of that epoch,
    list the MLflow backlogs then waiting under ``watch``."""

    def __init__(self, uri: str, pid: int, folder: str | Path, *, stop_after_epoch: int, restart_in_epoch: int,
                 command: list[str], watch: str | Path):
        self.uri, self.pid, self.folder, self.command = uri, pid, Path(folder), command
        self.stop_after_epoch, self.restart_in_epoch, self.watch = stop_after_epoch, restart_in_epoch, watch

    def after_epoch(self, epoch: int, rank: int, model: torch.nn.Module) -> None:
        if rank != 0:
            return
        if epoch == self.stop_after_epoch:
            os.killpg(self.pid, signal.SIGTERM)
            wait_for_tracking_server(self.uri, up=False)
        if epoch == self.restart_in_epoch:
            self.list_backlogs("backlogs_after_restart.txt")

    def list_backlogs(self, name: str) -> None:
        waiting = sorted(str(path) for path in Path(self.watch).rglob("mlflow_backlog.jsonl"))
        (self.folder / name).write_text("".join(f"{path}\n" for path in waiting))

    def after_optimizer_step(self, epoch: int, step: int, rank: int, world: int) -> None:
        pid_file = self.folder / "server.pid"
        if rank != 0 or epoch != self.restart_in_epoch or pid_file.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.list_backlogs("backlogs_before_restart.txt")
        with open(self.folder / "restarted_server.log", "w") as log:
            server = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(str(server.pid))
        wait_for_tracking_server(self.uri, up=True)
