"""A real Ray job submission: a local head on 127.0.0.1, `evadlab prepare && evadlab train` submitted with the
job SDK and --working-dir, then the run found in MLflow."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head of its own; the session's in-process Ray is shut down first (tests that need it start it
    again), because `ray stop` ends every Ray process of the machine."""
    import ray

    ray.shutdown()
    dashboard = free_port()
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180,
                   # A throwaway head on loopback: no token (Ray 2.60 turns token auth on when a token file exists).
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, mini_ava, mlflow_server, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    overrides = (f"data.root={mini_ava} data.shards={tmp_path / 'shards'} train.storage_path={tmp_path / 'ray'} "
                 f"output_dir={tmp_path / 'runs'} train.epochs=1 eval.every_epochs=0 model.act_fc_dim=64 "
                 f"tracking.uri={mlflow_server} tracking.experiment=job_submit_test")
    command = f"{sys.executable} -m evadlab.cli"
    client = JobSubmissionClient(ray_head)
    job = client.submit_job(
        entrypoint=f"{command} prepare experiments/quickstart.yaml {overrides} && "
                   f"{command} train experiments/quickstart.yaml {overrides}",
        runtime_env={"working_dir": str(REPO)},
    )
    deadline = time.time() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 10 minutes"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]

    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("job_submit_test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "train/clips_per_s" in runs[0].data.metrics
