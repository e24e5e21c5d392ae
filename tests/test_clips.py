"""Clip rows -> model inputs: resize arithmetic, JPEG decode, flip, normalisation, and the training rows and
batches built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evadlab.config import ExperimentConfig
from evadlab.pipelines.clips import (
    decode_clip,
    encode_jpegs,
    multi_hot,
    resize_short_side,
    resized_size,
    to_model_input,
)
from evadlab.platform.ingest import decode_training_row, to_model_batch

HEIGHT, WIDTH, FRAMES = 64, 85, 4


def clip_row(frames: np.ndarray, boxes: list[list[float]], actions: list[list[int]], video_id: str = "v") -> dict:
    return {
        "video_id": video_id, "timestamp": 902,
        "frames": encode_jpegs(frames, quality=95),
        "height": frames.shape[1], "width": frames.shape[2], "orig_height": 240, "orig_width": 320,
        "boxes": boxes, "actions": actions, "person_ids": list(range(len(boxes))),
    }


def left_bright_frames(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Frames whose left quarter is white, everything else black: any flip is plain to see."""
    frames = np.zeros((FRAMES, height, width, 3), np.uint8)
    frames[:, :, : width // 4] = 255
    return frames


@pytest.mark.parametrize("size, short, long, expected", [
    ((240, 320), 64, 1333, (64, 85)),      # the quickstart: 85.33 rounds down
    ((1080, 1920), 288, 1333, (288, 512)),
    ((100, 2000), 288, 1333, (67, 1333)),  # long side capped: 288 x 5760 shrinks to 66.65 x 1333
    ((288, 360), 288, 1333, (288, 360)),
])
def test_resized_size_follows_detectron2(size, short, long, expected):
    assert resized_size(*size, short, long) == expected


def test_resize_matches_bilinear_half_pixel_interpolation():
    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    resized = resize_short_side(frames, 24, 1333)
    reference = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).double(), size=(24, 32),
                                                mode="bilinear", align_corners=False)
    assert resized.shape == (2, 24, 32, 3) and resized.dtype == torch.uint8
    assert (resized.permute(0, 3, 1, 2).double() - reference).abs().max() <= 1.0
    assert resize_short_side(frames, 48, 1333).data_ptr() == torch.as_tensor(frames).data_ptr()


def test_decode_gives_frames_and_absolute_clipped_boxes():
    row = clip_row(left_bright_frames(), [[0.1, 0.25, 0.5, 1.0]], [[12]])
    frames, boxes = decode_clip(row)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.dtype == np.uint8
    assert frames[:, :, :10].min() > 240 and frames[:, :, -10:].max() < 15
    np.testing.assert_allclose(boxes, [[0.1 * WIDTH, 0.25 * HEIGHT, 0.5 * WIDTH, HEIGHT - 1]], rtol=1e-6)


def test_flip_mirrors_frames_and_boxes():
    row = clip_row(left_bright_frames(), [[0.0, 0.0, 0.25, 1.0], [0.5, 0.2, 0.9, 0.6]], [[12], [14]])
    frames, boxes = decode_clip(row)
    flipped, flipped_boxes = decode_clip(row, flip=True)
    np.testing.assert_array_equal(flipped, frames[:, :, ::-1])
    # x1' = W - x2, x2' = W - x1 (the image of the box under x -> W - x), then clipped to W - 1.
    np.testing.assert_allclose(flipped_boxes, [[0.75 * WIDTH, 0, WIDTH - 1, HEIGHT - 1],
                                               [0.1 * WIDTH, 0.2 * HEIGHT, 0.5 * WIDTH, 0.6 * HEIGHT]], rtol=1e-5)
    assert boxes[0, 0] == 0 and boxes[0, 2] == pytest.approx(0.25 * WIDTH)


def test_model_input_is_rgb_channels_first_and_normalised():
    frames = np.zeros((FRAMES, 2, 3, 3), np.uint8)
    frames[..., 0] = 255  # red
    clip = to_model_input(frames)
    assert clip.shape == (3, FRAMES, 2, 3) and clip.dtype == torch.float32
    assert torch.allclose(clip[0], torch.tensor((1 - 0.45) / 0.225))
    assert torch.allclose(clip[1:], torch.tensor(-0.45 / 0.225))
    assert torch.allclose(to_model_input(frames, mean=0.5, std=0.5)[0], torch.tensor(1.0))


def decoded_batch(rows: list[dict]) -> dict[str, list]:
    """Shard rows decoded as Ray Data decodes them, gathered column by column as a batch."""
    decoded = [decode_training_row(row, num_actions=80) for row in rows]
    return {key: [row[key] for row in decoded] for key in decoded[0]}


def test_training_rows_keep_sizes_and_build_targets():
    rows = [clip_row(left_bright_frames(), [[0.1, 0.1, 0.5, 0.5]], [[12, 80]], video_id="a"),
            clip_row(left_bright_frames(64, 48), [[0.2, 0.2, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]], [[1], [14]],
                     video_id="b")]
    cfg = ExperimentConfig(data={"flip_prob": 0.0})
    batch = to_model_batch(decoded_batch(rows), cfg, torch.device("cpu"), loss_scale=1.0, rng=np.random.default_rng(0))
    assert [tuple(c.shape) for c in batch.clips] == [(3, FRAMES, 64, 85), (3, FRAMES, 64, 48)]
    assert batch.keys == [("a", 902), ("b", 902)]
    np.testing.assert_allclose(batch.targets[0]["boxes"], [[8.5, 6.4, 42.5, 32]], rtol=1e-5)
    np.testing.assert_allclose(batch.targets[1]["boxes"], [[9.6, 12.8, 19.2, 25.6], [24, 32, 47, 63]], rtol=1e-5)
    actions = batch.targets[0]["actions"]
    assert actions.shape == (1, 80) and actions[0, 11] == 1 and actions[0, 79] == 1 and actions.sum() == 2
    assert batch.targets[1]["actions"].nonzero().tolist() == [[0, 0], [1, 13]]


def test_training_batches_flip_about_half_the_clips_with_their_boxes():
    """The workers flip (data.flip_prob): every flipped clip has its bright quarter and its box on the right."""
    rows = [clip_row(left_bright_frames(), [[0.0, 0.0, 0.25, 1.0]], [[12]])] * 40
    cfg = ExperimentConfig(data={"flip_prob": 0.5})
    batch = to_model_batch(decoded_batch(rows), cfg, torch.device("cpu"), loss_scale=1.0, rng=np.random.default_rng(0))
    flipped = [bool(clip[0, 0, 0, -1] > 0) for clip in batch.clips]
    for clip_is_flipped, target in zip(flipped, batch.targets):
        # x1' = W - x2 of the unflipped box, clipped boxes as decode_clip gives them.
        expected = [0.75 * WIDTH, 0, WIDTH - 1, HEIGHT - 1] if clip_is_flipped else [0, 0, 0.25 * WIDTH, HEIGHT - 1]
        np.testing.assert_allclose(target["boxes"][0], expected, rtol=1e-5)
    assert 10 <= sum(flipped) <= 30
    unflipped = to_model_batch(decoded_batch(rows[:4]), ExperimentConfig(data={"flip_prob": 0.0}),
                               torch.device("cpu"), loss_scale=1.0, rng=np.random.default_rng(0))
    assert not any(bool(clip[0, 0, 0, -1] > 0) for clip in unflipped.clips)


def test_action_ids_outside_the_vocabulary_are_named():
    with pytest.raises(ValueError, match="outside 1..80"):
        multi_hot([[0]], 80)
    # A custom vocabulary of 5 actions: the targets have 5 columns, id 6 has none.
    np.testing.assert_array_equal(multi_hot([[1, 5], [3]], 5), [[1, 0, 0, 0, 1], [0, 0, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"action ids \[6\] of box 0 are outside 1..5"):
        multi_hot([[6]], 5)
    with pytest.raises(ValueError, match="row v,902"):
        decode_training_row(clip_row(left_bright_frames(), [[0.1, 0.1, 0.5, 0.5]], [[81]]), num_actions=80)
