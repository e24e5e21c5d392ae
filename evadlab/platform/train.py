"""``evadlab train``: distributed EVAD training on Ray Train (V2), one ``TorchTrainer`` with ``train.num_workers``
DDP workers.

Read it top to bottom: :func:`train_loop_per_worker` is what every worker runs (train one epoch, evaluate,
report); :func:`train` is the driver that sets up the run, MLflow and the trainer. The recipe (optimiser groups,
learning rate) is in :mod:`evadlab.platform.recipe`, the input pipeline in :mod:`evadlab.platform.ingest`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import yaml

from evadlab import storage
from evadlab.config import ConfigError, ExperimentConfig, TrainConfig
from evadlab.console import EpochProgress, duration
from evadlab.errors import INTERRUPTIONS, one_line
from evadlab.memory import reuse_freed_memory
from evadlab.models.checkpoints import load_training_checkpoint, save_training_checkpoint, training_checkpoint_bytes
from evadlab.models.flops import REFERENCE_INPUT_SIZE, flops_report
from evadlab.models.latency import inference_latency_s
from evadlab.pipelines.prepare import require_prepared
from evadlab.platform.data_config import ExactlyOnceDataConfig
from evadlab.platform.evaluate import DETECTIONS_FILE, evaluate_in_workers, require_evaluation_files
from evadlab.platform.hooks import TrainingHooks
from evadlab.platform.ingest import (
    STREAM,
    TRAIN_SPLIT,
    IngestPlan,
    MicroBatch,
    count_rows,
    epoch_batches,
    plan_ingest,
    training_dataset,
)
from evadlab.platform.modeling import StartingWeights, build_model, starting_weights
from evadlab.platform.recipe import build_optimizer, learning_rate, set_learning_rate
from evadlab.platform.runs import (
    CHECKPOINT_FOLDER,
    committed_epochs,
    new_run_name,
    run_to_resume,
    why_none_matches,
    write_run_marker,
)
from evadlab.platform.tracking import (
    RunLogger,
    check_tracking_uri,
    dashboard_lines,
    experiment_of,
    log_per_class_ap,
    logged_models_of,
    now_ms,
    shard_datasets,
    start_run,
    start_system_metrics,
    trade_off_tags,
)
from evadlab.ray_session import cluster_text, copies_that_fit, ensure_ray, node_resources, resources_text

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "best_model.pt"
FINAL_MODEL_FILE = "final_model.pt"
MLFLOW_RUN_FILE = "mlflow_run_id"
# Loss terms of an auxiliary stage or decoder block end in its index (loss_ce_0); per step only the final ones are
# logged (the total and four terms), per epoch all of them.
AUXILIARY_TERM = re.compile(r".*_\d+")
# The measured inference latency of the model at the table's input, logged once per attempt (see measure_latency).
LATENCY_METRIC = "speed/latency_{}x{}x{}_ms".format(*REFERENCE_INPUT_SIZE)
# The same measurement as a rate: clips of that input per second, one clip at a time.
INFERENCE_RATE_METRIC = "speed/infer_clips_per_s"


@dataclass
class TrainResult:
    run_name: str
    run_path: str
    mlflow_run_id: str  # '' when tracking is off
    experiment_id: str
    tracking_uri: str
    metrics: dict[str, Any]  # the last report: the epoch's metrics and ``progress/*`` (see :func:`report_epoch`)
    checkpoint_path: str | None
    gflops: float
    seconds: float
    models: dict[str, str] = field(default_factory=dict)  # logged model name -> ``models:/<model_id>``
    # The detections of the last epoch's evaluation inside training (the final weights), when it ran and the file is on
    # this machine: `evadlab run` scores them instead of inferring again.
    final_detections: Path | None = None

    @property
    def step(self) -> int:
        """Optimiser steps of the whole run: the step of its final metrics."""
        return int(self.metrics.get("progress/step", 0))


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so that a restored worker continues from it."""

    epoch: int = 0  # the next epoch to train
    step: int = 0  # optimiser steps taken so far
    best_map: float | None = None
    best_epoch: int | None = None
    last_map: float | None = None  # of the last evaluated epoch


@dataclass
class Worker:
    """One DDP worker's view of the run."""

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    progress: Progress
    train_rows: int
    run_path: str
    logger: RunLogger | None  # rank 0 only, when tracking is on
    progress_channel: EpochProgress | None  # rank 0 only
    gflops: float  # at 16x288x288
    grad_accum: int  # micro-batches per optimiser step at this world size (see TrainConfig.effective_grad_accum)
    hooks: list[TrainingHooks] = field(default_factory=list)
    last_lr: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)  # rank 0: this attempt's measure_latency
    checkpoints: CheckpointWriter = field(default_factory=lambda: CheckpointWriter())

    @property
    def run_name(self) -> str:
        return Path(self.run_path).name

    @property
    def core_model(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    @property
    def amp(self) -> bool:
        return self.cfg.train.amp and self.device.type == "cuda"


# --------------------------------------------------------------------------------------------- worker loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    # The shard first: Ray Data starts its split coordinator (an actor, in a new process) while the model is built.
    shard = ray.train.get_dataset_shard(TRAIN_SPLIT)
    logger = ray.get(loop_config["mlflow"])
    worker = start_worker(loop_config, logger)
    monitor = system_monitor(worker.cfg, logger)
    first_epoch = worker.progress.epoch
    try:
        for epoch in range(first_epoch, worker.cfg.train.epochs):
            started = time.perf_counter()
            metrics = train_one_epoch(worker, shard, epoch)
            if epoch == first_epoch:
                metrics |= measure_latency(worker)
            if should_evaluate(worker.cfg, epoch):
                metrics |= evaluate_epoch(worker, epoch)
            report_epoch(worker, epoch, metrics, seconds=time.perf_counter() - started)
    finally:
        if monitor is not None:
            monitor.finish()


def system_monitor(cfg: ExperimentConfig, logger: RunLogger | None):
    """MLflow's system metrics of this node, sampled by its first worker (local rank 0) and keyed by its node rank
    (``system/node0/...``); None on the other workers, without tracking or with ``tracking.system_metrics=false``."""
    context = ray.train.get_context()
    if logger is None or not cfg.tracking.system_metrics or context.get_local_rank() != 0:
        return None
    return start_system_metrics(logger, f"node{context.get_node_rank()}", cfg.tracking.system_metrics_interval_s)


def start_worker(loop_config: dict[str, Any], logger: RunLogger | None) -> Worker:
    """Builds the model and optimiser, restores them from Ray Train's latest checkpoint if there is one; rank 0 logs
    to ``logger``. The worker process keeps the memory its steps free (:func:`~evadlab.memory.reuse_freed_memory`)."""
    reuse_freed_memory()
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed)
    restored = ray.train.get_checkpoint()
    start = loop_config["starting_weights"]
    model = build_model(cfg.model, ray.get(start) if start is not None and not restored else None)
    optimizer = build_optimizer(model, cfg.train)
    progress = Progress()
    if restored:
        with restored.as_directory() as folder:
            state = load_training_checkpoint(Path(folder) / CHECKPOINT_FILE)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        progress = Progress(**state["extra"]["progress"])
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    logger = logger if rank == 0 else None
    if logger and not restored:
        logger.log_metrics(loop_config["model_metrics"], step=0)
    return Worker(cfg=cfg, rank=rank, world=world, device=ray.train.torch.get_device(), model=model,
                  optimizer=optimizer, progress=progress, train_rows=loop_config["train_rows"],
                  run_path=loop_config["run_path"], logger=logger,
                  progress_channel=loop_config["progress"] if rank == 0 else None,
                  gflops=loop_config["model_metrics"]["model/gflops"], grad_accum=cfg.train.effective_grad_accum(world),
                  hooks=loop_config["hooks"])


def train_one_epoch(worker: Worker, shard, epoch: int) -> dict[str, float]:
    """One pass over this worker's split. Gradients are accumulated over ``worker.grad_accum`` micro-batches (more
    when an elastic run has fewer workers than its max, so the global batch stays the same); the epoch's last
    micro-batch always ends a step, so no gradient crosses an epoch boundary unsynchronised.

    Besides the losses it returns ``train/clips_per_s`` (all workers), ``speed/epoch_s`` (this worker's epoch),
    ``speed/first_batch_s``, the wait from the epoch's start to its first batch (the ingest's per-epoch overhead), and
    ``train/workers`` and ``train/grad_accum``, the worker count and accumulation the epoch ran with."""
    cfg, model = worker.cfg, worker.model
    model.train()
    start, clips_done, micro_batches, accumulated = time.perf_counter(), 0, 0, 0
    first_batch_s = None
    loss_sums: dict[str, float] = {}
    for batch in epoch_batches(shard, cfg, worker.device, epoch):
        first_batch_s = first_batch_s if first_batch_s is not None else time.perf_counter() - start
        progress_in_epoch = min(clips_done * worker.world / max(worker.train_rows, 1), 1.0)
        lr = learning_rate(epoch + progress_in_epoch, cfg.train)
        set_learning_rate(worker.optimizer, lr)
        worker.last_lr = lr
        accumulated += 1
        steps_now = accumulated == worker.grad_accum or batch.is_last
        losses = forward_backward(worker, batch, synchronise=steps_now)
        micro_batches += 1
        if batch.loss_scale > 0:
            clips_done += len(batch.keys)
            for key, value in losses.items():
                loss_sums[key] = loss_sums.get(key, 0.0) + value
            for hook in worker.hooks:
                hook.after_micro_batch(epoch, worker.rank, batch.keys)
        if steps_now:
            optimizer_step(worker, accumulated)
            accumulated = 0
            for hook in worker.hooks:
                hook.after_optimizer_step(epoch, worker.progress.step, worker.rank, worker.world)
            if worker.logger and worker.progress.step % cfg.train.log_every == 0:
                step_metrics = {f"train/{key}": value for key, value in losses.items()
                                if not AUXILIARY_TERM.fullmatch(key)}
                worker.logger.log_metrics(step_metrics | {"train/lr": lr}, worker.progress.step)
    for hook in worker.hooks:
        hook.after_epoch(epoch, worker.rank, worker.core_model)
    elapsed = time.perf_counter() - start
    return {"epoch": epoch, "train/clips_per_s": clips_done * worker.world / elapsed, "speed/epoch_s": elapsed,
            "speed/first_batch_s": first_batch_s or 0.0, "train/workers": worker.world,
            "train/grad_accum": worker.grad_accum,
            **{f"train/epoch_{key}": value / max(micro_batches, 1) for key, value in loss_sums.items()}}


def forward_backward(worker: Worker, batch: MicroBatch, synchronise: bool) -> dict[str, float]:
    """Loss and backward of one micro-batch; DDP all-reduces the gradients only when ``synchronise``."""
    model = worker.model
    skip_sync = model.no_sync() if worker.world > 1 and not synchronise else contextlib.nullcontext()
    with skip_sync:
        with torch.autocast(worker.device.type, dtype=torch.bfloat16, enabled=worker.amp):
            losses = model(batch.clips, batch.targets)
        (losses["loss"] * batch.loss_scale / worker.grad_accum).backward()
    return {key: float(value.detach()) for key, value in losses.items()}


def optimizer_step(worker: Worker, micro_batches: int) -> None:
    """Steps on the gradient accumulated over ``micro_batches``. The losses were divided by ``worker.grad_accum``;
    a shorter group at the end of an epoch is rescaled so its gradient is the mean over its own micro-batches."""
    parameters = [p for p in worker.model.parameters() if p.grad is not None]
    if micro_batches != worker.grad_accum:
        torch._foreach_mul_([p.grad for p in parameters], worker.grad_accum / micro_batches)
    if worker.cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, worker.cfg.train.grad_clip)
    worker.optimizer.step()
    worker.optimizer.zero_grad(set_to_none=True)
    worker.progress.step += 1


def measure_latency(worker: Worker) -> dict[str, float]:
    """Rank 0 times the model's inference at 16x288x288 on its device (:func:`inference_latency_s`): the latency in ms
    and the rate in clips/s (kept in ``worker.latency`` for the reports to Tune); the others return nothing. It costs
    the run about 1.5 s for the quickstart's model on a CPU core, about 9 s for ViT-B on a CPU (a warm-up and one timed
    forward), milliseconds on a GPU."""
    if worker.rank != 0:
        return {}
    seconds = inference_latency_s(worker.core_model, worker.device, amp=worker.amp)
    worker.latency = {LATENCY_METRIC: 1000 * seconds, INFERENCE_RATE_METRIC: 1 / seconds}
    return dict(worker.latency)


def should_evaluate(cfg: ExperimentConfig, epoch: int) -> bool:
    every = cfg.eval.every_epochs
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs)


def evaluate_epoch(worker: Worker, epoch: int) -> dict[str, float]:
    """Frame-mAP on the val shards, inferred by all workers and scored on rank 0: ``val/mAP``, the evaluation's
    ``speed/eval_clips_per_s`` and ``speed/eval_s`` (inference and scoring, all workers), and ``best/mAP`` when it is
    the best so far (rank 0; the other ranks get nothing)."""
    out_dir = eval_dir(worker.run_path, epoch) if worker.rank == 0 else None
    result = evaluate_in_workers(worker.core_model, worker.cfg, rank=worker.rank, world=worker.world,
                                 device=worker.device, out_dir=out_dir)
    if result is None:
        return {}
    progress = worker.progress
    progress.last_map = result.mAP
    if worker.logger:
        title = (f"{worker.run_name}: epoch {epoch + 1}/{worker.cfg.train.epochs} (step {progress.step}), "
                 f"frame-mAP@0.5 {result.mAP:.4f}")
        log_per_class_ap(worker.logger, result.per_class_named, title, prefix=f"epoch_{epoch:03d}_")
    metrics = {"val/mAP": result.mAP}
    if progress.best_map is None or result.mAP > progress.best_map:
        progress.best_map, progress.best_epoch = result.mAP, epoch
        metrics["best/mAP"] = result.mAP
    return metrics | {key: value for key, value in result.metrics.items() if key.startswith("speed/")}


def eval_dir(run_path: str | Path, epoch: int) -> Path:
    """Where the evaluation of ``epoch`` inside training writes its detections, in the local run folder."""
    return Path(run_path) / f"eval_epoch_{epoch}"


def report_epoch(worker: Worker, epoch: int, metrics: dict[str, float], seconds: float) -> None:
    """Logs the epoch to MLflow at the step it ended (rank 0), with the best model when it is new and the final model
    after the last epoch, tells the driver, and reports to Ray Train; rank 0 attaches the checkpoint (the weights are
    identical on all ranks). The report holds the epoch's metrics and the run's ``progress/*``."""
    progress = worker.progress
    progress.epoch = epoch + 1
    timestamp = now_ms()
    if worker.logger:
        worker.logger.log_metrics(metrics, progress.step, timestamp)
        if "best/mAP" in metrics:
            log_model(worker, "best", BEST_MODEL_FILE, epoch, metrics, timestamp)
    if worker.progress_channel:
        worker.progress_channel.send(epoch_message(worker, epoch, metrics, seconds))
    # Tune's schedulers need the metric in every report: the last one measured, 0 before the first evaluation; and a
    # multi-objective search reads its costs from the last report (GFLOPs, the attempt's measured latency). This goes
    # to Ray Train and Tune only, never to MLflow.
    reported = {"val/mAP": progress.last_map or 0.0, "model/gflops": worker.gflops, **worker.latency, **metrics,
                **{f"progress/{key}": value for key, value in asdict(progress).items() if value is not None}}
    if worker.rank != 0:
        ray.train.report(reported)
        return
    worker.checkpoints.report(reported, epoch, lambda: {
        "model_state": worker.core_model.state_dict(), "optimizer_state": worker.optimizer.state_dict(),
        "epoch": epoch, "config_yaml": config_yaml(worker.cfg), "extra": {"progress": asdict(progress)}})
    if worker.logger and progress.epoch == worker.cfg.train.epochs:
        worker.checkpoints.wait()  # no final model in MLflow for a run whose last checkpoint could not be written
        log_model(worker, "final", FINAL_MODEL_FILE, epoch, metrics, timestamp)


class CheckpointWriter:
    """Rank 0's report with the epoch's checkpoint, written to storage while the next epoch trains.

    The training thread serializes the checkpoint into memory (:func:`training_checkpoint_bytes`: ~0.1 s for the
    quickstart's 180 MB of weights and AdamW moments); Ray Train's checkpoint thread
    (``checkpoint_upload_mode=ASYNC``) writes those bytes atomically straight into the run's storage folder, as
    ``checkpoint_epoch_NNNN/checkpoint.pt`` (:data:`CHECKPOINT_FOLDER`), and only then hands Ray the report. So Ray
    commits the checkpoint as before, in report order, and a failed write fails the attempt as before; what left
    the training thread is the file write and Ray's copy from a temporary folder (``benchmarks/RESULTS.md`` §5). One
    write at a time: a report first waits for the previous write, which bounds the memory to one serialized
    checkpoint."""

    def __init__(self) -> None:
        self._written = threading.Event()
        self._written.set()
        self._failure: BaseException | None = None

    def wait(self) -> None:
        """Returns once the last checkpoint handed to :meth:`report` is written; raises the error of a write that
        failed (an OSError naming the file, see :func:`evadlab.storage.naming`)."""
        self._written.wait()
        if self._failure is not None:
            raise self._failure

    def report(self, metrics: dict[str, Any], epoch: int, training_state: Callable[[], dict[str, Any]]) -> None:
        """``ray.train.report(metrics)`` with a checkpoint of ``training_state()`` (the keyword arguments of
        :func:`training_checkpoint_bytes`) as it is now. Raises the error of the previous write if it failed."""
        self.wait()
        content = training_checkpoint_bytes(**training_state())
        run_storage = ray.train.get_context().get_storage()
        folder_name = CHECKPOINT_FOLDER.format(epochs=epoch + 1)
        folder = ray.train.Checkpoint(path=f"{run_storage.experiment_fs_path}/{folder_name}",
                                      filesystem=run_storage.storage_filesystem)

        def write(checkpoint: ray.train.Checkpoint, _: str) -> ray.train.Checkpoint:
            try:
                storage.write_bytes(storage.join(storage.uri_of(checkpoint.filesystem, checkpoint.path),
                                                 CHECKPOINT_FILE), content)
                return checkpoint
            except BaseException as error:
                self._failure = error
                raise
            finally:
                self._written.set()

        self._written.clear()
        try:
            ray.train.report(metrics, checkpoint=folder, checkpoint_dir_name=folder_name,
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                             checkpoint_upload_fn=write, delete_local_checkpoint_after_upload=False)
        except BaseException:
            self._written.set()
            raise


def epoch_message(worker: Worker, epoch: int, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
    """What the driver prints of an epoch (see :meth:`EpochProgress.send`)."""
    progress = worker.progress
    message = {"epoch": epoch, "epochs": worker.cfg.train.epochs, "step": progress.step, "lr": worker.last_lr,
               "clips_per_s": metrics["train/clips_per_s"], "seconds": seconds,
               "losses": {key.removeprefix("train/epoch_"): value for key, value in metrics.items()
                          if key.startswith("train/epoch_")}}
    if "val/mAP" in metrics:
        message |= {"mAP": metrics["val/mAP"], "best_mAP": progress.best_map, "best_epoch": progress.best_epoch}
    return message


def log_model(worker: Worker, name: str, file_name: str, epoch: int, metrics: dict[str, float],
              timestamp: int) -> None:
    """The model as it is now, a self-describing checkpoint (weights, config, epoch, its mAP when measured), as the
    run's logged model ``name`` (``best`` replaces the previous best) carrying the trade-off params and the epoch's
    ``val/mAP``; the best one also as the run's artifact ``checkpoints/best_model.pt``."""
    progress = worker.progress
    extra = {"step": progress.step} | ({"mAP": metrics["val/mAP"]} if "val/mAP" in metrics else {})
    with tempfile.TemporaryDirectory() as folder:
        path = save_training_checkpoint(Path(folder) / file_name, model_state=worker.core_model.state_dict(),
                                        optimizer_state={}, epoch=epoch, config_yaml=config_yaml(worker.cfg),
                                        extra=extra)
        Path(folder, "config.yaml").write_text(config_yaml(worker.cfg))
        if name == "best":
            worker.logger.log_artifact(path, "checkpoints")
            worker.logger.set_tags({"evadlab.best_epoch": str(epoch)})
        model_metrics = {key: {"value": metrics[key], "step": progress.step, "timestamp": timestamp}
                         for key in ("val/mAP",) if key in metrics}
        evad = worker.cfg.model.evad
        worker.logger.log_model(folder, name, step=progress.step, metrics=model_metrics,
                                tags=trade_off_tags(worker.cfg, worker.gflops) | {"evadlab.model": name},
                                params={"model.keep_rate": evad.keep_rate_label, "epoch": epoch,
                                        "step": progress.step, "model.enhanced_weight": evad.enhanced_weight,
                                        "model.variant": worker.cfg.model.variant, "gflops": f"{worker.gflops:.2f}"})


def config_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------- driver
@dataclass
class RunSetup:
    """What the driver decides before any worker starts."""

    run_name: str
    storage: str  # train.storage_path as an absolute path or a URI
    local_path: str  # the run folder on this machine's file system: evaluation outputs, the MLflow backlog
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    model_metrics: dict[str, float]

    @property
    def run_path(self) -> str:
        return storage.join(self.storage, self.run_name)

    def logger(self, retry_s: float) -> RunLogger | None:
        """The run's MLflow logger, its backlog in the local run folder; None when tracking is off."""
        if not self.mlflow_run_id:
            return None
        return RunLogger(self.tracking_uri, self.mlflow_run_id, backlog=self.local_path, retry_s=retry_s)


def training_splits(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The splits a training run reads: train, and val when it evaluates."""
    return (TRAIN_SPLIT, "val") if cfg.eval.every_epochs > 0 else (TRAIN_SPLIT,)


def train(cfg: ExperimentConfig, *, parent_run_id: str | None = None, callbacks: list | None = None,
          hooks: list[TrainingHooks] | None = None, start: StartingWeights | None = None,
          flops: dict[str, float] | None = None) -> TrainResult:
    """``evadlab train``: fit EVAD on the prepared train shards, evaluating on val as configured; prints one line per
    epoch (see :class:`EpochProgress`).

    ``callbacks`` are Ray Train callbacks (Tune's ``TuneReportCallback``); ``hooks`` run inside the workers (tests);
    ``start`` are starting weights the caller has read and checked already (else ``model.checkpoint`` /
    ``model.pretrained`` are read here); ``flops`` the model's :func:`count_model` when the caller has it. Before Ray
    starts, raises OSError when the run folder cannot be written (see :func:`require_writable_run_folder`),
    UnpreparedDataError for shards that are missing, incomplete or empty, FileNotFoundError for a missing label map or
    val annotations when it evaluates, TrackingError when MLflow is unreachable, CheckpointError when the starting
    weights cannot be read or do not fit, and, once Ray has started, ConfigError when the cluster cannot hold the
    workers (see :func:`require_room_for_workers`). Once training runs, MLflow may go away: see :class:`RunLogger`.
    """
    require_writable_run_folder(cfg)
    manifest = require_prepared(cfg, training_splits(cfg))
    if cfg.eval.every_epochs > 0:
        require_evaluation_files(cfg)
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.resolved_uri())
    if start is None:
        start = starting_weights(cfg.model, cfg.tracking.resolved_uri())
        build_model(cfg.model, start, device="meta")
    began = time.perf_counter()
    setup = set_up_run(cfg, parent_run_id, manifest, start_ray_counting(cfg, flops))
    plan = plan_ingest(cfg)
    warn_if_no_cpu_left_for_data(cfg, plan)
    start_ref = ray.put(start) if start is not None else None
    logger = setup.logger(retry_s=0.0)
    progress = EpochProgress()
    progress.start()
    try:
        dataset = ingest_dataset(cfg, plan, logger)
        # Ray Train hands these variables from the process that calls fit() to its controller (ENV_VARS_TO_PROPAGATE).
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.train.health_check_interval_s)
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.train.worker_group_start_timeout_s)
        result = build_trainer(cfg, setup, callbacks, hooks or [], start_ref, progress, dataset).fit()
    except BaseException as error:
        if logger:  # MLflow's statuses: KILLED for a run stopped by its user (Ctrl-C), FAILED for an error
            logger.end("KILLED" if isinstance(error, INTERRUPTIONS) else "FAILED")
            logger.finish()
        raise
    finally:
        progress.stop()
    checkpoint_path = None
    if result.checkpoint is not None:
        checkpoint_path = storage.join(storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path),
                                       CHECKPOINT_FILE)
    if logger:
        if checkpoint_path and storage.is_local(checkpoint_path):
            logger.log_artifact(storage.local_path(checkpoint_path), "checkpoints")
        logger.end()
        logger.finish()
    return TrainResult(run_name=setup.run_name, run_path=setup.run_path, mlflow_run_id=setup.mlflow_run_id,
                       experiment_id=setup.experiment_id, tracking_uri=setup.tracking_uri,
                       metrics=dict(result.metrics or {}), checkpoint_path=checkpoint_path,
                       gflops=setup.model_metrics["model/gflops"], seconds=time.perf_counter() - began,
                       models=logged_models_of(setup.tracking_uri, setup.experiment_id, setup.mlflow_run_id),
                       final_detections=last_epoch_detections(cfg, setup.local_path))


def last_epoch_detections(cfg: ExperimentConfig, local_path: str) -> Path | None:
    """The detections CSV of the last epoch's evaluation inside training, None when that epoch was not evaluated (a
    trial stopped early) or its file is not on this machine (rank 0 ran on another node)."""
    last = cfg.train.epochs - 1
    path = eval_dir(local_path, last) / DETECTIONS_FILE
    return path if should_evaluate(cfg, last) and path.is_file() else None


def summary_lines(result: TrainResult, epochs: int) -> list[str]:
    """What ``evadlab train`` ends with: the epochs and their mAP, the checkpoint, the MLflow run and its models, and
    how to open the dashboard."""
    metrics = result.metrics
    text = f"evadlab train: {epochs} epochs ({result.step} steps) in {duration(result.seconds)}"
    if "progress/last_map" in metrics:
        text += (f"; frame-mAP@0.5 {metrics['progress/last_map']:.4f} at the last evaluation, best "
                 f"{metrics['progress/best_map']:.4f} (epoch {int(metrics['progress/best_epoch']) + 1})")
    lines = [text, f"  checkpoint: {result.checkpoint_path}"]
    if result.mlflow_run_id:
        lines.append(f"  MLflow run {result.mlflow_run_id} ({result.run_name}), experiment {result.experiment_id}, "
                     f"at {result.tracking_uri}")
        lines += [f"  model '{name}': {uri}" for name, uri in result.models.items()]
        lines += [f"  dashboard: {line}" for line in dashboard_lines(result.tracking_uri, result.experiment_id,
                                                                    result.mlflow_run_id)]
    return lines


def start_ray_counting(cfg: ExperimentConfig, flops: dict[str, float] | None) -> dict[str, float]:
    """Starts or joins Ray and checks that it can hold the workers (:func:`require_room_for_workers`) while another
    thread counts the model (:func:`count_model`, ~2 s of Python on fake tensors, while Ray mostly waits for its
    processes), unless the caller has the count (``flops``); returns the count."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        counted = pool.submit(count_model, cfg) if flops is None else None
        ensure_ray()
        require_room_for_workers(cfg)
        return counted.result() if counted else flops


def count_model(cfg: ExperimentConfig) -> dict[str, float]:
    """The config's model counted at its input size (:func:`~evadlab.models.flops.flops_report`: GFLOPs there and at
    16x288x288, parameters)."""
    return flops_report(cfg.model.evad, (cfg.model.num_frames, cfg.data.short_side, cfg.data.short_side))


def set_up_run(cfg: ExperimentConfig, parent_run_id: str | None, manifest: dict[str, Any],
               report: dict[str, float]) -> RunSetup:
    """Names the run (or finds the one to resume) and opens its MLflow run; ``report`` is the model's
    :func:`~evadlab.models.flops.flops_report` at the config's input size."""
    location = storage.absolute(cfg.train.storage_path)
    run_name = run_name_for(cfg, location)
    model_metrics = {"model/gflops": report["gflops_16x288x288"], "model/gflops_input": report["gflops"],
                     "model/params": report["params"]}
    # Evaluation outputs and the MLflow backlog are written with plain file I/O: in the run folder when it is on
    # this machine's file system, else in a folder of that name under the config's output_dir.
    run_path = storage.join(location, run_name)
    local_path = run_path if storage.is_local(location) else str(cfg.run_dir / run_name)
    setup = RunSetup(run_name=run_name, storage=location, local_path=str(storage.local_path(local_path)),
                     mlflow_run_id="", experiment_id="", tracking_uri=cfg.tracking.resolved_uri(),
                     model_metrics=model_metrics)
    if cfg.tracking.enabled:
        setup.mlflow_run_id, setup.experiment_id = mlflow_run_of(cfg, setup, parent_run_id, manifest)
    print(f"evadlab train: run {run_name} ({report['gflops_16x288x288']:.1f} GFLOPs at 16x288x288, "
          f"{report['params'] / 1e6:.2f} M parameters), MLflow run {setup.mlflow_run_id or 'disabled'}")
    return setup


def run_name_for(cfg: ExperimentConfig, location: str) -> str:
    """``train.resume`` continues the newest run of this config (see :mod:`evadlab.platform.runs`) and says which;
    otherwise, or when there is none, a new run is created and marked."""
    if cfg.train.resume:
        previous = run_to_resume(cfg, location)
        if previous is not None:
            print(f"evadlab train: train.resume: continuing run {previous.run_name} of '{cfg.name}' (created "
                  f"{previous.created_text}) at {storage.join(location, previous.run_name)}")
            return previous.run_name
        print(f"evadlab train: train.resume: {why_none_matches(cfg, location)}; starting a new run")
    run_name = new_run_name(cfg, location)
    write_run_marker(cfg, location, run_name)
    return run_name


def mlflow_run_of(cfg: ExperimentConfig, setup: RunSetup, parent_run_id: str | None,
                  manifest: dict[str, Any]) -> tuple[str, str]:
    """The run's MLflow run and experiment ids: the run recorded in the run folder (a resumed run), else a new one,
    with its trade-off tags, config and dataset inputs (train for training, val for evaluation)."""
    marker = storage.join(setup.run_path, MLFLOW_RUN_FILE)
    run_id = storage.read_text(marker).strip() if storage.exists(marker) else ""
    if not run_id:
        run_id = start_run(cfg, run_name=setup.run_name, parent_run_id=parent_run_id)
        storage.write_text(marker, run_id)
    logger = RunLogger(setup.tracking_uri, run_id)
    logger.set_tags({"evadlab.gflops": f"{setup.model_metrics['model/gflops']:.1f}",
                     "evadlab.run_path": setup.run_path})
    logger.log_text(config_yaml(cfg), "config.yaml")
    contexts = {TRAIN_SPLIT: "training"} | ({"val": "evaluation"} if cfg.eval.every_epochs > 0 else {})
    logger.log_datasets(shard_datasets(cfg, manifest, contexts))
    return run_id, experiment_of(setup.tracking_uri, run_id)


def ingest_dataset(cfg: ExperimentConfig, plan: IngestPlan, logger: RunLogger | None) -> ray.data.Dataset:
    """The train split as the workers will iterate it (:func:`training_dataset`), materialized or streamed as
    ``plan`` says. The choice is printed and tagged (``evadlab.ingest``); the seconds spent here (decoding the whole
    split when it is materialized) are logged as ``speed/ingest_setup_s``."""
    print(f"evadlab train: {plan.describe()}")
    start = time.perf_counter()
    dataset = training_dataset(cfg, plan)
    if logger:
        logger.set_tags({"evadlab.ingest": plan.mode})
        logger.log_metrics({"speed/ingest_setup_s": time.perf_counter() - start}, step=0)
    return dataset


def build_trainer(cfg: ExperimentConfig, setup: RunSetup, callbacks: list | None, hooks: list[TrainingHooks],
                  starting_weights_ref: ray.ObjectRef | None, progress: EpochProgress,
                  dataset: ray.data.Dataset) -> ray.train.torch.TorchTrainer:
    train_rows = count_rows(cfg, TRAIN_SPLIT)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        # Ray Train's controller unpickles this dict too; the MLflow logger goes by reference, so that only the
        # workers import MLflow (1.9 s measured in the controller, before it starts them: benchmarks/RESULTS.md §5).
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "mlflow": ray.put(setup.logger(retry_s=cfg.tracking.retry_s)),
            "model_metrics": setup.model_metrics,
            "run_path": setup.local_path,
            "train_rows": train_rows,
            "hooks": hooks,
            "starting_weights": starting_weights_ref,
            "progress": progress,
        },
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=setup.run_name, storage_path=setup.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets={TRAIN_SPLIT: dataset},
        # A worker group starts at the epoch after Ray Train's newest committed checkpoint (start_worker restores it).
        dataset_config=ExactlyOnceDataConfig(train_rows, epochs_done=functools.partial(
            committed_epochs, storage.join(setup.storage, setup.run_name))),
    )


def scaling_config(cfg: ExperimentConfig) -> ray.train.ScalingConfig:
    """``train.num_workers`` (a range: elastic, resized at most every ``train.resize_interval_s``), each worker with
    ``train.cpus_per_worker`` CPUs, a GPU with ``train.use_gpu`` and the custom ``train.resources_per_worker``."""
    return ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                   resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                         **cfg.train.resources_per_worker},
                                   elastic_resize_monitor_interval_s=cfg.train.resize_interval_s)


def require_writable_run_folder(cfg: ExperimentConfig) -> None:
    """Where a run writes (checkpoints, evaluations, the MLflow backlog), checked before any work:
    ``train.storage_path`` when it is on this machine's file system, else ``output_dir``, which then holds those files.
    Raises OSError naming the key (``train.storage_path /x cannot be written (/x is a file)``), and ConfigError when
    an object-store URI names no file system pyarrow (and so Ray) can open: an unknown scheme, a missing client
    library (HDFS's libjvm), an S3 bucket whose region cannot be resolved. Whether the bucket may be written is the
    store's to answer, at the first checkpoint."""
    path = cfg.train.storage_path
    if storage.is_local(path):
        storage.require_writable_folder(storage.local_path(path), "train.storage_path")
        return
    try:
        storage.filesystem_of(path)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"train.storage_path {path!r} is no storage Ray can open: {one_line(error)}") from None
    storage.require_writable_folder(cfg.run_dir, "output_dir")


def require_room_for_workers(cfg: ExperimentConfig) -> None:
    """Ray Train waits without a word for workers the cluster cannot place. Raises ConfigError, in one line, when the
    cluster's nodes cannot hold ``train.num_workers`` workers (the min of a range), each on one node
    (:func:`~evadlab.ray_session.copies_that_fit`): their CPUs (``train.cpus_per_worker``), a GPU each with
    ``train.use_gpu``, and ``train.resources_per_worker``."""
    workers, needs = cfg.train.min_workers, cfg.train.worker_resources
    nodes = node_resources()
    if copies_that_fit(nodes, needs) >= workers:
        return
    raise ConfigError(f"{workers} worker(s) (train.num_workers) need {resources_text(needs, workers)} "
                      f"(train.cpus_per_worker={cfg.train.cpus_per_worker:g} each, each worker on one node) but the "
                      f"cluster has {cluster_text(nodes, needs)}: {worker_remedy(cfg.train)}")


def worker_remedy(train_cfg: TrainConfig) -> str:
    """What to change when workers do not fit: the keys that set what each one holds, or the cluster."""
    remedies = ["lower train.num_workers or train.cpus_per_worker"]
    if train_cfg.use_gpu:
        remedies.append("set train.use_gpu=false")
    if train_cfg.resources_per_worker:
        remedies.append("change train.resources_per_worker")
    return ", ".join([*remedies, "or add nodes"])


def warn_if_no_cpu_left_for_data(cfg: ExperimentConfig, plan: IngestPlan) -> None:
    """A streamed split's decode tasks each need a whole CPU next to the workers; without one the run waits forever
    (a materialized split is decoded before the workers start, and its epochs run no tasks). A warning, not an
    error: CPUs held by a job that is just ending come back a moment later."""
    if plan.mode != STREAM:
        return
    free = ray.available_resources().get("CPU", 0.0)
    left = free - cfg.train.max_workers * cfg.train.cpus_per_worker
    if left < 1:
        print(f"evadlab train: warning: {cfg.train.max_workers} worker(s) x train.cpus_per_worker="
              f"{cfg.train.cpus_per_worker} leave {left:.2f} of {free:.2f} free CPUs for Ray Data's decoding, which "
              f"needs at least 1; if training does not start, lower train.cpus_per_worker", file=sys.stderr)
