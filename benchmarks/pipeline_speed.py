"""Input pipeline speed on a synthetic mini-AVA, printed as a markdown table.

Preparation (keyframe clips written per second):
- ``prepare`` with 1 and with 2 Ray CPUs: one task per video, each frame decoded once;
- a sequential baseline that seeks and decodes every keyframe's clip on its own with decord.

Training input (model-ready clips per second, one process):
- rows of the Parquet shards: 16 stored JPEGs decoded, normalised;
- frame folders: 16 full-size JPEG files read, decoded, resized, normalised per clip.

Run: ``python benchmarks/pipeline_speed.py [--videos 4 --seconds 20 --width 640 --height 360 --short-side 288]``.
Ray workers import torch and decord once (seconds each); a warm-up in the same Ray session keeps that out of the
timing.

"N CPUs" means N cores: each measurement runs with this process (and the Ray processes it starts, which inherit
it) pinned to N cores. Ray's CPU count alone does not confine a task to one core: a decord reader decodes in a
thread of its own beside the caller's, so one "1-CPU" task keeps about 1.8 cores busy and, on a 2-core machine,
a 1-CPU run would already use both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ray
import torch

from evadlab.config import DataConfig, ExperimentConfig
from evadlab.pipelines.ava import NUM_ACTIONS, clip_frame_indices, keyframe_frame_index, read_frame_list
from evadlab.pipelines.clips import (
    decode_clip,
    decode_jpegs,
    encode_jpegs,
    iter_shard_rows,
    resize_short_side,
    to_model_input,
)
from evadlab.pipelines.prepare import (
    PartTask,
    PrepareHooks,
    plan_tasks,
    prepare,
    shard_path,
    task_item,
    write_shard,
)
from evadlab.pipelines.synthetic import generate_mini_ava
from evadlab.pipelines.video import VideoFileFrames


@contextlib.contextmanager
def pinned_to_cores(count: int) -> Iterator[None]:
    """This process, the processes it starts and torch's thread pool confined to ``count`` cores."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if count > len(cores):
        raise SystemExit(f"{count} cores asked for, {len(cores)} available")
    os.sched_setaffinity(0, sorted(cores)[:count])
    torch.set_num_threads(count)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


class WarmedUp(Exception):
    """Ends the warm-up prepare once every worker has handled a part."""


class StopAfterParts(PrepareHooks):
    def __init__(self, parts: int):
        self.parts = parts

    def after_part(self, finished: int, pending: int) -> None:
        if finished >= self.parts:
            raise WarmedUp


def timed_prepare(cfg: ExperimentConfig, cpus: int, warm_up: ExperimentConfig) -> tuple[int, float]:
    """Clips written and seconds of one prepare on a fresh local Ray with ``cpus`` CPUs, after a warm-up run
    of one part per worker (so that every worker has imported torch and the decoders). Ray, its workers and this
    driver all run on ``cpus`` cores."""
    with pinned_to_cores(cpus):
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
        try:
            with contextlib.suppress(WarmedUp):
                prepare(warm_up, hooks=StopAfterParts(cpus), here_bytes=0)
            start = time.perf_counter()
            # Ray tasks, whatever the input's size (a small one would be prepared in this process).
            summary = prepare(cfg, here_bytes=0)
            return summary.written, time.perf_counter() - start
        finally:
            ray.shutdown()


def seek_per_keyframe(data: DataConfig, out: Path) -> tuple[int, float]:
    """The baseline: every clip decoded with its own decord ``get_batch`` (a seek), then the same resize,
    JPEG encoding and shard writing as ``prepare``."""
    tasks, _ = plan_tasks(data, ("train", "val"), NUM_ACTIONS)
    start, written = time.perf_counter(), 0
    for task in tasks:
        item = task_item(PartTask(task, 0, task.keyframes))
        frames = VideoFileFrames(str(task.source), data)
        rows = (clip_row(frames, item, keyframe, data) for keyframe in item["keyframes"])
        timestamps = [keyframe["timestamp"] for keyframe in item["keyframes"]]
        written += write_shard(shard_path(out, task.split, task.video_id, 0), rows, data.clip_spec, timestamps, [])
    return written, time.perf_counter() - start


def clip_row(frames: VideoFileFrames, item: dict, keyframe: dict, data: DataConfig) -> dict:
    original = frames.read(frames.clip_indices(keyframe["timestamp"]))
    resized = resize_short_side(original, data.short_side, data.max_long_side)
    return {"video_id": item["video_id"], "timestamp": keyframe["timestamp"],
            "frames": encode_jpegs(resized, data.jpeg_quality), "height": resized.shape[1],
            "width": resized.shape[2], "orig_height": original.shape[1], "orig_width": original.shape[2],
            "boxes": keyframe["boxes"], "actions": keyframe["actions"], "person_ids": keyframe["person_ids"]}


def shard_input(shards: Path) -> tuple[int, float]:
    start, clips = time.perf_counter(), 0
    for split in ("train", "val"):
        for row in iter_shard_rows(shards, split):
            frames, _ = decode_clip(row)
            to_model_input(frames)
            clips += 1
    return clips, time.perf_counter() - start


def frame_folder_input(data: DataConfig) -> tuple[int, float]:
    start, clips = time.perf_counter(), 0
    tasks, _ = plan_tasks(data, ("train", "val"), NUM_ACTIONS)
    for task in tasks:
        frame_list = read_frame_list(data.root_path / "frame_lists" / f"{task.split}.csv")[task.video_id]
        for keyframe in task.keyframes:
            center = keyframe_frame_index(keyframe.timestamp, data.fps, data.video_offset_sec)
            indices = clip_frame_indices(center, data.num_frames, data.sample_rate, len(frame_list))
            jpegs = [(data.root_path / "frames" / frame_list[i]).read_bytes() for i in indices]
            to_model_input(resize_short_side(decode_jpegs(jpegs), data.short_side, data.max_long_side))
            clips += 1
    return clips, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--short-side", type=int, default=288)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards; a temporary folder if unset")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        work = args.workdir or Path(temporary)
        root = work / "mini_ava"
        if not root.exists():
            generate_mini_ava(root, videos=args.videos, seconds=args.seconds, frames=True, width=args.width,
                              height=args.height)

        def config(shards: str, **data) -> ExperimentConfig:
            return ExperimentConfig(data=DataConfig(root=str(root), shards=str(work / shards),
                                                    short_side=args.short_side, **data))

        results = []
        for cpus in (1, 2):
            clips, seconds = timed_prepare(config(f"ray_{cpus}"), cpus, config(f"warm_up_{cpus}"))
            results.append(("prepare", f"Ray Data, one decode pass per video, {cpus} CPU", clips, seconds))
        with pinned_to_cores(1):
            clips, seconds = seek_per_keyframe(config("baseline").data, work / "baseline")
            results.append(("prepare", "sequential, one decord seek per keyframe clip, 1 CPU", clips, seconds))
            clips, seconds = shard_input(work / "ray_2")
            results.append(("training input", "Parquet shard rows (16 stored JPEGs), 1 CPU", clips, seconds))
            clips, seconds = frame_folder_input(config("unused", source="frames").data)
            results.append(("training input", "frame folders (16 JPEG files, resize), 1 CPU", clips, seconds))

    print(f"\n{args.videos} videos x {args.seconds} s at {args.width}x{args.height}, clips of 16x4 at short side "
          f"{args.short_side}\n")
    print("| stage | method | clips | seconds | clips/s |")
    print("|---|---|---:|---:|---:|")
    for stage, method, clips, seconds in results:
        print(f"| {stage} | {method} | {clips} | {seconds:.2f} | {clips / seconds:.1f} |")


if __name__ == "__main__":
    main()
