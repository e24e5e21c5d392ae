"""Real ``mlflow server`` processes for the tests: started on 127.0.0.1 in their own process group, so that a test
can stop one and start it again on the same port and backend store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from evadlab.platform.hooks import wait_for_tracking_server


def mlflow_server_command(folder: Path, port: int) -> list[str]:
    """``mlflow server`` on 127.0.0.1:``port`` with its SQLite backend and artifact store in ``folder``."""
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_mlflow_server(folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` started in its own process group (stop it with ``stop_process_group``), not yet
    waited for (see :func:`wait_until_answering`): its ~10 s of start-up can overlap other work."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "a") as log:
        server = subprocess.Popen(mlflow_server_command(folder, port), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    return server, f"http://127.0.0.1:{port}"


def wait_until_answering(server: subprocess.Popen, uri: str, folder: Path) -> None:
    """Returns once the server launched by :func:`launch_mlflow_server` answers; stops it and raises RuntimeError with
    its log when it does not start."""
    try:
        wait_for_tracking_server(uri, up=True)
    except TimeoutError:
        stop_process_group(server.pid)
        raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}") from None


def start_mlflow_server(folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` in its own process group (stop it with ``stop_process_group``), once it answers."""
    server, uri = launch_mlflow_server(folder, port)
    wait_until_answering(server, uri, folder)
    return server, uri


def stop_process_group(pid: int) -> None:
    """SIGTERM to the process group ``pid`` leads (a server started with ``start_new_session``), if it still runs."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def stop_server(server: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stops a server started by :func:`start_mlflow_server` and reaps it: SIGTERM to its group, then SIGKILL when it
    has not exited within ``grace_s`` (uvicorn's graceful shutdown can take longer than that on a loaded machine)."""
    stop_process_group(server.pid)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=grace_s)
