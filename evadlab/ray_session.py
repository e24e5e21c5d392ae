"""The one place that starts or joins Ray.

Without ``RAY_ADDRESS`` a command starts a local Ray on this machine, its dashboard (if any) bound to 127.0.0.1;
with it (as ``ray job submit`` sets it) the command joins that cluster.
"""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Start or join Ray once per process; later calls do nothing."""
    if ray.is_initialized():
        return
    if "RAY_ADDRESS" in os.environ:
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(include_dashboard=False, dashboard_host="127.0.0.1")
