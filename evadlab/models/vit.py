"""VideoMAE ViT backbone with keyframe-centric token pruning (KTP), as EVAD uses it (spec §1.2-§2).

Token layout inside the backbone: the Ns = h*w tokens of the keyframe slice (temporal index t//2) come
first in raster order, followed by the non-key tokens that are still alive. `nonkey_idx` (B, n) carries
the original non-key index of every such token (see `KTPTrace` for the numbering).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import PATCH_SIZE, POSITION_TABLE_GRID, TUBELET_SIZE, EVADConfig
from .structures import KTPTrace

VIT_LAYERNORM_EPS = 1e-6
# Queries per chunk of a pruning block's explicit attention: small enough for the chunk's probabilities to stay in cache.
QUERY_CHUNK = 128


def sinusoid_position_table(num_positions: int, dim: int) -> Tensor:
    """(num_positions, dim) table: angle p / 10000^(2*(j//2)/dim), sin on even j and cos on odd j.

    Computed in float64 and rounded to float32 once, as VideoMAE's numpy version does, so released
    weights see the same values.
    """
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponents = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = positions / torch.pow(10000.0, exponents)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def resize_position_table(table: Tensor, token_grid: tuple[int, int, int]) -> Tensor:
    """Fit the flat 8x14x14 table to a (t, h, w) token grid: bicubic per temporal slice, flat (t, h, w) order out."""
    slices, height, width = POSITION_TABLE_GRID
    t, h, w = token_grid
    if t != slices:
        raise ValueError(
            f"the position table has {slices} temporal slices, so clips need {slices * TUBELET_SIZE} frames "
            f"(got {t} token slices)"
        )
    if (h, w) == (height, width):
        return table
    grid = table.reshape(slices, height, width, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(t * h * w, -1)


def move_keyframe_slice_first(tokens: Tensor, num_slices: int) -> Tensor:
    """Reorder flat (t, h, w) tokens to [slice t//2, slices 0..t//2-1, slices t//2+1..t-1]."""
    keyframe_slice = num_slices // 2
    order = [keyframe_slice, *range(keyframe_slice), *range(keyframe_slice + 1, num_slices)]
    return tokens.unflatten(1, (num_slices, -1))[:, order].flatten(1, 2)


def attend_and_score(
    q: Tensor, k: Tensor, v: Tensor, num_key_tokens: int, enhanced_weight: float, query_chunk: int = QUERY_CHUNK
) -> tuple[Tensor, Tensor]:
    """Softmax attention (B, heads, N, head_dim) and the (B, N - Ns) keyframe-centric score of each non-key token.

    The score is the attention a token receives, averaged over all N queries and then over heads, after the
    keyframe-query rows are scaled by the enhanced weight (the divisor stays N, spec §2.1). Queries are processed
    in chunks so the (B, heads, N, N) probabilities never exist whole: on a CPU the whole matrix does not fit in
    cache, and writing and re-reading it cost more than the two matrix products. Scores come from a detached
    copy of the probabilities, which the backward pass of probs @ v still needs unchanged.
    """
    num_heads, num_tokens = q.shape[1], q.shape[2]
    key_chunks = range(0, num_key_tokens, query_chunk)
    nonkey_chunks = range(num_key_tokens, num_tokens, query_chunk)
    received = q.new_zeros(q.shape[0], num_tokens - num_key_tokens, dtype=torch.float32)
    attended = []
    for start in [*key_chunks, *nonkey_chunks]:
        stop = min(start + query_chunk, num_key_tokens if start < num_key_tokens else num_tokens)
        probs = (q[:, :, start:stop] @ k.transpose(-2, -1)).softmax(dim=-1)
        attended.append(probs @ v)
        query_weight = enhanced_weight if start < num_key_tokens else 1.0
        received += probs.detach()[..., num_key_tokens:].sum(dim=(1, 2), dtype=torch.float32) * query_weight
    return torch.cat(attended, dim=2), received / (num_heads * num_tokens)


def keep_top_scored_tokens(
    tokens: Tensor, nonkey_idx: Tensor, scores: Tensor, num_key_tokens: int, num_kept: int, token_order: str
) -> tuple[Tensor, Tensor]:
    """Keep the keyframe tokens plus the `num_kept` best-scored non-key tokens.

    "released" holds the kept tokens in descending-score order (topk, sorted), as the released code does;
    "position" holds them in ascending original index, so later index-based remapping stays consistent.
    """
    top = scores.topk(num_kept, dim=1, largest=True, sorted=True).indices
    if token_order == "position":
        top = top.sort(dim=1).values
    nonkey_tokens = tokens[:, num_key_tokens:]
    kept = nonkey_tokens.gather(1, top[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_key_tokens], kept], dim=1), nonkey_idx.gather(1, top)


def maybe_checkpoint(enabled: bool, function: Callable, *args):
    """Run `function`, recomputing it in backward instead of storing activations when `enabled` and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class PatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d whose kernel equals its stride (2 frames x 16 x 16 pixels)."""

    def __init__(self, embed_dim: int, in_chans: int = 3):
        super().__init__()
        kernel = (TUBELET_SIZE, PATCH_SIZE, PATCH_SIZE)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, clips: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> (B, C, t, h, w)."""
        return self.proj(clips)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's bias layout: learned q and v biases, the k bias fixed at zero."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all tokens with the fused scaled_dot_product_attention kernel."""
        q, k, v = self._heads(x)
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v))

    def forward_with_scores(self, x: Tensor, num_key_tokens: int, enhanced_weight: float) -> tuple[Tensor, Tensor]:
        """Attend over all tokens with an explicit softmax, also returning the keyframe-centric token scores."""
        q, k, v = self._heads(x)
        attended, scores = attend_and_score(q * self.scale, k, v, num_key_tokens, enhanced_weight)
        return self._merge_heads(attended), scores

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (B, heads, N, head_dim)."""
        batch, num_tokens, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, num_tokens, 3, self.num_heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def _merge_heads(self, attended: Tensor) -> Tensor:
        batch, _, num_tokens, _ = attended.shape
        return self.proj(attended.transpose(1, 2).reshape(batch, num_tokens, -1))


class KTPBlock(nn.Module):
    """Pre-norm transformer block that can drop non-key tokens between attention and MLP (spec §2.1).

    With keep_rate < 1 it keeps ceil(keep_rate * N) of the N current tokens, keyframe tokens included
    (they are always kept), ranked by `attend_and_score`. Dropped tokens never come back.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        keep_rate: float = 1.0,
        enhanced_weight: float = 1.0,
        token_order: str = "released",
    ):
        super().__init__()
        self.keep_rate = keep_rate
        self.enhanced_weight = enhanced_weight
        self.token_order = token_order
        self.grad_checkpointing = False
        self.norm1 = nn.LayerNorm(dim, eps=VIT_LAYERNORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=VIT_LAYERNORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def num_tokens_to_keep(self, num_tokens: int) -> int:
        """ceil(rate * N) in Python float arithmetic, exactly as the released code counts."""
        if self.keep_rate >= 1.0:
            return num_tokens
        return math.ceil(self.keep_rate * num_tokens)

    def forward(
        self, x: Tensor, nonkey_idx: Tensor, num_key_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Returns the block output, the non-key indices of the tokens it holds, and the scores (None if nothing was dropped)."""
        num_kept = self.num_tokens_to_keep(x.shape[1])
        prunes = num_kept < x.shape[1]
        x, scores = maybe_checkpoint(
            self.grad_checkpointing, self._attention_residual, x, num_key_tokens if prunes else None
        )
        if prunes:
            num_kept_nonkey = max(num_kept - num_key_tokens, 0)
            x, nonkey_idx = keep_top_scored_tokens(
                x, nonkey_idx, scores, num_key_tokens, num_kept_nonkey, self.token_order
            )
        x = maybe_checkpoint(self.grad_checkpointing, self._mlp_residual, x)
        return x, nonkey_idx, scores

    def _attention_residual(self, x: Tensor, score_key_tokens: int | None) -> tuple[Tensor, Tensor | None]:
        """x + DropPath(Attn(LN(x))), plus token scores when `score_key_tokens` (= Ns) is given."""
        if score_key_tokens is None:
            attended, scores = self.attn(self.norm1(x)), None
        else:
            attended, scores = self.attn.forward_with_scores(self.norm1(x), score_key_tokens, self.enhanced_weight)
        return x + self.drop_path(attended), scores

    def _mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))


@dataclass
class BackboneOutput:
    tokens: Tensor  # (B, Ns + n, C) after the final norm: keyframe tokens, then the held non-key tokens
    nonkey_idx: Tensor  # (B, n) non-key index of each held non-key token
    keyframe_maps: list[Tensor]  # (B, C, h, w) keyframe tokens of each FPN tap block, before the final norm
    token_grid: tuple[int, int, int]  # (t, h, w)
    ktp: KTPTrace
    embedded_tokens: Tensor | None = None  # (B, t*h*w, C) patch embedding + positions, flat (t, h, w) order
    block_tokens: list[Tensor] | None = None  # output of each block, in held order


class KeyframeViT(nn.Module):
    """VideoMAE ViT whose keyframe tokens feed an FPN and whose other tokens may be pruned by KTP."""

    def __init__(self, config: EVADConfig | None = None):
        """Backbone of `config` (None: released ViT-B): width, depth, heads, drop path, FPN taps and KTP settings.

        Raises TypeError for anything but an EVADConfig.
        """
        super().__init__()
        if config is None:
            config = EVADConfig()
        if not isinstance(config, EVADConfig):
            raise TypeError(
                f"{type(self).__name__} takes an EVADConfig (EVADConfig.vit_b(...), or cfg.model.evad of an "
                f"experiment), got {type(config).__name__}"
            )
        self.config = config
        self.patch_embed = PatchEmbed(config.embed_dim)
        # On the CPU explicitly, so that building the model under torch.device("meta") (shape-only) still works.
        drop_path_rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            KTPBlock(
                config.embed_dim,
                config.num_heads,
                mlp_ratio=config.mlp_ratio,
                drop_path=block_drop_path,
                keep_rate=keep_rate,
                enhanced_weight=config.enhanced_weight,
                token_order=config.token_order,
            )
            for block_drop_path, keep_rate in zip(drop_path_rates, config.keep_rates, strict=True)
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=VIT_LAYERNORM_EPS)
        # A fixed table: recomputed, never saved, exactly as the released checkpoints expect.
        self.register_buffer(
            "pos_embed", sinusoid_position_table(math.prod(POSITION_TABLE_GRID), config.embed_dim), persistent=False
        )
        self.apply(_init_vit_weights)

    def forward_features(self, images: Tensor, record_intermediates: bool = False) -> BackboneOutput:
        """Run the backbone on a padded (B, 3, T, Hp, Wp) batch."""
        x = self.patch_embed(images)
        token_grid = tuple(x.shape[2:])
        num_slices, height, width = token_grid
        num_key_tokens = height * width
        x = x.flatten(2).transpose(1, 2) + resize_position_table(self.pos_embed, token_grid)
        embedded_tokens = x if record_intermediates else None
        x = move_keyframe_slice_first(x, num_slices)

        num_nonkey = (num_slices - 1) * num_key_tokens
        nonkey_idx = torch.arange(num_nonkey, device=x.device).expand(x.shape[0], -1)
        ktp = KTPTrace(
            pruning_blocks=[],
            num_tokens_after_block=[],
            nonkey_idx_after_block=[],
            scores={},
            scores_input_nonkey_idx={},
            num_nonkey_tokens=num_nonkey,
        )
        keyframe_maps, block_tokens = [], []
        for index, block in enumerate(self.blocks):
            incoming_idx = nonkey_idx
            x, nonkey_idx, scores = block(x, nonkey_idx, num_key_tokens)
            if scores is not None:
                ktp.pruning_blocks.append(index)
                ktp.scores[index] = scores
                ktp.scores_input_nonkey_idx[index] = incoming_idx
            ktp.num_tokens_after_block.append(x.shape[1])
            ktp.nonkey_idx_after_block.append(nonkey_idx)
            if record_intermediates:
                block_tokens.append(x)
            if index in self.config.fpn_indices:
                keyframe = x[:, :num_key_tokens].transpose(1, 2)
                keyframe_maps.append(keyframe.reshape(x.shape[0], -1, height, width))
        return BackboneOutput(
            tokens=self.norm(x),
            nonkey_idx=nonkey_idx,
            keyframe_maps=keyframe_maps,
            token_grid=token_grid,
            ktp=ktp,
            embedded_tokens=embedded_tokens,
            block_tokens=block_tokens if record_intermediates else None,
        )

    def forward(self, images: Tensor) -> BackboneOutput:
        return self.forward_features(images)


def _init_vit_weights(module: nn.Module) -> None:
    """timm/VideoMAE defaults; pre-trained weights normally replace them."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
