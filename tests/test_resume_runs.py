"""`train.resume` continues the newest run of exactly this config, found by the marker in each run folder; other
configs whose name starts the same, sweep trials, a sweep's folder and runs of a changed config are never continued."""

from __future__ import annotations

import json
import time
from pathlib import Path

from evadlab.config import load_config
from evadlab.platform.runs import (
    CHECKPOINT_FOLDER,
    RAY_TRAIN_SNAPSHOT_FILE,
    RUN_MARKER,
    config_hash,
    config_identity,
    read_run_markers,
    write_run_marker,
)
from evadlab.platform.train import run_name_for

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def config(tmp_path: Path, *overrides: str):
    return load_config(QUICKSTART, [f"train.storage_path={tmp_path / 'ray'}", "tracking.enabled=false", *overrides])


def make_run(tmp_path: Path, folder: str, created: float, *overrides: str, epochs: int = 1) -> None:
    """A run folder as `evadlab train` leaves it, created at ``created`` (seconds since the epoch), with the checkpoint
    of ``epochs`` epochs committed (as Ray Train's snapshot records it); ``epochs=0``: a start that failed before."""
    location = str(tmp_path / "ray")
    write_run_marker(config(tmp_path, *overrides), location, folder)
    marker = tmp_path / "ray" / folder / RUN_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "created": created}))
    if epochs:
        (tmp_path / "ray" / folder / CHECKPOINT_FOLDER.format(epochs=epochs)).mkdir()
        latest = {"metrics": {"progress/epoch": epochs}, "checkpoint_dir_name": CHECKPOINT_FOLDER.format(epochs=epochs)}
        snapshot = {"latest_checkpoint_result": latest}
        (tmp_path / "ray" / folder / RAY_TRAIN_SNAPSHOT_FILE).write_text(json.dumps(snapshot))


def test_resume_picks_the_newest_run_of_this_config_and_says_which(tmp_path, capsys):
    make_run(tmp_path, "quickstart_20251130-090000", 1_764_490_000.0)
    make_run(tmp_path, "quickstart_20251130-080000", 1_764_493_600.0)  # started later, although its name sorts first
    make_run(tmp_path, "quickstart_20991231-235959", 1_764_497_200.0, "model.keep_rate=0.5")  # another config
    make_run(tmp_path, "quickstart_long_20251130-110000", 1_764_500_800.0, "name=quickstart_long")
    make_run(tmp_path, "quickstart_a1b2c3_20251130-120000", 1_764_504_400.0, "name=quickstart_a1b2c3")  # a sweep trial
    (tmp_path / "ray" / "quickstart_sweep").mkdir()  # a sweep's own folder: no marker
    (tmp_path / "ray" / "quickstart_sweep" / "experiment_state-2025-11-30_12-00-00.json").write_text("{}")

    # What a resume may change (length, resources, evaluation, tracking) does not make it another config.
    resumed = config(tmp_path, "train.resume=true", "train.epochs=60", "train.num_workers=2", "eval.every_epochs=5",
                     "tracking.uri=http://127.0.0.1:5000")
    assert run_name_for(resumed, str(tmp_path / "ray")) == "quickstart_20251130-080000"
    out = capsys.readouterr().out
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_764_493_600.0))
    assert out == (f"evadlab train: train.resume: continuing run quickstart_20251130-080000 of 'quickstart' (created "
                   f"{created}) at {tmp_path / 'ray' / 'quickstart_20251130-080000'}\n")
    assert len(read_run_markers(str(tmp_path / "ray"))) == 5


def test_resume_skips_newer_runs_that_never_committed_a_checkpoint(tmp_path, capsys):
    """Starts that failed before their first epoch (an unreachable tracking server, too few CPUs) leave a marked
    folder with nothing to continue: resume continues the newest run with a checkpoint, and the newest run when none
    has one."""
    make_run(tmp_path, "quickstart_20251130-090000", 1_764_490_000.0, epochs=3)
    make_run(tmp_path, "quickstart_20251130-100000", 1_764_493_600.0, epochs=0)
    make_run(tmp_path, "quickstart_20251130-110000", 1_764_497_200.0, epochs=0)
    resumed = config(tmp_path, "train.resume=true")
    assert run_name_for(resumed, str(tmp_path / "ray")) == "quickstart_20251130-090000"
    assert "continuing run quickstart_20251130-090000" in capsys.readouterr().out

    other = tmp_path / "other"
    make_run(other, "quickstart_20251130-100000", 1_764_493_600.0, epochs=0)
    make_run(other, "quickstart_20251130-110000", 1_764_497_200.0, epochs=0)
    assert run_name_for(config(other, "train.resume=true"), str(other / "ray")) == "quickstart_20251130-110000"


def test_a_changed_config_starts_a_marked_new_run_and_names_the_difference(tmp_path, capsys):
    make_run(tmp_path, "quickstart_20251130-090000", 1_764_490_000.0)
    make_run(tmp_path, "quickstart_long_20251130-110000", 1_764_500_800.0, "name=quickstart_long")
    changed = config(tmp_path, "train.resume=true", "train.batch_size=8")
    name = run_name_for(changed, str(tmp_path / "ray"))
    assert name.startswith("quickstart_2") and name != "quickstart_20251130-090000"
    assert capsys.readouterr().out == (
        f"evadlab train: train.resume: 1 earlier run(s) of 'quickstart' under {tmp_path / 'ray'}, none with this "
        f"config (the newest, quickstart_20251130-090000, differs in train.batch_size (4 -> 8)); starting a new run\n")
    marker = json.loads((tmp_path / "ray" / name / RUN_MARKER).read_text())
    assert marker["config_name"] == "quickstart" and marker["run_name"] == name
    assert marker["config_hash"] == config_hash(config_identity(changed))
    # The new run is the one a later resume of this config continues.
    assert run_name_for(changed, str(tmp_path / "ray")) == name


def test_without_any_run_of_the_config_resume_starts_one(tmp_path, capsys):
    make_run(tmp_path, "quickstart_long_20251130-110000", 1_764_500_800.0, "name=quickstart_long")
    name = run_name_for(config(tmp_path, "train.resume=true"), str(tmp_path / "ray"))
    assert name.startswith("quickstart_2")
    assert capsys.readouterr().out == (f"evadlab train: train.resume: no earlier run of 'quickstart' under "
                                       f"{tmp_path / 'ray'}; starting a new run\n")
