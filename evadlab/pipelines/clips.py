"""Clip rows in and model inputs out: resize, JPEG decode, flip and normalise.

Shared by preprocessing (``resize_short_side``), training, evaluation and the demo, so that every consumer
sees a clip exactly as the released EVAD data pipeline would (spec section 5.4), with one difference kept on
purpose: frames are stored already resized, so the flip happens on the stored frames (see ``flip_clip``).

A row is one annotated keyframe as written by ``evadlab.pipelines.prepare``: ``frames`` holds the clip's
JPEG bytes, ``boxes`` the normalised xyxy person boxes, ``actions`` their AVA action ids.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

# Rows per Arrow batch when reading a shard without Ray: small, because each row holds a whole clip.
ROWS_PER_READ = 16


def resized_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Detectron2's ResizeShortestEdge arithmetic (spec 5.4 step 3): short side to ``short_side``, scaled
    down further if the long side would exceed ``max_long_side``, each side rounded with ``int(x + 0.5)``."""
    scale = short_side / min(height, width)
    new_height, new_width = height * scale, width * scale
    if max(new_height, new_width) > max_long_side:
        shrink = max_long_side / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    return int(new_height + 0.5), int(new_width + 0.5)


def resize_short_side(frames: np.ndarray | torch.Tensor, short_side: int, max_long_side: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames resized with bilinear interpolation (cv2 INTER_LINEAR's half-pixel centres,
    no antialiasing, as the released pipeline) to ``resized_size``; returned as a (T, h, w, 3) uint8 tensor."""
    frames = torch.as_tensor(frames)
    height, width = frames.shape[1:3]
    size = resized_size(height, width, short_side, max_long_side)
    if size == (height, width):
        return frames
    # The permuted view is channels-last, the layout torch's fast uint8 bilinear kernel works on.
    resized = F.interpolate(frames.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False,
                            antialias=False)
    return resized.permute(0, 2, 3, 1)


def decode_clip(row: dict[str, Any], *, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The row's frames as a (T, H, W, 3) uint8 RGB array and its boxes as (n, 4) float32 absolute xyxy pixels
    of the stored frames, clipped to [0, W-1] x [0, H-1]; mirrored horizontally when ``flip`` (see ``flip_clip``).
    Raises ValueError naming the row for an undecodable frame."""
    try:
        frames = decode_jpegs(row["frames"])
    except ValueError as error:
        raise ValueError(f"row {row['video_id']},{row['timestamp']}: {error}") from None
    boxes = box_array(row["boxes"])
    if flip:
        frames, boxes = flip_clip(frames, boxes)
    return frames, absolute_boxes(boxes, int(row["height"]), int(row["width"]))


def flip_clip(frames: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) frames mirrored horizontally (a contiguous copy) and their (n, 4) normalised xyxy boxes with them.

    The mirror is taken in normalised coordinates (x -> 1 - x, i.e. x -> W - x in pixels), the exact image of a box
    under the flip; the released code uses W - x - 1 on pixel boxes at the original resolution, a shift of one
    original pixel (about 0.3 stored pixels at short side 288) that we do not copy."""
    mirrored = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], axis=1)
    return np.ascontiguousarray(frames[:, :, ::-1]), mirrored.astype(np.float32).reshape(-1, 4)


def absolute_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(n, 4) normalised xyxy boxes -> float32 pixels of a ``height`` x ``width`` frame, clipped to [0, W-1] x
    [0, H-1]."""
    absolute = np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([width, height, width, height], np.float32)
    np.clip(absolute[:, 0::2], 0, width - 1, out=absolute[:, 0::2])
    np.clip(absolute[:, 1::2], 0, height - 1, out=absolute[:, 1::2])
    return absolute


def decode_jpegs(encoded: Sequence[bytes]) -> np.ndarray:
    """JPEG images of one size -> (T, H, W, 3) uint8 RGB. Pillow rather than torchvision.io, whose JPEG codecs
    are deprecated since torchvision 0.29; it is about as fast. Raises ValueError naming the image (0-based) that
    Pillow cannot decode."""
    frames = []
    for index, data in enumerate(encoded):
        try:
            frames.append(np.asarray(rgb(Image.open(io.BytesIO(data)))))
        except OSError as error:  # Pillow's UnidentifiedImageError and truncated-file errors are OSErrors
            raise ValueError(f"frame {index} is not a readable JPEG ({error})") from None
    return np.stack(frames)


def rgb(image: Image.Image) -> Image.Image:
    """Colour JPEGs decode as RGB already; greyscale or CMYK ones are converted."""
    return image if image.mode == "RGB" else image.convert("RGB")


def encode_jpegs(frames: np.ndarray | torch.Tensor, quality: int) -> list[bytes]:
    """(T, H, W, 3) uint8 RGB -> one JPEG per frame. Colour is kept at full resolution (4:4:4): the default
    4:2:0 halves it, which at short side 64 costs about 7 dB PSNR for some 25 % fewer bytes."""
    encoded = []
    for frame in np.asarray(frames):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buffer, format="JPEG", quality=quality, subsampling=0)
        encoded.append(buffer.getvalue())
    return encoded


def box_array(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """Boxes as read from a shard (lists from pyarrow, arrays of arrays from Ray Data) as (n, 4) float32."""
    return np.array([np.asarray(box, dtype=np.float32) for box in boxes], dtype=np.float32).reshape(-1, 4)


def to_model_input(frames_uint8: np.ndarray | torch.Tensor, mean: float = 0.45, std: float = 0.225) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (3, T, H, W) float32, scaled to [0, 1] and normalised with SlowFast's
    single mean/std for all channels (spec section 9, item 12)."""
    # Converting straight into a contiguous (3, T, H, W) tensor, and (x - 255 mean) / (255 std) in place of
    # (x / 255 - mean) / std, save two passes over the clip: 2-3x faster at 16 x 288 x 512.
    clip = torch.as_tensor(frames_uint8).permute(3, 0, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return clip.sub_(255.0 * mean).div_(255.0 * std)


def multi_hot(actions: Sequence[Sequence[int]], num_actions: int) -> np.ndarray:
    """Per-box action id lists -> (n, num_actions) float32 multi-hot, column = action id - 1."""
    target = np.zeros((len(actions), num_actions), dtype=np.float32)
    for box, ids in enumerate(actions):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > num_actions):
            raise ValueError(f"action ids {ids.tolist()} of box {box} are outside 1..{num_actions}")
        target[box, ids - 1] = 1.0
    return target


def split_dir(shards_path: str | Path, split: str) -> Path:
    """The folder of one split's shards; an error that says how to create it when it is missing."""
    folder = Path(shards_path) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no '{split}' shards at {folder}; run 'evadlab prepare' first")
    return folder


def read_shards(shards_path: str | Path, split: str):
    """One split's shards as a streaming Ray Dataset, one row per keyframe."""
    # Imported here so that decoding a clip (the demo, plain-pyarrow evaluation) does not pay for importing Ray.
    import ray.data

    return ray.data.read_parquet(str(split_dir(shards_path, split)), file_extensions=["parquet"])


def iter_shard_rows(shards_path: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """One split's rows as plain dicts, without Ray, in a fixed order (shard name, then row)."""
    for shard in sorted(split_dir(shards_path, split).glob("part-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=ROWS_PER_READ):
            yield from batch.to_pylist()
