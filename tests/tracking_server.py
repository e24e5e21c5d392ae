"""Real ``mlflow server`` processes for the tests: started on 127.0.0.1 in their own process group, so that a test
can stop one and start it again on the same port and backend store; and a TCP forwarder that cuts a running server
off the network and connects it again, as a partition does on a cluster."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
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


class NetworkCut:
    """A TCP forwarder on 127.0.0.1 in front of a running server at 127.0.0.1:``upstream_port``: clients use
    ``uri``; :meth:`cut` makes that address refuse new connections and resets the open ones, as a stopped server or a
    lost route does, and :meth:`reconnect` forwards again on the same port. The server itself keeps running, which
    spares a test the ~10 s start of another ``mlflow server``."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None
        self.reconnect()

    def reconnect(self) -> None:
        """Forwards ``uri`` to the server again."""
        cut = self

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError), socket.create_connection(cut.upstream) as upstream, \
                        cut.tracked(self.request, upstream):
                    pipe_both_ways(self.request, upstream)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Forward, bind_and_activate=False)
        server.allow_reuse_address = server.daemon_threads = True
        server.server_bind()
        server.server_activate()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._server = server

    def cut(self) -> None:
        """Stops listening and resets every forwarded connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @contextlib.contextmanager
    def tracked(self, *sockets: socket.socket) -> Iterator[None]:
        with self._lock:
            self._open.update(sockets)
        try:
            yield
        finally:
            with self._lock:
                self._open.difference_update(sockets)


def pipe_both_ways(first: socket.socket, second: socket.socket) -> None:
    """Copies bytes between two connected sockets until either side closes."""
    peer = {first: second, second: first}
    while True:
        readable, _, _ = select.select(list(peer), [], [])
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            peer[source].sendall(data)
