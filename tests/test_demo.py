"""``evadlab demo`` on real video files: annotated mp4, AVA-format CSV, odd sizes and frame rates, bad input."""

import contextlib
import subprocess
import sys
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch
import yaml

from evadlab.cli import main
from evadlab.config import load_config
from evadlab.models.checkpoints import save_training_checkpoint
from evadlab.pipelines.ava import DroppedRowsWarning, read_boxes_csv
from evadlab.pipelines.ava_map import frame_map
from evadlab.platform.demo import nearest_keyframes, run_demo
from evadlab.platform.modeling import build_model

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model whose person threshold is 0, so every proposal is drawn and written."""
    cfg = load_config(QUICKSTART, ["model.person_threshold=0.0", "model.act_fc_dim=64"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo") / "model.pt"
    save_training_checkpoint(path, model_state=build_model(cfg.model).state_dict(), optimizer_state={}, epoch=0,
                             config_yaml=yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def write_video(path: Path, *, width: int, height: int, fps: int, seconds: float) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(int(fps * seconds)):
            frame = np.full((height, width, 3), (index * 7) % 255, np.uint8)
            frame[height // 4: 3 * height // 4, width // 3: width // 2] = (200, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_demo_annotates_a_video_of_any_size_and_rate(tmp_path, checkpoint):
    video = tmp_path / "clip.mp4"
    write_video(video, width=212, height=150, fps=25, seconds=3.2)
    out = tmp_path / "out" / "annotated.mp4"
    assert main(["demo", str(video), "--checkpoint", str(checkpoint), "--out", str(out), "--fps", "1"]) == 0

    source, annotated = decord.VideoReader(str(video)), decord.VideoReader(str(out))
    assert len(annotated) == len(source)
    assert annotated[0].shape == (150, 212, 3)
    assert not np.array_equal(annotated[10].asnumpy(), source[10].asnumpy()), "boxes must be drawn"
    written = np.loadtxt(out.with_suffix(".csv"), delimiter=",", usecols=(2, 3, 4, 5), ndmin=2)
    assert len(written) == 4 * 10 * 80, "10 proposals x 80 actions on each of 4 keyframes"
    # The untrained model finds some boxes without height; the official evaluation leaves their rows out.
    with_extent = (written[:, 2] > written[:, 0]) & (written[:, 3] > written[:, 1])
    dropped = int((~with_extent).sum())
    with pytest.warns(DroppedRowsWarning, match=rf" {dropped} row") if dropped else contextlib.nullcontext():
        rows = read_boxes_csv(out.with_suffix(".csv"), is_detection=True)
    keys = set(rows["key"].to_pylist())
    assert keys == {"clip,0000", "clip,0001", "clip,0002", "clip,0003"}
    assert rows.num_rows == len(written)
    assert frame_map(rows.slice(0, 0), rows, range(1, 81)).num_detections == with_extent.sum()


def test_demo_names_an_unreadable_video(tmp_path, checkpoint, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    with pytest.raises(ValueError, match="cannot read video .*broken.mp4: cannot decode the video"):
        run_demo(str(broken), checkpoint=str(checkpoint), config=None, out=str(tmp_path / "o.mp4"), fps=1)
    assert main(["demo", str(broken), "--checkpoint", str(checkpoint)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"evadlab demo: error: cannot read video {broken}: cannot decode the video (decord: ")
    assert error.count("\n") == 1, "one line, no traceback"
    assert main(["demo", str(tmp_path / "missing.mp4"), "--checkpoint", str(checkpoint)]) == 2


# A Python whose import system refuses Ray, as on a laptop where only the demo's dependencies are installed.
WITHOUT_RAY = """
import sys
class RefuseRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, RefuseRay())
from evadlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_demo_runs_where_ray_cannot_be_imported(tmp_path, checkpoint):
    video = tmp_path / "short.mp4"
    write_video(video, width=96, height=64, fps=10, seconds=1.2)
    out = tmp_path / "annotated.mp4"
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "demo", str(video), "--checkpoint", str(checkpoint),
                           "--out", str(out), "--fps", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file() and out.with_suffix(".csv").is_file()
    # Keyframes closer than a second share the CSV's whole-second timestamp: said in one line of the command.
    assert "evadlab demo: warning: --fps 2: the detections CSV gives whole seconds" in done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def write_timed_video(path: Path, time_base: Fraction, pts: list[int], durations: list[int], *, width: int = 96,
                      height: int = 64, container: str | None = None, options: dict | None = None,
                      pix_fmt: str = "yuv420p") -> None:
    """A video with the given presentation times and durations (in ``time_base``), as phones and slideshow tools
    write them (without B-frames, so that MP4 keeps the last frame's duration); frame i is grey 8 i."""
    duration_of = dict(zip(pts, durations))
    with av.open(str(path), mode="w", format=container, options=options or {}) as output:
        stream = output.add_stream("libx264")
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = stream.codec_context.time_base = time_base
        stream.options = {"bf": "0"}

        def mux(packets):
            for packet in packets:
                packet.duration = duration_of.get(packet.pts, packet.duration)
                output.mux(packet)

        for index, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), (8 * index) % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = stamp, time_base
            mux(stream.encode(frame))
        mux(stream.encode())


def timeline(path: Path) -> tuple[list[float], float]:
    """Every frame's presentation time in seconds and the end of the last frame, from the file's packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.duration) for p in container.demux(stream) if p.pts is not None)
        start = packets[0][0]
        return ([float((pts - start) * stream.time_base) for pts, _ in packets],
                float((packets[-1][0] + packets[-1][1] - start) * stream.time_base))


# name: time base, pts, durations, keyframes per second (few: each costs a model run).
TIMELINES = {
    # A phone's variable frame rate: frames 20 to 600 ms apart.
    "variable_rate": (Fraction(1, 1000), [0, 33, 70, 100, 180, 400, 420, 1000, 1033, 1500, 2100],
                      [33, 37, 30, 80, 220, 20, 580, 33, 467, 600, 40], 0.5),
    # A slideshow at 0.4 fps: 7 pictures of 2.5 s, 17.5 s in all (round(0.4) = 0 fps would play it in 0.29 s).
    "slideshow": (Fraction(1, 1000), [2500 * index for index in range(7)], [2500] * 7, 0.1),
    # NTSC 29.97 fps, which a whole-number rate turns into 30.
    "ntsc": (Fraction(1001, 30000), list(range(45)), [1] * 45, 0.5),
}


@pytest.mark.parametrize("name", sorted(TIMELINES))
def test_the_annotated_video_keeps_the_source_timeline(tmp_path, checkpoint, name):
    time_base, pts, durations, keyframes_per_s = TIMELINES[name]
    video, out = tmp_path / f"{name}.mp4", tmp_path / "annotated.mp4"
    write_timed_video(video, time_base, pts, durations)
    source_times, source_end = timeline(video)
    assert source_end == pytest.approx(float((pts[-1] + durations[-1]) * time_base), abs=1e-6)
    run_demo(str(video), checkpoint=str(checkpoint), config=None, out=str(out), fps=keyframes_per_s)
    times, end = timeline(out)
    assert len(times) == len(source_times)
    assert times == pytest.approx(source_times, abs=1e-6)
    assert end == pytest.approx(source_end, abs=1e-6)


def test_matching_frames_to_keyframes_needs_memory_for_the_inputs_only():
    """A 2-hour film at 30 fps with a keyframe every second: a frames x keyframes matrix would take 12 GB."""
    frame_times = np.arange(2 * 3600 * 30) / 30
    keyframe_times = np.arange(0.0, 2 * 3600, 1.0)
    tracemalloc.start()
    try:
        nearest = nearest_keyframes(frame_times, keyframe_times)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * frame_times.nbytes, f"peak {peak / 2**20:.1f} MiB"
    sample = slice(0, None, 997)
    brute_force = np.abs(frame_times[sample, None] - keyframe_times[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(nearest[sample], brute_force)


def test_real_ava_names_odd_sizes_and_live_files(tmp_path, checkpoint, monkeypatch, capsys):
    """A real AVA id starts with '-', which the argument parser would take for an option; a live Matroska file
    (no duration, no cues) is read with PyAV; an odd frame size is padded for the encoder, not cropped."""
    monkeypatch.chdir(tmp_path)
    write_timed_video(tmp_path / "-5KQ66BBWC4.mkv", Fraction(1, 30), list(range(20)), [1] * 20, width=97, height=63,
                      container="matroska", options={"live": "1"}, pix_fmt="yuv444p")
    assert main(["demo", "-5KQ66BBWC4.mkv", "--checkpoint", str(checkpoint), "--out", "annotated.mp4"]) == 0
    printed = capsys.readouterr()
    assert "(video id -5KQ66BBWC4, PyAV)" in printed.out and "frames of 97x63 padded to 98x64" in printed.out
    assert printed.err == "", "progress bars are drawn on a terminal only"
    with av.open("annotated.mp4") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 20 and frames[0].shape == (64, 98, 3)
    # The padding repeats the last column and row.
    assert np.abs(frames[5][:, -1].astype(int) - frames[5][:, -2]).mean() < 8
    assert np.abs(frames[5][-1].astype(int) - frames[5][-2]).mean() < 8
    assert video_ids(Path("annotated.csv")) == {"-5KQ66BBWC4"}


def test_video_ids_are_checked_before_any_work(tmp_path, checkpoint, capsys):
    video = tmp_path / "scene 1, take 2.mp4"
    write_video(video, width=96, height=64, fps=10, seconds=0.5)
    # A bad --video-id stops at once: the checkpoint is never read (it does not even exist).
    assert main(["demo", str(video), "--checkpoint", str(tmp_path / "nowhere.pt"), "--video-id", "a,b"]) == 2
    assert "--video-id 'a,b': a video id must be non-empty, without commas" in capsys.readouterr().err
    out = tmp_path / "out.mp4"
    assert main(["demo", str(video), "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert video_ids(out.with_suffix(".csv")) == {"scene 1_ take 2"}
    assert main(["demo", str(video), "--checkpoint", str(checkpoint), "--out", str(out), "--video-id", "vid7"]) == 0
    assert video_ids(out.with_suffix(".csv")) == {"vid7"}


def video_ids(csv: Path) -> set[str]:
    return {line.split(",")[0] for line in csv.read_text().splitlines()}
