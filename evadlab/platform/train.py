"""Distributed EVAD training on Ray Train (V2): one ``TorchTrainer``, ``train.num_workers`` DDP workers.

Read it top to bottom: ``train`` (driver) sets up the run and MLflow, ``train_loop_per_worker`` is the loop
every worker runs. The recipe (optimiser groups, LR schedule) follows the released EVAD code (spec section 4).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from evadlab.config import ExperimentConfig, TrainConfig
from evadlab.models.checkpoints import load_training_checkpoint, save_training_checkpoint
from evadlab.models.flops import flops_report
from evadlab.pipelines.clips import decode_clip, multi_hot, read_shards, to_model_input
from evadlab.platform.evaluate import evaluate_in_workers
from evadlab.platform.modeling import build_model
from evadlab.ray_session import ensure_ray
from evadlab.platform.tracking import RunLogger, check_tracking_uri, log_per_class_ap, start_run

CHECKPOINT_FILE = "checkpoint.pt"
MLFLOW_RUN_FILE = "mlflow_run_id"


@dataclass
class TrainResult:
    run_name: str
    run_path: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]
    checkpoint_path: str | None
    gflops: float


# --------------------------------------------------------------------------------------- recipe
def parameter_groups(model: torch.nn.Module, train_cfg: TrainConfig) -> list[dict[str, Any]]:
    """Four AdamW groups as the released optimizer: no weight decay on 1-D parameters, biases and the mask
    token; ``head_lr_scale`` on ``det_head.*`` (the FPN and the proposals are not part of it)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("module.")
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "mask_token" in name or "pos_embed" in name
        groups.setdefault((no_decay, name.startswith("det_head.")), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else train_cfg.weight_decay,
         "lr_scale": train_cfg.head_lr_scale if in_head else 1.0}
        for (no_decay, in_head), params in sorted(groups.items())
    ]


def learning_rate(epoch: float, train_cfg: TrainConfig) -> float:
    """Linear warm-up from ``warmup_start_lr``, then the relative steps, at a fractional epoch."""
    step_lr = train_cfg.base_lr * train_cfg.lr_factors[
        max(i for i, start in enumerate(train_cfg.lr_steps) if epoch >= start or i == 0)
    ]
    if epoch < train_cfg.warmup_epochs:
        end = train_cfg.base_lr * train_cfg.lr_factors[0]
        return train_cfg.warmup_start_lr + epoch * (end - train_cfg.warmup_start_lr) / train_cfg.warmup_epochs
    return step_lr


# --------------------------------------------------------------------------------------- input
def decode_training_row(row: dict[str, Any], flip_prob: float) -> dict[str, Any]:
    """Runs in Ray Data's CPU pool: JPEG decode and the random horizontal flip."""
    frames, boxes = decode_clip(row, flip=bool(np.random.default_rng().random() < flip_prob))
    return {"frames": frames, "boxes": boxes, "actions": multi_hot(row["actions"]),
            "video_id": row["video_id"], "timestamp": int(row["timestamp"])}


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Ray's default split (``equal=True``) drops the remainder rows to give every worker the same count.
    Equal splits are kept when nothing is lost; otherwise the split is uneven and ``epoch_batches`` keeps the
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


def epoch_batches(shard, batch_size: int, device: torch.device, cfg: ExperimentConfig) -> Iterator[tuple[dict, float]]:
    """Yields ``(batch, loss_scale)``. Workers may hold one batch more than others; a worker that has run out
    repeats its last batch with scale 0 so DDP's collectives stay matched, and the active workers scale their
    loss by world/active so the gradient is the mean over the samples actually present."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                      local_shuffle_buffer_size=4 * batch_size, drop_last=False))
    previous = None
    while True:
        numpy_batch = next(batches, None)
        has_batch = numpy_batch is not None
        active = has_batch
        if world > 1:
            flag = torch.tensor([float(has_batch)], device=device)
            dist.all_reduce(flag)
            active = int(flag.item())
        if not active:
            return
        if has_batch:
            previous = _to_model_batch(numpy_batch, device, cfg)
            yield previous, world / active
        else:
            yield previous, 0.0


def _to_model_batch(numpy_batch: dict[str, np.ndarray], device: torch.device, cfg: ExperimentConfig) -> dict:
    clips = [to_model_input(frames, cfg.data.mean, cfg.data.std).to(device) for frames in numpy_batch["frames"]]
    targets = [{"boxes": torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4), device=device),
                "actions": torch.as_tensor(np.asarray(actions, np.float32).reshape(-1, 80), device=device)}
               for boxes, actions in zip(numpy_batch["boxes"], numpy_batch["actions"])]
    keys = [(str(v), int(t)) for v, t in zip(numpy_batch["video_id"], numpy_batch["timestamp"])]
    return {"clips": clips, "targets": targets, "keys": keys}


# --------------------------------------------------------------------------------------- worker loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.train), lr=cfg.train.base_lr, betas=(0.9, 0.999))
    start_epoch, best_map, last_map, global_step = 0, -1.0, None, 0
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as folder:
            state = load_training_checkpoint(Path(folder) / CHECKPOINT_FILE)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        start_epoch = state["epoch"] + 1
        best_map, last_map, global_step = state["extra"]["best_map"], state["extra"]["last_map"], state["extra"]["step"]
    model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
    core_model = model.module if hasattr(model, "module") else model

    logger = RunLogger(**loop_config["mlflow"]) if rank == 0 and loop_config["mlflow"] else None
    if logger and not restored:
        logger.log_metrics(loop_config["model_metrics"], step=0)
    shard = ray.train.get_dataset_shard("train")
    amp = cfg.train.amp and device.type == "cuda"
    samples_per_epoch = loop_config["train_rows"]

    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        seen: list[tuple[str, int]] = []
        epoch_start, clips_done, loss_sums = time.perf_counter(), 0, {}
        for micro_step, (batch, loss_scale) in enumerate(epoch_batches(shard, cfg.train.batch_size, device, cfg)):
            fraction = min(len(seen) * world / max(samples_per_epoch, 1), 1.0)
            lr = learning_rate(epoch + fraction, cfg.train)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            finishes_step = (micro_step + 1) % cfg.train.grad_accum == 0
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                sync = model.no_sync() if world > 1 and not finishes_step else contextlib.nullcontext()
                with sync:
                    losses = model(batch["clips"], batch["targets"])
                    (losses["loss"] * loss_scale / cfg.train.grad_accum).backward()
            if loss_scale > 0:
                seen += batch["keys"]
                clips_done += len(batch["keys"])
                for key, value in losses.items():
                    loss_sums[key] = loss_sums.get(key, 0.0) + float(value.detach())
            if finishes_step:
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                _maybe_inject_failure(cfg, epoch, rank, loop_config["run_path"])
                if logger and global_step % cfg.train.log_every == 0:
                    logger.log_metrics({f"train/{k}": v for k, v in losses.items()} | {"train/lr": lr}, global_step)
        if (micro_step + 1) % cfg.train.grad_accum:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - epoch_start
        epoch_metrics = {"epoch": epoch, "train/clips_per_s": clips_done * world / elapsed,
                         **{f"train/epoch_{k}": v / max(micro_step + 1, 1) for k, v in loss_sums.items()}}
        _record_seen(loop_config, epoch, rank, seen)

        if _should_evaluate(cfg, epoch):
            result = evaluate_in_workers(core_model, cfg, rank=rank, world=world, device=device,
                                         out_dir=Path(loop_config["run_path"]) / f"eval_epoch_{epoch}" if rank == 0 else None)
            if result is not None:
                last_map = result.mAP
                if logger:
                    log_per_class_ap(logger, result.per_class_named, prefix=f"epoch_{epoch:03d}_")
                if result.mAP > best_map:
                    best_map = result.mAP
                    if logger:
                        _log_best_model(logger, core_model, epoch, result.mAP)
        epoch_metrics["best/mAP"] = best_map
        if last_map is not None:
            epoch_metrics["val/mAP"] = last_map
        if logger:
            logger.log_metrics(epoch_metrics, global_step)
        # Tune (and its schedulers) need the metric in every report: 0 until the first evaluation.
        _report({"val/mAP": 0.0, **epoch_metrics}, core_model, optimizer, epoch, cfg, rank,
                extra={"best_map": best_map, "last_map": last_map, "step": global_step})


def _should_evaluate(cfg: ExperimentConfig, epoch: int) -> bool:
    every = cfg.eval.every_epochs
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == cfg.train.epochs)


def _report(metrics, model, optimizer, epoch, cfg, rank, extra) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (the weights are identical on all ranks)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_training_checkpoint(Path(folder) / CHECKPOINT_FILE, model_state=model.state_dict(),
                                 optimizer_state=optimizer.state_dict(), epoch=epoch,
                                 config_yaml=_config_yaml(cfg), extra=extra)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _config_yaml(cfg: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _log_best_model(logger: RunLogger, model, epoch: int, mAP: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best_model.pt"
        torch.save({"model_state": model.state_dict(), "epoch": epoch, "mAP": mAP}, path)
        logger.log_artifact(path, "checkpoints")
    logger.set_tags({"evadlab.best_epoch": str(epoch)})


def _maybe_inject_failure(cfg: ExperimentConfig, epoch: int, rank: int, run_path: str) -> None:
    """Test switch ``train.fail_at_epoch``: the last worker dies once, after an optimiser step of that epoch,
    like a lost node."""
    if cfg.train.fail_at_epoch != epoch or rank != ray.train.get_context().get_world_size() - 1:
        return
    marker = Path(run_path) / f"failure_injected_epoch_{epoch}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("worker killed on purpose by train.fail_at_epoch\n")
    os._exit(1)


def _record_seen(loop_config: dict, epoch: int, rank: int, seen: list[tuple[str, int]]) -> None:
    """Writes which keyframes this worker trained on, so 'every sample exactly once per epoch' is checkable."""
    folder = Path(loop_config["run_path"]) / "samples_seen"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"epoch_{epoch:03d}_rank_{rank}.txt").write_text("".join(f"{v},{t}\n" for v, t in seen))


# --------------------------------------------------------------------------------------- driver
def _run_name(cfg: ExperimentConfig, storage: str) -> str:
    """A new run gets a fresh name; ``train.resume`` continues the newest run of this config."""
    if cfg.train.resume:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
        infos = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        previous = sorted(i.base_name for i in infos
                          if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(f"{cfg.name}_"))
        if previous:
            return previous[-1]
        print(f"train.resume: no earlier run of '{cfg.name}' under {storage}; starting a new one")
    return f"{cfg.name}_{time.strftime('%Y%m%d-%H%M%S')}"


def _storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _read_run_file(storage: str, run_name: str) -> str | None:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    try:
        with filesystem.open_input_stream(f"{root}/{run_name}/{MLFLOW_RUN_FILE}") as stream:
            return stream.read().decode().strip()
    except (FileNotFoundError, OSError):
        return None


def _write_run_file(storage: str, run_name: str, run_id: str) -> None:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    filesystem.create_dir(f"{root}/{run_name}", recursive=True)
    with filesystem.open_output_stream(f"{root}/{run_name}/{MLFLOW_RUN_FILE}") as stream:
        stream.write(run_id.encode())


def train(cfg: ExperimentConfig, *, parent_run_id: str | None = None, callbacks: list | None = None) -> TrainResult:
    """``evadlab train``: fit EVAD on the prepared train shards, evaluating on val as configured."""
    shards = cfg.data.shards_path
    if not (shards / "manifest.json").exists():
        raise FileNotFoundError(f"no prepared shards at {shards}; run 'evadlab prepare' first")
    tracking_uri = cfg.tracking.resolved_uri()
    if cfg.tracking.enabled:
        check_tracking_uri(tracking_uri)
    storage = _storage_uri(cfg.train.storage_path)
    run_name = _run_name(cfg, storage)
    run_path = f"{storage}/{run_name}"

    report = flops_report(cfg.model.evad, (cfg.model.num_frames, cfg.data.short_side, cfg.data.short_side))
    model_metrics = {"model/gflops": report["gflops_16x288x288"], "model/gflops_input": report["gflops"],
                     "model/params": report["params"]}
    mlflow_run_id = ""
    if cfg.tracking.enabled:
        mlflow_run_id = _read_run_file(storage, run_name) or ""
        if not mlflow_run_id:
            mlflow_run_id = start_run(cfg, run_name=run_name, parent_run_id=parent_run_id)
            _write_run_file(storage, run_name, mlflow_run_id)
        logger = RunLogger(tracking_uri, mlflow_run_id)
        logger.set_tags({"evadlab.gflops": f"{report['gflops_16x288x288']:.1f}", "evadlab.run_path": run_path})
        logger.log_text(_config_yaml(cfg), "config.yaml")
    print(f"evadlab train: run {run_name} ({report['gflops_16x288x288']:.1f} GFLOPs at 16x288x288, "
          f"{report['params'] / 1e6:.2f} M parameters), MLflow run {mlflow_run_id or 'disabled'}")

    ensure_ray()
    _check_cpus_left_for_data(cfg)
    train_rows = _count_rows(shards, "train")
    train_dataset = read_shards(shards, "train").randomize_block_order().repartition(
        target_num_rows_per_block=cfg.train.batch_size).map(
        decode_training_row, fn_kwargs={"flip_prob": cfg.data.flip_prob})
    # The ingest re-runs every epoch in every worker; its progress bars would drown the training log.
    train_dataset.context.enable_progress_bars = False
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "mlflow": {"uri": tracking_uri, "run_id": mlflow_run_id} if mlflow_run_id else None,
            "model_metrics": model_metrics,
            "run_path": str(Path(cfg.run_dir).resolve() / run_name) if "://" in storage else run_path,
            "train_rows": train_rows,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": train_dataset},
        dataset_config=ExactlyOnceDataConfig(train_rows),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    checkpoint_path = None
    if result.checkpoint is not None:
        checkpoint_path = f"{result.checkpoint.path}/{CHECKPOINT_FILE}"
    if cfg.tracking.enabled:
        logger = RunLogger(tracking_uri, mlflow_run_id)
        if checkpoint_path and "://" not in checkpoint_path:
            logger.log_artifact(checkpoint_path, "checkpoints")
        logger.end()
    return TrainResult(run_name=run_name, run_path=run_path, mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                       metrics=metrics, checkpoint_path=checkpoint_path, gflops=report["gflops_16x288x288"])


def _check_cpus_left_for_data(cfg: ExperimentConfig) -> None:
    """Ray Data's decode tasks each need a whole CPU next to the workers; without one the run waits forever.
    A warning, not an error: CPUs held by a job that is just ending come back a moment later."""
    free = ray.available_resources().get("CPU", 0.0)
    left = free - cfg.train.num_workers * cfg.train.cpus_per_worker
    if left < 1:
        print(f"evadlab train: warning: {cfg.train.num_workers} worker(s) x train.cpus_per_worker="
              f"{cfg.train.cpus_per_worker} leave {left:.2f} of {free:.2f} free CPUs for Ray Data's decoding, which "
              f"needs at least 1; if training does not start, lower train.cpus_per_worker", file=sys.stderr)


def _count_rows(shards: Path, split: str) -> int:
    manifest = json.loads((shards / "manifest.json").read_text())
    return int(manifest["counts"][split])
