"""A real Ray job submission to a real multi-node cluster (tests/ray_cluster.py: a head and two worker nodes on
127.0.0.1, token authentication on): `evadlab prepare && evadlab train` submitted with `ray job submit` and
--working-dir, the token passed the way the README says, 2 training workers placed one per worker node through a
custom resource, and the run found in the MLflow server on 127.0.0.1."""

import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_cluster import LocalRayCluster

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# Each worker node offers one slot; a worker reserves one, so 2 workers land on 2 nodes.
SLOT = "train_slot"


@pytest.fixture
def cluster(tmp_path, mlflow_server):
    """A head (data decoding, the job's driver) and two worker nodes of 1 CPU each, one shared storage folder. Only
    the processes it started are stopped (never `ray stop`, which ends every Ray of the machine). The MLflow server
    starts first: Ray's processes take free ports of their own while they start, and could take the server's."""
    cluster = LocalRayCluster(storage=tmp_path / "shared")
    cluster.storage.mkdir()
    try:
        cluster.start_head(num_cpus=1)
        for name in ("node_a", "node_b"):
            cluster.add_worker_node(name, num_cpus=1, resources={SLOT: 1, name: 1}, wait=False)
        cluster.wait_for_nodes(3)
        yield cluster
    finally:
        cluster.shutdown()


def test_ray_job_submit_trains_on_two_nodes_and_logs_to_mlflow(cluster, mini_ava, mlflow_server):
    shared = cluster.storage
    overrides = (f"data.root={mini_ava} data.shards={shared / 'shards'} train.storage_path={shared / 'ray'} "
                 f"output_dir={shared / 'runs'} train.epochs=1 eval.every_epochs=0 model.act_fc_dim=64 "
                 f"train.num_workers=2 train.cpus_per_worker=0.5 'train.resources_per_worker={{{SLOT}: 1}}' "
                 f"tracking.uri={mlflow_server} "
                 f"tracking.experiment=job_submit_test")
    command = f"{sys.executable} -m evadlab.cli"
    cluster.submit_job(f"{command} prepare experiments/quickstart.yaml {overrides} && "
                       f"{command} train experiments/quickstart.yaml {overrides}", "job_submit_test", REPO)
    status, logs = cluster.wait_for_job("job_submit_test", timeout_s=600)
    assert status == "SUCCEEDED", logs[-3000:]

    mlflow = MlflowClient(mlflow_server)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("job_submit_test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert "train/clips_per_s" in metrics and metrics["train/workers"] == 2
    placed = cluster.actor_nodes("RayTrainWorker")
    assert sorted(placed) == sorted(cluster.node_id(name) for name in ("node_a", "node_b")), "one worker per node"
