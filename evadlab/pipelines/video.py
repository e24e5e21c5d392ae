"""Reading the frames of one video, without Ray: video files by presentation time, frame folders by index.

Used by ``evadlab prepare`` (inside Ray Data tasks) and by ``evadlab demo`` (which must run where Ray is not
installed). A clip is asked for by its keyframe's AVA second; the reader answers with frame indices and decodes them.

Two decoders read video files, each taking the file the other refuses. decord seeks quickly; the demo reads with it
first. PyAV (FFmpeg's own bindings) decodes in the calling thread when given one thread, where decord always adds a
decoding thread of its own beside the caller (a 1-thread decord reader keeps about 1.5 cores busy), and it decodes a
forward pass with about 30 % less CPU time per frame; ``prepare``, whose tasks must use the cores they request, reads
with it first. decord stops on WebM / Matroska written live (browsers' MediaRecorder, OBS, live muxers: no duration,
no cues; "Failed to measure duration/frame-count due to broken metadata"), on some tiny widths and on MPEG-TS, which
PyAV reads. Both decoders give the same time line: each frame's presentation time in seconds from the stream's first
frame, in presentation order, and a clip takes the frames nearest to its sampling instants on either
(``nearest_frame_indices``). Any decoder error becomes a ValueError naming the file and the decoder's first line.

The media spans from time 0 to the end of its last frame (its start plus its duration); a frame folder spans its
frame count. A keyframe whose instant lies outside is not read (``keyframe_outside`` says why); a clip whose keyframe
is inside but whose window reaches past an end takes the first or last frame there, as the released code does.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import av
import decord
import numpy as np

from evadlab.config import DataConfig
from evadlab.pipelines.ava import clip_frame_indices, clip_sample_times, keyframe_frame_index, nearest_frame_indices
from evadlab.pipelines.clips import decode_jpegs

# decord's time stamps are float32 (about 6e-5 s apart at second 900) and Matroska counts milliseconds: an instant
# within this of the end of the media counts as the end, which is outside.
END_TOLERANCE_S = 1e-3
# PyAV seeks forward (to the key frame before the wanted frame) rather than decoding on when the wanted frame is more
# than this many frames ahead and a key frame lies between: a prepare task that starts part way into a video (a shard
# part, see prepare.py) jumps there instead of decoding everything before it.
FORWARD_SEEK_FRAMES = 300
# What each decoder raises on a file it cannot read: decord's DECORDError is no RuntimeError, PyAV's FFmpegError
# covers FFmpeg's codes (first_video_stream raises ValueError for a file without a video stream).
_DECORD_ERRORS = (decord.DECORDError, RuntimeError, OSError, ValueError)
_PYAV_ERRORS = (av.FFmpegError, OSError, ValueError, IndexError)
# Serialises decord_log_held: the threads of an in-process prepare open videos at once.
_STDERR_HOLD = threading.Lock()


def error_reason(error: BaseException) -> str:
    """One line for the manifest: decord's errors carry a C++ stack trace after their first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def first_video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """The container's first video stream. Raises ValueError for a file without one (audio only, subtitles)."""
    if not container.streams.video:
        raise ValueError(f"no video stream (the file has {len(container.streams)} stream(s), none of them video)")
    return container.streams.video[0]


@contextlib.contextmanager
def decord_log_held() -> Iterator[None]:
    """decord's C++ code writes "ERROR opening: <file>, <reason>" to the process's stderr (file descriptor 2) before
    it raises on a file it cannot open; the error this module raises, or PyAV taking over, says it in one line. So
    descriptor 2 goes to a temporary file for the open, and what it caught is written back only when the open
    succeeds (output of other threads in that moment included). One thread at a time: descriptor 2 is the
    process's, and a second hold begun inside the first would restore the first one's file for good."""
    with _STDERR_HOLD, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        opened = False
        os.dup2(caught.fileno(), 2)
        try:
            yield
            opened = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if opened:
                caught.seek(0)
                os.write(2, caught.read())


@dataclass(frozen=True)
class Timeline:
    """When a video's frames are shown: ``starts`` (n,) float64 seconds from the first frame, ascending, and
    ``end``, the end of the last frame in the same seconds."""

    starts: np.ndarray
    end: float

    @classmethod
    def of(cls, starts: np.ndarray, last_duration: float | None) -> Timeline:
        """A time line from frame starts and the last frame's duration; a missing or zero duration (live files
        carry none) is taken as the median interval between frames."""
        starts = np.asarray(starts, np.float64)
        if starts.size == 0:
            raise ValueError("the video has no frames")
        if not last_duration or last_duration <= 0:
            last_duration = float(np.median(np.diff(starts))) if starts.size > 1 else 0.0
        return cls(starts, float(starts[-1] + last_duration))


class VideoDecoder(Protocol):
    """What the two decoders offer: the time line, the frame size and frames by index (presentation order)."""

    name: str
    timeline: Timeline
    height: int
    width: int

    def read(self, indices: list[int]) -> np.ndarray: ...


class DecordDecoder:
    """decord: fast seeking and threaded decoding for the files it reads."""

    name = "decord"

    def __init__(self, path: str, threads: int = 1):
        with decord_log_held():
            self.reader = decord.VideoReader(path, num_threads=threads)
        if len(self.reader) == 0:
            raise ValueError("decord finds no frames")
        stamps = self.reader.get_frame_timestamp(np.arange(len(self.reader)))
        # decord opens some files whose batches it cannot decode (some tiny widths): find out here, where PyAV can
        # still take over.
        self.height, self.width = self.read([0]).shape[1:3]
        self.timeline = Timeline.of(stamps[:, 0], float(stamps[-1, 1] - stamps[-1, 0]))

    def read(self, indices: list[int]) -> np.ndarray:
        return self.reader.get_batch(indices).asnumpy()


class PyAVDecoder:
    """PyAV: the time line comes from one pass over the packets (no decoding); frames are decoded forward, with a seek
    when a read goes back or jumps far ahead (``FORWARD_SEEK_FRAMES``). ``threads`` FFmpeg decoding threads; with 1
    the caller's thread decodes."""

    name = "PyAV"

    def __init__(self, path: str, threads: int = 1):
        self.path, self.threads = path, threads
        self.container, self.stream = self._open()
        self.pts, last_duration, self.key_frames = _presentation_times(self.container, self.stream)
        start = self.stream.start_time if self.stream.start_time is not None else int(self.pts[0])
        seconds = float(self.stream.time_base)
        self.timeline = Timeline.of((self.pts - start) * seconds, last_duration * seconds)
        self._frames: Iterator[av.VideoFrame] = iter(())
        self._last: tuple[int, np.ndarray] | None = None
        self.height = self.width = 0
        first = self._frame_at(int(self.pts[0]))
        self.height, self.width = first.shape[:2]

    def read(self, indices: list[int]) -> np.ndarray:
        return np.stack([self._frame_at(int(self.pts[index])) for index in indices])

    def _open(self):
        container = av.open(self.path)
        stream = first_video_stream(container)
        stream.thread_type, stream.thread_count = "AUTO", self.threads
        return container, stream

    def _frame_at(self, pts: int) -> np.ndarray:
        """The frame shown at ``pts`` (a value of ``self.pts``) as (H, W, 3) uint8 RGB at the first frame's size."""
        if self._last is not None and self._last[0] == pts:
            return self._last[1]
        if self._last is None or pts < self._last[0] or self._far_ahead(self._last[0], pts):
            self._seek(pts)
        for frame in self._frames:
            if frame.pts is not None and frame.pts >= pts:
                break
        else:
            raise ValueError(f"the frame at pts {pts} was never decoded")
        if frame.pts != pts:
            raise ValueError(f"the frame at pts {pts} was never decoded (the next one is at {frame.pts})")
        size = {"width": self.width, "height": self.height} if self.width else {}
        self._last = (pts, frame.to_ndarray(format="rgb24", **size))
        return self._last[1]

    def _far_ahead(self, current: int, wanted: int) -> bool:
        """Whether a seek to ``wanted`` saves decoding: it lies more than ``FORWARD_SEEK_FRAMES`` frames after
        ``current`` and a key frame lies between them (a seek lands on the last one)."""
        frames_ahead = np.searchsorted(self.pts, wanted) - np.searchsorted(self.pts, current)
        key = np.searchsorted(self.key_frames, wanted, side="right") - 1
        return frames_ahead > FORWARD_SEEK_FRAMES and key >= 0 and self.key_frames[key] > current

    def _seek(self, pts: int) -> None:
        """Decoding restarts at the key frame at or before ``pts``; from the first frame when the container cannot
        seek there (live files have no cues) or lands after it."""
        if pts > self.pts[0]:
            try:
                self.container.seek(pts, stream=self.stream, backward=True)
                frames = self.container.decode(self.stream)
                first = next(frames)
                if first.pts is not None and first.pts <= pts:
                    self._frames = chain([first], frames)
                    return
            except (av.FFmpegError, StopIteration):
                pass
        try:
            self.container.seek(0, stream=self.stream, backward=True)
        except av.FFmpegError:
            self.container.close()
            self.container, self.stream = self._open()
        self._frames = self.container.decode(self.stream)


def _presentation_times(container, stream) -> tuple[np.ndarray, int, np.ndarray]:
    """The stream's frame pts in presentation order (one pass over the packets, no decoding), the duration of the
    last frame (0 when the container does not say) and the pts of its key frames, ascending."""
    packets = [(packet.pts, packet.duration or 0, packet.is_keyframe) for packet in container.demux(stream)
               if packet.pts is not None]
    if not packets:
        raise ValueError("the video stream has no frames with presentation times")
    pts, durations, key = np.asarray(packets, np.int64).T
    order = np.argsort(pts, kind="stable")
    pts, durations, key = pts[order], durations[order], key[order].astype(bool)
    unique = np.concatenate([[True], pts[1:] != pts[:-1]])
    return pts[unique], int(durations[unique][-1]), pts[unique & key]


DECODERS = {"decord": (DecordDecoder, _DECORD_ERRORS), "PyAV": (PyAVDecoder, _PYAV_ERRORS)}


def open_video(path: str, threads: int = 1, first: str = "decord") -> VideoDecoder:
    """The decoder named ``first`` ("decord" or "PyAV") when it opens the file and decodes its first frame, else the
    other one. Raises ValueError with both decoders' reasons, in that order, when neither reads it."""
    reasons = []
    for name in sorted(DECODERS, key=lambda name: name != first):
        decoder, errors = DECODERS[name]
        try:
            return decoder(path, threads)
        except errors as error:
            reasons.append(f"{name}: {error_reason(error)}")
    raise ValueError(f"cannot decode the video ({'; '.join(reasons)})")


@dataclass(frozen=True)
class PresentedFrame:
    """One decoded frame with its presentation time as the file states it."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB, at the first frame's size
    pts: int  # in time_base units
    duration: int  # in time_base units; 0 when the file does not say
    time_base: Fraction
    time: float  # seconds from the stream's start: the time line of ``Timeline``


def presented_frames(path: str) -> Iterator[PresentedFrame]:
    """Every frame of the file's first video stream in presentation order, decoded by PyAV, with its own time stamp
    (a frame without one, or with one not after the previous frame's, takes the previous one plus one tick). Frames
    keep the first frame's size (live recordings may change it). Raises ValueError for a decoder error."""
    previous, size = None, {}
    try:
        with av.open(path) as container:
            stream = first_video_stream(container)
            stream.thread_type = "AUTO"
            origin = stream.start_time
            for frame in container.decode(stream):
                pts = frame.pts
                if pts is None or (previous is not None and pts <= previous):
                    pts = 0 if previous is None else previous + 1
                origin = pts if origin is None else origin
                previous = pts
                pixels = frame.to_ndarray(format="rgb24", **size)
                size = size or {"height": pixels.shape[0], "width": pixels.shape[1]}
                yield PresentedFrame(pixels, pts, int(frame.duration or 0), stream.time_base,
                                     float((pts - origin) * stream.time_base))
    except _PYAV_ERRORS as error:
        raise ValueError(f"cannot decode {path}: {error_reason(error)}") from None


class FrameSource(Protocol):
    def keyframe_outside(self, timestamp: int) -> str | None: ...

    def media_extent(self) -> dict[str, float | int]: ...

    def clip_indices(self, timestamp: int) -> list[int]: ...

    def read(self, indices: list[int]) -> np.ndarray: ...


class VideoFileFrames:
    """A video file addressed by time: the clip is the frames nearest to the 30 fps sampling times, whatever
    the file's real frame rate (many AVA videos are not 30 fps). ``threads`` and ``first`` go to ``open_video``."""

    def __init__(self, path: str, data: DataConfig, threads: int = 1, first: str = "decord"):
        self.path, self.data = str(path), data
        self.decoder = open_video(self.path, threads=threads, first=first)

    @property
    def timeline(self) -> Timeline:
        return self.decoder.timeline

    @property
    def frame_times(self) -> np.ndarray:
        return self.decoder.timeline.starts

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the decoded frames."""
        return self.decoder.height, self.decoder.width

    def keyframe_instant(self, timestamp: int) -> float:
        """Seconds into the file of the keyframe at AVA second ``timestamp`` (the middle sample of its clip)."""
        return keyframe_frame_index(timestamp, self.data.fps, self.data.video_offset_sec) / self.data.fps

    def keyframe_outside(self, timestamp: int) -> str | None:
        """Why the keyframe at ``timestamp`` lies outside the video, or None when it lies inside."""
        instant, end = self.keyframe_instant(timestamp), self.timeline.end
        if -END_TOLERANCE_S < instant < end - END_TOLERANCE_S:
            return None
        return (f"keyframe {timestamp} is {instant:.3f} s into the file (data.video_offset_sec="
                f"{self.data.video_offset_sec:g}), outside the video, which lasts {end:.3f} s")

    def media_extent(self) -> dict[str, float]:
        return {"media_duration_s": round(self.timeline.end, 6)}

    def clip_indices(self, timestamp: int) -> list[int]:
        times = clip_sample_times(timestamp, self.data.num_frames, self.data.sample_rate, fps=self.data.fps,
                                  video_offset_sec=self.data.video_offset_sec)
        return nearest_frame_indices(times, self.frame_times).tolist()

    def read(self, indices: list[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB. Raises ValueError naming the file for any decoder error."""
        try:
            return self.decoder.read(indices)
        except (*_DECORD_ERRORS, *_PYAV_ERRORS) as error:
            raise ValueError(f"{self.decoder.name} cannot decode {self.path}: {error_reason(error)}") from None


class FrameFolderFrames:
    """Extracted frames (30 fps JPEGs of the cut), addressed by index as the released code does."""

    def __init__(self, folder: str, frame_paths: list[str], data: DataConfig):
        self.data = data
        self.paths = [Path(folder).parent / relative for relative in frame_paths]

    def keyframe_outside(self, timestamp: int) -> str | None:
        """Why the keyframe at ``timestamp`` lies outside the folder's frames, or None when it lies inside."""
        index = keyframe_frame_index(timestamp, fps=self.data.fps, video_offset_sec=self.data.video_offset_sec)
        if 0 <= index < len(self.paths):
            return None
        return (f"keyframe {timestamp} is frame index {index} (data.video_offset_sec="
                f"{self.data.video_offset_sec:g}, data.fps={self.data.fps}), outside the {len(self.paths)} frames")

    def media_extent(self) -> dict[str, int]:
        return {"frame_count": len(self.paths)}

    def clip_indices(self, timestamp: int) -> list[int]:
        center = keyframe_frame_index(timestamp, fps=self.data.fps, video_offset_sec=self.data.video_offset_sec)
        return list(clip_frame_indices(center, self.data.num_frames, self.data.sample_rate, len(self.paths)))

    def read(self, indices: list[int]) -> np.ndarray:
        frames = []
        for index in indices:
            try:
                frames.append(decode_jpegs([self.paths[index].read_bytes()])[0])
            except (OSError, ValueError) as error:
                raise ValueError(f"frame {index} ({self.paths[index]}): {error}") from None
        if len({frame.shape for frame in frames}) > 1:
            first, last = self.paths[indices[0]], self.paths[indices[-1]]
            raise ValueError(f"frames of different sizes among {first}..{last.name}")
        return np.stack(frames)


def open_frames(item: dict[str, Any], data: DataConfig, threads: int) -> FrameSource:
    """The frames of a prepare task's video: its file, read by PyAV first with ``threads`` decoding threads (see the
    module's notes), or its frame folder."""
    if item["frame_paths"] is None:
        return VideoFileFrames(item["source"], data, threads=threads, first="PyAV")
    return FrameFolderFrames(item["source"], item["frame_paths"], data)
