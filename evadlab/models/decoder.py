"""Context Refinement Decoder (CRD): action classification on the actor boxes (spec §3.3).

The kept encoder tokens are projected, put back on the dense (t, h, w) grid with a mask token where
KTP dropped them, RoI-pooled per temporal slice into one token per actor, and refined together with
the kept tokens by transformer blocks that each end in an action classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import DropPath, Mlp
from torch import Tensor, nn
from torchvision.ops import roi_align

from .config import POSITION_TABLE_GRID, EVADConfig
from .vit import Attention, maybe_checkpoint, resize_position_table, sinusoid_position_table

CRD_LAYERNORM_EPS = 1e-6
# The released CRD blocks always use MLP ratio 4, whatever the backbone's.
CRD_MLP_RATIO = 4.0
ACTION_HEAD_LAYERNORM_EPS = 1e-5
ROI_RESOLUTION = 7
ROI_SAMPLING_RATIO = 2
TOKEN_STRIDE = 16


def token_grid_positions(nonkey_idx: Tensor, token_order: str) -> Tensor:
    """Grid slot (non-key index) that receives each held non-key token.

    The released code fills the kept slots in ascending index order whatever order the tokens are held
    in (spec §9.1), so with "released" order a token lands on the slot of its rank among the kept indices.
    Released KTP weights were trained that way. With "position" order tokens are held sorted by index,
    so the two rules agree and every token lands on its own slot.
    """
    if token_order == "released":
        return nonkey_idx.sort(dim=1).values
    return nonkey_idx


@dataclass
class DecoderInputs:
    tokens: Tensor  # (B, Ns + n, C_d) projected tokens plus the position embedding of their grid slot
    grid: Tensor  # (B, C_d, t, h, w) dense map for RoIAlign, mask_token + position at dropped slots


def build_decoder_inputs(
    projected: Tensor,
    grid_positions: Tensor,
    mask_token: Tensor,
    position_table: Tensor,
    token_grid: tuple[int, int, int],
) -> DecoderInputs:
    """Add position embeddings to the (B, Ns + n, C_d) projected tokens (keyframe first) and remap them onto the grid.

    `position_table` is the (t*h*w, C_d) decoder table in flat (t, h, w) order.
    """
    batch, _, dim = projected.shape
    num_slices, height, width = token_grid
    num_key_tokens = height * width
    key_start = num_slices // 2 * num_key_tokens
    key_end = key_start + num_key_tokens
    key_positions = position_table[key_start:key_end]
    nonkey_positions = torch.cat([position_table[:key_start], position_table[key_end:]])

    held_positions = torch.cat([key_positions.expand(batch, -1, -1), nonkey_positions[grid_positions]], dim=1)
    tokens = projected + held_positions

    dropped_slots = (mask_token + nonkey_positions).expand(batch, -1, -1)
    scatter_index = grid_positions[..., None].expand(-1, -1, dim)
    nonkey_slots = dropped_slots.scatter(1, scatter_index, tokens[:, num_key_tokens:])
    flat_grid = torch.cat(
        [nonkey_slots[:, :key_start], tokens[:, :num_key_tokens], nonkey_slots[:, key_start:]], dim=1
    )
    grid = flat_grid.transpose(1, 2).reshape(batch, dim, num_slices, height, width)
    return DecoderInputs(tokens=tokens, grid=grid)


def extend_boxes(boxes: Tensor, extension: tuple[float, float], images_whwh: Tensor) -> Tensor:
    """Widen (B, P, 4) boxes for context: each side moves out by ext*(size+1)/2, then clip to the unpadded image.

    Boxes in and out are in `BoxMode.INPUT_XYXY_ABS`; `images_whwh` (B, 4) is [W, H, W, H] of each clip.
    """
    extend_x, extend_y = extension
    half_width = (boxes[..., 2] - boxes[..., 0] + 1) * extend_x / 2
    half_height = (boxes[..., 3] - boxes[..., 1] + 1) * extend_y / 2
    extended = torch.stack(
        [
            boxes[..., 0] - half_width,
            boxes[..., 1] - half_height,
            boxes[..., 2] + half_width,
            boxes[..., 3] + half_height,
        ],
        dim=-1,
    )
    return torch.minimum(extended.clamp(min=0), (images_whwh - 1)[:, None, :])


def pool_actor_tokens(grid: Tensor, boxes: Tensor) -> Tensor:
    """One token per box: aligned 7x7 RoIAlign on every temporal slice, max over space, mean over time.

    (B, C_d, t, h, w) grid at stride 16 and (B, P, 4) boxes in `BoxMode.INPUT_XYXY_ABS` -> (B, P, C_d).
    """
    batch, dim, num_slices, height, width = grid.shape
    num_boxes = boxes.shape[1]
    dtype = torch.promote_types(grid.dtype, boxes.dtype)
    slices = grid.transpose(1, 2).reshape(batch * num_slices, dim, height, width).to(dtype)
    # Row order (b, slice, p): every box is pooled on each of its clip's t slices.
    slice_boxes = boxes.to(dtype)[:, None].expand(-1, num_slices, -1, -1).reshape(-1, 4)
    slice_index = torch.arange(batch * num_slices, device=grid.device, dtype=dtype).repeat_interleave(
        num_boxes
    )
    pooled = roi_align(
        slices,
        torch.cat([slice_index[:, None], slice_boxes], dim=1),
        output_size=ROI_RESOLUTION,
        spatial_scale=1.0 / TOKEN_STRIDE,
        sampling_ratio=ROI_SAMPLING_RATIO,
        aligned=True,
    )
    spatial_max = pooled.amax(dim=(-2, -1)).view(batch, num_slices, num_boxes, dim)
    return spatial_max.mean(dim=1)


class DecoderBlock(nn.Module):
    """Pre-norm transformer block followed by an action classifier on the trailing actor tokens."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        act_fc_dim: int = 2048,
        num_actions: int = 80,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.norm1 = nn.LayerNorm(dim, eps=CRD_LAYERNORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=CRD_LAYERNORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.act_module = nn.Sequential(
            nn.Linear(dim, act_fc_dim, bias=False),
            nn.LayerNorm(act_fc_dim, eps=ACTION_HEAD_LAYERNORM_EPS),
            nn.ReLU(inplace=True),
        )
        self.action_logits = nn.Linear(act_fc_dim, num_actions)

    def forward(self, x: Tensor, num_actors: int) -> tuple[Tensor, Tensor]:
        """Returns the refined tokens and (B, num_actors, num_actions) logits of the last `num_actors` tokens."""
        return maybe_checkpoint(self.grad_checkpointing, self._refine_and_classify, x, num_actors)

    def _refine_and_classify(self, x: Tensor, num_actors: int) -> tuple[Tensor, Tensor]:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, self.action_logits(self.act_module(x[:, -num_actors:]))


class ContextRefinementDecoder(nn.Module):
    """D decoder blocks (no final norm) with deep supervision: every block yields action logits."""

    def __init__(self, config: EVADConfig):
        """`config.crd_depth` blocks of width `crd_embed_dim`, each ending in an `act_fc_dim` -> `num_actions` head."""
        super().__init__()
        # On the CPU explicitly, so that building under torch.device("meta") still works.
        drop_path_rates = torch.linspace(0, config.crd_drop_path_rate, config.crd_depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            DecoderBlock(
                config.crd_embed_dim,
                config.crd_num_heads,
                mlp_ratio=CRD_MLP_RATIO,
                drop_path=block_drop_path,
                act_fc_dim=config.act_fc_dim,
                num_actions=config.num_actions,
            )
            for block_drop_path in drop_path_rates
        )
        # Fixed sinusoid, recomputed rather than saved, like the backbone's table.
        self.register_buffer(
            "pos_embed",
            sinusoid_position_table(math.prod(POSITION_TABLE_GRID), config.crd_embed_dim),
            persistent=False,
        )
        self.apply(_init_decoder_weights)

    def position_table(self, token_grid: tuple[int, int, int]) -> Tensor:
        """(t*h*w, C_d) decoder position embeddings for this token grid, flat (t, h, w) order."""
        return resize_position_table(self.pos_embed, token_grid)

    def forward(self, x: Tensor, num_actors: int) -> list[Tensor]:
        """(B, N, C_d) tokens whose last `num_actors` are actor tokens -> per-block (B, num_actors, num_actions) logits."""
        action_logits = []
        for block in self.blocks:
            x, logits = block(x, num_actors)
            action_logits.append(logits)
        return action_logits


def _init_decoder_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
