"""The Ray a command starts: quiet unless verbose, its own records in the session's log folder, and a State API that
Ray Train's placement-group cleaner reaches from inside the job even when several Ray instances run on the machine
(the test session's own Ray is one of them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import logging, ray, ray.data
from evadlab.ray_session import DRIVER_LOG, ensure_ray
ensure_ray()

@ray.remote(num_cpus=0)
def actors_seen_by_the_state_api():
    from ray.util.state import list_actors
    return len(list_actors())

print("state api:", ray.get(actors_seen_by_the_state_api.remote()) >= 0)
ray.data.range(8).map_batches(lambda batch: batch).materialize()
logging.getLogger("ray.data").warning("a warning of Ray Data")
logging.getLogger("ray.train").error("an error of Ray Train")
session = ray._private.worker._global_node.get_session_dir_path()
print("driver log:", f"{session}/logs/{DRIVER_LOG}")
"""


def start_command(verbose: bool) -> list[str]:
    """The script in its own process (as a command runs), its console (stdout and stderr) as lines."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "EVADLAB_VERBOSE")}
    if verbose:
        env["EVADLAB_VERBOSE"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout.splitlines()


def test_ray_whispers_unless_verbose_and_its_state_api_answers_beside_another_ray(ray_local):
    lines = start_command(verbose=False)
    assert "state api: True" in lines, "the State API of this job's Ray, not 'Found multiple active Ray instances'"
    (log_line,) = [line for line in lines if line.startswith("driver log: ")]
    console = [line for line in lines if not line.startswith(("state api:", "driver log: "))]
    assert [line for line in console if "an error of Ray Train" not in line] == [], f"only Ray's errors: {console}"
    assert any("an error of Ray Train" in line for line in console)
    with open(log_line.removeprefix("driver log: ")) as driver_log:
        kept = driver_log.read()
    assert "Started a local Ray instance" in kept and "a warning of Ray Data" in kept

    loud = "\n".join(start_command(verbose=True))
    assert "Started a local Ray instance" in loud and "a warning of Ray Data" in loud
