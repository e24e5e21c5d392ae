"""A real multi-node Ray cluster on 127.0.0.1 for the tests.

Each node is a ``ray start --block`` process started in a process group of its own, with its own ``--temp-dir``,
so that the tests end exactly the processes they started (never ``ray stop``, which ends every Ray process of the
machine, a user's own cluster included). Ray puts each worker process in a process group of its own (per-worker
process-group cleanup), so a signal to the node's group does not reach the workers: a worker outlived such a kill by
~1.7 s (until it saw its raylet gone), long enough to end an epoch and report it. "A node is lost" is therefore the
node's whole process tree frozen, then killed, and waited for: its raylet and every worker on it are gone when
:meth:`RayNode.kill` returns, as when a host crashes. Token authentication is on (one
token for every node and client, as users run it), the dashboard and every service listen on 127.0.0.1, and all
nodes share one storage folder the way NFS would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tracking_server import free_port

RAY = Path(sys.executable).with_name("ray")
# How long a node may take to join; the machine is small and shared.
JOIN_TIMEOUT_S = 180


@dataclass
class RayNode:
    """One node: the ``ray start --block`` process that leads the node's process group."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    def kill(self) -> None:
        """A lost host: every process of the node (raylet, workers, agents) is stopped with SIGSTOP, so none can
        start another or send one more message, then killed with SIGKILL; returns once all are gone. Nothing drains.

        Raises:
            TimeoutError: a process of the node is still there 60 s after its SIGKILL.
        """
        _signal_group(self.process.pid, signal.SIGSTOP)
        frozen = _process_tree(self.process.pid)
        for process in frozen:
            _signal_process(process, signal.SIGSTOP)
        frozen = _process_tree(self.process.pid)  # children forked just before their parent stopped
        for process in frozen:
            _signal_process(process, signal.SIGKILL)
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        deadline = time.time() + 60
        while alive := [process.pid for process in frozen if _is_alive(process)]:
            if time.time() > deadline:
                raise TimeoutError(f"node {self.name}: processes {alive} outlived SIGKILL by 60 s")
            time.sleep(0.01)


@dataclass
class LocalRayCluster:
    """A head node (no CPUs for training workers) plus worker nodes, each with a custom resource of its own name so
    that a test can place work on it."""

    storage: Path
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, RayNode] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of every node and client: token authentication on, with this cluster's token. A
        ``RAY_ADDRESS`` of the caller's is dropped: every node and client names this cluster's address itself."""
        inherited = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        return {**inherited, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def start_head(self, num_cpus: float) -> RayNode:
        return self._start("head", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                    f"--dashboard-port={self.dashboard_port}", f"--num-cpus={num_cpus}"])

    def add_worker_node(self, name: str, num_cpus: float, resources: dict[str, float], wait: bool = True) -> RayNode:
        """A worker node that joins the head; ``resources`` are custom resources it offers (e.g. ``{name: 1}``).
        ``wait``: until every running node has joined (without it, nodes started together join together)."""
        node = self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}",
                                  f"--resources={json.dumps(resources)}"])
        if wait:
            self.wait_for_nodes(len(self.running_nodes()))
        return node

    def running_nodes(self) -> list[RayNode]:
        """The nodes whose ``ray start`` process still runs (a killed node's does not)."""
        return [node for node in self.nodes.values() if node.process.poll() is None]

    def _start(self, name: str, arguments: list[str]) -> RayNode:
        # Short folders: Ray puts Unix sockets under the temp dir, and socket paths are limited to 107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rc_{name[:6]}_", dir="/tmp"))
        log = self.storage.parent / f"ray_node_{name}.log"
        with open(log, "a") as output:
            process = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                 "--disable-usage-stats", *agent_ports(), *arguments],
                stdout=output, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = RayNode(name=name, process=process, temp_dir=temp_dir, log=log)
        self.nodes[name] = node
        if name == "head":
            self._wait_for_dashboard()
        return node

    def _wait_for_dashboard(self) -> None:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + JOIN_TIMEOUT_S
        while True:
            try:
                JobSubmissionClient(self.dashboard_url, headers=self.auth_headers).list_jobs()
                return
            except Exception:  # noqa: BLE001 - any failure means "not up yet" until the deadline
                if time.time() > deadline or self.nodes["head"].process.poll() is not None:
                    raise RuntimeError(f"the Ray head did not start: {self.nodes['head'].log.read_text()[-3000:]}")
                time.sleep(2)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def alive_nodes(self) -> list[dict]:
        """The cluster's view of its live nodes (as ``ray.nodes()`` reports them), through the dashboard."""
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard_url}/nodes?view=summary", headers=self.auth_headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            summary = json.loads(response.read())["data"]["summary"]
        return [node for node in summary if node.get("raylet", {}).get("state") == "ALIVE"]

    def _state(self, resource: str, filters: list[tuple[str, str, str]]) -> list:
        """Ray's State API (``ray list``) of this cluster, with the token."""
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        client = StateApiClient(self.dashboard_url, headers=self.auth_headers)
        return client.list(StateResource(resource), ListApiOptions(filters=filters, detail=True, limit=10_000),
                           raise_on_missing_output=False)

    def actor_nodes(self, class_name: str, *, alive_only: bool = False) -> list[str]:
        """The node ids of the actors of ``class_name`` the cluster ran (dead ones included unless ``alive_only``)."""
        filters = [("class_name", "=", class_name)] + ([("state", "=", "ALIVE")] if alive_only else [])
        return [actor.node_id for actor in self._state("actors", filters)]

    def node_id(self, name: str) -> str:
        """The Ray node id of the live node ``name`` (found by the custom resource of its name)."""
        for node in self._state("nodes", [("state", "=", "ALIVE")]):
            if name in node.resources_total:
                return node.node_id
        raise KeyError(f"no live node offers the resource {name}")

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.time() + JOIN_TIMEOUT_S
        while len(self.alive_nodes()) != count:
            if time.time() > deadline:
                raise RuntimeError(f"expected {count} live Ray nodes, have {len(self.alive_nodes())}")
            time.sleep(2)

    def submit_job(self, entrypoint: str, submission_id: str, working_dir: Path) -> None:
        """``ray job submit`` as a user runs it, the token passed in ``RAY_AUTH_TOKEN`` (with ``RAY_AUTH_MODE=token``),
        ``working_dir`` shipped to the cluster; returns once the job is accepted. ``entrypoint`` is a shell command
        line (the CLI quotes each word after ``--``, so it runs under ``sh -c``). The head's job agent starts after
        its dashboard: until it does, the submission is refused ("No available agent") and tried again."""
        deadline = time.time() + JOIN_TIMEOUT_S
        while True:
            done = subprocess.run([str(RAY), "job", "submit", f"--address={self.dashboard_url}",
                                   f"--working-dir={working_dir}", f"--submission-id={submission_id}", "--no-wait",
                                   "--", "sh", "-c", entrypoint], check=False, env=self.env, capture_output=True, text=True,
                                  timeout=300)
            output = done.stdout + done.stderr
            if done.returncode == 0 or "No available agent" not in output or time.time() > deadline:
                break
            time.sleep(3)
        assert done.returncode == 0, f"ray job submit failed: {output[-3000:]}"

    def wait_for_job(self, submission_id: str, timeout_s: float) -> tuple[str, str]:
        """The job's final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``) and its log, once it ends. Raises
        TimeoutError, with the log so far, after ``timeout_s``."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)
        deadline = time.time() + timeout_s
        while (status := client.get_job_status(submission_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                        JobStatus.STOPPED}:
            if time.time() > deadline:
                raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:g} s: "
                                   f"{client.get_job_logs(submission_id)[-3000:]}")
            time.sleep(1)
        return str(status.value), client.get_job_logs(submission_id)

    def shutdown(self) -> None:
        """Ends the nodes this cluster started, worker nodes first, as :meth:`RayNode.kill` does (a test's cluster
        has nothing to drain: Ray's own stop on SIGTERM kept the head ~30 s), and removes their temp dirs."""
        for name in [name for name in self.nodes if name != "head"] + ["head"]:
            node = self.nodes[name]
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def agent_ports() -> list[str]:
    """Free ports for a node's agents. The dashboard agent's HTTP port is 52365 unless given: every node on one
    machine (and any other Ray there) would want it, and the node that loses has no job agent ("No available agent
    to submit job")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants (whatever process group they are in); empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _is_alive(process: psutil.Process) -> bool:
    """Whether ``process`` can still run. A killed process stays a zombie until its new parent (init, which reaps
    when it gets to it: ~1 s here) collects it; a zombie runs nothing and sends nothing."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_process(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass
