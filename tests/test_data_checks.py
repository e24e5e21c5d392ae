"""Nothing trains or evaluates on data that is not completely prepared: every consumer refuses, before Ray or MLflow
is touched, with one line saying what is missing and how to finish it; `run` and `tune` resume the prepare instead."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from evadlab.cli import main
from evadlab.config import load_config
from evadlab.pipelines.prepare import PrepareHooks, prepare, require_prepared
from evadlab.platform.run import ensure_prepared

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


class Killed(Exception):
    """Stands for the job being killed."""


class KillAfterFirstPart(PrepareHooks):
    def after_part(self, finished: int, pending: int) -> None:
        raise Killed


def overrides(folder: Path, data_root: Path) -> list[str]:
    return [f"data.root={data_root}", f"data.shards={folder / 'shards'}", f"train.storage_path={folder / 'ray'}",
            f"output_dir={folder / 'runs'}", "tracking.enabled=false", "model.act_fc_dim=64"]


def refusals(folder: Path, settings: list[str], capsys) -> dict[str, str]:
    """The error line of train and evaluate on this data (each must exit 2 with exactly one line). `tune` prepares its
    data as `run` does (tests/test_sweeps.py)."""
    commands = {
        "train": ["train", str(QUICKSTART), *settings],
        "evaluate": ["evaluate", str(QUICKSTART), "--checkpoint", str(folder / "never_read.pt"), *settings],
    }
    lines = {}
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"evadlab {name}: error: "), err
        lines[name] = err[0].removeprefix(f"evadlab {name}: error: ")
    assert not (folder / "ray").exists() and not (folder / "runs").exists(), "nothing may start"
    return lines


def test_an_interrupted_prepare_is_refused_with_what_is_missing_and_run_resumes_it(mini_ava, tmp_path, ray_local,
                                                                                   capsys):
    settings = overrides(tmp_path, mini_ava)
    cfg = load_config(QUICKSTART, settings)
    with pytest.raises(Killed):
        prepare(cfg, hooks=KillAfterFirstPart())
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    assert not manifest["complete"]
    capsys.readouterr()

    for command, line in refusals(tmp_path, settings, capsys).items():
        match = re.fullmatch(
            rf"the shards at {re.escape(str(cfg.data.shards_path))} are incomplete \(a prepare was interrupted\): "
            r"(?P<splits>.*); rerun `evadlab prepare <config>` to resume it", line)
        assert match, (command, line)
        needed = ["val"] if command == "evaluate" else ["train", "val"]  # the quickstart evaluates while training
        parts = match["splits"].split("; ")
        assert [part.split(":")[0] for part in parts] == needed
        for part in parts:
            split = part.split(":")[0]
            present, expected = map(int, re.search(r": (\d+) of (\d+) keyframes", part).groups())
            assert present == manifest["counts"][split] and expected == manifest["expected"][split]
            missing, planned = map(int, re.search(r"(\d+) of (\d+) videos missing", part).groups())
            assert planned == sum(key.startswith(f"{split}/") for key in manifest["sources"]["videos"])
            assert missing == planned - len(manifest["videos"][split])

    ensure_prepared(cfg)
    out = capsys.readouterr().out
    assert "resuming an interrupted prepare" in out and "videos already done" in out
    assert require_prepared(cfg, ("train", "val"))["complete"]
    assert re.search(r"keyframe clips written, [1-9]\d* videos already done", out), "finished videos are kept"


def test_a_split_without_keyframes_says_why(mini_ava, tmp_path, capsys):
    """Prepared completely but empty: the annotation file has no usable rows, or no video it names could be read.
    Both need no Ray: with nothing to decode, prepare only writes the manifest."""
    root = tmp_path / "ava"
    shutil.copytree(mini_ava / "annotations", root / "annotations")
    train_csv = root / "annotations" / "ava_train_v2.2.csv"
    train_csv.write_text("only,three,fields\nvid,09o2,0.1,0.1,0.5,0.5,12,0\n")
    settings = overrides(tmp_path, root)
    cfg = load_config(QUICKSTART, settings)
    with pytest.raises(ValueError, match="split.s. train, val have no rows"):
        prepare(cfg)
    capsys.readouterr()
    lines = refusals(tmp_path, settings, capsys)
    manifest = cfg.data.shards_path / "manifest.json"
    assert lines["train"] == (
        f"the train split at {cfg.data.shards_path} holds no keyframes: its annotation file {train_csv} has no usable "
        f"rows (2 rejected, listed under 'rejected' in {manifest})")
    val_csv = root / "annotations" / "ava_val_v2.2.csv"
    videos = len({line.split(",")[0] for line in val_csv.read_text().splitlines()})
    assert lines["evaluate"] == (f"the val split at {cfg.data.shards_path} holds no keyframes: none of the {videos} "
                                 f"videos named in {val_csv} could be read (listed under 'rejected' in {manifest})")


def test_never_prepared_and_another_clip_spec_are_told_apart(mini_ava, tmp_path, capsys):
    settings = overrides(tmp_path, mini_ava)
    shards = load_config(QUICKSTART, settings).data.shards_path
    lines = refusals(tmp_path, settings, capsys)
    never = f"no prepared shards at {shards} (no manifest.json): run `evadlab prepare <config>` first"
    assert set(lines.values()) == {never}
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text(json.dumps({"clip_spec": {"short_side": 32}, "complete": True,
                                                      "counts": {"train": 4, "val": 2}}))
    for line in refusals(tmp_path, settings, capsys).values():
        assert line.startswith(f"{shards} holds shards of clip spec {{'short_side': 32}}, but this config asks for ")
