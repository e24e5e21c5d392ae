"""A node lost in the middle of an epoch, on a real multi-node Ray cluster (tests/ray_cluster.py: a head and two
worker nodes on 127.0.0.1, token authentication on, one shared storage folder, one MLflow server on 127.0.0.1).

`evadlab prepare` and `evadlab train` are submitted with `ray job submit` as a user runs it (--working-dir, the token
passed the way the README says); the 2 training workers are placed one per worker node by a custom
resource each node offers once. Mid-epoch, one worker node is killed (every process of the node, raylet, workers and
agents, stopped and then killed at once), as a crashed host or a preemption without notice. Then:

- fixed ``train.num_workers=2``: a replacement node joins, and the run finishes every epoch from the last checkpoint;
- elastic ``train.num_workers=[1, 2]``: no node comes back, and the run finishes on 1 worker, accumulating 2
  micro-batches per step so the global batch (and so the steps per epoch and the learning-rate recipe) stay those
  of 2 workers; the loss curve does not jump at the resize.

Either way: exactly one MLflow run holding every epoch once, and one checkpoint per epoch, none lost or duplicated.
The recovery time (kill -> first optimiser step of the new worker group) is printed (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_cluster import LocalRayCluster

from evadlab.models.checkpoints import load_training_checkpoint
from evadlab.platform.runs import committed_epochs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SLOT = "train_slot"  # offered once by each worker node, reserved once by each training worker
EPOCHS = 4
COMMAND = f"{sys.executable} -m evadlab.cli"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mlflow_server):
    """A head (1 CPU: data decoding, the jobs' drivers) and two worker nodes of 1 CPU; the MLflow server starts first
    (Ray's processes take free ports while they start). Only the processes it started are stopped."""
    cluster = LocalRayCluster(storage=tmp_path_factory.mktemp("cluster") / "shared")
    cluster.storage.mkdir()
    try:
        cluster.start_head(num_cpus=1)
        for name in ("node_a", "node_b"):
            cluster.add_worker_node(name, num_cpus=1, resources={SLOT: 1, name: 1}, wait=False)
        cluster.wait_for_nodes(3)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def overrides(cluster, mini_ava, mlflow_server) -> str:
    """The overrides every job of this module uses, once the shards are prepared by a job of their own. Batch 1 of
    the 10 train keyframes: 5 steps per epoch on 2 workers."""
    shared = cluster.storage
    common = (f"data.root={mini_ava} data.shards={shared / 'shards'} train.storage_path={shared / 'ray'} "
              f"output_dir={shared / 'runs'} train.epochs={EPOCHS} train.batch_size=1 eval.every_epochs=0 "
              f"model.act_fc_dim=64 train.cpus_per_worker=0.5 'train.resources_per_worker={{{SLOT}: 1}}' "
              f"train.max_failures=3 train.keep_checkpoints={EPOCHS + 2} train.log_every=1 "
              f"tracking.system_metrics=false tracking.uri={mlflow_server}")
    cluster.submit_job(f"{COMMAND} prepare experiments/quickstart.yaml {common}", "prepare", REPO)
    status, logs = cluster.wait_for_job("prepare", timeout_s=600)
    assert status == "SUCCEEDED", logs[-3000:]
    return common


def worker_nodes(cluster: LocalRayCluster) -> list[str]:
    return [node.name for node in cluster.running_nodes() if node.name != "head"]


def add_worker_node(cluster: LocalRayCluster, wait: bool) -> str:
    name = f"node_{len(cluster.nodes)}"
    cluster.add_worker_node(name, num_cpus=1, resources={SLOT: 1, name: 1}, wait=wait)
    return name


@dataclass
class NodeLoss:
    """What the test saw when it killed a node."""

    run_id: str
    kill_ms: int  # when the node was killed, ms since the epoch (the clock of MLflow's timestamps: one machine)
    checkpoint_step: int  # the step of the last epoch reported before the kill: where the next group starts
    last_step: int  # the last step logged before the kill
    training_nodes: list[str]  # the node ids of the live training workers just before the kill
    worker_nodes: list[str]  # the node ids of the live worker nodes just before the kill


def kill_node_mid_epoch(cluster: LocalRayCluster, client: MlflowClient, experiment: str, node: str) -> NodeLoss:
    """Kills ``node`` in the middle of an epoch after the first: once Ray Train has committed every epoch the run has
    ended (a kill within Ray's report poll would lose the last report: see ``committed_epochs``) and the run has
    logged a step of the next epoch, in its first half, so that the workers cannot end the epoch between the reads
    below and the kill (at least half the epoch's steps are left; the node's processes are all gone when ``kill``
    returns, see tests/ray_cluster.py). The run's live workers are located once the first epoch has ended (they stay
    until the kill); then each round reads the metrics and the commit and kills at once when they allow."""
    deadline = time.time() + 600
    training: list[str] = []
    nodes: list[str] = []
    while time.time() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        run_path = runs[0].data.tags.get("evadlab.run_path") if runs else None  # tagged just after the run starts
        if run_path:
            run_id = runs[0].info.run_id
            steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
            ended = [m.step for m in client.get_metric_history(run_id, "epoch")]
            committed = committed_epochs(run_path)
            if ended and training and committed == len(ended) and 1 <= max(steps) - max(ended) <= min(ended) // 2:
                cluster.nodes[node].kill()
                return NodeLoss(run_id, int(1000 * time.time()), max(ended), max(steps), training, nodes)
            assert len(ended) < EPOCHS, "the run finished before the node could be killed"
            if ended and not training:
                training = sorted(cluster.actor_nodes("RayTrainWorker", alive_only=True))
                nodes = sorted(cluster.node_id(name) for name in worker_nodes(cluster))
        time.sleep(0.05)
    raise TimeoutError(f"{experiment} did not come to the middle of an epoch after the first in 10 minutes")


def metric(client: MlflowClient, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def check_one_run_with_every_epoch_once(client: MlflowClient, experiment: str, loss: NodeLoss) -> dict[int, int]:
    """One worker on each worker node before the kill (placed by the custom resource); one FINISHED run; every epoch's
    metrics logged once; the interrupted epoch ended after the kill (it was in the middle of it); one checkpoint per
    epoch in the run folder, none lost or duplicated, each at the step its epoch's
    metrics were logged. Returns the step each epoch ended at."""
    assert loss.training_nodes == loss.worker_nodes, "one training worker per worker node"
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [run.info.run_id for run in runs] == [loss.run_id] and runs[0].info.status == "FINISHED"
    ended = metric(client, loss.run_id, "epoch")
    assert [int(m.value) for m in ended] == list(range(EPOCHS)), "every epoch logged once"
    assert [m.step for m in metric(client, loss.run_id, "train/clips_per_s")] == [m.step for m in ended]
    epoch_end = {int(m.value): m.step for m in ended}
    interrupted = next(m for m in ended if m.step > loss.checkpoint_step)
    assert interrupted.timestamp > loss.kill_ms and loss.last_step < interrupted.step, "killed mid-epoch"
    folders = sorted(path for path in Path(runs[0].data.tags["evadlab.run_path"]).glob("checkpoint_*") if path.is_dir())
    progress = [load_training_checkpoint(folder / "checkpoint.pt")["extra"]["progress"] for folder in folders]
    assert [(p["epoch"], p["step"]) for p in progress] == [(e + 1, epoch_end[e]) for e in range(EPOCHS)]
    return epoch_end


def recovery_seconds(client: MlflowClient, loss: NodeLoss) -> float:
    """From the kill to the first optimiser step of the new worker group: the first step after the checkpoint logged
    after the kill (the old group had logged it before)."""
    redone = [m.timestamp for m in metric(client, loss.run_id, "train/loss")
              if m.step == loss.checkpoint_step + 1 and m.timestamp > loss.kill_ms]
    assert redone, "the new worker group redid the interrupted epoch from its first step"
    return (min(redone) - loss.kill_ms) / 1000


def submit_train(cluster: LocalRayCluster, overrides: str, experiment: str, *extra: str) -> None:
    """``evadlab train`` as a job. Its epochs (5 steps of ~0.3 s) are shorter than Ray Train's own default report
    poll (2 s), after which an epoch's checkpoint is committed: the job polls every 0.5 s
    (``train.health_check_interval_s``), so that an epoch has steps left between its predecessor's commit and its own
    end, where the node is killed. A new worker group that cannot be placed is given up after 10 s
    (``train.worker_group_start_timeout_s``; Ray's 60 s made the elastic case's recovery ~75 s, see the README)."""
    cluster.submit_job(f"{COMMAND} train experiments/quickstart.yaml {overrides} train.health_check_interval_s=0.5 "
                       f"train.worker_group_start_timeout_s=10 tracking.experiment={experiment} " + " ".join(extra),
                       experiment, REPO)


def train_and_lose_a_node(cluster: LocalRayCluster, overrides: str, client: MlflowClient, experiment: str,
                          num_workers: str) -> NodeLoss:
    """Two live worker nodes, `evadlab train` submitted with ``train.num_workers=num_workers``, then one worker node
    killed in the middle of an epoch after the first."""
    while len(worker_nodes(cluster)) < 2:
        add_worker_node(cluster, wait=True)
    submit_train(cluster, overrides, experiment, f"train.num_workers={num_workers}")
    return kill_node_mid_epoch(cluster, client, experiment, worker_nodes(cluster)[-1])


def test_a_lost_node_is_replaced_and_the_run_finishes_from_its_last_checkpoint(cluster, overrides, mlflow_server):
    client = MlflowClient(mlflow_server)
    loss = train_and_lose_a_node(cluster, overrides, client, "node_loss", "2")
    add_worker_node(cluster, wait=False)  # the replacement host; 2 workers need 2 nodes with a slot each
    status, logs = cluster.wait_for_job("node_loss", timeout_s=600)
    assert status == "SUCCEEDED", logs[-3000:]

    check_one_run_with_every_epoch_once(client, "node_loss", loss)
    assert [m.value for m in metric(client, loss.run_id, "train/workers")] == [2] * EPOCHS
    print(f"\nnode loss, fixed 2 workers, replacement node: recovery {recovery_seconds(client, loss):.1f} s")


def test_elastic_run_goes_on_with_one_worker_after_a_node_loss(cluster, overrides, mlflow_server):
    client = MlflowClient(mlflow_server)
    loss = train_and_lose_a_node(cluster, overrides, client, "elastic", "[1,2]")
    status, logs = cluster.wait_for_job("elastic", timeout_s=600)
    assert status == "SUCCEEDED", logs[-3000:]

    epoch_end = check_one_run_with_every_epoch_once(client, "elastic", loss)
    resized = sum(step <= loss.checkpoint_step for step in epoch_end.values())  # the epochs done by 2 workers
    assert [m.value for m in metric(client, loss.run_id, "train/workers")] == [2] * resized + [1] * (EPOCHS - resized)
    assert [m.value for m in metric(client, loss.run_id, "train/grad_accum")] == [1] * resized + [2] * (EPOCHS -
                                                                                                        resized)
    # The global batch is unchanged: as many optimiser steps per epoch on 1 worker as on 2.
    steps_per_epoch = {epoch_end[e] - epoch_end.get(e - 1, 0) for e in range(EPOCHS)}
    assert len(steps_per_epoch) == 1, f"steps per epoch changed with the worker count: {epoch_end}"
    # No jump at the resize: the steps the new group redid from the checkpoint against the same steps of 2 workers.
    losses = metric(client, loss.run_id, "train/loss")
    before = [m.value for m in losses if m.timestamp < loss.kill_ms]
    old = {m.step: m.value for m in losses if loss.checkpoint_step < m.step and m.timestamp < loss.kill_ms}
    new = {m.step: m.value for m in losses if m.step in old and m.timestamp > loss.kill_ms}
    assert new.keys() == old.keys()
    jump = statistics.mean(new.values()) - statistics.mean(old.values())
    noise = statistics.stdev(before)
    assert abs(jump) <= 2 * noise, f"loss jumped by {jump:.3f} at the resize (step-to-step noise {noise:.3f})"
    print(f"\nnode loss, elastic [1, 2] -> 1 worker: recovery {recovery_seconds(client, loss):.1f} s, loss change at "
          f"the resize {jump:+.3f} (noise {noise:.3f})")
