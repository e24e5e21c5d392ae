"""What the MLflow dashboard shows of evadlab's runs, against a real `mlflow server`: logged models (created once,
the newest best replacing the older, readable as `models:/<id>`, kept through an outage), the prepared shards as
dataset inputs, the saved view of the trade-off, the links the commands print, and system metrics keyed by node."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tracking_server import free_port

from evadlab.config import load_config
from evadlab.models.checkpoints import save_training_checkpoint
from evadlab.platform.modeling import open_checkpoint
from evadlab.platform.tracking import (
    BACKLOG_FILE,
    HTTP_SETTINGS,
    VIEW_TAG,
    RunLogger,
    check_tracking_uri,
    dashboard_lines,
    read_backlog,
    replay_backlog,
    send_records,
    shard_datasets,
    start_run,
    start_system_metrics,
)

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture
def run(mlflow_server, tmp_path) -> tuple[MlflowClient, str, str]:
    """A fresh MLflow run: (client, experiment id, run id)."""
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"dashboard_{tmp_path.name}")
    return client, experiment_id, client.create_run(experiment_id).info.run_id


def model_folder(folder: Path, name: str, value: float) -> Path:
    """A folder holding one small self-describing checkpoint whose weight is ``value``."""
    folder.mkdir(parents=True)
    save_training_checkpoint(folder / name, model_state={"w": torch.full((2,), value)}, optimizer_state={}, epoch=0,
                             config_yaml="name: test\n")
    (folder / "config.yaml").write_text("name: test\n")
    return folder


def models_of(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    return list(client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"))


def test_a_logged_model_is_created_once_and_a_newer_best_replaces_it(run, mlflow_server, tmp_path):
    client, experiment_id, run_id = run
    logger = RunLogger(mlflow_server, run_id)
    timestamp = 1_700_000_000_000
    logger.log_metrics({"val/mAP": 0.25}, step=5, timestamp=timestamp)
    logger.log_model(model_folder(tmp_path / "best_a", "best_model.pt", 1.0), "best", step=5,
                     params={"model.keep_rate": 0.7}, tags={"evadlab.model": "best"},
                     metrics={"val/mAP": {"value": 0.25, "step": 5, "timestamp": timestamp}})
    (first,) = models_of(client, experiment_id, run_id)
    assert first.name == "best" and first.params["model.keep_rate"] == "0.7"
    assert [(m.key, m.value, m.step) for m in first.metrics] == [("val/mAP", 0.25, 5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/mAP")] == [(5, 0.25)], \
        "the model's metric is the run's point, not a second one"

    record = {"uri": mlflow_server, "run_id": run_id, "kind": "model", "path": str(tmp_path / "best_a"),
              "name": "best", "step": 5, "params": {}, "tags": {}, "metrics": {},
              "record_id": first.tags["evadlab.record_id"]}
    send_records(client, [record])
    assert [m.model_id for m in models_of(client, experiment_id, run_id)] == [first.model_id], "sent twice, made once"

    logger.log_model(model_folder(tmp_path / "best_b", "best_model.pt", 2.0), "best", step=9, params={}, tags={},
                     metrics={})
    (second,) = models_of(client, experiment_id, run_id)
    assert second.model_id != first.model_id
    assert [(o.model_id, o.step) for o in client.get_run(run_id).outputs.model_outputs if o.model_id == second.model_id
            ] == [(second.model_id, 9)]
    checkpoint = open_checkpoint(f"models:/{second.model_id}", mlflow_server)
    assert torch.equal(checkpoint.weights["w"], torch.full((2,), 2.0))


def test_a_model_logged_while_the_server_is_away_is_created_by_the_replay(run, mlflow_server, tmp_path):
    client, experiment_id, run_id = run
    away = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger(away, run_id, backlog=str(tmp_path / "run"), retry_s=0.0)
    logger.log_model(model_folder(tmp_path / "final", "final_model.pt", 3.0), "final", step=12, params={}, tags={},
                     metrics={})
    logger.finish()
    (record,) = read_backlog(tmp_path / "run" / BACKLOG_FILE)
    assert record["kind"] == "model" and Path(record["path"], "final_model.pt").is_file(), "the folder is kept"

    assert replay_backlog(tmp_path / "run", tracking_uri=mlflow_server) == 1
    (model,) = models_of(client, experiment_id, run_id)
    assert model.name == "final" and model.status.to_proto() == model.status.READY.to_proto()
    assert torch.equal(open_checkpoint(f"models:/{model.model_id}", mlflow_server).weights["w"],
                       torch.full((2,), 3.0))
    assert not (tmp_path / "run" / "mlflow_backlog_artifacts").exists()


def test_the_prepared_shards_are_the_runs_datasets(run, mlflow_server, tmp_path):
    client, _, run_id = run
    cfg = load_config(QUICKSTART, [f"data.root={tmp_path / 'my_ava'}"])
    manifest = {"clip_spec": cfg.data.clip_spec, "clip_spec_name": cfg.data.clip_spec_name,
                "counts": {"train": 30, "val": 12}, "videos": {"train": {"a": 10, "b": 20}, "val": {"c": 12}},
                "sources": {"videos": {"train/a": {"path": "a.mp4", "bytes": 1}, "train/b": {"path": "b.mp4",
                                                                                           "bytes": 2},
                                       "val/c": {"path": "c.mp4", "bytes": 3}}}}
    records = shard_datasets(cfg, manifest, {"train": "training", "val": "evaluation"})
    logger = RunLogger(mlflow_server, run_id)
    logger.log_datasets(records)
    logger.log_datasets(records)

    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert sorted((i.dataset.name, i.tags[0].value) for i in inputs) == [("my_ava/train", "training"),
                                                                        ("my_ava/val", "evaluation")]
    train = next(i.dataset for i in inputs if i.dataset.name == "my_ava/train")
    assert json.loads(train.profile)["keyframes"] == 30
    assert json.loads(train.profile)["keyframes_per_split"] == {"train": 30, "val": 12}
    assert json.loads(train.source)["uri"] == str(cfg.data.shards_path / "train")
    again = shard_datasets(cfg, json.loads(json.dumps(manifest)), {"train": "training"})
    assert again[0]["digest"] == train.digest, "the same shards have the same digest"
    manifest["sources"]["videos"]["train/a"]["modified_ns"] = 123
    assert shard_datasets(cfg, manifest, {"train": "training"})[0]["digest"] == train.digest, "copied, not changed"
    manifest["videos"]["train"]["b"] = 19
    assert shard_datasets(cfg, manifest, {"train": "training"})[0]["digest"] != train.digest


def test_every_experiment_gets_the_saved_view_of_the_trade_off(mlflow_server, tmp_path):
    cfg = load_config(QUICKSTART, [f"tracking.uri={mlflow_server}", "tracking.experiment=saved_view"])
    run_id = start_run(cfg, run_name="with_view")
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    view = json.loads(experiment.tags[VIEW_TAG])
    state = json.loads(view["state"])
    assert {"metrics.`val/mAP`", "metrics.`model/gflops`", "params.`model.keep_rate`",
            "params.`model.enhanced_weight`", "attributes.`Models`"} <= set(
        state["selectedColumns"])
    parallel = next(chart for chart in state["compareRunCharts"] if chart["type"] == "PARALLEL")
    assert parallel["selectedParams"] == ["model.keep_rate", "model.enhanced_weight"]
    assert parallel["selectedMetrics"] == ["model/gflops", "val/mAP"]
    sections = {section["uuid"] for section in state["compareRunSections"]}
    assert {chart["metricSectionId"] for chart in state["compareRunCharts"]} <= sections
    start_run(cfg, run_name="again")
    assert client.get_experiment(experiment.experiment_id).tags[VIEW_TAG] == experiment.tags[VIEW_TAG]


def test_the_first_run_creates_a_new_sqlite_store_and_its_folder(tmp_path):
    """The default store (SQLite): the tracking check creates nothing, the first run creates the folder and the
    database."""
    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    cfg = load_config(QUICKSTART, [f"tracking.uri={uri}", "tracking.experiment=local"])
    check_tracking_uri(uri)
    assert list(tmp_path.iterdir()) == []
    run_id = start_run(cfg, run_name="first")
    assert MlflowClient(uri).get_run(run_id).info.run_name == "first"
    check_tracking_uri(uri, read_only=True)  # now an MLflow database, as a reader requires


def test_the_dashboard_links_open_the_training_view():
    served = dashboard_lines("http://mlflow.example:5000/", "3", "abc")
    assert served == [("http://mlflow.example:5000/#/experiments/3/runs?workflowType=machine_learning"
                       "&viewStateShareKey=evadlab"),
                      "http://mlflow.example:5000/#/experiments/3/runs/abc?workflowType=machine_learning"]
    local = dashboard_lines("sqlite:////data/mlflow.db", "1")
    assert local == ["mlflow ui --backend-store-uri sqlite:////data/mlflow.db",
                     ("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
                      "&viewStateShareKey=evadlab")]


def test_system_metrics_are_keyed_by_node(run, mlflow_server, monkeypatch):
    client, _, run_id = run
    for name, value in HTTP_SETTINGS.items():  # start_system_metrics sets them for the process; undone afterwards
        monkeypatch.setenv(name, os.environ.get(name, value))
    monitor = start_system_metrics(RunLogger(mlflow_server, run_id), "node3", interval_s=0.2)
    time.sleep(1.5)
    monitor.finish()
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/node3/cpu_utilization_percentage", "system/node3/system_memory_usage_megabytes"} <= keys
    steps = [m.step for m in client.get_metric_history(run_id, "system/node3/cpu_utilization_percentage")]
    assert steps == sorted(set(steps)) and steps[0] == 0
