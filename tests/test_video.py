"""Video files by presentation time with decord, and with PyAV for the files decord refuses: real files written by
PyAV, each frame a flat grey that tells its own index."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av  # PyAV first: decord's own FFmpeg libraries, loaded first, break PyAV's libvpx encoder
import decord
import numpy as np
import pytest
from video_files import levels, write_numbered_video

from evadlab.config import DataConfig
from evadlab.pipelines.video import DecordDecoder, PyAVDecoder, VideoFileFrames, presented_frames

# What decord refuses and FFmpeg plays: live WebM / Matroska (no duration, no cues), a width decord cannot copy out,
# MPEG-TS.
REFUSED_BY_DECORD = {
    "vp8_live.webm": {"codec": "libvpx", "container": "webm", "options": {"live": "1"},
                      "quality": {"crf": "4", "b": "4M"}},
    "h264_live.mkv": {"codec": "libx264", "container": "matroska", "options": {"live": "1"}},
    "width_8.mp4": {"width": 8, "count": 60},
    "stream.ts": {"container": "mpegts", "count": 60},
}


@pytest.mark.parametrize("name", sorted(REFUSED_BY_DECORD))
def test_files_decord_refuses_are_read_with_pyav_by_time(tmp_path, name):
    path = write_numbered_video(tmp_path / name, **REFUSED_BY_DECORD[name])
    with pytest.raises(decord.DECORDError):
        DecordDecoder(str(path))
    frames = VideoFileFrames(str(path), DataConfig(video_offset_sec=900.0))
    count = REFUSED_BY_DECORD[name].get("count", 240)
    assert frames.decoder.name == "PyAV" and len(frames.frame_times) == count
    np.testing.assert_allclose(frames.frame_times, np.arange(count) / 30, atol=1e-3)
    assert frames.timeline.end == pytest.approx(count / 30, abs=1e-3)
    # The clip of AVA second 901 (file second 1): 16 samples 4 frames apart around frame 30, clamped at the start.
    indices = frames.clip_indices(901)
    assert indices == [max(0, 30 + 4 * offset) for offset in range(-8, 8)]
    assert levels(frames.read(indices)) == indices
    # Going back in the file (a seek, or decoding from the start where the file has no cues) gives the same frames.
    assert levels(frames.read([count - 1, 3, 3, 40])) == [(count - 1) % 80, 3, 3, 40]


@pytest.mark.parametrize("rate", [Fraction(25), Fraction(30000, 1001)])
def test_both_decoders_give_the_same_time_line_and_frames(tmp_path, rate):
    path = str(write_numbered_video(tmp_path / "video.mp4", rate=rate, count=75))
    by_decord, by_pyav = DecordDecoder(path), PyAVDecoder(path)
    np.testing.assert_allclose(by_pyav.timeline.starts, by_decord.timeline.starts, atol=1e-4)
    assert by_pyav.timeline.end == pytest.approx(by_decord.timeline.end, abs=1e-4)
    assert by_pyav.timeline.end == pytest.approx(75 / rate, abs=1e-4)
    indices = [0, 7, 8, 74, 12]
    assert levels(by_pyav.read(indices)) == levels(by_decord.read(indices)) == indices


def test_pyav_jumps_far_ahead_by_a_seek_and_reads_the_right_frames(tmp_path):
    """A prepare task that starts part way into a video reads its first frame after a forward seek to the key frame
    before it (key frames every 60 frames here), and reads on and back from there."""
    path = str(write_numbered_video(tmp_path / "long.mp4", count=900, quality={"crf": "10", "g": "60"}))
    decoder = PyAVDecoder(path)
    assert len(decoder.key_frames) == 15
    indices = [701, 705, 899, 3, 640]
    assert levels(decoder.read(indices)) == [index % 80 for index in indices]


def test_variable_frame_rate_times_are_read_as_written(tmp_path):
    times_ms = [0, 33, 70, 100, 180, 400, 420, 1000, 1033, 2500]
    path = str(write_numbered_video(tmp_path / "vfr.mp4", times_ms=times_ms))
    for decoder in (DecordDecoder(path), PyAVDecoder(path)):
        np.testing.assert_allclose(decoder.timeline.starts, np.array(times_ms) / 1000, atol=1e-4)
    presented = list(presented_frames(path))
    assert [frame.time for frame in presented] == pytest.approx(np.array(times_ms) / 1000, abs=1e-9)
    assert levels(np.stack([frame.pixels for frame in presented])) == list(range(len(times_ms)))


def test_a_file_no_decoder_reads_is_one_error_naming_both(tmp_path, capfd):
    """The error is all: decord's own C++ log line of the failed open does not reach the process's stderr."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"^cannot decode the video \(decord: \w+Error: .*; PyAV: \w+Error: "):
        VideoFileFrames(str(broken), DataConfig())
    assert capfd.readouterr().err == ""
    with pytest.raises(ValueError, match=f"cannot decode {broken}"):
        list(presented_frames(str(broken)))


def test_threads_opening_videos_at_once_leave_stderr_where_it_was(tmp_path):
    """decord's log is held back on the process's stderr descriptor, which the threads of an in-process prepare
    share: after many opens at once, good and broken, it is the same file as before."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 4096)
    good = tmp_path / "good.mp4"
    write_numbered_video(good, count=90)

    def open_one(index: int) -> bool:
        try:
            VideoFileFrames(str(broken if index % 2 else good), DataConfig())
        except ValueError:
            return False
        return True

    before = os.fstat(2)
    with ThreadPoolExecutor(max_workers=4) as pool:
        opened = list(pool.map(open_one, range(24)))
    after = os.fstat(2)
    assert opened == [index % 2 == 0 for index in range(24)]
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_a_file_without_a_video_stream_says_so(tmp_path):
    audio = tmp_path / "audio_only.mp4"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for _ in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match=r"PyAV: ValueError: no video stream \(the file has 1 stream\(s\), none"):
        VideoFileFrames(str(audio), DataConfig())
