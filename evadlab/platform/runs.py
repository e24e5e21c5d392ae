"""Run folders under ``train.storage_path`` and the run that ``train.resume`` continues.

Each training run gets a folder ``<storage>/<name>_<YYYYmmdd-HHMMSS>/`` (Ray Train's checkpoints, one folder
``checkpoint_epoch_NNNN/`` per kept checkpoint after NNNN epochs, and ``mlflow_run_id``) with a marker,
``evadlab_run.json``, written when the run is created: the config's ``name``, its identity (the flattened config
without the keys a resume may change, :data:`RESUMABLE_KEYS` and :data:`RESUMABLE_SECTIONS`), the identity's hash and
the creation time. ``train.resume`` continues the newest run (by that time, not by folder name) whose marker has this
config's name and hash and that has a checkpoint Ray Train committed; when none has one, the newest of them (a start
that failed before its first epoch leaves a folder with a marker and nothing to continue, which must not hide an older
run that has checkpoints). Folders without a marker (a sweep's own folder, anything else under the storage path) are
never continued, and a name that merely starts the same (``quickstart_long``, a sweep trial ``quickstart_<trial>``)
is another config.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from evadlab import storage
from evadlab.config import ExperimentConfig

RUN_MARKER = "evadlab_run.json"
# Ray Train's checkpoint manager rewrites this file in the run's storage folder each time it commits a checkpoint
# (ray.train.v2's CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, an internal name: written out so that no internal module is
# imported).
RAY_TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# The folder of the checkpoint taken after {epochs} epochs, in the run folder.
CHECKPOINT_FOLDER = "checkpoint_epoch_{epochs:04d}"
# What a resumed run may change: how long it trains and how it checkpoints, where its files are, on what resources
# (and how its input reaches them).
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.resume", "train.max_failures", "train.keep_checkpoints", "train.log_every",
    "train.storage_path", "train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.resources_per_worker",
    "train.resize_interval_s", "train.health_check_interval_s", "train.worker_group_start_timeout_s",
    "data.root", "data.shards", "data.prepare_cpus", "data.keyframes_per_part", "data.ingest", "output_dir",
})
# ... and how it is evaluated, swept and tracked. Everything else (data, model, recipe) identifies the run.
RESUMABLE_SECTIONS = ("eval", "tune", "tracking")


@dataclass(frozen=True)
class RunMarker:
    """The marker of one run folder."""

    run_name: str
    config_name: str
    config_hash: str
    created: float  # seconds since the epoch
    identity: dict[str, Any]

    @property
    def created_text(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))


def config_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """The flattened config without the keys a resume may change (a mapping's, such as
    ``train.resources_per_worker.<name>``, included)."""
    return {key: value for key, value in cfg.flat().items()
            if key.rsplit(".", 1)[0] not in RESUMABLE_KEYS and key not in RESUMABLE_KEYS
            and key.split(".", 1)[0] not in RESUMABLE_SECTIONS}


def config_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def new_run_name(cfg: ExperimentConfig, location: str) -> str:
    """``<name>_<YYYYmmdd-HHMMSS>``, with a counter when a run of this name started in the same second."""
    base = f"{cfg.name}_{time.strftime('%Y%m%d-%H%M%S')}"
    name, count = base, 1
    while storage.exists(storage.join(location, name)):
        name, count = f"{base}-{count}", count + 1
    return name


def write_run_marker(cfg: ExperimentConfig, location: str, run_name: str) -> RunMarker:
    """Marks ``<location>/<run_name>`` as a run of ``cfg``."""
    identity = config_identity(cfg)
    marker = RunMarker(run_name=run_name, config_name=cfg.name, config_hash=config_hash(identity),
                       created=time.time(), identity=identity)
    storage.write_text(storage.join(location, run_name, RUN_MARKER), json.dumps(asdict(marker), indent=1) + "\n")
    return marker


def read_run_markers(location: str) -> list[RunMarker]:
    """The markers of the run folders directly under ``location``; folders without one are skipped."""
    markers = []
    for folder in storage.list_folders(location):
        path = storage.join(location, folder.base_name, RUN_MARKER)
        if storage.exists(path):
            markers.append(RunMarker(**json.loads(storage.read_text(path))))
    return markers


def committed_epochs(run_storage: str | os.PathLike) -> int:
    """The epochs (``progress/epoch``) of the newest checkpoint Ray Train has committed for the run whose storage
    folder (path or URI) is ``run_storage``; 0 before the first, or while the file is being rewritten (callers poll).

    Ray Train commits a reported checkpoint only once its controller has collected the report of every worker (it
    polls them every ``train.health_check_interval_s``); its checkpoint manager then rewrites
    :data:`RAY_TRAIN_SNAPSHOT_FILE` in the run's storage folder, which this reads. A worker lost before that poll
    takes its report with it, and the run resumes from the checkpoint before."""
    try:
        snapshot = json.loads(storage.read_text(storage.join(run_storage, RAY_TRAIN_SNAPSHOT_FILE)))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("progress/epoch", 0))


def run_to_resume(cfg: ExperimentConfig, location: str) -> RunMarker | None:
    """The run under ``location`` that ``train.resume`` continues: of the runs of this config (same name and identity
    hash), the newest with a committed checkpoint (:func:`committed_epochs`), else the newest; None when there is
    none."""
    wanted = config_hash(config_identity(cfg))
    matching = [marker for marker in read_run_markers(location)
                if marker.config_name == cfg.name and marker.config_hash == wanted]
    with_checkpoints = [marker for marker in matching
                        if committed_epochs(storage.join(location, marker.run_name)) > 0]
    return max(with_checkpoints or matching, key=lambda marker: marker.created, default=None)


def why_none_matches(cfg: ExperimentConfig, location: str) -> str:
    """Why no run could be continued: none of this name, or the keys in which the newest one of this name differs."""
    same_name = [marker for marker in read_run_markers(location) if marker.config_name == cfg.name]
    if not same_name:
        return f"no earlier run of '{cfg.name}' under {location}"
    newest = max(same_name, key=lambda marker: marker.created)
    identity = config_identity(cfg)
    keys = sorted(set(identity) | set(newest.identity))
    differing = [f"{key} ({newest.identity.get(key)!r} -> {identity.get(key)!r})"
                 for key in keys if identity.get(key) != newest.identity.get(key)]
    shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
    return (f"{len(same_name)} earlier run(s) of '{cfg.name}' under {location}, none with this config (the newest, "
            f"{newest.run_name}, differs in {shown})")
