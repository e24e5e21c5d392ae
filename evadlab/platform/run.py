"""``evadlab run``: the main job, from (synthetic) AVA to a scored, tracked model in one command."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evadlab.config import ExperimentConfig
from evadlab.storage import require_writable_folder, write_text


def run_main_job(cfg: ExperimentConfig) -> dict:
    """Synth (if the data root is missing and the config asks for synthetic data) -> prepare (skipped when a complete
    prepare of this clip spec exists, resumed when one was interrupted) -> train -> evaluate (the last epoch's
    evaluation inside training when there was one, else Ray Data inference on the final checkpoint), then a summary and
    ``summary.json``. Nothing is written before the MLflow server has answered and the starting weights (if any) have
    been read and checked. The final evaluation logs into the training's MLflow run at its final step."""
    from evadlab.platform.evaluate import JobRun, evaluate, evaluation_of_detections, require_evaluation_files
    from evadlab.platform.modeling import build_model, starting_weights
    from evadlab.platform.tracking import check_tracking_uri
    from evadlab.platform.train import count_model, should_evaluate, train
    from evadlab.ray_session import ensure_ray

    start = time.perf_counter()
    require_writable_folder(cfg.run_dir, "output_dir")
    require_writable_outputs(cfg)
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.resolved_uri())
    weights = starting_weights(cfg.model, cfg.tracking.resolved_uri())
    build_model(cfg.model, weights, device="meta")
    require_data_source(cfg)
    # Ray starts (~4 s, mostly waiting for its processes) while other threads count the model's FLOPs (~2 s of
    # Python) and synthesise the data. Ray starts in this thread: its local processes die with the thread that
    # started them (PR_SET_PDEATHSIG), and only the main thread gets its SIGTERM handler. Prepare runs here too, so
    # that Ctrl-C stops it at once.
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = pool.submit(count_model, cfg)
        synthesised = pool.submit(synthesise_if_needed, cfg)
        ensure_ray()
        require_room_for_final_evaluation(cfg)
        synthesised.result()
        require_evaluation_files(cfg)
        ensure_prepared(cfg)
        flops = counted.result()
    print("[3/4] train")
    trained = train(cfg, start=weights, flops=flops)
    if trained.checkpoint_path is None:
        raise RuntimeError("training reported no checkpoint")
    print("[4/4] evaluate")
    job_run = JobRun(trained.mlflow_run_id, trained.run_name, trained.experiment_id, step=trained.step,
                     has_map=should_evaluate(cfg, cfg.train.epochs - 1)) if trained.mlflow_run_id else None
    out_dir = cfg.run_dir / trained.run_name / "evaluation"
    # The last epoch was evaluated inside training on the final weights: score its detections rather than infer again.
    if trained.final_detections is not None:
        result = evaluation_of_detections(cfg, trained.final_detections, out_dir, job_run, epoch=cfg.train.epochs - 1)
    else:
        result = evaluate(cfg, trained.checkpoint_path, out_dir=out_dir, job_run=job_run)
    summary = {"mAP": result.mAP, "gflops": trained.gflops, "wall_s": round(time.perf_counter() - start, 1),
               "mlflow_run_id": trained.mlflow_run_id, "tracking_uri": trained.tracking_uri,
               "experiment_id": trained.experiment_id, "checkpoint": trained.checkpoint_path,
               "models": trained.models, "detections": str(result.detections_path)}
    out_dir = (cfg.run_dir / trained.run_name).resolve()
    write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    print("\n".join(summary_lines(summary, cfg, out_dir / "summary.json")))
    return summary


def summary_lines(summary: dict, cfg: ExperimentConfig, summary_file: Path) -> list[str]:
    """What ``evadlab run`` ends with: the trade-off, what it wrote (checkpoint, logged models, detections, manifest,
    summary.json), its MLflow run and how to open the dashboard."""
    from evadlab.platform.tracking import dashboard_lines

    lines = ["", f"frame-mAP@0.5 (val, held-out videos): {summary['mAP']:.4f}",
             f"GFLOPs (16x288x288): {summary['gflops']:.1f}", f"wall time: {summary['wall_s']:.0f} s",
             f"checkpoint: {summary['checkpoint']}"]
    lines += [f"model '{name}': {uri}" for name, uri in summary["models"].items()]
    lines += [f"detections: {summary['detections']}", f"shards: {cfg.data.shards_path / 'manifest.json'}"]
    if summary["mlflow_run_id"]:
        lines.append(f"MLflow run: {summary['mlflow_run_id']}, experiment '{cfg.experiment_name}' "
                     f"({summary['experiment_id']}) at {summary['tracking_uri']}")
        lines += [f"dashboard: {line}" for line in dashboard_lines(summary["tracking_uri"], summary["experiment_id"],
                                                                  summary["mlflow_run_id"])]
    lines.append(f"summary: {summary_file}")
    return lines


def require_room_for_final_evaluation(cfg: ExperimentConfig) -> None:
    """Before the main job trains: unless its last epoch is evaluated inside training (whose detections it then
    scores), its final evaluation infers with Ray Data's actors, which the cluster must be able to hold
    (:func:`~evadlab.platform.evaluate.require_room_for_evaluation`; ConfigError)."""
    from evadlab.platform.evaluate import require_room_for_evaluation
    from evadlab.platform.train import should_evaluate

    if not should_evaluate(cfg, cfg.train.epochs - 1):
        require_room_for_evaluation(cfg)


def require_writable_outputs(cfg: ExperimentConfig) -> None:
    """The folders the main job and a sweep will write, checked before any work: ``data.root`` when the synthetic
    mini-AVA is to be written there, ``data.shards`` when they are to be prepared, and the run folder
    (:func:`~evadlab.platform.train.require_writable_run_folder`). Raises OSError naming the key and the path."""
    from evadlab.platform.train import require_writable_run_folder

    if cfg.data.synthetic and not has_annotations(cfg):
        require_writable_folder(cfg.data.root_path, "data.root")
    if not prepared_already(cfg):
        require_writable_folder(cfg.data.shards_path, "data.shards")
    require_writable_run_folder(cfg)


def has_annotations(cfg: ExperimentConfig) -> bool:
    """The generator writes the annotations last, so their presence means a complete dataset."""
    return (cfg.data.annotation_dir / cfg.data.train_annotations).is_file()


def require_data_source(cfg: ExperimentConfig) -> None:
    """Before any work: the AVA annotations exist, or the config asks for the synthetic mini-AVA (FileNotFoundError
    naming ``data.root`` otherwise); when they exist, the files scoring reads too."""
    from evadlab.platform.evaluate import require_evaluation_files

    if has_annotations(cfg):
        require_evaluation_files(cfg)
    elif not cfg.data.synthetic:
        raise FileNotFoundError(f"no AVA annotations under data.root {cfg.data.root} (set data.synthetic=true "
                                f"for the embedded mini-AVA)")


def synthesise_if_needed(cfg: ExperimentConfig) -> None:
    """Writes the synthetic mini-AVA when the annotations are missing and the config asks for it."""
    from evadlab.pipelines.synthetic import generate_mini_ava

    if has_annotations(cfg):
        print(f"[1/4] synth: AVA annotations found under {cfg.data.root}, nothing to generate")
        return
    require_data_source(cfg)
    print(f"[1/4] synth: writing the synthetic mini-AVA to {cfg.data.root}")
    generate_mini_ava(cfg.data.root_path, videos=cfg.data.synth_videos, seconds=cfg.data.synth_seconds,
                      seed=cfg.data.synth_seed, frames=cfg.data.source == "frames")


def prepared_already(cfg: ExperimentConfig) -> bool:
    """A complete prepare of both splits with this clip spec is at ``data.shards``."""
    from evadlab.pipelines.prepare import read_manifest

    manifest = read_manifest(cfg.data.shards_path)
    return bool(manifest and manifest["complete"] and manifest.get("clip_spec") == cfg.data.clip_spec
                and {"train", "val"} <= set(manifest["counts"]))


def ensure_prepared(cfg: ExperimentConfig) -> None:
    """Prepares the shards unless a complete prepare of this clip spec holds them; an interrupted prepare is resumed
    (finished videos are kept). Empty splits are left for ``train`` to refuse with their cause."""
    from evadlab.pipelines.prepare import prepare, read_manifest

    if prepared_already(cfg):
        print(f"[2/4] prepare: shards with this clip spec exist at {cfg.data.shards_path}, skipped")
        return
    manifest = read_manifest(cfg.data.shards_path)
    resuming = manifest is not None and not manifest["complete"]
    print(f"[2/4] prepare{': resuming an interrupted prepare' if resuming else ''}")
    prepare(cfg)
