"""``reuse_freed_memory``: a process that allocates and frees blocks of 1-24 MB, as a training step does, stops
page-faulting them in again. Each case runs in its own interpreter, so the test process's allocator is untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

STEPS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from evadlab.memory import reuse_freed_memory

    if sys.argv[1] == "tuned":
        assert reuse_freed_memory()
    rng = np.random.default_rng(0)

    def step():
        held = []
        for _ in range(40):
            held.append(np.ones(int(rng.integers(1, 24)) << 18, np.float32))  # 1-24 MB, every page written
            if len(held) > 4:
                held.pop(0)

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, tuned = page_faults("default"), page_faults("tuned")
    # 5 steps of 40 blocks of ~12 MB on the project's machine: ~28,000 faults with glibc's defaults, ~1,500 tuned.
    assert default > 10_000
    assert tuned < default / 5, (default, tuned)
