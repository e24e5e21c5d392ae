"""Typed containers passed between the EVAD parts (boxes with their coordinate frame, detections, traces)
and the clip batching helper."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

# The detector pads every batch to this multiple so that the stride-32 FPN level has whole cells.
SIZE_DIVISIBILITY = 32


@dataclass
class KTPTrace:
    """What keyframe-centric token pruning decided in one forward pass.

    Non-key indices number the tokens outside the keyframe slice as in the spec: index j lies in
    temporal slice j // Ns (+1 from the keyframe slice on) at spatial position j % Ns.
    """

    pruning_blocks: list[int]
    num_tokens_after_block: list[int]
    nonkey_idx_after_block: list[Tensor]  # (B, n_i) in the order the tokens are held after block i
    scores: dict[int, Tensor]  # pruning block -> (B, n_in) importance of each incoming non-key token
    scores_input_nonkey_idx: dict[
        int, Tensor
    ]  # pruning block -> (B, n_in) non-key index of each scored token
    num_nonkey_tokens: int

    @property
    def dropped_mask(self) -> Tensor:
        """(B, (t-1)*Ns) bool, True where a non-key token was dropped by the end of the backbone."""
        final = self.nonkey_idx_after_block[-1]
        kept = torch.zeros(final.shape[0], self.num_nonkey_tokens, dtype=torch.bool, device=final.device)
        return ~kept.scatter(1, final, True)


class BoxMode(Enum):
    """Coordinate frame of (x1, y1, x2, y2) boxes.

    The unpadded input clip is the original video frame resized (aspect kept), so relative coordinates mean
    the same point in both frames; absolute ones do not.
    """

    # Absolute pixels of the unpadded input clip: the model's internal boxes and the training targets.
    INPUT_XYXY_ABS = "input_xyxy_abs"
    # Absolute pixels of the original video frame.
    ORIGINAL_XYXY_ABS = "original_xyxy_abs"
    # Normalised by the original frame's width and height, in [0, 1]: detections and AVA CSVs.
    ORIGINAL_XYXY_REL = "original_xyxy_rel"


def boxes_to_original_frame(boxes: Tensor, image_whwh: Tensor, original_size: tuple[int, int]) -> Tensor:
    """(..., 4) boxes of one clip from `BoxMode.INPUT_XYXY_ABS` to `ORIGINAL_XYXY_ABS`, as the released test path does.

    Clips to the unpadded input's [0, W-1] x [0, H-1] (`image_whwh` = [W, H, W, H]), scales by the original
    (H, W) over the input size, then clamps to [0, W_orig] x [0, H_orig].
    """
    original_height, original_width = original_size
    clipped = torch.minimum(boxes.clamp(min=0), image_whwh - 1)
    width, height = image_whwh[0], image_whwh[1]
    scale = torch.stack([original_width / width, original_height / height] * 2)
    limits = clipped.new_tensor([original_width, original_height] * 2)
    return torch.minimum((clipped * scale).clamp(min=0), limits)


class Boxes:
    """(n, 4) xyxy boxes together with the frame they are in.

    Torch functions treat a `Boxes` as its tensor (`torch.cat([ids, boxes], dim=1)` works and returns a plain
    tensor), so code that only needs numbers need not unwrap it.
    """

    def __init__(self, tensor: Tensor, mode: BoxMode):
        if tensor.dim() != 2 or tensor.shape[-1] != 4:
            raise ValueError(f"Boxes need an (n, 4) tensor, got shape {tuple(tensor.shape)}")
        self.tensor = tensor
        self.mode = mode

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Boxes:
        """The boxes at an index, a slice, an index tensor or a bool mask; always (k, 4)."""
        return Boxes(self.tensor[index].view(-1, 4), self.mode)

    def __repr__(self) -> str:
        return f"Boxes({self.tensor!r}, mode={self.mode.name})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_unwrap_boxes(args), **{name: _unwrap_boxes(value) for name, value in (kwargs or {}).items()})

    def to(self, device: torch.device | str) -> Boxes:
        return Boxes(self.tensor.to(device), self.mode)

    def cpu(self) -> Boxes:
        return self.to("cpu")

    def convert(
        self, mode: BoxMode, *, image_whwh: Tensor | None = None, original_size: tuple[int, int] | None = None
    ) -> Boxes:
        """The same boxes in frame `mode`.

        Leaving the input frame clips to it and needs `image_whwh` ([W, H, W, H] of the unpadded clip) and
        `original_size` (H, W); entering it needs `image_whwh`; between the original frame's absolute and
        relative forms only `original_size`. Raises ValueError when a needed size is missing.
        """
        if mode == self.mode:
            return self
        if self.mode == BoxMode.INPUT_XYXY_ABS:
            original = boxes_to_original_frame(
                self.tensor, _required(image_whwh, "image_whwh"), _required(original_size, "original_size")
            )
            return Boxes(original, BoxMode.ORIGINAL_XYXY_ABS).convert(mode, original_size=original_size)
        if mode == BoxMode.INPUT_XYXY_ABS:
            relative = self.convert(BoxMode.ORIGINAL_XYXY_REL, original_size=original_size)
            return Boxes(relative.tensor * _required(image_whwh, "image_whwh"), mode)
        original_height, original_width = _required(original_size, "original_size")
        original_whwh = self.tensor.new_tensor([original_width, original_height] * 2)
        if mode == BoxMode.ORIGINAL_XYXY_REL:
            return Boxes(self.tensor / original_whwh, mode)
        return Boxes(self.tensor * original_whwh, mode)


def _unwrap_boxes(value):
    """`value` with every Boxes, also inside lists and tuples (torch.cat's argument), replaced by its tensor."""
    if isinstance(value, Boxes):
        return value.tensor
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap_boxes(item) for item in value)
    return value


def _required(value, name: str):
    if value is None:
        raise ValueError(f"this box conversion needs {name}")
    return value


@dataclass
class StageOutput:
    """One Sparse R-CNN stage. Boxes are never clipped."""

    box_mode: ClassVar[BoxMode] = BoxMode.INPUT_XYXY_ABS
    input_boxes: Tensor  # (B, P, 4) the boxes this stage pooled with
    pred_logits: Tensor  # (B, P, 2) person, no-object
    pred_boxes: Tensor  # (B, P, 4)
    proposal_features: Tensor  # (B, P, hidden_dim), the next stage's input features


@dataclass
class Detections:
    """Test-time detections of one clip (spec §6.1): n selected proposals, boxes in `BoxMode.ORIGINAL_XYXY_REL`.

    Index it with an int, a slice, an index tensor or a bool mask (`found[found.person_scores >= 0.7]`).
    """

    boxes: Boxes  # (n, 4)
    person_scores: Tensor  # (n,) softmax person probability
    action_scores: Tensor  # (n, num_actions) sigmoid of the last CRD block, not multiplied by the person score
    proposal_indices: Tensor  # (n,) which of the P proposals were kept

    def __post_init__(self) -> None:
        lengths = {len(self.boxes), len(self.person_scores), len(self.action_scores), len(self.proposal_indices)}
        if len(lengths) != 1:
            raise ValueError(f"Detections fields disagree on the number of detections: {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int | slice | Tensor) -> Detections:
        if isinstance(index, int):
            index = [index]  # keeps the leading dimension, as for the other index kinds
        return Detections(
            boxes=self.boxes[index],
            person_scores=self.person_scores[index],
            action_scores=self.action_scores[index],
            proposal_indices=self.proposal_indices[index],
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Detections:
        """On `device`; `dtype` (if given) casts the scores, boxes and indices keep theirs."""
        return Detections(
            boxes=self.boxes.to(device),
            person_scores=self.person_scores.to(device, dtype),
            action_scores=self.action_scores.to(device, dtype),
            proposal_indices=self.proposal_indices.to(device),
        )

    def cpu(self) -> Detections:
        return self.to("cpu")


def pad_and_stack_clips(
    clips: list[Tensor], size_divisibility: int = SIZE_DIVISIBILITY
) -> tuple[Tensor, Tensor]:
    """Zero-pad (3, T, H_i, W_i) clips at the bottom/right to a shared size rounded up to `size_divisibility`.

    Returns the (B, 3, T, Hp, Wp) batch and images_whwh (B, 4) = [W_i, H_i, W_i, H_i] of the *unpadded*
    sizes, which is the frame every box of the detector lives in.
    """
    if not clips:
        raise ValueError("pad_and_stack_clips needs at least one clip")
    channels, frames = clips[0].shape[:2]
    if any(clip.shape[:2] != (channels, frames) for clip in clips):
        raise ValueError(
            f"all clips need the same channels and frame count, got {[tuple(c.shape) for c in clips]}"
        )
    max_height = max(clip.shape[-2] for clip in clips)
    max_width = max(clip.shape[-1] for clip in clips)
    padded_height = -(-max_height // size_divisibility) * size_divisibility
    padded_width = -(-max_width // size_divisibility) * size_divisibility
    batch = clips[0].new_zeros(len(clips), channels, frames, padded_height, padded_width)
    for slot, clip in zip(batch, clips):
        slot[..., : clip.shape[-2], : clip.shape[-1]].copy_(clip)
    # Box coordinates need at least float32: bf16 cannot hold pixel sizes such as 1333 exactly.
    whwh_dtype = torch.promote_types(clips[0].dtype, torch.float32)
    images_whwh = torch.tensor(
        [[clip.shape[-1], clip.shape[-2], clip.shape[-1], clip.shape[-2]] for clip in clips],
        dtype=whwh_dtype,
        device=clips[0].device,
    )
    return batch, images_whwh
