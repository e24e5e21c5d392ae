"""Small typed containers passed between the EVAD parts, and the clip batching helper."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class StageOutput:
    """One Sparse R-CNN stage. Boxes are absolute xyxy in each clip's unpadded frame, never clipped."""

    input_boxes: Tensor  # (B, P, 4) the boxes this stage pooled with
    pred_logits: Tensor  # (B, P, 2) person, no-object
    pred_boxes: Tensor  # (B, P, 4)
    proposal_features: Tensor  # (B, P, hidden_dim), the next stage's input features


@dataclass
class Detections:
    """Test-time detections of one clip, in its original video frame (spec §6.1)."""

    boxes: Tensor  # (n, 4) xyxy normalised by the original width/height
    person_scores: Tensor  # (n,) softmax person probability
    action_scores: (
        Tensor  # (n, num_actions) sigmoid of the last CRD block, not multiplied by the person score
    )
    proposal_indices: Tensor  # (n,) which of the P proposals were kept


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
