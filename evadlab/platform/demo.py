"""``evadlab demo``: EVAD on any video file, an annotated mp4 and the detections as an AVA-format CSV.

Keyframes are taken every ``1 / fps`` seconds of the file; each is detected from the clip the model was
trained with (``data.num_frames`` frames ``data.sample_rate`` apart on the 30 fps grid around it). The
annotated video keeps every frame of the source and shows the detections of the nearest keyframe.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from evadlab.config import ExperimentConfig, TrackingConfig, load_config
from evadlab.models.structures import Detections
from evadlab.pipelines.ava import (
    ALL_ACTION_IDS,
    AVA_ACTION_NAMES,
    detection_rows,
    stack_detection_rows,
    write_detections_csv,
)
from evadlab.pipelines.clips import resize_short_side, to_model_input
from evadlab.pipelines.video import VideoFileFrames
from evadlab.platform.modeling import StartingWeights, build_model, open_checkpoint, stored_config
from evadlab.storage import atomic_path

LABELS_PER_BOX = 3
BOX_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 160, 60)]
# Frames decoded per call while writing the annotated video: bounds memory for long, large videos.
WRITE_CHUNK = 64


def detect_keyframes(model, frames: VideoFileFrames, times: np.ndarray, cfg: ExperimentConfig,
                     device: torch.device) -> list[Detections]:
    height, width = frames.reader[0].shape[:2]
    detections = []
    for time_s in tqdm(times, desc="detecting", unit="keyframe"):
        clip = resize_short_side(frames.read(frames.clip_indices(float(time_s))), cfg.data.short_side,
                                 cfg.data.max_long_side)
        (found,) = model.predict([to_model_input(clip, cfg.data.mean, cfg.data.std).to(device)], [(height, width)])
        # predict falls back to every proposal when none passes; the demo draws only real persons.
        detections.append(found[found.person_scores >= cfg.model.person_threshold].to("cpu", torch.float32))
    return detections


def draw(frame: np.ndarray, found: Detections) -> np.ndarray:
    image = Image.fromarray(frame)
    canvas = ImageDraw.Draw(image)
    height, width = frame.shape[:2]
    for index, (box, scores) in enumerate(zip(found.boxes.tensor.tolist(), found.action_scores)):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
        canvas.rectangle([x1, y1, x2, y2], outline=colour, width=max(2, width // 320))
        top = torch.topk(scores, LABELS_PER_BOX)
        for line, (score, column) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            text = f"{AVA_ACTION_NAMES[column + 1]} {score:.2f}"
            position = (x1 + 3, y1 + 2 + 12 * line)
            canvas.rectangle(canvas.textbbox(position, text), fill=(0, 0, 0))
            canvas.text(position, text, fill=colour)
    return np.asarray(image)


def write_annotated_video(frames: VideoFileFrames, times: np.ndarray, detections: list[Detections], out: Path) -> None:
    """Every source frame, with the detections of the keyframe nearest in time, encoded with libx264 as MP4
    (whatever ``out`` is named) and written atomically."""
    reader = frames.reader
    fps = float(reader.get_avg_fps()) or 30.0
    height, width = reader[0].shape[:2]
    nearest = np.abs(frames.frame_times[:, None] - times[None, :]).argmin(axis=1)
    # The temporary name ends in .tmp, so the container format is named rather than guessed from the name.
    with atomic_path(out) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        for start in tqdm(range(0, len(reader), WRITE_CHUNK), desc="writing", unit="chunk"):
            indices = list(range(start, min(start + WRITE_CHUNK, len(reader))))
            for index, frame in zip(indices, reader.get_batch(indices).asnumpy()):
                picture = draw(frame, detections[nearest[index]])[: stream.height, : stream.width]
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")))
        container.mux(stream.encode())


def detections_table(video_id: str, times: np.ndarray, detections: list[Detections]) -> pa.Table:
    """One row per box and action (all 80), keyed by the keyframe's whole second in the file."""
    return pa.table(stack_detection_rows(
        detection_rows(video_id, int(time_s), found.boxes.tensor.numpy(), found.action_scores.numpy(), ALL_ACTION_IDS)
        for time_s, found in zip(times, detections)
    ))


def run_demo(video: str, *, checkpoint: str, config: str | None, out: str, fps: float) -> Path:
    if fps <= 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    if not Path(video).is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    start = StartingWeights(open_checkpoint(checkpoint, TrackingConfig().resolved_uri()), backbone_only=False)
    cfg = load_config(config) if config else stored_config(start.checkpoint)
    # The file's own time line: second 0 is its first frame.
    data = cfg.data.model_copy(update={"video_offset_sec": 0.0})
    try:
        frames = VideoFileFrames(video, data)
    except ValueError as error:
        raise ValueError(f"cannot read video {video}: {error}") from None
    duration = float(frames.frame_times[-1]) if len(frames.frame_times) else 0.0
    times = np.arange(0.0, duration + 1e-9, 1.0 / fps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, start).to(device).eval()
    print(f"evadlab demo: {video}, {len(frames.frame_times)} frames, {len(times)} keyframes at {fps:g}/s")
    detections = detect_keyframes(model, frames, times, cfg, device)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_annotated_video(frames, times, detections, out_path)
    csv_path = out_path.with_suffix(".csv")
    write_detections_csv(csv_path, detections_table(Path(video).stem, times, detections))
    persons = sum(len(found.boxes) for found in detections)
    print(f"annotated video: {out_path}\ndetections ({persons} persons on {len(times)} keyframes): {csv_path}")
    return out_path
