"""The one place that starts or joins Ray, and decides what Ray may print.

Without ``RAY_ADDRESS`` a command starts a local Ray on this machine, its dashboard bound to 127.0.0.1; with it (as
``ray job submit`` sets it) the command joins that cluster.

evadlab speaks, Ray whispers: unless the console is verbose (``evadlab -v`` or ``EVADLAB_VERBOSE=1``), the output of
Ray's workers and actors stays in the session's log files (``log_to_driver=False``), Ray Data shows no progress of its
own, and the records of Ray's loggers in this process go to ``<session>/logs/evadlab-driver.log`` (Ray Data's also to
its ``ray-data.log``), only errors reaching the console. The commands print their own progress and summaries.
"""

from __future__ import annotations

import logging
import logging.handlers
import math
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import ray

VERBOSE_VARIABLE = "EVADLAB_VERBOSE"
DRIVER_LOG = "evadlab-driver.log"
# Loggers of Ray in this process: "ray" (Ray Core, Train, Tune) and "ray.data", which does not propagate to "ray".
RAY_LOGGERS = ("ray", "ray.data")


def verbose_console() -> bool:
    """Whether Ray may print to the console: ``EVADLAB_VERBOSE`` set to anything but '' or '0'."""
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


# Whether ensure_ray started or joined the Ray of this process (release_ray undoes only that).
_connected_here = False


def ensure_ray() -> None:
    """Start or join Ray once per process; later calls do nothing (a Ray started by the caller is kept as it is)."""
    global _connected_here
    if ray.is_initialized():
        return
    _connected_here = True
    verbose = verbose_console()
    buffer = None if verbose else hold_ray_records()
    options = {"log_to_driver": verbose}
    if "RAY_ADDRESS" in os.environ:
        context = ray.init(address=os.environ["RAY_ADDRESS"], **options)
    else:
        context = ray.init(**local_ray_options(), **options)
    quiet_ray_data(verbose)
    if buffer is not None:
        write_ray_records(buffer, Path(context.address_info["session_dir"]) / "logs" / DRIVER_LOG)


def release_ray() -> None:
    """Stops the local Ray that :func:`ensure_ray` started (or leaves the cluster it joined) now, at the end of a
    command, instead of in Ray's exit handler, which takes seconds longer (a process with torch and MLflow loaded
    exits 1.8 s sooner on a 2-core machine). A Ray started by the caller is kept."""
    global _connected_here
    if _connected_here and ray.is_initialized():
        ray.shutdown()
    _connected_here = False


def local_ray_options() -> dict:
    """A local Ray with its dashboard on a free port of 127.0.0.1, whose address every worker of the job knows.

    Ray Train's placement-group cleaner asks the dashboard's State API whether its controller lives; without a
    dashboard it warns every few seconds, and without an address it looks for the Ray on this machine and fails
    when several run (``Found multiple active Ray instances``). ``RAY_API_SERVER_ADDRESS`` is the State API's own
    setting for that address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def hold_ray_records() -> logging.handlers.MemoryHandler:
    """Ray's console handlers in this process print errors only; every record is held in memory until Ray has
    started and its session's log folder exists (see :func:`write_ray_records`)."""
    import ray.data  # noqa: F401 - importing it installs the handlers of "ray.data" that are adjusted here

    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
        logger.addHandler(buffer)
    return buffer


def write_ray_records(buffer: logging.handlers.MemoryHandler, path: Path) -> None:
    """Sends the held records, and every later one, to ``path`` (Ray's format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))
    buffer.setTarget(file)
    buffer.flush()
    for name in RAY_LOGGERS:
        logging.getLogger(name).removeHandler(buffer)
        logging.getLogger(name).addHandler(file)
    buffer.close()


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars (or, without a terminal, its progress log every few seconds) and its per-execution
    INFO lines, off unless verbose; evadlab shows its own progress."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_auto_log_stats = False


def node_resources() -> list[dict[str, float]]:
    """Each live node's total resources by Ray's names (CPU, GPU, custom ones), from ``ray.nodes()``."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def copies_that_fit(nodes: list[dict[str, float]], needs: dict[str, float]) -> int:
    """How many holders of ``needs`` (Ray's resource names and amounts, e.g. one Train worker's or one inference
    actor's) fit on ``nodes`` (:func:`node_resources`), each on one node as Ray places a task, an actor or a placement
    group's bundle: the sum over the nodes of how many each holds. ``[ray.available_resources()]`` counts the
    cluster's free resources as one pool. Needs of 0 do not limit it."""
    return sum(min((math.floor((node.get(name, 0.0) + 1e-9) / amount) for name, amount in needs.items() if amount > 0),
                   default=10**6) for node in nodes)


def total_resources(nodes: list[dict[str, float]]) -> dict[str, float]:
    """The sum of ``nodes``' resources (:func:`node_resources`), name by name."""
    total: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def cluster_text(nodes: list[dict[str, float]], names: Iterable[str]) -> str:
    """The ``names`` resources of ``nodes`` for a message: ``2 CPUs``, or on several nodes ``6 CPUs on 3 nodes, at
    most 2 CPUs on one``."""
    names = list(names)
    everything = total_resources(nodes)
    total = resources_text({name: everything.get(name, 0.0) for name in names})
    if len(nodes) < 2:
        return total
    largest = resources_text({name: max(node.get(name, 0.0) for node in nodes) for name in names})
    return f"{total} on {len(nodes)} nodes, at most {largest} on one"


def resources_text(resources: dict[str, float], times: int = 1) -> str:
    """``times`` x ``resources`` for a message, e.g. ``3.01 CPUs, 1 GPU, 1 gpu_node``."""
    return ", ".join(f"{times * amount:g} {name}{'s' if name in ('CPU', 'GPU') and times * amount != 1 else ''}"
                     for name, amount in resources.items())
