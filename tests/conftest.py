"""Generic session fixtures: a local Ray, the synthetic mini-AVA, the test data folder, an MLflow server."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from tracking_server import free_port, start_mlflow_server, stop_process_group


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs for the whole session (the test machine has 2 cores, shared)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mini_ava(tmp_path_factory) -> Path:
    """Root of a small synthetic AVA (3 videos of 8 s, with frame folders) in the official layout."""
    from evadlab.pipelines.synthetic import generate_mini_ava

    root = tmp_path_factory.mktemp("mini_ava")
    generate_mini_ava(root, videos=3, seconds=8, seed=0, frames=True)
    return root


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data: the golden fixture, the released key listings and real AVA-format samples (see its README)."""
    return Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact store), stopped at the end."""
    server, uri = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), free_port())
    yield uri
    stop_process_group(server.pid)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a loaded machine: it is ended, not waited for
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
