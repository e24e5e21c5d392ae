"""Generic session fixtures: a local Ray, the synthetic mini-AVA, the test data folder, an MLflow server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()
