"""A job does not depend on its MLflow server staying up: records it cannot send wait in a backlog in the run folder,
go out when the server answers again, and `evadlab tracking replay` sends what a finished job left. Real
`mlflow server` processes: the session's, cut off the network and connected again by a TCP forwarder, and, in the
training test, one of its own, stopped and started again on the same port and backend store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from mlflow.tracking import MlflowClient
from tracking_server import NetworkCut, free_port, mlflow_server_command, start_mlflow_server, stop_process_group

from evadlab.cli import main
from evadlab.config import load_config
from evadlab.platform.hooks import StopTrackingServer, wait_for_tracking_server
from evadlab.platform.modeling import open_checkpoint, stored_config
from evadlab.platform.tracking import BACKLOG_FILE, RunLogger

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture
def own_server(tmp_path):
    """A server of this test alone, which it may stop and start again: (folder, port, uri)."""
    folder, port = tmp_path / "mlflow", free_port()
    server, uri = start_mlflow_server(folder, port)
    started = [server.pid]
    yield folder, port, uri, started
    for pid in started:
        stop_process_group(pid)


@pytest.fixture
def cuttable_server(mlflow_server):
    """The session's server behind a :class:`NetworkCut` of this test alone."""
    network = NetworkCut(urlsplit(mlflow_server).port)
    yield network
    network.cut()


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_records_wait_while_the_server_is_away_and_go_out_when_it_answers(cuttable_server, tmp_path, capsys):
    uri = cuttable_server.uri
    client = MlflowClient(uri)
    experiment = client.create_experiment(f"outage_{tmp_path.name}")
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    logger = RunLogger(uri, first, backlog=str(tmp_path / "run_a"), retry_s=1.0)
    other = RunLogger(uri, second, backlog=str(tmp_path / "run_b"), retry_s=1.0)
    logger.log_metrics({"loss": 1.0}, step=0)

    cuttable_server.cut()
    wait_for_tracking_server(uri, up=False)
    began = time.monotonic()
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_params({"model.keep_rate": 0.7})
    logger.log_text("kept while the server was away\n", "note.txt")
    other.log_metrics({"loss": 2.0}, step=0)
    other.end()
    other.finish()
    assert time.monotonic() - began < 30, "an absent server must not hold a job for minutes"
    err = capsys.readouterr().err
    assert err.count(f"MLflow server at {uri} does not answer") == 2, "one warning per logger and outage"
    backlog = tmp_path / "run_b" / BACKLOG_FILE
    assert f"send them with `evadlab tracking replay {backlog}` once it answers" in err
    assert [json.loads(line)["kind"] for line in (tmp_path / "run_a" / BACKLOG_FILE).read_text().splitlines()] == [
        "metrics", "params", "artifact"]

    cuttable_server.reconnect()
    time.sleep(1.0)  # the retry is due
    logger.log_metrics({"loss": 0.25}, step=2)
    assert "answers: 3 kept records sent" in capsys.readouterr().err
    assert not (tmp_path / "run_a" / BACKLOG_FILE).exists()
    assert not (tmp_path / "run_a" / "mlflow_backlog_artifacts").exists()
    assert metric_steps(client, first, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(first).data.params == {"model.keep_rate": "0.7"}
    assert [a.path for a in client.list_artifacts(first)] == ["note.txt"]

    assert main(["tracking", "replay", str(tmp_path / "run_b")]) == 0
    assert not backlog.exists()
    assert metric_steps(client, second, "loss") == [(0, 2.0)]
    assert client.get_run(second).info.status == "FINISHED"
    assert main(["tracking", "replay", str(tmp_path / "run_b")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no MLflow backlog at {tmp_path / 'run_b'} (expected a "
                                                    f"{BACKLOG_FILE} or a run folder with one)")


A_RECORD = {"uri": "http://127.0.0.1:9", "run_id": "0123456789abcdef", "kind": "metrics", "metrics": {"loss": 1.0},
            "step": 0, "timestamp": 0}


@pytest.mark.parametrize(("content", "line"), [
    ("0123456789abcdef0123456789abcdef\n", 1),  # a run folder's mlflow_run_id, given by mistake
    (json.dumps({**A_RECORD, "kind": "nope"}) + "\n", 1),
    (json.dumps(A_RECORD) + "\n" + json.dumps({"kind": "metrics"}) + "\n", 2),
    (json.dumps(A_RECORD) + "\nnot a record\n" + json.dumps(A_RECORD) + "\n", 2),
    (json.dumps(A_RECORD)[:25], 1),  # the only line cut short: nothing to send, and the file is not removed
])
def test_a_file_that_is_no_backlog_is_refused_and_kept(tmp_path, capsys, content, line):
    file = tmp_path / "some_file"
    file.write_text(content)
    assert main(["tracking", "replay", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evadlab tracking replay: error: {file}: line {line} is not an MLflow backlog record")
    assert file.read_text() == content


def test_a_replay_to_a_store_without_the_run_is_refused_and_the_backlog_kept(tmp_path, capsys, mlflow_server):
    """An empty file, a SQLite store that does not exist (it is not created) and a server that holds no such run are
    answers, not outages: one line naming the file or the store, exit 2, the file as it was."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["tracking", "replay", str(empty)]) == 2
    assert capsys.readouterr().err.strip() == (f"evadlab tracking replay: error: {empty}: empty, not an MLflow backlog "
                                               f"(evadlab removes a backlog once it is sent)")
    assert empty.read_text() == ""

    file = tmp_path / BACKLOG_FILE
    missing_store = tmp_path / "nowhere" / "mlflow.db"
    content = json.dumps({**A_RECORD, "uri": f"sqlite:///{missing_store}"}) + "\n"
    file.write_text(content)
    assert main(["tracking", "replay", str(file)]) == 2
    assert f"no MLflow database at {missing_store}" in capsys.readouterr().err
    assert not missing_store.parent.exists()

    assert main(["tracking", "replay", str(file), "--tracking-uri", mlflow_server]) == 2
    assert capsys.readouterr().err.strip() == (
        f"evadlab tracking replay: error: {file}: its run {A_RECORD['run_id']} does not exist at {mlflow_server}: "
        f"replay it "
        f"to the tracking server of that run (--tracking-uri)")
    assert file.read_text() == content


def test_a_backlog_line_cut_short_by_a_crash_is_left_out(tmp_path, capsys):
    """The last line is the start of a record (the job died writing it): the records before it are read, and sent
    once the server answers; here none does, so the whole file stays."""
    file = tmp_path / BACKLOG_FILE
    content = json.dumps(A_RECORD) + "\n" + json.dumps(A_RECORD)[:25]
    file.write_text(content)
    assert main(["tracking", "replay", str(file)]) == 2
    assert "MLflow tracking server at http://127.0.0.1:9" in capsys.readouterr().err
    assert file.read_text() == content


@pytest.mark.slow
def test_training_survives_a_tracking_server_that_stops_and_comes_back(own_server, tmp_path, mini_ava, ray_local):
    """The server is stopped after epoch 0 and started again during epoch 2 of 3: the run finishes, its MLflow run
    holds every epoch's metrics exactly once, the backlog went out as soon as the server answered, and the best model
    logged meanwhile is a self-describing checkpoint."""
    from evadlab.pipelines.prepare import prepare
    from evadlab.platform.train import train

    folder, port, uri, started = own_server
    cfg = load_config(QUICKSTART, [
        f"data.root={mini_ava}", f"data.shards={tmp_path / 'shards'}", f"train.storage_path={tmp_path / 'ray'}",
        f"output_dir={tmp_path / 'runs'}", "train.epochs=3", "train.batch_size=2", "eval.every_epochs=1",
        "train.cpus_per_worker=0.5", "model.act_fc_dim=64", "train.log_every=1", f"tracking.uri={uri}",
        "tracking.retry_s=0", "tracking.experiment=outage_training"])
    prepare(cfg)
    hook = StopTrackingServer(uri, started.pop(), tmp_path / "hook", stop_after_epoch=0, restart_in_epoch=2,
                              command=mlflow_server_command(folder, port), watch=tmp_path / "ray")
    try:
        result = train(cfg, hooks=[hook])
    finally:
        if (tmp_path / "hook" / "server.pid").exists():
            started.append(int((tmp_path / "hook" / "server.pid").read_text()))
    backlog = Path(result.run_path) / BACKLOG_FILE
    assert (tmp_path / "hook" / "backlogs_before_restart.txt").read_text() == f"{backlog}\n", "kept while away"
    assert (tmp_path / "hook" / "backlogs_after_restart.txt").read_text() == "", "sent once the server answered"
    assert not backlog.exists()

    client = MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) == [0.0, 1.0, 2.0]
    for key in ("epoch", "val/mAP", "train/clips_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, len(losses) + 1)), "every step once, none lost"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/best_model.pt" in artifacts
    best = client.download_artifacts(run.info.run_id, "checkpoints/best_model.pt", str(tmp_path))
    checkpoint = open_checkpoint(best)
    assert stored_config(checkpoint).model.evad == cfg.model.evad
    assert checkpoint.epoch in (0, 1, 2) and "mAP" in checkpoint.extra
    assert yaml.safe_load(checkpoint.config_text)["name"] == "quickstart"
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(model.name for model in models) == ["best", "final"], "models logged while away were created later"
    assert result.models == {model.name: f"models:/{model.model_id}" for model in models}
