"""Batch inference over the val shards and AVA frame-mAP.

``evaluate`` runs a pool of Ray Data actors (the model is loaded once per actor); ``evaluate_in_workers`` is the
same code path inside the training workers. Both turn clips into detection rows with ``detect_clips`` and score
them with the official-equivalent evaluator.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.util.annotations import RayDeprecationWarning

from evadlab.config import ConfigError, ExperimentConfig
from evadlab.console import progress_bar
from evadlab.memory import reuse_freed_memory
from evadlab.pipelines.ava import (
    detection_rows,
    distinct_class_names,
    read_boxes_csv,
    read_exclusions,
    read_label_map,
    stack_detection_rows,
    write_detections_csv,
)
from evadlab.pipelines.ava_map import evaluate_files, parse_iou_thresholds
from evadlab.pipelines.clips import decode_clip, iter_shard_rows, read_shards, to_model_input
from evadlab.pipelines.prepare import require_prepared
from evadlab.platform.modeling import StartingWeights, build_model, complete_checkpoint
from evadlab.platform.tracking import (
    RunLogger,
    check_tracking_uri,
    dashboard_lines,
    experiment_of,
    log_per_class_ap,
    shard_datasets,
    start_run,
)
from evadlab.ray_session import cluster_text, copies_that_fit, ensure_ray, node_resources, resources_text
from evadlab.storage import atomic_path, require_writable_folder

DETECTIONS_FILE = "detections.csv"


@dataclass
class EvalResult:
    mAP: float
    per_class_named: dict[str, float | None]
    detections_path: Path
    num_detections: int
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str = ""  # the run it was logged into; '' without tracking
    experiment_id: str = ""


@dataclass
class JobRun:
    """The MLflow run an evaluation logs into, at ``step``: the run of the job it is part of (``evadlab run``: the
    training's final step), or its ``own`` run, which ends with it. ``has_map``: the run holds this checkpoint's
    ``val/mAP`` at ``step`` already (the training evaluated its last epoch), so it is not logged twice."""

    run_id: str
    name: str
    experiment_id: str
    step: int
    has_map: bool = False
    own: bool = False


def label_map_ids(cfg: ExperimentConfig) -> np.ndarray:
    return np.array(sorted(read_label_map(cfg.data.annotation_dir / cfg.data.label_map)), dtype=np.int64)


@torch.no_grad()
def detect_clips(model, rows: list[dict[str, Any]], cfg: ExperimentConfig, class_ids: np.ndarray,
                 device: torch.device) -> dict[str, np.ndarray]:
    """Detection rows (one per selected box and label-map class) for decoded shard rows.

    Each clip runs on its own so its detections do not depend on which clips share its batch (padding
    and kernel choice would otherwise change the last digits)."""
    model.eval()
    parts = []
    for row in rows:
        frames, _ = decode_clip(row, flip=False)
        clip = to_model_input(frames, cfg.data.mean, cfg.data.std).to(device)
        (detections,) = model.predict([clip], [(int(row["orig_height"]), int(row["orig_width"]))])
        boxes = detections.boxes.tensor.float().cpu().numpy()
        parts.append(detection_rows(str(row["video_id"]), int(row["timestamp"]), boxes,
                                    detections.action_scores.float().cpu().numpy(), class_ids))
    return stack_detection_rows(parts)


def _sorted_table(parts: Iterable[dict[str, np.ndarray]]) -> pa.Table:
    tables = [pa.table(dict(part)) for part in parts if len(part["score"])]
    if not tables:
        return pa.table(stack_detection_rows([]))
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.sort_by([("video_id", "ascending"), ("timestamp", "ascending"), ("box_index", "ascending"),
                          ("action_id", "ascending")])


def score_detections(table: pa.Table, cfg: ExperimentConfig, out_dir: Path) -> EvalResult:
    """Writes the AVA detections CSV and scores it against the val ground truth."""
    out_dir.mkdir(parents=True, exist_ok=True)
    detections_path = out_dir / DETECTIONS_FILE
    write_detections_csv(detections_path, table)
    return score_file(detections_path, cfg)


def require_evaluation_files(cfg: ExperimentConfig) -> None:
    """The files scoring on val reads, checked before any work (else an evaluation would stop after its inference, or
    inside a Ray worker): the label map and the val annotations exist, and they and the excluded timestamps (which
    are optional) read as the official evaluator reads them. Raises FileNotFoundError naming the config key and the
    path, and ValueError naming the file and line the official reader cannot read."""
    annotations = cfg.data.annotation_dir
    for key, what in (("label_map", "label map"), ("val_annotations", "val annotations")):
        path = annotations / getattr(cfg.data, key)
        if not path.is_file():
            raise FileNotFoundError(f"the {what} {path} ('data.{key}') does not exist")
    exclusions = annotations / cfg.data.exclusions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scoring says them, once
        class_ids = list(read_label_map(annotations / cfg.data.label_map))
        read_boxes_csv(annotations / cfg.data.val_annotations, is_detection=False, class_ids=class_ids)
        if exclusions.exists():
            read_exclusions(exclusions)


def score_file(detections_path: Path, cfg: ExperimentConfig) -> EvalResult:
    """The frame-mAP (``eval.iou``) and per-class AP of an AVA detections CSV against the val ground truth."""
    annotations = cfg.data.annotation_dir
    exclusions = annotations / cfg.data.exclusions
    result = evaluate_files(annotations / cfg.data.label_map, annotations / cfg.data.val_annotations, detections_path,
                            exclusions if exclusions.exists() else None,
                            iou_thresholds=parse_iou_thresholds(cfg.eval.iou))
    names = distinct_class_names(read_label_map(annotations / cfg.data.label_map))
    per_class_named = {names[class_id]: ap for class_id, ap in sorted(result.per_class.items())}
    return EvalResult(mAP=float(result.mAP), per_class_named=per_class_named, detections_path=detections_path,
                      num_detections=result.num_detections)


def evaluate_in_workers(model, cfg: ExperimentConfig, *, rank: int, world: int, device: torch.device,
                        out_dir: Path | None) -> EvalResult | None:
    """Periodic evaluation inside training: every worker infers a strided share of the val rows, rank 0
    gathers, writes and scores. Returns the result on rank 0 (its metrics: ``speed/eval_clips_per_s`` and
    ``speed/eval_s``, inference to score), None elsewhere."""
    import torch.distributed as dist

    start = time.perf_counter()
    class_ids = label_map_ids(cfg)
    rows, clips = [], 0
    for index, row in enumerate(iter_shard_rows(cfg.data.shards_path, "val")):
        clips += 1
        if index % world == rank:
            rows.append(row)
    part = detect_clips(model, rows, cfg, class_ids, device)
    parts = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    model.train()
    if rank != 0:
        return None
    result = score_detections(_sorted_table(parts), cfg, out_dir)
    result.metrics = eval_speed(clips, time.perf_counter() - start)
    return result


def eval_speed(clips: int, seconds: float) -> dict[str, float]:
    """The evaluation's throughput metrics: clips inferred and scored per second, and its seconds."""
    return {"speed/eval_clips_per_s": clips / seconds, "speed/eval_s": seconds}


class ClipDetector:
    """Ray Data actor: builds the model once from the driver's weights, then turns batches of shard rows into
    detection rows."""

    def __init__(self, experiment: dict[str, Any], start: StartingWeights | ray.ObjectRef):
        reuse_freed_memory()
        self.cfg = ExperimentConfig.model_validate(experiment)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        start = ray.get(start) if isinstance(start, ray.ObjectRef) else start
        self.model = build_model(self.cfg.model, start).to(self.device).eval()
        self.class_ids = label_map_ids(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{name: values[i] for name, values in batch.items()} for i in range(len(batch["video_id"]))]
        return detect_clips(self.model, rows, self.cfg, self.class_ids, self.device)


def evaluate(cfg: ExperimentConfig, checkpoint: str | None = None, *, out_dir: Path | None = None,
             job_run: JobRun | None = None) -> EvalResult:
    """``evadlab evaluate``: cluster-scale inference on the val shards with ``eval.concurrency`` actors.

    Before Ray starts: the val shards must be completely prepared (UnpreparedDataError), the label map and val
    annotations exist (FileNotFoundError) and the folder of ``out_dir`` be writable (OSError); the MLflow server must
    answer (TrackingError), unless ``job_run`` names the run of the job this evaluation is part of; ``checkpoint`` (else
    ``model.checkpoint``: a path, a storage URI, ``runs:/`` or ``models:/``) is read once and checked against the
    configured model (ValueError without one, CheckpointError for one that cannot be read or does not fit); then Ray
    starts and must be able to hold the ``eval.concurrency`` actors (ConfigError, :func:`require_room_for_evaluation`);
    then the evaluation's own MLflow run is created, with the val shards as its dataset. The actors get the weights
    from the object store. The result is printed, with where the detections are, before it is logged; records a lost
    tracking server could not take wait in ``out_dir`` (see :class:`RunLogger`).
    """
    manifest = require_prepared(cfg, ("val",))
    require_evaluation_files(cfg)
    location = checkpoint or cfg.model.checkpoint
    if not location:
        raise ValueError("evaluate needs a checkpoint: pass --checkpoint or set model.checkpoint")
    out_dir = out_dir or cfg.run_dir / f"evaluate_{time.strftime('%Y%m%d-%H%M%S')}"
    require_writable_folder(out_dir.parent, "output_dir")
    if cfg.tracking.enabled and job_run is None:
        check_tracking_uri(cfg.tracking.resolved_uri())
    start_weights = complete_checkpoint(cfg.model, location, cfg.tracking.resolved_uri())
    build_model(cfg.model, start_weights, device="meta")
    ensure_ray()
    require_room_for_evaluation(cfg)
    job_run = job_run or own_run(cfg, location, manifest)
    logger = RunLogger(cfg.tracking.resolved_uri(), job_run.run_id, backlog=str(out_dir), retry_s=0.0) \
        if job_run else None
    try:
        result = infer_and_score(cfg, start_weights, out_dir, manifest["counts"]["val"])
    except BaseException:
        if logger and job_run.own:
            logger.end("FAILED")
            logger.finish()
        raise
    if logger:
        log_evaluation(logger, result, job_run, epoch=start_weights.checkpoint.epoch)
        result.mlflow_run_id, result.experiment_id = job_run.run_id, job_run.experiment_id
    return result


def evaluation_of_detections(cfg: ExperimentConfig, detections: Path, out_dir: Path, job_run: JobRun | None,
                             epoch: int | None) -> EvalResult:
    """An evaluation whose inference is done: ``detections`` (a CSV written by an evaluation of the same weights,
    such as the last epoch's inside training) copied into ``out_dir``, scored, printed and logged like
    :func:`evaluate`'s (into ``job_run``, when tracking is on); no model is loaded and Ray is not used."""
    copied = out_dir / DETECTIONS_FILE
    with atomic_path(copied) as temporary:
        shutil.copyfile(detections, temporary)
    result = score_file(copied, cfg)
    result.metrics = {"val/mAP": result.mAP}
    print(f"evadlab evaluate: frame-mAP@0.5 = {result.mAP:.4f} ({result.num_detections} detection rows, inferred "
          f"by the evaluation of the same weights at {detections.parent}); detections: {result.detections_path}")
    if job_run:
        logger = RunLogger(cfg.tracking.resolved_uri(), job_run.run_id, backlog=str(out_dir), retry_s=0.0)
        log_evaluation(logger, result, job_run, epoch=epoch)
        result.mlflow_run_id, result.experiment_id = job_run.run_id, job_run.experiment_id
    return result


def infer_and_score(cfg: ExperimentConfig, start_weights: StartingWeights, out_dir: Path, clips: int) -> EvalResult:
    """Ray Data inference over the ``clips`` val keyframes (a progress bar on a terminal), the detections CSV in
    ``out_dir`` and its frame-mAP."""
    ensure_ray()
    start = time.perf_counter()
    # Blocks of one batch each: every clip is heavy, so they must spread over all actors even when the
    # shards are small.
    val_clips = read_shards(cfg.data.shards_path, "val").repartition(target_num_rows_per_block=cfg.eval.batch_size)
    with warnings.catch_warnings():
        # Ray Data passes its actors their constructor arguments (its own transformer, these weights) through the
        # object store, from where a restarted actor cannot count on them (ray-project/ray#53727), and Ray says so at
        # error level for every actor it may restart. An evaluation is cheap to rerun: its actors are not restarted.
        # max_restarts has no named parameter in Ray 2.60, whose map_batches calls the free remote args deprecated.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        detections = val_clips.map_batches(
            ClipDetector,
            fn_constructor_kwargs={"experiment": cfg.model_dump(mode="json"), "start": ray.put(start_weights)},
            batch_size=cfg.eval.batch_size, compute=ray.data.ActorPoolStrategy(size=cfg.eval.concurrency),
            num_gpus=cfg.eval.num_gpus, num_cpus=cfg.eval.cpus_per_actor, batch_format="numpy", max_restarts=0,
        )
    with progress_bar(clips, "clip", "evaluating") as bar:
        table = _sorted_table(counted(detections.iter_batches(batch_format="numpy", batch_size=None), bar))
    result = score_detections(table, cfg, out_dir)
    seconds = time.perf_counter() - start
    result.metrics = {"val/mAP": result.mAP, **eval_speed(clips, seconds)}
    print(f"evadlab evaluate: frame-mAP@0.5 = {result.mAP:.4f} on {clips} keyframes ({result.num_detections} "
          f"detection rows, {seconds:.1f} s); detections: {result.detections_path}")
    return result


def require_room_for_evaluation(cfg: ExperimentConfig) -> None:
    """Ray Data waits without a word for inference actors the cluster cannot place: its pool of ``eval.concurrency``
    actors starts all of them before the first batch. Raises ConfigError, in one line, when the cluster's nodes
    cannot hold them, each on one node (``eval.cpus_per_actor`` CPUs and ``eval.num_gpus`` GPUs each)."""
    actors = cfg.eval.concurrency
    needs = {"CPU": cfg.eval.cpus_per_actor, **({"GPU": cfg.eval.num_gpus} if cfg.eval.num_gpus else {})}
    nodes = node_resources()
    if copies_that_fit(nodes, needs) >= actors:
        return
    raise ConfigError(f"{actors} inference actor(s) (eval.concurrency) need {resources_text(needs, actors)} "
                      f"(eval.cpus_per_actor={cfg.eval.cpus_per_actor:g}, eval.num_gpus={cfg.eval.num_gpus:g} each, "
                      f"each actor on one node) but the cluster has {cluster_text(nodes, needs)}: lower "
                      f"eval.concurrency, eval.cpus_per_actor or eval.num_gpus, or add nodes")


def counted(batches: Iterable[dict[str, np.ndarray]], bar) -> Iterator[dict[str, np.ndarray]]:
    """The detection batches, each advancing ``bar`` by its keyframes."""
    for batch in batches:
        bar.update(len(set(zip(batch["video_id"].tolist(), batch["timestamp"].tolist()))))
        yield batch


def own_run(cfg: ExperimentConfig, checkpoint: str, manifest: dict[str, Any]) -> JobRun | None:
    """A new MLflow run for a stand-alone evaluation, with the val shards as its dataset; None without tracking."""
    if not cfg.tracking.enabled:
        return None
    name = f"evaluate_{Path(checkpoint).stem}"
    run_id = start_run(cfg, run_name=name, tags={"evadlab.job": "evaluate", "evadlab.checkpoint": checkpoint})
    RunLogger(cfg.tracking.resolved_uri(), run_id).log_datasets(shard_datasets(cfg, manifest, {"val": "evaluation"}))
    return JobRun(run_id, name, experiment_of(cfg.tracking.resolved_uri(), run_id), step=0, own=True)


def log_evaluation(logger: RunLogger, result: EvalResult, job_run: JobRun, epoch: int | None) -> None:
    """The metrics at the run's step, the per-class AP (titled with the run, the checkpoint's epoch and the mAP) and
    the detections; a stand-alone evaluation's own run ends here."""
    metrics = {key: value for key, value in result.metrics.items() if not (job_run.has_map and key == "val/mAP")}
    logger.log_metrics(metrics, step=job_run.step)
    of_epoch = f"epoch {epoch + 1}, " if epoch is not None else ""
    title = f"{job_run.name}: {of_epoch}step {job_run.step}, frame-mAP@0.5 {result.mAP:.4f}"
    log_per_class_ap(logger, result.per_class_named, title, prefix="eval_")
    logger.log_artifact(result.detections_path, "evaluation")
    if job_run.own:
        logger.end()
    logger.finish()


def summary_lines(result: EvalResult, cfg: ExperimentConfig) -> list[str]:
    """What ``evadlab evaluate`` ends with (after the line with the mAP and the detections): its MLflow run and how
    to open the dashboard."""
    if not result.mlflow_run_id:
        return []
    uri = cfg.tracking.resolved_uri()
    lines = [f"  MLflow run {result.mlflow_run_id}, experiment {result.experiment_id}, at {uri}"]
    return lines + [f"  dashboard: {line}" for line in dashboard_lines(uri, result.experiment_id, result.mlflow_run_id)]
