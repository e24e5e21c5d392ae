"""``evadlab prepare``: AVA videos or frame folders -> Parquet shards of keyframe clips, with Ray Data.

Layout written under ``cfg.data.shards_path``::

    <split>/part-<video_id>-<NNNN>.parquet   shard part NNNN of a video: its keyframes number NNNN * P .. NNNN * P +
                                             P - 1 in timestamp order (P = data.keyframes_per_part), one row each
    manifest.json                            clip spec, sources, counts, parts, rejected inputs, ``complete``

Row schema (``SHARD_SCHEMA``):

    video_id     string
    timestamp    int64                 the keyframe's second in the AVA time line (902..1798)
    frames       list<binary>          num_frames JPEGs at sample_rate around the keyframe (index num_frames // 2
                                       is the keyframe), short side resized as spec 5.4 step 3
    height       int32, width int32    size of the stored frames
    orig_height  int32, orig_width int32   size of the source frames
    boxes        list<list<float32>>   one [x1, y1, x2, y2] per person, normalised to 0..1
    actions      list<list<int32>>     action ids (1..model.num_actions) of each box
    person_ids   list<int32>           the CSV's person id of each box

Every part also carries its clip spec, the timestamps of its keyframes and those of them that lie outside the media in
the Parquet key-value metadata (``evadlab.clip_spec``, ``evadlab.keyframes``, ``evadlab.outside_media``), which is
what makes a rerun skip finished work: a part is only ever visible complete (written under a hidden temporary name,
then renamed), so an existing part with the right spec and keyframes, whose rows and keyframes outside the media add
up to them, is done. A killed prepare therefore redoes at most the parts that were being written, never a whole
15-minute video; part files no longer planned (another part size, a keyframe dropped from the annotations, the one-file
shards of earlier versions) are removed, so the split folders hold exactly the planned parts.

A keyframe whose instant lies outside its media (past the end of a video that was cut short, before its start, or
beyond the frames of a frame folder) has no frames to show: it is rejected, named in the manifest with the video, the
timestamp, the media's duration or frame count and the reason, instead of becoming copies of the first or last frame.
A keyframe inside the media whose clip window reaches past an end takes the first or last frame there, as the
released code does (``clip_frame_indices``, ``nearest_frame_indices``). A split left with no rows (no annotated
keyframes, or every one rejected) is an error once the manifest is written.

Each task writes one part of one video; the tasks are Ray tasks, or threads of this process when the input media
total at most 16 MiB (``PREPARE_HERE_BYTES``: starting Ray's workers would cost more than the work). A task works
out the frames its keyframes' clips need, seeks to the first, decodes each of them once, in order, resizes and
JPEG-encodes it, and streams the rows into the part. A Ray task keeps to ``data.prepare_cpus`` cores: that many
decoding threads (PyAV, see ``video.py``) and torch threads for the resize, Arrow's pool sized the same; this process
runs as many parts at once as its cores allow at that many decoding threads each. Video files are read by time (the
frames nearest to the 30 fps sampling instants, whatever the file's frame rate); frame folders by index, as the
released code does. A video that cannot be read (by PyAV, nor by decord) is recorded as rejected in the manifest; the
other videos finish. The manifest is rewritten as each part finishes. A progress bar over the keyframe clips (on a
terminal) shows the parts done, clips/s and the time left; a one-line summary ends the run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from evadlab.config import ConfigError, DataConfig, ExperimentConfig, check_action_ids
from evadlab.console import progress_bar
from evadlab.pipelines.ava import (
    Keyframe,
    Rejection,
    group_keyframes,
    read_annotations,
    read_frame_list,
)
from evadlab.pipelines.clips import encode_jpegs, resize_short_side
from evadlab.pipelines.video import FrameSource, error_reason, open_frames
from evadlab.ray_session import cluster_text, copies_that_fit, ensure_ray, node_resources
from evadlab.storage import atomic_path, remove, require_writable_folder, temporaries_in, write_text

SHARD_SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("timestamp", pa.int64()),
    ("frames", pa.list_(pa.binary())),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("actions", pa.list_(pa.list_(pa.int32()))),
    ("person_ids", pa.list_(pa.int32())),
])
# JPEG bytes do not compress; the small columns do.
SHARD_COMPRESSION = {name: "NONE" if name == "frames" else "ZSTD" for name in SHARD_SCHEMA.names}
CLIP_SPEC_KEY = b"evadlab.clip_spec"
KEYFRAMES_KEY = b"evadlab.keyframes"
OUTSIDE_MEDIA_KEY = b"evadlab.outside_media"
MANIFEST = "manifest.json"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
# Frames decoded per call: large enough to amortise the call, small enough to bound memory at 1080p.
DECODE_CHUNK = 32
# Rows per Parquet row group: readers stream a shard a few clips at a time.
ROWS_PER_GROUP = 8
# Input media of at most this size (video files, or the frames of frame folders) is prepared by this process:
# starting Ray and its worker processes, each importing torch and PyAV, takes 5-10 s on 2 cores, while the
# quickstart's 1.1 MB of synthetic videos decode in ~1 s.
PREPARE_HERE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class KeyframeRejection(Rejection):
    """An annotated keyframe whose instant lies outside its video's media: ``source`` is the video file or frame
    folder, ``media`` its extent (``media_duration_s`` or ``frame_count``)."""

    video_id: str = ""
    timestamp: int = 0
    media: dict[str, float | int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The manifest's entry: source, line (None), video_id, timestamp, the media's extent, reason."""
        return {"source": self.source, "line": self.line, "video_id": self.video_id, "timestamp": self.timestamp,
                **self.media, "reason": self.reason}


@dataclass
class PrepareSummary:
    written: int
    skipped_videos: int  # videos whose every part an earlier run had written
    rejected: list[Rejection]
    seconds: float
    clips_per_s: float
    shards_path: Path
    skipped_parts: int = 0  # parts an earlier run had written (those of the skipped videos included)
    task_peak_memory_bytes: int = 0  # the largest peak resident memory of a process that ran a task of this run
    here: bool = False  # the parts were written by this process, not by Ray tasks (see PREPARE_HERE_BYTES)

    @property
    def outside_media(self) -> list[KeyframeRejection]:
        return [rejection for rejection in self.rejected if isinstance(rejection, KeyframeRejection)]


@dataclass
class VideoTask:
    """One video of one split: where its frames are and which keyframes it needs."""

    split: str
    video_id: str
    source: Path
    frame_paths: list[str] | None
    keyframes: list[Keyframe]


@dataclass
class PartTask:
    """One shard part: up to ``data.keyframes_per_part`` consecutive keyframes of a video, the unit of a Ray task."""

    video: VideoTask
    index: int
    keyframes: list[Keyframe]

    @property
    def key(self) -> tuple[str, str, int]:
        return self.video.split, self.video.video_id, self.index

    @property
    def timestamps(self) -> list[int]:
        return [int(keyframe.timestamp) for keyframe in self.keyframes]


def video_parts(task: VideoTask, per_part: int) -> list[PartTask]:
    """The video's keyframes (timestamp order) in parts of ``per_part``."""
    return [PartTask(task, index, task.keyframes[start:start + per_part])
            for index, start in enumerate(range(0, len(task.keyframes), per_part))]


def shard_path(out: str | Path, split: str, video_id: str, part: int) -> Path:
    return Path(out) / split / f"part-{video_id}-{part:04d}.parquet"


class PrepareHooks:
    """Called on the driver while ``prepare`` runs; this base class does nothing. Tests subclass it, e.g. to stop a
    run part way through as a killed job would stop."""

    def after_part(self, finished: int, pending: int) -> None:
        """``finished`` of the ``pending`` parts of this run are written (or rejected) and in the manifest."""


# --------------------------------------------------------------------------------------------- driver
def prepare(cfg: ExperimentConfig, *, splits: tuple[str, ...] = ("train", "val"), hooks: PrepareHooks | None = None,
            here_bytes: int = PREPARE_HERE_BYTES) -> PrepareSummary:
    """Writes the shard parts of ``splits`` and the manifest; parts already written by an earlier run are skipped.
    The parts still to write are written by this process when their input media total at most ``here_bytes``
    (:func:`media_at_most`), else by Ray tasks: the same files either way.

    The manifest describes the splits of this call. It is rewritten (atomically) as each part finishes, so its
    counts are those of the parts on disk and ``complete`` turns true only at the end: a killed run leaves a
    manifest that says how far it got. Raises OSError, before any work, when ``data.shards`` cannot be written (a file,
    a read-only folder), ConfigError for a label map with ids above ``model.num_actions``, and ValueError, once the
    manifest is complete, when a split has no rows.
    """
    start = time.perf_counter()
    data, out = cfg.data, cfg.data.shards_path
    require_writable_folder(out, "data.shards")
    check_action_ids(cfg)
    check_clip_spec(out, data.clip_spec)
    tasks, rejected = plan_tasks(data, splits, cfg.model.num_actions)
    parts = [part for task in tasks for part in video_parts(task, data.keyframes_per_part)]
    remove_parts_of_changed_sources(out, tasks, parts)
    pending, rows = find_finished_parts(parts, out, data.clip_spec, rejected)
    remove_stale_shards(out, splits, {shard_path(out, *part.key) for part in parts})
    write_manifest(out, data, splits, tasks, rows=rows, rejected=rejected, complete=False)

    here = media_at_most(pending, here_bytes)
    written, peak_memory = write_parts(pending, cfg, splits, tasks, rows, rejected, hooks, here)
    write_manifest(out, data, splits, tasks, rows=rows, rejected=rejected, complete=True)

    seconds = time.perf_counter() - start
    unfinished = {(part.video.split, part.video.video_id) for part in pending}
    summary = PrepareSummary(written=written, skipped_videos=len(tasks) - len(unfinished), rejected=rejected,
                             seconds=seconds, clips_per_s=written / seconds, shards_path=out,
                             skipped_parts=len(parts) - len(pending), task_peak_memory_bytes=peak_memory,
                             here=here)
    print(summary_line(summary))
    refuse_empty_splits(summary, splits, rows)
    return summary


def write_parts(pending: list[PartTask], cfg: ExperimentConfig, splits: tuple[str, ...], tasks: list[VideoTask],
                rows: dict[tuple[str, str, int], int], rejected: list[Rejection],
                hooks: PrepareHooks | None, here: bool) -> tuple[int, int]:
    """Runs the ``pending`` part tasks (in this process when ``here``, else as Ray tasks), adding each finished
    part's rows to ``rows`` and its rejections to ``rejected`` and rewriting the (incomplete) manifest; a progress bar
    over the keyframe clips on a terminal. Returns the rows written and the largest peak memory of a task (bytes)."""
    data, out = cfg.data, cfg.data.shards_path
    written, peak_memory = 0, 0
    by_key = {part.key: part for part in pending}
    results = run_parts_here(pending, data, out) if here else run_part_tasks(pending, data, out)
    # closing: an error here (a killed run) stops the parts not yet started now, not when the traceback is freed.
    with closing(results), progress_bar(sum(len(part.keyframes) for part in pending), "clip", "preparing") as bar:
        for finished, result in enumerate(results, start=1):
            part = by_key[result["split"], result["video_id"], result["part"]]
            peak_memory = max(peak_memory, result["peak_memory_bytes"])
            if result["error"]:
                rejection = Rejection(str(part.video.source), None, result["error"])
                rejected += [rejection] if rejection not in rejected else []
            else:
                rows[part.key] = result["rows"]
                written += result["rows"]
                rejected += keyframe_rejections(part.video, json.loads(result["outside"]))
            write_manifest(out, data, splits, tasks, rows=rows, rejected=rejected, complete=False)
            bar.update(len(part.keyframes))
            bar.set_postfix_str(f"{finished}/{len(pending)} parts")
            if hooks:
                hooks.after_part(finished, len(pending))
    return written, peak_memory


def remove_parts_of_changed_sources(out: Path, tasks: list[VideoTask], parts: list[PartTask]) -> None:
    """Removes the parts an earlier run wrote from a video file or frame folder that has changed since (its
    :func:`source_record` differs from the manifest's in a field both have), so that this run writes them again from
    the source as it is now, with its keyframes outside the media found again; prints which."""
    recorded = (read_manifest(out) or {}).get("sources", {}).get("videos", {})
    changed = set()
    for task in tasks:
        before, now = recorded.get(f"{task.split}/{task.video_id}"), source_record(task)
        if before is not None and any(before[field] != now[field] for field in before.keys() & now.keys()):
            changed.add((task.split, task.video_id))
    for part in parts:
        if (part.video.split, part.video.video_id) in changed:
            shard_path(out, *part.key).unlink(missing_ok=True)
    if changed:
        names = ", ".join(f"{split}/{video}" for split, video in sorted(changed))
        print(f"evadlab prepare: {len(changed)} source(s) changed since they were prepared ({names}): prepared again")


def find_finished_parts(parts: list[PartTask], out: Path, clip_spec: dict[str, Any],
                        rejected: list[Rejection]) -> tuple[list[PartTask], dict[tuple[str, str, int], int]]:
    """The parts still to write, and the rows of those an earlier run finished; the keyframes outside the media that
    finished parts recorded are added to ``rejected``."""
    pending, rows = [], {}
    for part in parts:
        outside = finished_shard(shard_path(out, *part.key), clip_spec, part.timestamps)
        if outside is None:
            pending.append(part)
        else:
            rows[part.key] = len(part.keyframes) - len(outside)
            rejected += keyframe_rejections(part.video, outside)
    return pending, rows


def summary_line(summary: PrepareSummary) -> str:
    outside = len(summary.outside_media)
    where = " in this process" if summary.here else ""
    return (f"evadlab prepare: {summary.written} keyframe clips written, {summary.skipped_videos} videos already done, "
            f"{len(summary.rejected)} inputs rejected ({outside} of them keyframes outside their media), "
            f"{summary.clips_per_s:.1f} clips/s{where}; manifest: {summary.shards_path / MANIFEST}")


def refuse_empty_splits(summary: PrepareSummary, splits: tuple[str, ...],
                        rows: dict[tuple[str, str, int], int]) -> None:
    """A split without rows cannot train or be evaluated: ValueError naming it and the manifest."""
    empty = [split for split in splits if not any(count for (owner, _, _), count in rows.items() if owner == split)]
    if empty:
        raise ValueError(f"split(s) {', '.join(empty)} have no rows: their annotations list no keyframe, or every "
                         f"keyframe was rejected (see 'rejected' in {summary.shards_path / MANIFEST})")


def keyframe_rejections(task: VideoTask, outside: list[dict[str, Any]]) -> list[KeyframeRejection]:
    """The keyframes of ``task`` (of one of its parts) that lie outside its media, from the records
    ``split_by_media`` made."""
    return [KeyframeRejection(str(task.source), None, record["reason"], video_id=task.video_id,
                              timestamp=record["timestamp"], media=record["media"]) for record in outside]


def check_clip_spec(out: Path, clip_spec: dict[str, Any]) -> None:
    """Refuses to mix two clip specs in one shard folder."""
    manifest = out / MANIFEST
    if not manifest.exists():
        return
    recorded = json.loads(manifest.read_text()).get("clip_spec")
    if recorded != clip_spec:
        raise ValueError(f"{out} holds shards of clip spec {recorded}, but this config asks for {clip_spec}; "
                         f"choose another data.shards (the default path is named after the clip spec)")


def plan_tasks(data: DataConfig, splits: tuple[str, ...],
               num_actions: int) -> tuple[list[VideoTask], list[Rejection]]:
    """One task per (split, video) with annotated keyframes, in (split, video id) order, plus the rejected
    annotation rows (action ids outside 1..num_actions among them) and the videos whose frames are missing."""
    tasks, rejected = [], []
    for split in splits:
        table, bad_rows = read_annotations(annotation_path(data, split), num_actions=num_actions)
        rejected += bad_rows
        by_video: dict[str, list[Keyframe]] = {}
        for keyframe in group_keyframes(table):
            by_video.setdefault(keyframe.video_id, []).append(keyframe)
        frame_lists = read_split_frame_list(data, split)
        for video_id in sorted(by_video):
            try:
                source, frame_paths = locate_frames(data, video_id, frame_lists)
            except FileNotFoundError as error:
                rejected.append(Rejection(error.filename, None, error.strerror))
                continue
            keyframes = sorted(by_video[video_id], key=lambda keyframe: keyframe.timestamp)
            tasks.append(VideoTask(split, video_id, source, frame_paths, keyframes))
    return tasks, rejected


def annotation_path(data: DataConfig, split: str) -> Path:
    names = {"train": data.train_annotations, "val": data.val_annotations}
    if split not in names:
        raise ValueError(f"unknown split '{split}'; expected one of {sorted(names)}")
    path = data.annotation_dir / names[split]
    if not path.is_file():
        raise FileNotFoundError(f"the {split} annotations {path} do not exist")
    return path


def read_split_frame_list(data: DataConfig, split: str) -> dict[str, list[str]]:
    """The split's LFB frame list when the source is frame folders and the list exists, else nothing (the
    folders are then listed)."""
    if data.source != "frames":
        return {}
    path = data.root_path / "frame_lists" / (data.train_frame_list if split == "train" else data.val_frame_list)
    return read_frame_list(path) if path.is_file() else {}


def locate_frames(data: DataConfig, video_id: str, frame_lists: dict[str, list[str]]) -> tuple[Path, list[str] | None]:
    """The video file, or the frame folder with its frames' paths relative to ``frames/`` in frame order."""
    if data.source == "videos":
        videos = data.root_path / "videos"
        candidates = sorted(p for p in videos.glob(f"{video_id}.*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not candidates:
            raise FileNotFoundError(2, f"no video file for '{video_id}' ({'/'.join(VIDEO_SUFFIXES)})",
                                    str(videos / video_id))
        return candidates[0], None
    folder = data.root_path / "frames" / video_id
    if video_id in frame_lists:
        return folder, frame_lists[video_id]
    frame_paths = sorted(f"{video_id}/{p.name}" for p in folder.glob("*.jpg")) if folder.is_dir() else []
    if not frame_paths:
        raise FileNotFoundError(2, f"no frame list entry and no JPEG frames for '{video_id}'", str(folder))
    return folder, frame_paths


def finished_shard(path: Path, clip_spec: dict[str, Any], timestamps: list[int]) -> list[dict[str, Any]] | None:
    """The records of the keyframes outside the media of a part written by an earlier run for the same clip spec and
    the same keyframes (its rows and those records add up to them); None when the part must be (re)written."""
    if not path.exists():
        return None
    try:
        metadata = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return None
    recorded = metadata.metadata or {}
    if CLIP_SPEC_KEY not in recorded or json.loads(recorded[CLIP_SPEC_KEY]) != clip_spec:
        return None
    if json.loads(recorded.get(KEYFRAMES_KEY, b"null")) != timestamps:
        return None
    outside = json.loads(recorded.get(OUTSIDE_MEDIA_KEY, b"[]"))
    return outside if metadata.num_rows + len(outside) == len(timestamps) else None


def remove_stale_shards(out: Path, splits: tuple[str, ...], planned: set[Path]) -> None:
    """Removes what no reader may see in the split folders: the temporaries of parts a killed run was writing, and
    parts that are not planned (another part size, keyframes no longer annotated, shards of an earlier layout)."""
    for split in splits:
        for temporary in temporaries_in(out / split, r"part-.*\.parquet"):
            remove(temporary)
        for shard in (out / split).glob("part-*.parquet"):
            if shard not in planned:
                shard.unlink(missing_ok=True)


def run_part_tasks(parts: list[PartTask], data: DataConfig, out: Path) -> Iterator[dict[str, Any]]:
    """Runs one Ray task per part (``data.prepare_cpus`` CPUs each; Ray Data limits how many run at once to what the
    cluster has) and yields each part's result row (see ``prepare_part``) as it finishes. Raises ConfigError when no
    node has ``data.prepare_cpus`` CPUs."""
    if not parts:
        return
    ensure_ray()
    nodes = node_resources()
    if copies_that_fit(nodes, {"CPU": data.prepare_cpus}) < 1:  # Ray Data would wait for such a task forever
        raise ConfigError(f"a prepare task needs {data.prepare_cpus:g} CPUs (data.prepare_cpus) on one node but the "
                          f"cluster has {cluster_text(nodes, ['CPU'])}: lower data.prepare_cpus, or add a larger node")
    items = [task_item(part) for part in parts]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
        prepare_part, fn_kwargs={"data": data, "out": str(out)}, num_cpus=data.prepare_cpus)
    # Ray Data reserves part of the CPUs for each operator; this job's only other operator (the item list)
    # does no work, and with the reservation on, one of 2 CPUs sits idle most of the time.
    dataset.context.op_resource_reservation_enabled = False
    yield from dataset.iter_rows()


def run_parts_here(parts: list[PartTask], data: DataConfig, out: Path) -> Iterator[dict[str, Any]]:
    """Writes the parts in this process's threads, as many at once as its cores allow at ``data.prepare_cpus`` each
    (the decoder and the encoders release the GIL; more than the cores there are, which Ray would refuse, is cut to
    them), and yields each part's result row (see ``write_part``) as it finishes. Closing the generator early cancels
    the parts not yet started and waits for those being written."""
    threads = max(1, min(math.floor(data.prepare_cpus), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) // threads)) as pool:
        futures = [pool.submit(write_part, task_item(part), data, str(out), threads) for part in parts]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def media_at_most(parts: list[PartTask], limit: int) -> bool:
    """Whether the input media of ``parts`` (their videos' files, or their frame folders' listed frames) total at
    most ``limit`` bytes. Stops reading sizes once past it (a frame folder of AVA holds ~27,000 frames); a missing
    frame counts 0 (its task rejects it)."""
    total = 0
    for video in {part.video.source: part.video for part in parts}.values():
        files = ([video.source] if video.frame_paths is None
                 else (video.source.parent / relative for relative in video.frame_paths))
        for path in files:
            total += path.stat().st_size if path.is_file() else 0
            if total > limit:
                return False
    return True


def task_item(part: PartTask) -> dict[str, Any]:
    """A part as plain values, the form Ray Data carries between processes."""
    return {
        "split": part.video.split,
        "video_id": part.video.video_id,
        "part": part.index,
        "source": str(part.video.source),
        "frame_paths": part.video.frame_paths,
        "keyframes": [{"timestamp": int(k.timestamp), "boxes": np.asarray(k.boxes, np.float32).tolist(),
                       "actions": [list(map(int, ids)) for ids in k.actions],
                       "person_ids": list(map(int, k.person_ids))} for k in part.keyframes],
    }


def write_manifest(out: Path, data: DataConfig, splits: tuple[str, ...], tasks: list[VideoTask],
                   rows: dict[tuple[str, str, int], int], rejected: list[Rejection], complete: bool) -> None:
    """The manifest, replaced atomically. ``counts`` (keyframe rows per split) and ``parts`` (rows per written part,
    by split, video and part number) cover the parts on disk; ``videos`` the videos whose every part is written."""
    annotations = [annotation_path(data, split) for split in splits]
    parts: dict[str, dict[str, dict[str, int]]] = {split: {} for split in splits}
    for (split, video, index), count in sorted(rows.items()):
        parts[split].setdefault(video, {})[f"{index:04d}"] = count
    planned = {(task.split, task.video_id): math.ceil(len(task.keyframes) / data.keyframes_per_part) for task in tasks}
    manifest = {
        "clip_spec": data.clip_spec,
        "clip_spec_name": data.clip_spec_name,
        "complete": complete,
        "sources": {
            "annotations": {str(path): path.stat().st_size for path in annotations},
            "videos": {f"{task.split}/{task.video_id}": source_record(task) for task in tasks},
        },
        "counts": {split: sum(n for (s, _, _), n in rows.items() if s == split) for split in splits},
        "expected": {split: sum(len(task.keyframes) for task in tasks if task.split == split) for split in splits},
        "videos": {split: {video: sum(done.values()) for video, done in parts[split].items()
                           if len(done) == planned[split, video]} for split in splits},
        "parts": parts,
        "rejected": [rejection_record(rejection) for rejection in rejected],
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def rejection_record(rejection: Rejection) -> dict[str, Any]:
    if isinstance(rejection, KeyframeRejection):
        return rejection.record()
    return {"source": rejection.source, "line": rejection.line, "reason": rejection.reason}


class UnpreparedDataError(ValueError):
    """The shards a command needs were never prepared, are incomplete, of another clip spec, or empty."""


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest under ``out`` as written by :func:`write_manifest`; None when there is none."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def require_prepared(cfg: ExperimentConfig, splits: tuple[str, ...]) -> dict[str, Any]:
    """The manifest, once it says that ``splits`` are completely prepared for this config's clip spec and hold
    keyframes. Raises UnpreparedDataError, one line saying what is missing and how to finish it, otherwise."""
    out, rerun = cfg.data.shards_path, "`evadlab prepare <config>`"
    manifest = read_manifest(out)
    if manifest is None:
        raise UnpreparedDataError(f"no prepared shards at {out} (no {MANIFEST}): run {rerun} first")
    if manifest.get("clip_spec") != cfg.data.clip_spec:
        raise UnpreparedDataError(f"{out} holds shards of clip spec {manifest.get('clip_spec')}, but this config asks "
                                  f"for {cfg.data.clip_spec}: run {rerun} or set data.shards")
    absent = [split for split in splits if split not in manifest["counts"]]
    if absent:
        raise UnpreparedDataError(f"the {'/'.join(absent)} split was never prepared at {out}: run {rerun}")
    if not manifest["complete"]:
        progress = "; ".join(split_progress(manifest, split) for split in splits)
        raise UnpreparedDataError(f"the shards at {out} are incomplete (a prepare was interrupted): {progress}; "
                                  f"rerun {rerun} to resume it")
    for split in splits:
        if manifest["counts"][split] == 0:
            raise UnpreparedDataError(f"the {split} split at {out} holds no keyframes: {why_empty(cfg, split)}")
    return manifest


def split_progress(manifest: dict[str, Any], split: str) -> str:
    """``train: 49 of 91 keyframes, 3 of 8 videos missing (a, b, c)`` for a manifest of an unfinished prepare."""
    planned = {key.split("/", 1)[1] for key in manifest["sources"]["videos"] if key.startswith(f"{split}/")}
    rejected = {entry["source"] for entry in manifest["rejected"]}
    missing = sorted(video for video in planned - set(manifest["videos"][split])
                     if manifest["sources"]["videos"][f"{split}/{video}"]["path"] not in rejected)
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    expected = manifest.get("expected", {}).get(split)
    of_expected = f" of {expected}" if expected is not None else ""
    return (f"{split}: {manifest['counts'][split]}{of_expected} keyframes, {len(missing)} of {len(planned)} videos "
            f"missing" + (f" ({shown})" if missing else ""))


def why_empty(cfg: ExperimentConfig, split: str) -> str:
    """Why a completely prepared split holds no keyframes: its annotation file has no usable rows, or none of the
    videos it names could be read. Reads the annotation file again (only on this error path)."""
    names = {"train": cfg.data.train_annotations, "val": cfg.data.val_annotations}
    annotations = cfg.data.annotation_dir / names[split]
    table, bad_rows = read_annotations(annotations)
    listed = f"listed under 'rejected' in {cfg.data.shards_path / MANIFEST}"
    if table.num_rows == 0:
        return f"its annotation file {annotations} has no usable rows ({len(bad_rows)} rejected, {listed})"
    videos = len(set(table["video_id"].to_pylist()))
    return f"none of the {videos} videos named in {annotations} could be read ({listed})"


def source_record(task: VideoTask) -> dict[str, Any]:
    """What identifies a source as it was prepared: a video file's size and modification time, a frame folder's
    frame count and modification time (files added or removed)."""
    status = task.source.stat()
    if task.frame_paths is None:
        return {"path": str(task.source), "bytes": status.st_size, "modified_ns": status.st_mtime_ns}
    return {"path": str(task.source), "frames": len(task.frame_paths), "modified_ns": status.st_mtime_ns}


# --------------------------------------------------------------------------------------------- worker
def prepare_part(item: dict[str, Any], *, data: DataConfig, out: str) -> dict[str, Any]:
    """Ray Data task: writes one part's shard (``write_part``) on ``data.prepare_cpus`` cores (see ``task_threads``)."""
    return write_part(item, data, out, task_threads(data.prepare_cpus))


def write_part(item: dict[str, Any], data: DataConfig, out: str, threads: int) -> dict[str, Any]:
    """Writes one part's shard, decoding with ``threads`` threads. Returns ``split``, ``video_id``, ``part``, ``rows``
    written, ``outside`` (JSON text: the records of its keyframes outside the media, see ``split_by_media``),
    ``error`` ('' on success) and ``peak_memory_bytes`` (of this process so far)."""
    path = shard_path(out, item["split"], item["video_id"], item["part"])
    timestamps = [keyframe["timestamp"] for keyframe in item["keyframes"]]
    result = {"split": item["split"], "video_id": item["video_id"], "part": item["part"], "rows": 0, "outside": "[]",
              "error": ""}
    try:
        frames = open_frames(item, data, threads)
        inside, outside = split_by_media(frames, item["keyframes"])
        rows = clip_rows(frames, {**item, "keyframes": inside}, data)
        result["rows"] = write_shard(path, rows, data.clip_spec, timestamps, outside)
        result["outside"] = json.dumps(outside)
    except Exception as error:  # noqa: BLE001 - a corrupt input of any kind rejects this video only
        result["error"] = error_reason(error)
    # ru_maxrss is in KiB on Linux.
    return {**result, "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def task_threads(cpus: float) -> int:
    """Makes this process's thread pools match a task's CPU request: torch (the resize) and Arrow (the Parquet writer)
    get ``floor(cpus)`` threads (at least 1), which is also what the decoder is given. Ray sets OMP_NUM_THREADS for a
    task, but torch reads it once per process, and Ray reuses processes across tasks."""
    threads = max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)
    return threads


def split_by_media(frames: FrameSource, keyframes: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """The keyframes whose instant lies inside the media, and a record (``timestamp``, ``reason``, ``media``: the
    media's extent) of every other one."""
    inside, outside = [], []
    for keyframe in keyframes:
        reason = frames.keyframe_outside(keyframe["timestamp"])
        if reason is None:
            inside.append(keyframe)
        else:
            outside.append({"timestamp": keyframe["timestamp"], "reason": reason, "media": frames.media_extent()})
    return inside, outside


def clip_rows(frames: FrameSource, item: dict[str, Any], data: DataConfig) -> Iterator[dict[str, Any]]:
    """Shard rows in timestamp order. Every frame any clip needs is decoded once, in increasing order, and
    encoded once; a row is emitted as soon as its last frame is ready and frames no clip still needs are
    dropped, so memory holds a few seconds of encoded frames, not the video."""
    clips = deque((keyframe, frames.clip_indices(keyframe["timestamp"])) for keyframe in item["keyframes"])
    needed = sorted({index for _, indices in clips for index in indices})
    encoded: dict[int, bytes] = {}
    for start in range(0, len(needed), DECODE_CHUNK):
        chunk = needed[start:start + DECODE_CHUNK]
        original = frames.read(chunk)
        resized = resize_short_side(original, data.short_side, data.max_long_side)
        encoded.update(zip(chunk, encode_jpegs(resized, data.jpeg_quality)))
        # Clip indices never decrease with the keyframe time, so clips complete in order.
        while clips and max(clips[0][1]) <= chunk[-1]:
            keyframe, indices = clips.popleft()
            yield {
                "video_id": item["video_id"],
                "timestamp": keyframe["timestamp"],
                "frames": [encoded[index] for index in indices],
                "height": resized.shape[1], "width": resized.shape[2],
                "orig_height": original.shape[1], "orig_width": original.shape[2],
                "boxes": keyframe["boxes"], "actions": keyframe["actions"], "person_ids": keyframe["person_ids"],
            }
        if clips:
            oldest_needed = min(clips[0][1])
            encoded = {index: jpeg for index, jpeg in encoded.items() if index >= oldest_needed}


def write_shard(path: Path, rows: Iterator[dict[str, Any]], clip_spec: dict[str, Any], timestamps: list[int],
                outside: list[dict[str, Any]]) -> int:
    """Streams rows into a hidden temporary file beside ``path`` and renames it into place once complete, so a
    shard is never visible half-written; its metadata holds the clip spec, the ``timestamps`` of the keyframes it
    stands for and the records of those outside the media. Returns the number of rows (a part whose every keyframe is
    outside gets an empty shard)."""
    schema = SHARD_SCHEMA.with_metadata({CLIP_SPEC_KEY: json.dumps(clip_spec).encode(),
                                         KEYFRAMES_KEY: json.dumps(timestamps).encode(),
                                         OUTSIDE_MEDIA_KEY: json.dumps(outside).encode()})
    count = 0
    with atomic_path(path) as temporary, pq.ParquetWriter(temporary, schema, compression=SHARD_COMPRESSION) as writer:
        group: list[dict[str, Any]] = []
        for row in rows:
            group.append(row)
            if len(group) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(group, schema=schema))
                count, group = count + len(group), []
        if group:
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
            count += len(group)
    return count
