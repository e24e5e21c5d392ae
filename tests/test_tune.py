"""A real 2-trial Ray Tune sweep of the tiny model with a real MLflow server, then its resume and compare."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from evadlab.config import ConfigError
from evadlab.platform.compare import compare_runs
from evadlab.platform.tune import load_sweep, run_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
pytestmark = pytest.mark.slow


def write_sweep(folder: Path, data_root: Path, **extra) -> Path:
    sweep = {
        "name": "tiny_sweep",
        "base": str(EXPERIMENTS / "quickstart.yaml"),
        "search_space": {"model.keep_rate": {"grid": [1.0, 0.4]}},
        "overrides": {"data.root": str(data_root), "data.shards": str(folder / "shards"),
                      "train.storage_path": f"file://{folder / 'ray'}", "output_dir": str(folder / "runs"),
                      "train.epochs": 1, "train.cpus_per_worker": 0.5, "model.act_fc_dim": 64,
                      "name": "sweep_test"},
        **extra,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_file_errors_name_the_key(tmp_path):
    path = write_sweep(tmp_path, tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"]["model.keep_rat"] = {"grid": [0.5]}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="model.keep_rat"):
        load_sweep(path)
    text["search_space"] = {"model.keep_rate": {"grid": [0.5], "uniform": [0.1, 0.2]}}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_sweep(path)


@pytest.mark.parametrize(("dimension", "message"), [
    ({"grid": []}, "grid needs at least one value"),
    ({"choice": []}, "choice needs at least one value"),
    ({"uniform": [0.9, 0.1]}, r"uniform needs \[low, high\] with low < high, got \[0.9, 0.1\]"),
    ({"loguniform": [0.5, 0.5]}, r"loguniform needs \[low, high\] with low < high"),
])
def test_an_empty_or_reversed_search_dimension_is_refused(tmp_path, dimension, message):
    path = write_sweep(tmp_path, tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"] = {"model.keep_rate": dimension}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=rf"search_space.*model.keep_rate.*{message}"):
        load_sweep(path)


def test_two_trial_sweep_logs_parent_and_children_and_resumes(tmp_path, mini_ava, ray_local, mlflow_server,
                                                                 monkeypatch):
    """The storage path is a file:// URI (as Ray users name NFS paths), and the resume runs from another working
    directory: it must find the sweep's parent run and trials under the URI, and write nothing relative to either."""
    from evadlab.pipelines.prepare import prepare

    path = write_sweep(tmp_path, mini_ava)
    _, base = load_sweep(path, [f"tracking.uri={mlflow_server}"])
    prepare(base)
    rows = run_sweep(path, [f"tracking.uri={mlflow_server}"])

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sweep_test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    by_keep = {float(r.data.params["model.keep_rate"]): r for r in children}
    assert set(by_keep) == {1.0, 0.4}
    assert by_keep[1.0].data.metrics["model/gflops"] > by_keep[0.4].data.metrics["model/gflops"]
    for run in children:
        assert {"val/mAP", "train/clips_per_s", "model/params"} <= set(run.data.metrics)
        assert run.data.tags["evadlab.keep_rate"] == run.data.params["model.keep_rate"]
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"map_vs_gflops.png", "trials.txt", "best_config.yaml"} <= parent_artifacts
    png = client.download_artifacts(parents[0].info.run_id, "map_vs_gflops.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rows) == 2 and any(r["pareto"] for r in rows)

    table = compare_runs("sweep_test", mlflow_server, tmp_path / "compare")
    assert {r["run_id"] for r in table} == {r.info.run_id for r in children}
    assert (tmp_path / "compare" / "map_vs_gflops.png").stat().st_size > 0
    for sweep in ("tiny_sweep", parents[0].info.run_id):
        trials = compare_runs(None, mlflow_server, tmp_path / "compare_sweep", sweep=sweep)
        assert sorted(r["run_id"] for r in trials) == sorted(r["run_id"] for r in table), "a sweep's trials only"

    # Resume: make one trial look interrupted before its training started (status RUNNING, no Ray Train run,
    # no MLflow run). The resumed sweep must run that trial again and leave the finished one untouched.
    sweep_dir = tmp_path / "ray" / "tiny_sweep"
    state_file = max(sweep_dir.glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["status"] = "RUNNING"
    state["trial_data"][0][0] = json.dumps(trial)
    state_file.write_text(json.dumps(state))
    interrupted = trial["trial_id"]
    trial_ids = [json.loads(t[0])["trial_id"] for t in state["trial_data"]]
    runs_by_trial = {trial_id: path for trial_id in trial_ids
                     for path in (tmp_path / "ray").glob(f"sweep_test_{trial_id}_*")}
    assert len(runs_by_trial) == 2
    shutil.rmtree(runs_by_trial.pop(interrupted))
    interrupted_run = next(child for child in children
                           if child.data.tags["mlflow.runName"].startswith(f"sweep_test_{interrupted}_"))
    client.delete_run(interrupted_run.info.run_id)
    untouched = {trial_id: path.stat().st_mtime_ns for trial_id, path in runs_by_trial.items()}

    parent_marker = (sweep_dir / "mlflow_parent_run_id").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed_rows = run_sweep(path, [f"tracking.uri={mlflow_server}", "tune.resume=true"])
    assert (sweep_dir / "mlflow_parent_run_id").read_text() == parent_marker == parents[0].info.run_id
    assert list(elsewhere.iterdir()) == [] and not list(Path(__file__).parents[1].glob("file:*"))
    assert {trial_id: runs_by_trial[trial_id].stat().st_mtime_ns for trial_id in untouched} == untouched
    assert len(list((tmp_path / "ray").glob(f"sweep_test_{interrupted}_*"))) == 1, "the interrupted trial ran again"
    runs_after = client.search_runs([experiment.experiment_id])
    children_after = [r for r in runs_after if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children_after) == 2 and len(resumed_rows) == 2
    assert [r.info.run_id for r in runs_after if "mlflow.parentRunId" not in r.data.tags] == [parents[0].info.run_id]
    assert (sweep_dir / "map_vs_gflops.png").stat().st_size > 0
