"""Generic session fixtures: a local Ray, the synthetic mini-AVA, the test data folder, an MLflow server."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from tracking_server import free_port, launch_mlflow_server, stop_server, wait_until_answering

# The session's MLflow server, launched once collection shows a test needs it: (process, uri, folder).
SESSION_SERVER = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what will not run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Launches the session's MLflow server as soon as the tests are collected, when one of them needs it, so that its
    start-up (~10 s of one core) runs beside the tests before the first that uses it."""
    if any("mlflow_server" in item.fixturenames for item in items):
        folder = Path(tempfile.mkdtemp(prefix="evadlab_mlflow_server_"))
        config.stash[SESSION_SERVER] = (*launch_mlflow_server(folder, free_port()), folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stops and removes the session's MLflow server, whether or not a test got to use it."""
    if SESSION_SERVER in config.stash:
        server, _uri, folder = config.stash[SESSION_SERVER]
        stop_server(server)
        shutil.rmtree(folder, ignore_errors=True)


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
def mlflow_server(pytestconfig: pytest.Config) -> str:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact store), launched after collection and
    stopped at the end of the session (``pytest_unconfigure``)."""
    server, uri, folder = pytestconfig.stash[SESSION_SERVER]
    wait_until_answering(server, uri, folder)
    return uri
