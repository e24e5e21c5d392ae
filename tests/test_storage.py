"""Atomic writes on the real file system: a write that fails for want of space names its file, and what a killed
write left under a temporary name goes with the next complete write of that file. Paths and URIs joined and opened
alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from evadlab import storage

# A process whose files may not grow beyond 64 KiB (RLIMIT_FSIZE: the kernel's EFBIG, as a full disk's ENOSPC, an
# OSError that names no file), writing 1 MiB to the file named on its command line.
LIMITED_WRITE = textwrap.dedent("""
    import resource, signal, sys
    from evadlab import storage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        storage.write_bytes(sys.argv[1], bytes(1 << 20))
    except OSError as error:
        print(error.errno, error.filename, error, sep="\\n")
""")

# A process killed (SIGKILL) in the middle of writing the file named on its command line.
KILLED_WRITE = textwrap.dedent("""
    import os, signal, sys
    from evadlab import storage
    with storage.atomic_write(sys.argv[1]) as file:
        file.write(b"half a checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_a_write_that_runs_out_of_space_names_its_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoint_epoch_0003" / "checkpoint.pt"
    done = run_python(LIMITED_WRITE, str(target))
    assert done.returncode == 0, done.stderr
    errno, filename, message = done.stdout.splitlines()
    assert int(errno) == 27 and filename == str(target), done.stdout
    assert message == f"[Errno 27] File too large: '{target}'"
    assert list(target.parent.iterdir()) == [], "neither the file nor its temporary may stay"


def test_the_next_write_of_a_file_removes_what_killed_writes_of_it_left(tmp_path):
    target = tmp_path / "checkpoint.pt"
    neighbour = tmp_path / "checkpoint.pt.json"  # another file whose name starts with the target's
    for _ in range(2):
        assert run_python(KILLED_WRITE, str(target)).returncode == -signal.SIGKILL
    assert run_python(KILLED_WRITE, str(neighbour)).returncode == -signal.SIGKILL
    leftovers = sorted(path.name for path in tmp_path.iterdir())
    assert len(leftovers) == 3 and all(name.endswith(".tmp") for name in leftovers), leftovers
    assert not target.exists(), "a killed write leaves the file as it was"

    storage.write_bytes(target, b"the whole checkpoint")
    assert target.read_bytes() == b"the whole checkpoint"
    remaining = sorted(path.name for path in tmp_path.iterdir())
    assert remaining[1:] == ["checkpoint.pt"] and remaining[0].startswith(".checkpoint.pt.json."), remaining

    storage.write_bytes(neighbour, b"{}")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "checkpoint.pt.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "manifest.json"
    storage.write_text(target, "previous")
    with pytest.raises(RuntimeError), storage.atomic_write(target) as file:
        file.write(b"half")
        raise RuntimeError("stopped")
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["manifest.json"]


@pytest.mark.parametrize(("location", "expected"), [
    ("s3://bucket", "s3://bucket/run/a.pt"),
    ("s3://bucket/", "s3://bucket/run/a.pt"),
    ("file:///tmp/runs", "file:///tmp/runs/run/a.pt"),
    ("file:///", "file:///run/a.pt"),
    ("/tmp/runs", "/tmp/runs/run/a.pt"),
])
def test_join_keeps_the_scheme_of_a_uri(location, expected):
    assert storage.join(location, "run", "a.pt") == expected


@pytest.mark.parametrize("location", ["s3://", "gs://"])
def test_a_uri_without_a_bucket_is_refused_not_read_as_a_local_folder(location):
    with pytest.raises(ValueError, match=f"^{location} names no bucket"):
        storage.filesystem_of(location)
