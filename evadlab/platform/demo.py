"""``evadlab demo``: EVAD on any video file, an annotated mp4 and the detections as an AVA-format CSV.

Keyframes are taken every ``1 / fps`` seconds of the file; each is detected from the clip the model was
trained with (``data.num_frames`` frames ``data.sample_rate`` apart on the 30 fps grid around it). The
annotated video keeps every frame of the source with its presentation time and duration (variable frame rates,
slideshows and 29.97 fps stay as they are) and shows the detections of the nearest keyframe. Memory does not grow
with the video's length beyond one entry per keyframe: frames are decoded, drawn and encoded one at a time.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from itertools import chain, pairwise
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from evadlab.config import ExperimentConfig, TrackingConfig, load_config
from evadlab.console import progress_bar
from evadlab.models.structures import Detections
from evadlab.pipelines.ava import (
    AVA_ACTION_NAMES,
    VIDEO_ID_FORBIDDEN,
    detection_rows,
    nearest_frame_indices,
    read_label_map,
    stack_detection_rows,
    write_detections_csv,
)
from evadlab.pipelines.clips import resize_short_side, to_model_input
from evadlab.pipelines.video import PresentedFrame, VideoFileFrames, presented_frames
from evadlab.platform.modeling import StartingWeights, build_model, open_checkpoint, stored_config
from evadlab.storage import atomic_path, require_writable_folder

LABELS_PER_BOX = 3
BOX_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 160, 60)]


def demo_video_id(video: str, given: str | None) -> str:
    """The video id of the detections CSV: ``given`` (``--video-id``), else the file's stem with every character a
    CSV field cannot hold unquoted (comma, quote, line break) replaced by '_'. Raises ValueError for a given id that
    is empty or holds such a character."""
    if given is not None:
        if not given or re.search(VIDEO_ID_FORBIDDEN, given):
            raise ValueError(f"--video-id {given!r}: a video id must be non-empty, without commas, quotes or line "
                             f"breaks")
        return given
    return re.sub(VIDEO_ID_FORBIDDEN, "_", Path(video).stem) or "video"


def action_names(cfg: ExperimentConfig) -> dict[int, str]:
    """A name for each of the model's action ids 1..model.num_actions: the config's label map where it names the id,
    else AVA's name (ids 1..80), else ``action <id>``."""
    label_map = cfg.data.annotation_dir / cfg.data.label_map
    listed = read_label_map(label_map) if label_map.is_file() else {}
    return {action: listed.get(action) or AVA_ACTION_NAMES.get(action) or f"action {action}"
            for action in range(1, cfg.model.num_actions + 1)}


def detect_keyframes(model, frames: VideoFileFrames, times: np.ndarray, cfg: ExperimentConfig,
                     device: torch.device) -> list[Detections]:
    detections = []
    for time_s in progress_bar(len(times), "keyframe", "detecting", times):
        clip = resize_short_side(frames.read(frames.clip_indices(float(time_s))), cfg.data.short_side,
                                 cfg.data.max_long_side)
        (found,) = model.predict([to_model_input(clip, cfg.data.mean, cfg.data.std).to(device)], [frames.size])
        # predict falls back to every proposal when none passes; the demo draws only real persons.
        detections.append(found[found.person_scores >= cfg.model.person_threshold].to("cpu", torch.float32))
    return detections


def draw(frame: np.ndarray, found: Detections, names: dict[int, str]) -> np.ndarray:
    image = Image.fromarray(frame)
    canvas = ImageDraw.Draw(image)
    height, width = frame.shape[:2]
    for index, (box, scores) in enumerate(zip(found.boxes.tensor.tolist(), found.action_scores)):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        canvas.rectangle([x1, y1, x2, y2], outline=colour, width=max(2, width // 320))
        top = torch.topk(scores, min(LABELS_PER_BOX, len(scores)))
        for line, (score, column) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            text = f"{names[column + 1]} {score:.2f}"
            position = (x1 + 3, y1 + 2 + 12 * line)
            canvas.rectangle(canvas.textbbox(position, text), fill=(0, 0, 0))
            canvas.text(position, text, fill=colour)
    return np.asarray(image)


def nearest_keyframes(frame_times: np.ndarray, keyframe_times: np.ndarray) -> np.ndarray:
    """For each frame time, the index of the nearest keyframe time (sorted); a frame exactly between two takes the
    earlier. A binary search per frame: memory grows with the inputs, never with their product."""
    return nearest_frame_indices(frame_times, keyframe_times)


def with_durations(frames: Iterator[PresentedFrame]) -> Iterator[tuple[PresentedFrame, int]]:
    """Each frame with its duration in its time base: up to the next frame, and the file's own for the last (0 when
    the file does not give one: the muxer then picks one)."""
    for frame, following in pairwise(chain(frames, [None])):
        yield frame, following.pts - frame.pts if following is not None else frame.duration


def write_annotated_video(video: str, times: np.ndarray, detections: list[Detections], names: dict[int, str],
                          out: Path, total_frames: int) -> None:
    """Every source frame, with the detections of the keyframe nearest in time, encoded with libx264 as MP4
    (whatever ``out`` is named) and written atomically. Each output frame keeps its source presentation time and
    duration (the source's time base), so the output has the source's frame count, timing and duration. The
    encoder's 4:2:0 chroma needs even sizes: an odd width or height is padded by repeating the last column or row."""
    frames = with_durations(presented_frames(video))
    first, first_duration = next(frames, (None, 0))
    if first is None:
        raise ValueError(f"PyAV decodes no frame of {video}")
    height, width = first.pixels.shape[:2]
    padding = ((0, height % 2), (0, width % 2), (0, 0))
    if height % 2 or width % 2:
        print(f"evadlab demo: frames of {width}x{height} padded to {width + width % 2}x{height + height % 2} "
              f"(H.264 needs even sizes)")
    # The temporary name ends in .tmp, so the container format is named rather than guessed from the name.
    with atomic_path(out) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264")
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        stream.time_base = stream.codec_context.time_base = first.time_base
        # Without B-frames, frames are stored in presentation order, so the file's time line ends with the last
        # frame's duration (MP4 takes the duration of the last frame in decoding order).
        stream.options = {"bf": "0"}
        durations: dict[int, int] = {}
        for frame, duration in progress_bar(total_frames, "frame", "writing", chain([(first, first_duration)], frames)):
            nearest = int(nearest_keyframes(np.array([frame.time]), times)[0])
            picture = np.pad(draw(frame.pixels, detections[nearest], names), padding, mode="edge")
            encoded = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
            encoded.pts, encoded.time_base, durations[frame.pts] = frame.pts, frame.time_base, duration
            mux_with_durations(container, stream.encode(encoded), durations)
        mux_with_durations(container, stream.encode(), durations)


def mux_with_durations(container, packets, durations: dict[int, int]) -> None:
    """Muxes encoded packets, each with its frame's duration (the encoder leaves the last one to the muxer's guess,
    which would shorten a slideshow's last frame)."""
    for packet in packets:
        if packet.pts is not None and durations.get(packet.pts):
            packet.duration = durations.pop(packet.pts)
        container.mux(packet)


def detections_table(video_id: str, times: np.ndarray, detections: list[Detections], num_actions: int) -> pa.Table:
    """One row per box and action id 1..num_actions, keyed by the keyframe's whole second in the file."""
    class_ids = np.arange(1, num_actions + 1)
    return pa.table(stack_detection_rows(
        detection_rows(video_id, int(time_s), found.boxes.tensor.numpy(), found.action_scores.numpy(), class_ids)
        for time_s, found in zip(times, detections)
    ))


def demo_outputs(video: str, out: str) -> tuple[Path, Path]:
    """The annotated MP4 ``out`` and the detections CSV beside it (``out`` with ``.csv``), checked before any work:
    ``out`` must name an ``.mp4`` file (so the CSV cannot replace the video), be neither the input video nor a folder,
    nor may the CSV's path be a folder, and their folder must be writable. Raises ValueError or OSError naming
    ``--out``."""
    if not out:
        raise ValueError("--out is empty: name the annotated video, e.g. --out annotated.mp4")
    out_path = Path(out).expanduser()
    if out_path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4: the annotated video is an MP4 file, and its detections are "
                         f"written beside it as {out_path.with_suffix('.csv').name}")
    if out_path.resolve() == Path(video).resolve():
        raise ValueError(f"--out {out} is the input video: name another file")
    csv_path = out_path.with_suffix(".csv")
    for path in (out_path, csv_path):
        if path.is_dir():
            raise IsADirectoryError(f"--out: {path} is a folder; name a file")
    require_writable_folder(out_path.absolute().parent, "--out")
    return out_path, csv_path


def run_demo(video: str, *, checkpoint: str, config: str | None, out: str, fps: float,
             video_id: str | None = None, tracking_uri: str | None = None) -> Path:
    """Detects, draws and writes; every input (fps, video file, video id, checkpoint, decoder) is checked before the
    work that needs it. ``checkpoint`` may be a path, a storage URI, or ``runs:/`` / ``models:/`` on the MLflow server
    ``tracking_uri`` (default: ``mlflow.db`` in the working directory). Raises ValueError, FileNotFoundError or
    OSError (``out`` not a writable ``.mp4`` path, see :func:`demo_outputs`) with one line for the command to print."""
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    if fps > 1:
        warnings.warn(f"--fps {fps:g}: the detections CSV gives whole seconds, as AVA's do, so the keyframes of one "
                      f"second share its timestamp there (the annotated video shows each)", stacklevel=2)
    if Path(video).is_dir():
        raise IsADirectoryError(f"video {video} is a folder, not a video file")
    if not Path(video).is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    out_path, csv_path = demo_outputs(video, out)
    video_id = demo_video_id(video, video_id)
    uri = tracking_uri or TrackingConfig().resolved_uri()
    start = StartingWeights(open_checkpoint(checkpoint, uri), backbone_only=False)
    cfg = load_config(config) if config else stored_config(start.checkpoint)
    # The file's own time line: second 0 is its first frame.
    data = cfg.data.model_copy(update={"video_offset_sec": 0.0})
    try:
        frames = VideoFileFrames(video, data)
    except ValueError as error:
        raise ValueError(f"cannot read video {video}: {error}") from None
    names = action_names(cfg)
    times = np.arange(0.0, float(frames.frame_times[-1]) + 1e-9, 1.0 / fps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, start).to(device).eval()
    print(f"evadlab demo: {video} (video id {video_id}, {frames.decoder.name}), {len(frames.frame_times)} frames, "
          f"{len(times)} keyframes at {fps:g}/s")
    detections = detect_keyframes(model, frames, times, cfg, device)
    write_annotated_video(video, times, detections, names, out_path, len(frames.frame_times))
    write_detections_csv(csv_path, detections_table(video_id, times, detections, cfg.model.num_actions))
    persons = sum(len(found.boxes) for found in detections)
    print(f"annotated video: {out_path}\ndetections ({persons} persons on {len(times)} keyframes): {csv_path}")
    return out_path
