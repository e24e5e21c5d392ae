"""Cluster-scale evaluation with Ray Data actors: detections CSV, frame-mAP, MLflow, actor-count invariance."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from tracking_server import free_port, start_mlflow_server, stop_server

from evadlab.config import load_config
from evadlab.models.checkpoints import CheckpointError, save_training_checkpoint
from evadlab.pipelines.ava import read_annotations
from evadlab.pipelines.ava_map import evaluate_files
from evadlab.pipelines.prepare import prepare
from evadlab.platform.evaluate import JobRun, evaluate, summary_lines
from evadlab.platform.modeling import build_model
from evadlab.platform.tracking import BACKLOG_FILE

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def split_val_shards(folder: Path) -> None:
    """Each val shard in two files, so that two actors really share the work (one file is one Ray block)."""
    for shard in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(shard)
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), shard.with_name(f"{shard.stem}-a.parquet"))
        pq.write_table(table.slice(half), shard.with_name(f"{shard.stem}-b.parquet"))
        shard.unlink()


@pytest.fixture(scope="module")
def evaluation_setup(tmp_path_factory, mini_ava, ray_local):
    folder = tmp_path_factory.mktemp("inference")
    cfg = load_config(QUICKSTART, [f"data.root={mini_ava}", f"data.shards={folder / 'shards'}",
                                   f"output_dir={folder / 'runs'}", "model.act_fc_dim=64"])
    prepare(cfg)
    split_val_shards(cfg.data.shards_path / "val")
    torch.manual_seed(0)
    checkpoint = folder / "model.pt"
    save_training_checkpoint(checkpoint, model_state=build_model(cfg.model).state_dict(), optimizer_state={},
                             epoch=0, config_yaml="")
    return folder, cfg, checkpoint


def test_detections_do_not_depend_on_the_number_of_actors(evaluation_setup, mlflow_server):
    folder, cfg, checkpoint = evaluation_setup
    texts = {}
    for actors in (1, 2):
        run_cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"concurrency": actors, "batch_size": 3,
                                                                        "cpus_per_actor": 0.5}),
                                         "tracking": cfg.tracking.model_copy(update={"uri": mlflow_server})})
        result = evaluate(run_cfg, str(checkpoint), out_dir=folder / f"actors_{actors}")
        texts[actors] = result.detections_path.read_text()
        assert 0.0 <= result.mAP <= 1.0
    assert texts[1] == texts[2]

    lines = texts[1].splitlines()
    _video, second, x1, _y1, _x2, _y2, _action, score = lines[0].split(",")
    assert len(second) == 4 and len(x1.split(".")[1]) == 3 and 0 <= float(score) <= 1
    val, _ = read_annotations(cfg.data.annotation_dir / cfg.data.val_annotations)
    keyframes = {(v, t) for v, t in zip(val["video_id"].to_pylist(), val["timestamp"].to_pylist())}
    assert {(line.split(",")[0], int(line.split(",")[1])) for line in lines} == keyframes
    rescored = evaluate_files(cfg.data.annotation_dir / cfg.data.label_map,
                              cfg.data.annotation_dir / cfg.data.val_annotations, result.detections_path,
                              cfg.data.annotation_dir / cfg.data.exclusions)
    assert rescored.mAP == pytest.approx(result.mAP, abs=1e-12)

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment_name).experiment_id])
    assert len(runs) == 2
    assert runs[0].data.metrics["val/mAP"] == pytest.approx(result.mAP)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"eval_per_class_ap.csv", "eval_per_class_ap.png", "evaluation"} <= artifacts
    inputs = client.get_run(runs[0].info.run_id).inputs.dataset_inputs
    expected = [(f"{cfg.data.root_path.name}/val", ["evaluation"])]
    assert [(i.dataset.name, [t.value for t in i.tags]) for i in inputs] == expected, "the val shards as its dataset"
    assert result.mlflow_run_id == runs[0].info.run_id
    assert any(runs[0].info.run_id in line for line in summary_lines(result, run_cfg))


def test_evaluate_names_a_missing_checkpoint(evaluation_setup):
    _, cfg, _ = evaluation_setup
    with pytest.raises(CheckpointError, match="checkpoint does_not_exist.pt does not exist"):
        evaluate(cfg, "does_not_exist.pt")



def test_a_finished_evaluation_is_kept_when_the_tracking_server_went_away(evaluation_setup, tmp_path, capsys):
    """As in `evadlab run` when the server is lost during training: the evaluation logs into the job's run, finds the
    server gone, and still returns, prints and keeps its result; the records wait in its folder for a replay."""
    _folder, cfg, checkpoint = evaluation_setup
    server, uri = start_mlflow_server(tmp_path / "mlflow", free_port())
    experiment_id = MlflowClient(uri).create_experiment("lost")
    run_id = MlflowClient(uri).create_run(experiment_id).info.run_id
    stop_server(server)
    run_cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": uri})})
    result = evaluate(run_cfg, str(checkpoint), out_dir=tmp_path / "evaluation",
                      job_run=JobRun(run_id, "lost", experiment_id, step=7))

    assert result.detections_path.stat().st_size > 0
    captured = capsys.readouterr()
    assert f"frame-mAP@0.5 = {result.mAP:.4f}" in captured.out and str(result.detections_path) in captured.out
    backlog = tmp_path / "evaluation" / BACKLOG_FILE
    assert f"`evadlab tracking replay {backlog}`" in captured.err
    records = [json.loads(line) for line in backlog.read_text().splitlines()]
    assert records[0]["kind"] == "metrics" and records[0]["metrics"]["val/mAP"] == result.mAP
    assert records[0]["step"] == 7, "a job's evaluation logs at the job's step"
    kept = sorted(Path(r["path"]).name for r in records if r["kind"] == "artifact")
    assert kept == ["detections.csv", "eval_per_class_ap.csv", "eval_per_class_ap.png"]
    assert all(Path(r["path"]).is_file() for r in records if r["kind"] == "artifact")
