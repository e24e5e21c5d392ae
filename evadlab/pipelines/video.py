"""Reading the frames of one video, without Ray: video files by presentation time, frame folders by index.

Used by ``evadlab prepare`` (inside Ray Data tasks) and by ``evadlab demo`` (which must run where Ray is not
installed). A clip is asked for by its keyframe's AVA second; the reader answers with frame indices and decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import decord
import numpy as np

from evadlab.config import DataConfig
from evadlab.pipelines.ava import clip_frame_indices, clip_sample_times, keyframe_frame_index, nearest_frame_indices
from evadlab.pipelines.clips import decode_jpegs


def error_reason(error: Exception) -> str:
    """One line for the manifest: decord's errors carry a C++ stack trace after their first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class FrameSource(Protocol):
    def clip_indices(self, timestamp: int) -> list[int]: ...

    def read(self, indices: list[int]) -> np.ndarray: ...


class VideoFileFrames:
    """A video file addressed by time: the clip is the frames nearest to the 30 fps sampling times, whatever
    the file's real frame rate (many AVA videos are not 30 fps)."""

    def __init__(self, path: str, data: DataConfig):
        self.data = data
        try:
            self.reader = decord.VideoReader(path, num_threads=max(1, int(data.prepare_cpus)))
        except RuntimeError as error:
            raise ValueError(f"decord cannot open the video: {error_reason(error)}") from None
        self.frame_times = self.reader.get_frame_timestamp(np.arange(len(self.reader)))[:, 0]

    def clip_indices(self, timestamp: int) -> list[int]:
        times = clip_sample_times(timestamp, self.data.num_frames, self.data.sample_rate, fps=self.data.fps,
                                  video_offset_sec=self.data.video_offset_sec)
        return nearest_frame_indices(times, self.frame_times).tolist()

    def read(self, indices: list[int]) -> np.ndarray:
        return self.reader.get_batch(indices).asnumpy()


class FrameFolderFrames:
    """Extracted frames (30 fps JPEGs of the cut), addressed by index as the released code does."""

    def __init__(self, folder: str, frame_paths: list[str], data: DataConfig):
        self.data = data
        self.paths = [Path(folder).parent / relative for relative in frame_paths]

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


def open_frames(item: dict[str, Any], data: DataConfig) -> FrameSource:
    if item["frame_paths"] is None:
        return VideoFileFrames(item["source"], data)
    return FrameFolderFrames(item["source"], item["frame_paths"], data)
