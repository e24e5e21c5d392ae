"""Boxes carry their coordinate frame and convert between frames; Detections index, move and filter as one."""

import pytest
import torch

from evadlab.models import Boxes, BoxMode, Detections, boxes_to_original_frame, select_detections

# A 96x64 (W x H) input clip resized from a 540x360 original frame.
INPUT_WHWH = torch.tensor([96.0, 64.0, 96.0, 64.0])
ORIGINAL_SIZE = (360, 540)


def input_boxes() -> Boxes:
    return Boxes(torch.tensor([[10.0, 8.0, 50.0, 60.0], [-5.0, 2.0, 120.0, 70.0]]), BoxMode.INPUT_XYXY_ABS)


def test_input_boxes_reach_the_original_frame_clipped_and_back():
    boxes = input_boxes()
    original = boxes.convert(BoxMode.ORIGINAL_XYXY_ABS, image_whwh=INPUT_WHWH, original_size=ORIGINAL_SIZE)
    assert original.mode == BoxMode.ORIGINAL_XYXY_ABS
    torch.testing.assert_close(original.tensor, boxes_to_original_frame(boxes.tensor, INPUT_WHWH, ORIGINAL_SIZE))
    torch.testing.assert_close(original.tensor[0], torch.tensor([56.25, 45.0, 281.25, 337.5]))
    relative = boxes.convert(BoxMode.ORIGINAL_XYXY_REL, image_whwh=INPUT_WHWH, original_size=ORIGINAL_SIZE)
    assert ((relative.tensor >= 0) & (relative.tensor <= 1)).all()
    torch.testing.assert_close(relative.convert(BoxMode.ORIGINAL_XYXY_ABS, original_size=ORIGINAL_SIZE).tensor,
                               original.tensor)
    back = relative.convert(BoxMode.INPUT_XYXY_ABS, image_whwh=INPUT_WHWH, original_size=ORIGINAL_SIZE)
    torch.testing.assert_close(back.tensor[0], boxes.tensor[0])


def test_conversion_without_a_needed_size_is_an_error():
    with pytest.raises(ValueError, match="original_size"):
        input_boxes().convert(BoxMode.ORIGINAL_XYXY_REL, image_whwh=INPUT_WHWH)


def test_boxes_index_keep_two_dimensions_and_act_as_a_tensor_in_torch_functions():
    boxes = input_boxes()
    assert len(boxes) == 2 and len(boxes[0]) == 1 and boxes[0].tensor.shape == (1, 4)
    assert len(boxes[torch.tensor([False, True])]) == 1 and boxes[1:].mode == BoxMode.INPUT_XYXY_ABS
    rows = torch.cat([torch.zeros(2, 1), boxes], dim=1)
    assert type(rows) is torch.Tensor and rows.shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        Boxes(torch.zeros(4), BoxMode.INPUT_XYXY_ABS)


def test_detections_filter_and_move_as_one_container():
    logits = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    found = select_detections(logits, input_boxes(), torch.zeros(2, 80), INPUT_WHWH, ORIGINAL_SIZE, 0.99)
    assert len(found) == 2, "no proposal passes 0.99, so all are kept"
    persons = found[found.person_scores >= 0.9]
    assert len(persons) == 1 and persons.proposal_indices.tolist() == [0]
    assert persons.boxes.mode == BoxMode.ORIGINAL_XYXY_REL
    moved = persons.to("cpu", torch.float64)
    assert moved.person_scores.dtype == torch.float64 and moved.proposal_indices.dtype == torch.int64
    assert len(found.cpu()[-1]) == 1
    with pytest.raises(ValueError, match="disagree"):
        Detections(found.boxes, found.person_scores[:1], found.action_scores, found.proposal_indices)
