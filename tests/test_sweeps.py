"""Sweeps from a fresh start against a real MLflow server: a warm-started sweep that synthesises and prepares its data
and trains its base model once (2 trials) on a ``file://`` storage path, its resume from another working directory
after one trial was interrupted, then an Optuna multi-objective sweep with ASHA of elastic trials (1 to 2 workers)
that reuses that base model (2 trials); the parent runs' trial tables and Pareto sets are read back through MLflow.
Tiny model, 1 epoch. One test holds all three because each Tune trial costs a Ray Train start (~50 s on 2 cores)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from evadlab.config import ConfigError
from evadlab.platform.compare import compare_runs, pareto_front
from evadlab.platform.tune import run_sweep
from evadlab.sweep_config import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
pytestmark = pytest.mark.slow


def write_sweep(folder: Path, name: str, search_space: dict, **overrides) -> Path:
    """A sweep of the quickstart model (act_fc_dim 64, 1 epoch) on a synthetic set of 3 videos that does not exist
    yet, warm-started from ``folder/base_model.pt``, trained once (1 epoch) when it is missing. Its Ray storage is
    ``file://folder/ray``, as Ray users name NFS paths."""
    sweep = {
        "name": name,
        "base": str(EXPERIMENTS / "quickstart.yaml"),
        "search_space": search_space,
        "warm_start": {"checkpoint": str(folder / "base_model.pt"),
                       "train_if_missing": {"name": "sweeps_test_base", "eval.every_epochs": 0}},
        "overrides": {"data.root": str(folder / "mini_ava"), "data.synth_videos": 3, "data.synth_seconds": 8,
                      "train.storage_path": f"file://{folder / 'ray'}", "output_dir": str(folder / "runs"),
                      "train.epochs": 1, "train.cpus_per_worker": 0.5, "model.act_fc_dim": 64,
                      "name": "sweeps_test", **overrides},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def run_sweep_file(path: Path, overrides: list[str]) -> list[dict]:
    """``evadlab tune path overrides``, in this process."""
    return run_sweep(*load_sweep(path, overrides), path)


def parent_and_trials(client: MlflowClient, sweep: str):
    experiment = client.get_experiment_by_name("sweeps_test")
    parent = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{sweep}'")[0]
    trials = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, trials


def artifact_json(client: MlflowClient, run_id: str, name: str, folder: Path):
    return json.loads(Path(client.download_artifacts(run_id, name, str(folder))).read_text())


def test_a_trial_that_does_not_fit_stops_before_anything_is_written(tmp_path, ray_local, mlflow_server):
    path = write_sweep(tmp_path, "too_big", {"model.keep_rate": {"grid": [0.5]}})
    with pytest.raises(ConfigError, match=r"one trial needs 3\.01 CPUs .* train.num_workers"):
        run_sweep_file(path, [f"tracking.uri={mlflow_server}", "train.num_workers=3", "train.cpus_per_worker=0.5",
                         "tune.data_cpus=1.5"])
    assert not (tmp_path / "mini_ava").exists() and not (tmp_path / "ray").exists()


def test_warm_started_sweep_resumes_and_a_multi_objective_sweep_reuses_its_base(tmp_path, ray_local, mlflow_server,
                                                                                 capsys, monkeypatch):
    client = MlflowClient(mlflow_server)
    warm = write_sweep(tmp_path, "warm", {"model.keep_rate": {"grid": [1.0, 0.5]}})
    rows = run_sweep_file(warm, [f"tracking.uri={mlflow_server}"])
    printed = capsys.readouterr().out
    assert "[1/4] synth" in printed and "[2/4] prepare" in printed and "training the base model once" in printed
    assert (tmp_path / "base_model.pt").is_file()

    parent, trials = parent_and_trials(client, "warm")
    assert parent.data.tags["evadlab.warm_start"] == str(tmp_path / "base_model.pt")
    assert len(trials) == 2 and len(rows) == 2 and any(row["pareto"] for row in rows)
    by_keep = {float(t.data.params["model.keep_rate"]): t.data.metrics for t in trials}
    assert set(by_keep) == {1.0, 0.5} and by_keep[0.5]["model/gflops"] < by_keep[1.0]["model/gflops"]
    for trial in trials:
        assert {"val/mAP", "train/clips_per_s", "model/params"} <= set(trial.data.metrics)
        assert trial.data.metrics["speed/infer_clips_per_s"] > 0
        assert trial.data.tags["evadlab.keep_rate"] == trial.data.params["model.keep_rate"]
    table = artifact_json(client, parent.info.run_id, "trials.json", tmp_path / "warm_artifacts")
    pareto = artifact_json(client, parent.info.run_id, "pareto.json", tmp_path / "warm_artifacts")
    assert {row["run_id"] for row in table} == {t.info.run_id for t in trials}
    assert pareto == [row for row in table if row["pareto"]] and pareto
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.txt", "best_config.yaml", "best_config_gflops.yaml", "map_vs_gflops.png"} <= artifacts
    png = client.download_artifacts(parent.info.run_id, "map_vs_gflops.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The base model's run logs no mAP (eval.every_epochs 0), so the experiment's table holds the trials only.
    experiment_table = compare_runs("sweeps_test", mlflow_server, tmp_path / "compare")
    assert {r["run_id"] for r in experiment_table} == {t.info.run_id for t in trials}
    assert (tmp_path / "compare" / "map_vs_gflops.png").stat().st_size > 0
    for sweep in ("warm", parent.info.run_id):
        shown = compare_runs(None, mlflow_server, tmp_path / "compare_sweep", sweep=sweep)
        assert sorted(r["run_id"] for r in shown) == sorted(t.info.run_id for t in trials), "a sweep's trials only"

    # Resume: make one trial look interrupted before its training started (status RUNNING, no Ray Train run, no
    # MLflow run). The resumed sweep, run from another working directory, must find its parent run and trials under
    # the file:// URI, run that trial again, leave the finished one untouched and write nothing relative to either.
    storage = tmp_path / "ray"
    sweep_dir = storage / "warm"
    state_file = max(sweep_dir.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["status"] = "RUNNING"
    state["trial_data"][0][0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    interrupted = trial["trial_id"]
    trial_ids = [json.loads(t[0])["trial_id"] for t in state["trial_data"]]
    runs_by_trial = {trial_id: path for trial_id in trial_ids for path in storage.glob(f"sweeps_test_{trial_id}_*")}
    assert len(runs_by_trial) == 2
    shutil.rmtree(runs_by_trial.pop(interrupted))
    (interrupted_run,) = [t for t in trials if t.data.tags["mlflow.runName"].startswith(f"sweeps_test_{interrupted}_")]
    client.delete_run(interrupted_run.info.run_id)
    untouched = {trial_id: path.stat().st_mtime_ns for trial_id, path in runs_by_trial.items()}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed_rows = run_sweep_file(warm, [f"tracking.uri={mlflow_server}", "tune.resume=true"])
    assert (sweep_dir / "mlflow_parent_run_id").read_text() == parent.info.run_id
    assert list(elsewhere.iterdir()) == [] and not list(Path(__file__).parents[1].glob("file:*"))
    assert {trial_id: runs_by_trial[trial_id].stat().st_mtime_ns for trial_id in untouched} == untouched
    assert len(list(storage.glob(f"sweeps_test_{interrupted}_*"))) == 1, "the interrupted trial ran again"
    resumed_parent, resumed_trials = parent_and_trials(client, "warm")
    assert resumed_parent.info.run_id == parent.info.run_id and len(resumed_trials) == 2 and len(resumed_rows) == 2
    assert len(client.search_runs([parent.info.experiment_id], "tags.mlflow.runName = 'warm'")) == 1
    assert "training the base model once" not in capsys.readouterr().out

    # The second sweep reuses the base model and the shards: no second base stage, no prepare.
    multi = write_sweep(tmp_path, "multi", {"model.keep_rate": {"choice": [0.5, 0.7, 1.0]},
                                            "model.enhanced_weight": {"uniform": [1.0, 4.0]}},
                        **{"tune.search": "optuna", "tune.sampler": "tpe", "tune.cost": "latency",
                           "tune.num_samples": 2, "tune.scheduler": "asha", "train.num_workers": [1, 2]})
    rows = run_sweep_file(multi, [f"tracking.uri={mlflow_server}"])
    printed = capsys.readouterr().out
    assert "training the base model once" not in printed and "shards with this clip spec exist" in printed
    # Elastic trials are counted at their max: 2 x 0.5 CPUs, tune.data_cpus 1 and the driver's 0.01 exceed 2 CPUs.
    assert ("evadlab tune: 1 trial(s) at a time: each needs 2.01 CPUs at its largest, the cluster has 2 CPUs free; an "
            "elastic trial trains with the workers the cluster can place, from its min") in printed
    assert len(client.search_runs([parent.info.experiment_id], "tags.mlflow.runName LIKE 'sweeps_test_base%'")) == 1

    parent, trials = parent_and_trials(client, "multi")
    assert parent.data.tags["evadlab.search"] == "optuna" and parent.data.tags["evadlab.cost"] == "latency"
    table = artifact_json(client, parent.info.run_id, "trials.json", tmp_path / "multi_artifacts")
    assert len(trials) == 2 and len(table) == 2 and all(math.isfinite(row["latency_ms"]) for row in table)
    front = pareto_front([(row["latency_ms"], row["mAP"]) for row in table])
    assert [row["pareto"] for row in table] == front and any(front)
    assert artifact_json(client, parent.info.run_id, "pareto.json", tmp_path / "multi_artifacts") == \
        [row for row in table if row["pareto"]]
    assert {"best_config.yaml", "best_config_latency.yaml", "map_vs_latency.png"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}
    shown = compare_runs(None, mlflow_server, tmp_path / "compare", sweep="multi")
    assert [(r["run_id"], r["pareto"]) for r in shown] == [(r["run_id"], r["pareto"]) for r in table] == \
        [(r["run_id"], r["pareto"]) for r in rows]
    assert "Pareto set (max mAP, min latency)" in capsys.readouterr().out
