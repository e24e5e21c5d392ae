"""Real video files for the tests, written by PyAV: frame i is a flat grey that tells its own index."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL_STEP = 3


def level(index: int) -> int:
    """The grey level of frame ``index``: distinct for 80 frames, and back to dark after that."""
    return 10 + LEVEL_STEP * (index % 80)


def write_numbered_video(path: Path, *, codec: str = "libx264", container: str | None = None, width: int = 96,
                         height: int = 64, rate=30, count: int = 240, options: dict | None = None,
                         times_ms: list[int] | None = None, quality: dict | None = None) -> Path:
    """A video whose frame i is grey ``level(i)``; ``times_ms`` gives every frame's presentation time instead of a
    constant rate; ``options`` go to the muxer (``{"live": "1"}``: no duration, no cues, as live recorders write)."""
    with av.open(str(path), mode="w", format=container, options=options or {}) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = quality or {"crf": "10"}
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for index in range(count if times_ms is None else len(times_ms)):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level(index), np.uint8), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[index], Fraction(1, 1000)
            output.mux(stream.encode(frame))
        output.mux(stream.encode())
    return path


def levels(frames: np.ndarray) -> list[int]:
    """The index each decoded frame tells by its grey level."""
    return [round((frame.mean() - 10) / LEVEL_STEP) for frame in frames]
