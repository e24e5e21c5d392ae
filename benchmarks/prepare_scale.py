"""Prepare at AVA scale: clips/s per core, cores a task keeps busy, peak memory per task, MB per keyframe, and what a
killed prepare costs, on real-size synthetic videos.

Input: ``evadlab synth``'s generator at 1280x720 and 1920x1080, 30 fps H.264, two videos of ``--seconds`` (default
150; a 15-minute AVA cut takes too long to write here, so the figures are per keyframe and extrapolated), annotated
every second with 2-3 persons; only the train video (the first) is prepared, at short side 288.

1. One task, measured in a fresh process each (so its peak resident memory is its own), as ``prepare_part`` runs it:
   the whole video as one part, first with the decoder of earlier versions (decord first, 1 thread) and then as
   ``prepare`` now runs it (PyAV first, 1 thread), free to use both cores ("cores busy" = CPU seconds / wall seconds)
   and pinned to one core ("clips/s per core").
2. Parts and a kill, through ``prepare`` on a fresh 2-CPU local Ray: an uninterrupted run; and runs stopped after
   ``--kill-after`` parts by shutting Ray down (what a killed job leaves: tasks in flight die, their temporaries stay)
   and then resumed. Resume cost = killed run + resumed run - uninterrupted run, in seconds and keyframes redone;
   with ``--part-keyframes`` (default 30, so the 150 s video has 5 parts) and with one part per video (earlier versions'
   all-or-nothing tasks).

    python benchmarks/prepare_scale.py --workdir /tmp/prepare_scale [--seconds 150] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


def make_input(workdir: Path, size: str, seconds: int) -> Path:
    """The synthetic AVA root of one resolution (written once, kept in ``workdir``)."""
    from evadlab.pipelines.synthetic import generate_mini_ava

    root = workdir / f"ava_{size}_{seconds}s"
    if not (root / "annotations").exists():
        width, height = SIZES[size]
        generate_mini_ava(root, videos=2, seconds=seconds, width=width, height=height)
    return root


def one_task(root: Path, out: Path, first: str, cores: int) -> dict:
    """Runs in its own process: the train video as one part, read with ``first`` decoder first, on ``cores`` cores."""
    import evadlab.pipelines.prepare as prepare_module
    from evadlab.config import DataConfig, ExperimentConfig
    from evadlab.pipelines.prepare import PartTask, plan_tasks, prepare_part, task_item
    from evadlab.pipelines.video import FrameFolderFrames, VideoFileFrames

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    data = ExperimentConfig(data=DataConfig(root=str(root), shards=str(out))).data
    (task,), _ = plan_tasks(data, ("train",), 80)

    def open_with(item, data, threads):  # the decoder order under test; prepare's own opener otherwise
        if item["frame_paths"] is not None:
            return FrameFolderFrames(item["source"], item["frame_paths"], data)
        return VideoFileFrames(item["source"], data, threads=threads, first=first)

    prepare_module.open_frames = open_with
    start_cpu, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = prepare_part(task_item(PartTask(task, 0, task.keyframes)), data=data, out=str(out))
    wall, end_cpu = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    if result["error"]:
        raise RuntimeError(result["error"])
    cpu = (end_cpu.ru_utime - start_cpu.ru_utime) + (end_cpu.ru_stime - start_cpu.ru_stime)
    shard_bytes = sum(path.stat().st_size for path in (out / "train").glob("part-*.parquet"))
    return {"keyframes": result["rows"], "wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall,
            "clips_per_s": result["rows"] / wall, "peak_memory_gb": result["peak_memory_bytes"] / 1e9,
            "mb_per_keyframe": shard_bytes / 1e6 / result["rows"]}


def task_in_subprocess(root: Path, out: Path, first: str, cores: int) -> dict:
    command = [sys.executable, __file__, "--one-task", str(root), str(out), first, str(cores)]
    done = subprocess.run(command, check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def task_table(workdir: Path, seconds: int, repeats: int) -> None:
    """Section 1: per resolution, decoder order and cores, the median of ``repeats`` fresh processes."""
    print("| input | decoder | cores allowed | clips/s | cores busy | clips per CPU-second | peak memory (GB) "
          "| MB per keyframe |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for size in SIZES:
        root = make_input(workdir, size, seconds)
        for first, label in (("decord", "decord first (before)"), ("PyAV", "PyAV first, 1 thread (now)")):
            for cores in (2, 1):
                runs = []
                for repeat in range(repeats):
                    out = workdir / f"task_{size}_{first}_{cores}_{repeat}"
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                    runs.append(task_in_subprocess(root, out, first, cores))
                m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
                print(f"| {size}, {m['keyframes']:.0f} keyframes | {label} | {cores} | {m['clips_per_s']:.2f} | "
                      f"{m['cores_busy']:.2f} | {m['keyframes'] / m['cpu_s']:.2f} | {m['peak_memory_gb']:.2f} | "
                      f"{m['mb_per_keyframe']:.3f} |", flush=True)


class Stop(Exception):
    pass


def timed_prepare(root: Path, shards: Path, part_keyframes: int, kill_after: int | None) -> tuple[float, int]:
    """Seconds and keyframes written of one prepare of the train split on a fresh 2-CPU Ray; with ``kill_after``, Ray
    is shut down (its tasks die mid-write) once that many parts are reported."""
    import ray

    from evadlab.config import DataConfig, ExperimentConfig
    from evadlab.pipelines.prepare import PrepareHooks, prepare, read_manifest

    class StopAfter(PrepareHooks):
        def after_part(self, finished: int, pending: int) -> None:
            if finished == kill_after:
                raise Stop

    cfg = ExperimentConfig(data=DataConfig(root=str(root), shards=str(shards), keyframes_per_part=part_keyframes))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    start = time.perf_counter()
    try:
        # Ray tasks, whatever the input's size (a small one would be prepared in this process).
        written = prepare(cfg, splits=("train",), hooks=StopAfter(), here_bytes=0).written
    except Stop:
        written = sum(read_manifest(shards)["counts"].values())
    finally:
        ray.shutdown()
    return time.perf_counter() - start, written


def resume_table(workdir: Path, seconds: int, part_keyframes: int, kill_after: int, repeats: int) -> None:
    """Section 2 on the 720p input."""
    root = make_input(workdir, "720p", seconds)
    print("\n| parts of | uninterrupted (s) | killed after | killed run (s) | resumed run (s) | resume cost (s) "
          "| keyframes redone |\n|---:|---:|---|---:|---:|---:|---:|")
    for per_part, kill in ((part_keyframes, kill_after), (100_000, None)):
        rows = []
        for repeat in range(repeats):
            base = workdir / f"resume_{per_part}_{repeat}"
            subprocess.run(["rm", "-rf", str(base)], check=True)
            full, total = timed_prepare(root, base / "full", per_part, None)
            if kill is None:  # one part per video: the kill comes half-way through the only part
                killed, kept = full / 2, 0
            else:
                killed, kept = timed_prepare(root, base / "killed", per_part, kill)
            resumed, rewritten = timed_prepare(root, base / "killed", per_part, None) if kill else (full, total)
            rows.append((full, killed, resumed, killed + resumed - full, rewritten - (total - kept)))
        full, killed, resumed, cost, redone = (statistics.median(column) for column in zip(*rows))
        label = f"after {kill} parts reported" if kill else "half-way (modelled: all of it is redone)"
        shown = per_part if per_part < 100_000 else "the whole video"
        print(f"| {shown} | {full:.1f} | {label} | {killed:.1f} | {resumed:.1f} | {cost:.1f} | {redone:.0f} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=False)
    parser.add_argument("--seconds", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part-keyframes", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=2)
    parser.add_argument("--only", choices=["tasks", "resume"], default=None)
    parser.add_argument("--one-task", nargs=4, metavar=("ROOT", "OUT", "FIRST", "CORES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_task:
        root, out, first, cores = args.one_task
        print(json.dumps(one_task(Path(root), Path(out), first, int(cores))))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()}")
    if args.only in (None, "tasks"):
        task_table(args.workdir, args.seconds, args.repeats)
    if args.only in (None, "resume"):
        resume_table(args.workdir, args.seconds, args.part_keyframes, args.kill_after, args.repeats)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
