"""prepare(): AVA videos or frame folders -> Parquet shards, checked against the source files with real Ray
and real decord."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from video_files import level, levels, write_numbered_video

from evadlab.cli import main
from evadlab.config import ConfigError, DataConfig, ExperimentConfig
from evadlab.pipelines.ava import group_keyframes, read_annotations
from evadlab.pipelines.clips import decode_jpegs, iter_shard_rows, read_shards, resize_short_side, resized_size
from evadlab.pipelines.prepare import (
    PREPARE_HERE_BYTES,
    KeyframeRejection,
    PrepareHooks,
    media_at_most,
    plan_tasks,
    prepare,
    video_parts,
)

SHORT_SIDE = 64
SPLITS = ("train", "val")


def config(root: Path, shards: Path, **data) -> ExperimentConfig:
    return ExperimentConfig(data=DataConfig(root=str(root), shards=str(shards), **{"short_side": SHORT_SIDE, **data}))


def expected_keyframes(cfg: ExperimentConfig, split: str) -> dict[tuple[str, int], object]:
    csv = cfg.data.annotation_dir / (cfg.data.train_annotations if split == "train" else cfg.data.val_annotations)
    table, _ = read_annotations(csv)
    return {(k.video_id, k.timestamp): k for k in group_keyframes(table)}


def rows_by_key(shards: Path, split: str) -> dict[tuple[str, int], dict]:
    rows = list(iter_shard_rows(shards, split))
    keyed = {(row["video_id"], row["timestamp"]): row for row in rows}
    assert len(keyed) == len(rows), "duplicate keyframes in the shards"
    return keyed


def decode(jpeg: bytes) -> np.ndarray:
    return decode_jpegs([jpeg])[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory, mini_ava, ray_local):
    """The videos prepared by Ray tasks (the mini-AVA is small enough to be prepared in-process by default)."""
    cfg = config(mini_ava, tmp_path_factory.mktemp("video_shards"))
    summary = prepare(cfg, here_bytes=0)
    assert not summary.here
    return cfg, summary


@pytest.fixture(scope="module")
def frame_shards(tmp_path_factory, mini_ava):
    """The frame folders (~20 MB of JPEGs, more than PREPARE_HERE_BYTES) prepared by this process all the same."""
    cfg = config(mini_ava, tmp_path_factory.mktemp("frame_shards"), source="frames")
    summary = prepare(cfg, here_bytes=2**40)
    assert summary.here
    return cfg, summary


def test_rows_are_the_annotated_keyframes_with_their_labels(video_shards):
    cfg, summary = video_shards
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    total = 0
    for split in SPLITS:
        expected, rows = expected_keyframes(cfg, split), rows_by_key(cfg.data.shards_path, split)
        assert rows.keys() == expected.keys()
        for key, keyframe in expected.items():
            row = rows[key]
            np.testing.assert_allclose(np.array(row["boxes"], np.float32), keyframe.boxes)
            assert row["actions"] == keyframe.actions
            assert row["person_ids"] == keyframe.person_ids
            assert len(row["frames"]) == cfg.data.num_frames
            assert (row["height"], row["width"]) == resized_size(row["orig_height"], row["orig_width"], SHORT_SIDE,
                                                                 cfg.data.max_long_side)
            assert decode(row["frames"][0]).shape == (row["height"], row["width"], 3)
        assert manifest["counts"][split] == len(expected)
        total += len(expected)
    assert summary.written == total and summary.rejected == [] and summary.clips_per_s > 0
    assert manifest["complete"] and manifest["clip_spec"] == cfg.data.clip_spec and manifest["rejected"] == []


def test_stored_keyframe_is_the_source_frame_at_its_second(video_shards):
    cfg, _ = video_shards
    for (video_id, timestamp), row in rows_by_key(cfg.data.shards_path, "train").items():
        reader = decord.VideoReader(str(cfg.data.root_path / "videos" / f"{video_id}.mp4"))
        source = reader[(timestamp - 900) * 30].asnumpy()[None]
        resized = resize_short_side(source, SHORT_SIDE, cfg.data.max_long_side)[0].numpy()
        assert psnr(decode(row["frames"][cfg.data.num_frames // 2]), resized) >= 30


def test_ray_data_reads_the_same_rows(video_shards):
    cfg, _ = video_shards
    dataset = read_shards(cfg.data.shards_path, "val").select_columns(["video_id", "timestamp"])
    keys = {(row["video_id"], row["timestamp"]) for row in dataset.take_all()}
    assert keys == rows_by_key(cfg.data.shards_path, "val").keys()


def test_frame_folders_and_videos_give_the_same_clips(video_shards, frame_shards):
    videos_cfg, frames_cfg = video_shards[0], frame_shards[0]
    for split in SPLITS:
        from_videos = rows_by_key(videos_cfg.data.shards_path, split)
        from_frames = rows_by_key(frames_cfg.data.shards_path, split)
        assert from_videos.keys() == from_frames.keys()
        for key, row in from_videos.items():
            other = from_frames[key]
            for column in ("boxes", "actions", "person_ids", "height", "width", "orig_height", "orig_width"):
                assert row[column] == other[column], column
            for a, b in zip(row["frames"], other["frames"]):
                assert psnr(decode(a), decode(b)) >= 30


def test_a_small_input_is_prepared_in_this_process_into_the_files_ray_tasks_write(video_shards, tmp_path, capsys):
    ray_cfg, _ = video_shards
    cfg = config(ray_cfg.data.root_path, tmp_path / "shards")
    summary = prepare(cfg)
    assert summary.here and "clips/s in this process; manifest" in capsys.readouterr().out
    by_ray, here = ray_cfg.data.shards_path, cfg.data.shards_path
    parts = sorted(path.relative_to(by_ray) for path in by_ray.glob("*/part-*.parquet"))
    assert parts == sorted(path.relative_to(here) for path in here.glob("*/part-*.parquet")) and len(parts) == 3
    for part in parts:
        ray_table, here_table = pq.read_table(by_ray / part), pq.read_table(here / part)
        assert here_table.equals(ray_table) and here_table.schema.metadata == ray_table.schema.metadata, part
    assert json.loads((here / "manifest.json").read_text()) == json.loads((by_ray / "manifest.json").read_text())


@pytest.mark.parametrize("source", ["videos", "frames"])
def test_the_input_media_size_chooses_where_the_parts_are_written(mini_ava, source):
    cfg = config(mini_ava, mini_ava / "unused", source=source)
    tasks, _ = plan_tasks(cfg.data, SPLITS, cfg.model.num_actions)
    parts = [part for task in tasks for part in video_parts(task, 2)]
    media = (mini_ava / "videos").glob("*.mp4") if source == "videos" else (mini_ava / "frames").glob("*/*.jpg")
    size = sum(path.stat().st_size for path in media)
    assert len(parts) > len(tasks) and media_at_most(parts, size) and not media_at_most(parts, size - 1)


class Killed(Exception):
    """Stands for the job being killed."""


class CheckManifest(PrepareHooks):
    """After every part: the manifest counts only parts that are on disk, each with the rows it says. With ``kill_after``
    the run stops there, as a killed job stops."""

    def __init__(self, shards: Path, kill_after: int | None = None):
        self.shards, self.kill_after = shards, kill_after

    def after_part(self, finished: int, pending: int) -> None:
        manifest = json.loads((self.shards / "manifest.json").read_text())
        for split, videos in manifest["parts"].items():
            for video, parts in videos.items():
                for index, rows in parts.items():
                    assert pq.read_metadata(self.shards / split / f"part-{video}-{index}.parquet").num_rows == rows
            assert manifest["counts"][split] == sum(sum(parts.values()) for parts in videos.values())
        if finished == self.kill_after:
            raise Killed


@pytest.mark.parametrize("here_bytes", [PREPARE_HERE_BYTES, 0], ids=["in-process", "ray-tasks"])
def test_a_killed_prepare_leaves_a_manifest_of_the_parts_it_saw_finish(mini_ava, tmp_path, ray_local, here_bytes):
    cfg = config(mini_ava, tmp_path / "shards", keyframes_per_part=2)
    with pytest.raises(Killed):
        prepare(cfg, hooks=CheckManifest(cfg.data.shards_path, kill_after=1), here_bytes=here_bytes)
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    # Tasks already running may finish more parts after the kill; the manifest counts the one it saw finish.
    counted = [rows for videos in manifest["parts"].values() for parts in videos.values() for rows in parts.values()]
    assert not manifest["complete"] and len(counted) == 1 and sum(manifest["counts"].values()) == counted[0] > 0
    assert manifest["videos"] == {"train": {}, "val": {}}


def test_a_rerun_writes_only_the_missing_parts_even_within_a_video(mini_ava, tmp_path, ray_local):
    """Parts of 2 keyframes, 3 per video. Left as a killed run leaves them: the first video without its middle part,
    the second without any, a temporary part, and the one-file shard of an earlier version. The rerun keeps what is on
    disk untouched, writes only the missing parts and removes what no reader may see."""
    cfg = config(mini_ava, tmp_path / "shards", keyframes_per_part=2)
    prepare(cfg)
    train = cfg.data.shards_path / "train"
    first, second = sorted({path.name.rsplit("-", 1)[0] for path in train.glob("part-*.parquet")})
    for path in [train / f"{first}-0001.parquet", *train.glob(f"{second}-*.parquet")]:
        path.unlink()
    kept = {path: path.stat().st_mtime_ns for path in cfg.data.shards_path.glob("*/part-*.parquet")}
    stale = [train / ".part-broken.parquet.123.tmp", train / f"{first}.parquet"]
    for path in stale:
        path.write_bytes(b"half a shard")

    again = prepare(cfg, hooks=CheckManifest(cfg.data.shards_path))
    assert again.skipped_parts == len(kept) == 5 and again.skipped_videos == 1 and again.written == 2 + 5
    assert not any(path.exists() for path in stale)
    assert all(path.stat().st_mtime_ns == written_at for path, written_at in kept.items())
    expected = {split: expected_keyframes(cfg, split) for split in SPLITS}
    for split in SPLITS:
        assert rows_by_key(cfg.data.shards_path, split).keys() == expected[split].keys()
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    assert manifest["complete"] and sum(manifest["counts"].values()) == sum(len(keys) for keys in expected.values())
    assert {video: list(parts) for video, parts in manifest["parts"]["train"].items()} == {
        video: ["0000", "0001", "0002"] for video in manifest["videos"]["train"]}


def test_a_source_changed_since_it_was_prepared_is_prepared_again(mini_ava, tmp_path, capsys):
    """A video replaced by a shorter one, then put back: each rerun writes that video's parts again from the file as
    it is, so that its clips, its keyframes outside the media and the manifest agree with it; the others are kept."""
    root = tmp_path / "ava"
    shutil.copytree(mini_ava, root, ignore=shutil.ignore_patterns("frames"))
    cfg = config(root, tmp_path / "shards")
    prepare(cfg)
    manifest_path = cfg.data.shards_path / "manifest.json"
    full = json.loads(manifest_path.read_text())
    video = min((root / "videos").glob("*.mp4"))
    original = video.read_bytes()
    kept = {path: path.stat().st_mtime_ns for path in cfg.data.shards_path.glob("*/part-*.parquet")
            if not path.name.startswith(f"part-{video.stem}-")}
    write_numbered_video(video, count=4 * 30)  # 4 s: the keyframes from second 904 on are outside
    capsys.readouterr()

    shorter = prepare(cfg)
    assert f"1 source(s) changed since they were prepared (train/{video.stem})" in capsys.readouterr().out
    assert shorter.skipped_videos == len(full["sources"]["videos"]) - 1
    outside = {r.timestamp for r in shorter.outside_media if r.video_id == video.stem}
    assert outside and min(outside) >= 904
    manifest = json.loads(manifest_path.read_text())
    assert manifest["sources"]["videos"][f"train/{video.stem}"]["bytes"] == video.stat().st_size
    assert all(path.stat().st_mtime_ns == written_at for path, written_at in kept.items())

    video.write_bytes(original)
    prepare(cfg)
    again = json.loads(manifest_path.read_text())
    assert again["counts"] == full["counts"] and again["rejected"] == full["rejected"]


def test_bad_inputs_are_named_and_the_good_ones_finish(mini_ava, tmp_path, ray_local):
    root = tmp_path / "ava"
    shutil.copytree(mini_ava, root, ignore=shutil.ignore_patterns("frames"))
    cfg = config(root, tmp_path / "shards")
    corrupt = min((root / "videos").glob("*.mp4"))
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    train_csv = cfg.data.annotation_dir / cfg.data.train_annotations
    good_lines = len(train_csv.read_text().splitlines())
    with train_csv.open("a") as csv:
        csv.write("some_video,09o2,0.1,0.1,0.5,0.5,12,0\nonly,three,fields\nghost,0902,0.1,0.1,0.5,0.5,12,0\n")

    summary = prepare(cfg)
    reasons = {(r.source, r.line): r.reason for r in summary.rejected}
    ghost = str(root / "videos" / "ghost")
    assert set(reasons) == {(str(corrupt), None), (ghost, None), (str(train_csv), good_lines + 1),
                            (str(train_csv), good_lines + 2)}
    assert "timestamp '09o2'" in reasons[(str(train_csv), good_lines + 1)]
    assert "3 fields, expected 8" in reasons[(str(train_csv), good_lines + 2)]
    assert reasons[(str(corrupt), None)].startswith("ValueError: cannot decode the video (PyAV: ")
    assert "no video file for 'ghost'" in reasons[(ghost, None)]
    assert not list(cfg.data.shards_path.glob("*/.part-*")), "a failed video left a temporary shard"
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    assert {(r["source"], r["line"]) for r in manifest["rejected"]} == set(reasons)
    for split in SPLITS:
        good = {key for key in expected_keyframes(cfg, split) if key[0] not in (corrupt.stem, "ghost")}
        assert rows_by_key(cfg.data.shards_path, split).keys() == good
        assert manifest["counts"][split] == len(good)


def test_another_clip_spec_is_refused_in_the_same_folder(video_shards):
    cfg, _ = video_shards
    other = config(cfg.data.root_path, cfg.data.shards_path, short_side=32)
    with pytest.raises(ValueError, match="choose another data.shards"):
        prepare(other)


def write_brightness_ramp(path: Path, frames: int, fps: int) -> None:
    """A video whose frame i is uniformly grey at 8 + 4 i, so a decoded frame tells its own index."""
    path.parent.mkdir(parents=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for index in range(frames):
            image = np.full((64, 96, 3), 8 + 4 * index, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_videos_are_read_by_time_whatever_their_frame_rate(tmp_path, ray_local):
    fps, num_frames, offset = 25, 60, 901.0
    root = tmp_path / "ava"
    write_brightness_ramp(root / "videos" / "ramp.mp4", num_frames, fps)
    (root / "annotations").mkdir()
    (root / "annotations" / "ava_train_v2.2.csv").write_text(
        "ramp,902,0.1,0.1,0.9,0.9,12,0\nramp,903,0.1,0.1,0.9,0.9,14,0\n")
    # With an even keyframe index every sample time is on an even 30 fps frame, never half-way between two
    # 25 fps frames, so "nearest" has one answer.
    cfg = config(root, tmp_path / "shards", video_offset_sec=offset)
    prepare(cfg, splits=("train",))

    frame_times = np.arange(num_frames) / fps
    for row in iter_shard_rows(cfg.data.shards_path, "train"):
        center = round((row["timestamp"] - offset) * 30)
        times = (center + (np.arange(16) - 8) * 4) / 30
        expected = [int(np.abs(frame_times - t).argmin()) for t in times]
        stored = [round((decode(jpeg).mean() - 8) / 4) for jpeg in row["frames"]]
        assert stored == expected
    assert expected[-1] == num_frames - 1, "the last keyframe's clip should run past the end and be clamped"


# A video cut short: 4 s (120 frames at 30 fps) from the start of an AVA cut (seconds 900-904), annotated at seconds
# 902..910 with one box each, plus a second before the cut and a negative one.
CUT_SECONDS = [899, *range(902, 911)]
CUT_ANNOTATIONS = "".join(f"cut,{second},0.1,0.1,0.9,0.9,12,1\n" for second in CUT_SECONDS) + "cut,-1,0.1,0.1,0.9,0.9,12,1\n"


def write_cut_short_video(root: Path, frames: bool) -> None:
    """``videos/cut.mp4``, or with ``frames`` the folder ``frames/cut/`` of its 120 JPEGs, and the train annotations."""
    if frames:
        (root / "frames" / "cut").mkdir(parents=True)
        for index in range(120):
            Image.fromarray(np.full((64, 96, 3), level(index), np.uint8)).save(
                root / "frames" / "cut" / f"cut_{index + 1:06d}.jpg", quality=95)
    else:
        (root / "videos").mkdir(parents=True)
        write_numbered_video(root / "videos" / "cut.mp4", count=120)
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "ava_train_v2.2.csv").write_text(CUT_ANNOTATIONS)


@pytest.mark.parametrize(("source", "media"), [("videos", {"media_duration_s": 4.0}), ("frames", {"frame_count": 120})])
def test_keyframes_outside_the_media_are_rejected_not_frozen(tmp_path, ray_local, capsys, source, media):
    root = tmp_path / "ava"
    write_cut_short_video(root, frames=source == "frames")
    cfg = config(root, tmp_path / "shards", source=source, video_offset_sec=900.0)
    summary = prepare(cfg, splits=("train",))

    rows = rows_by_key(cfg.data.shards_path, "train")
    assert sorted(rows) == [("cut", 902), ("cut", 903)]
    # Inside the media, a clip whose window reaches past the end takes the last frame there, as the released code.
    assert levels(np.stack([decode(jpeg) for jpeg in rows["cut", 903]["frames"]])) == [
        min(90 + 4 * offset, 119) % 80 for offset in range(-8, 8)]
    outside = [904, 905, 906, 907, 908, 909, 910, 899]
    source_path = str(root / ("frames/cut" if source == "frames" else "videos/cut.mp4"))
    assert sorted(summary.outside_media, key=lambda r: r.timestamp) == sorted(
        [KeyframeRejection(source_path, None, r.reason, video_id="cut", timestamp=r.timestamp, media=media)
         for r in summary.outside_media], key=lambda r: r.timestamp)
    assert sorted(r.timestamp for r in summary.outside_media) == sorted(outside)
    annotation_rows = [r for r in summary.rejected if not isinstance(r, KeyframeRejection)]
    assert [(r.line, r.reason) for r in annotation_rows] == [(11, "timestamp -1 outside 0..2147483647")]
    manifest_path = cfg.data.shards_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["counts"] == {"train": 2} and manifest["complete"]
    recorded = {entry["timestamp"]: entry for entry in manifest["rejected"] if entry.get("video_id") == "cut"}
    assert sorted(recorded) == sorted(outside)
    assert recorded[910] == {"source": source_path, "line": None, "video_id": "cut", "timestamp": 910, **media,
                             "reason": recorded[910]["reason"]}
    if source == "videos":
        assert recorded[910]["reason"] == ("keyframe 910 is 10.000 s into the file (data.video_offset_sec=900), "
                                           "outside the video, which lasts 4.000 s")
        assert recorded[899]["reason"].startswith("keyframe 899 is -1.000 s into the file")
    else:
        assert recorded[910]["reason"] == ("keyframe 910 is frame index 300 (data.video_offset_sec=900, "
                                           "data.fps=30), outside the 120 frames")
    printed = capsys.readouterr().out
    assert ("2 keyframe clips written, 0 videos already done, 9 inputs rejected (8 of them keyframes outside their "
            "media)") in printed and f"manifest: {manifest_path}" in printed

    # A second run finds the shard complete and still lists the keyframes it left out.
    again = prepare(cfg, splits=("train",))
    assert again.skipped_videos == 1 and again.written == 0
    assert json.loads(manifest_path.read_text())["rejected"] == manifest["rejected"]


def test_a_split_without_rows_is_an_error_after_the_manifest(tmp_path, ray_local, capsys):
    root = tmp_path / "ava"
    write_cut_short_video(root, frames=False)
    annotations = root / "annotations" / "ava_train_v2.2.csv"
    cfg = config(root, tmp_path / "shards", video_offset_sec=900.0)
    manifest_path = cfg.data.shards_path / "manifest.json"
    message = (f"split(s) train have no rows: their annotations list no keyframe, or every keyframe was rejected "
               f"(see 'rejected' in {manifest_path})")
    annotations.write_text("cut,0905,0.1,0.1,0.9,0.9,12,1\ncut,0906,0.1,0.1,0.9,0.9,12,1\n")
    with pytest.raises(ValueError) as error:
        prepare(cfg, splits=("train",))
    assert str(error.value) == message
    manifest = json.loads(manifest_path.read_text())
    assert manifest["complete"] and manifest["counts"] == {"train": 0} and len(manifest["rejected"]) == 2

    # The command: both splits, the val annotations empty. It ends with an error, not success.
    annotations.write_text("cut,0902,0.1,0.1,0.9,0.9,12,1\n")
    (root / "annotations" / "ava_val_v2.2.csv").write_text("")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"data": {"root": str(root), "shards": str(cfg.data.shards_path),
                                                   "short_side": SHORT_SIDE}}))
    capsys.readouterr()
    assert main(["prepare", str(experiment)]) == 2
    printed = capsys.readouterr()
    assert "evadlab prepare: 1 keyframe clips written" in printed.out
    assert printed.err == f"evadlab prepare: error: {message.replace('split(s) train', 'split(s) val')}\n"
    assert json.loads(manifest_path.read_text())["counts"] == {"train": 1, "val": 0}


def test_live_recordings_are_prepared_with_pyav(tmp_path, ray_local):
    """WebM and Matroska written live carry no duration and no cues; decord refuses them, PyAV reads them."""
    root = tmp_path / "ava"
    (root / "videos").mkdir(parents=True)
    write_numbered_video(root / "videos" / "webm_live.webm", codec="libvpx", container="webm",
                         options={"live": "1"}, quality={"crf": "4", "b": "4M"})
    write_numbered_video(root / "videos" / "mkv_live.mkv", container="matroska", options={"live": "1"})
    for video in ("webm_live.webm", "mkv_live.mkv"):
        with pytest.raises(decord.DECORDError):
            decord.VideoReader(str(root / "videos" / video))
    (root / "annotations").mkdir()
    (root / "annotations" / "ava_train_v2.2.csv").write_text("".join(
        f"{video},{second},0.1,0.1,0.9,0.9,12,1\n" for video in ("webm_live", "mkv_live") for second in (902, 905)))
    cfg = config(root, tmp_path / "shards", video_offset_sec=900.0)
    summary = prepare(cfg, splits=("train",))
    assert summary.rejected == [] and summary.written == 4
    for (video, second), row in rows_by_key(cfg.data.shards_path, "train").items():
        keyframe = (second - 900) * 30
        assert levels(np.stack([decode(jpeg) for jpeg in row["frames"]])) == [
            (keyframe + 4 * offset) % 80 for offset in range(-8, 8)], video


def test_a_prepare_task_no_node_can_hold_is_refused_before_any_part(mini_ava, tmp_path, ray_local):
    """Ray Data would wait forever for a task of more CPUs than any node has."""
    cfg = config(mini_ava, tmp_path, prepare_cpus=64)
    with pytest.raises(ConfigError, match=r"a prepare task needs 64 CPUs \(data.prepare_cpus\) on one node but the "
                                          r"cluster has 2 CPUs: lower data.prepare_cpus"):
        prepare(cfg, here_bytes=0)
    assert not list(cfg.data.shards_path.rglob("part-*.parquet"))
