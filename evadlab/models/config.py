"""`EVADConfig`: every architectural setting of the EVAD detector in one frozen, validated object.

The defaults are the released ViT-B recipe (spec §1.2, §2, §3). `EVADConfig.vit_b()`, `.vit_l()` and `.tiny()`
(the `VARIANTS` registry) are the presets; each knows the blocks where keyframe-centric token pruning (KTP)
drops tokens, so that one scalar keep rate becomes the per-block `keep_rates` the model reads.

Ranges are checked here and nowhere else; an `EVADConfigError` names the offending field. This module imports
nothing heavy (no torch), so the user-facing `evadlab.config` builds on it and still answers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

TOKEN_ORDERS = ("released", "position")
TUBELET_SIZE = 2
PATCH_SIZE = 16
# VideoMAE's fixed position table covers 16 frames / tubelet 2 = 8 slices of a 224/16 = 14x14 grid.
POSITION_TABLE_GRID = (8, 14, 14)
# One tapped block per FPN input level p2..p5.
NUM_FPN_TAPS = 4
# The released DynamicConv generates exactly two kernels (hidden -> dim_dynamic -> hidden).
NUM_DYNAMIC_KERNELS = 2


class EVADConfigError(ValueError):
    """An out-of-range or inconsistent EVAD setting; `field` names it (the message names it too)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class Interval:
    """Allowed range of a number; None leaves that side open."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def __str__(self) -> str:
        """E.g. "in (0, 1]" when bounded on both sides, ">= 1" when bounded below only."""
        lower = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        upper = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if lower and upper:
            return f"in {lower[0]}{lower[1]:g}, {upper[0]:g}{upper[1]}"
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{operator} {bound:g}" for operator, bound in bounds if bound is not None)


KEEP_RATE_RANGE = Interval(gt=0, le=1)
PROBABILITY_RANGE = Interval(ge=0, le=1)
DROP_PATH_RANGE = Interval(ge=0, lt=1)
POSITIVE = Interval(gt=0)
NON_NEGATIVE = Interval(ge=0)
AT_LEAST_ONE = Interval(ge=1)
# Narrower token widths leave no room for several heads of a useful size.
MIN_EMBED_DIM = Interval(ge=8)


def _setting(default: Any, allowed: Interval | None = None) -> Any:
    """A dataclass field whose value (or, for a tuple, every element) must lie in `allowed`."""
    return field(default=default, metadata={"allowed": allowed} if allowed else {})


@dataclass(frozen=True)
class EVADConfig:
    """Architecture, loss weights and test threshold of one EVAD detector (defaults: released ViT-B, no pruning).

    Raises `EVADConfigError` (a ValueError naming the field) for any out-of-range or inconsistent value.
    Lists are stored as tuples, so the object is hashable and cannot change after validation.
    """

    # Backbone: VideoMAE ViT (spec §1.2).
    embed_dim: int = _setting(768, MIN_EMBED_DIM)
    depth: int = _setting(12, AT_LEAST_ONE)
    num_heads: int = _setting(12, AT_LEAST_ONE)
    mlp_ratio: float = _setting(4.0, POSITIVE)
    drop_path_rate: float = _setting(0.1, DROP_PATH_RANGE)
    fpn_indices: tuple[int, ...] = (2, 5, 8, 11)  # blocks whose keyframe tokens feed p2..p5
    num_frames: int = 16
    # KTP (spec §2): one keep rate per block, 1 = no pruning; empty means 1 everywhere.
    keep_rates: tuple[float, ...] = _setting((), KEEP_RATE_RANGE)
    enhanced_weight: float = _setting(1.0, POSITIVE)
    token_order: Literal["released", "position"] = "released"
    # Localisation: Sparse R-CNN stages on the FPN (spec §3.2).
    num_proposals: int = _setting(100, AT_LEAST_ONE)
    hidden_dim: int = _setting(256, AT_LEAST_ONE)
    num_stages: int = _setting(6, AT_LEAST_ONE)
    stage_num_heads: int = _setting(8, AT_LEAST_ONE)
    dim_feedforward: int = _setting(2048, AT_LEAST_ONE)
    num_dynamic: int = NUM_DYNAMIC_KERNELS
    dim_dynamic: int = _setting(64, AT_LEAST_ONE)
    num_cls_layers: int = _setting(1, NON_NEGATIVE)
    num_reg_layers: int = _setting(3, NON_NEGATIVE)
    # Context refinement decoder (spec §3.3).
    crd_embed_dim: int = _setting(384, MIN_EMBED_DIM)
    crd_depth: int = _setting(6, AT_LEAST_ONE)
    crd_num_heads: int = _setting(6, AT_LEAST_ONE)
    crd_drop_path_rate: float = _setting(0.1, DROP_PATH_RANGE)
    roi_extension: tuple[float, float] = _setting((0.4, 0.2), NON_NEGATIVE)  # (x, y) context widening of actor boxes
    act_fc_dim: int = _setting(2048, AT_LEAST_ONE)
    num_actions: int = _setting(80, AT_LEAST_ONE)
    # Loss weights (spec §3.4) and the test-time person threshold (spec §6.1).
    class_weight: float = _setting(2.0, NON_NEGATIVE)
    l1_weight: float = _setting(5.0, NON_NEGATIVE)
    giou_weight: float = _setting(2.0, NON_NEGATIVE)
    action_weight: float = _setting(12.0, NON_NEGATIVE)
    no_object_weight: float = _setting(0.1, NON_NEGATIVE)
    person_threshold: float = _setting(0.7, PROBABILITY_RANGE)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fpn_indices", tuple(int(index) for index in self.fpn_indices))
        object.__setattr__(self, "roi_extension", tuple(float(factor) for factor in self.roi_extension))
        rates = tuple(float(rate) for rate in self.keep_rates) or (1.0,) * self.depth
        object.__setattr__(self, "keep_rates", rates)
        for setting in fields(self):
            allowed = setting.metadata.get("allowed")
            if allowed is not None:
                _check_in(setting.name, getattr(self, setting.name), allowed)
        self._check_backbone()
        self._check_heads()

    @classmethod
    def from_variant(
        cls, name: str, *, keep_rate: float = 1.0, pruning_blocks: Sequence[int] | None = None, **overrides: Any
    ) -> EVADConfig:
        """The preset `name` with `overrides`; `keep_rate` applies at its KTP blocks (or at `pruning_blocks`).

        An explicit `keep_rates` override wins over `keep_rate`. Raises EVADConfigError for an unknown name or
        invalid values.
        """
        if name not in VARIANTS:
            raise EVADConfigError("variant", f"variant must be one of {sorted(VARIANTS)}, got {name!r}")
        preset = VARIANTS[name]
        config = cls(**{**preset.settings, **overrides})
        blocks = preset.pruning_blocks if pruning_blocks is None else pruning_blocks
        rates = keep_rates_at(config.depth, blocks, keep_rate)
        return config if "keep_rates" in overrides else replace(config, keep_rates=rates)

    @classmethod
    def vit_b(cls, keep_rate: float = 1.0, **overrides: Any) -> EVADConfig:
        """Released ViT-B (768 wide, 12 blocks); KTP at blocks 3, 6, 9."""
        return cls.from_variant("vit_b", keep_rate=keep_rate, **overrides)

    @classmethod
    def vit_l(cls, keep_rate: float = 1.0, **overrides: Any) -> EVADConfig:
        """Released ViT-L (1024 wide, 24 blocks, 12-block CRD, action weight 6); KTP at blocks 6, 12, 18."""
        return cls.from_variant("vit_l", keep_rate=keep_rate, **overrides)

    @classmethod
    def tiny(cls, keep_rate: float = 1.0, **overrides: Any) -> EVADConfig:
        """Same architecture, few and narrow layers: trains on a 2-core CPU in minutes; KTP at blocks 1, 2."""
        return cls.from_variant("tiny", keep_rate=keep_rate, **overrides)

    @property
    def pruning_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that drop tokens (keep rate < 1), ascending."""
        return tuple(index for index, rate in enumerate(self.keep_rates) if rate < 1.0)

    @property
    def keep_rate_label(self) -> str:
        """Short name of the real keep rates, for MLflow tags, tables and plots.

        The shared rate when every pruning block uses the same one ("0.7"), "1.0" without pruning (the way a
        scalar `model.keep_rate` of 1.0 is logged), else every block's rate ("[1.0, 0.7, 0.6, 1.0]").
        """
        pruning_rates = {self.keep_rates[index] for index in self.pruning_blocks}
        if len(pruning_rates) <= 1:
            return str(pruning_rates.pop() if pruning_rates else 1.0)
        return str(list(self.keep_rates))

    def _check_backbone(self) -> None:
        if len(self.keep_rates) != self.depth:
            raise EVADConfigError(
                "keep_rates",
                f"keep_rates has {len(self.keep_rates)} entries but depth is {self.depth}: one rate per block",
            )
        indices = list(self.fpn_indices)
        if len(indices) != NUM_FPN_TAPS or any(not 0 <= index < self.depth for index in indices):
            raise EVADConfigError(
                "fpn_indices", f"fpn_indices needs {NUM_FPN_TAPS} block indices in [0, {self.depth}), got {indices}"
            )
        if indices != sorted(set(indices)):
            raise EVADConfigError(
                "fpn_indices", f"fpn_indices must be strictly increasing (fine to coarse levels), got {indices}"
            )
        if self.token_order not in TOKEN_ORDERS:
            raise EVADConfigError("token_order", f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        table_frames = POSITION_TABLE_GRID[0] * TUBELET_SIZE
        if self.num_frames != table_frames:
            raise EVADConfigError(
                "num_frames",
                f"num_frames must be {table_frames}: the fixed position table has {POSITION_TABLE_GRID[0]} temporal "
                f"slices of {TUBELET_SIZE} frames (got {self.num_frames})",
            )
        _check_divisible("embed_dim", self.embed_dim, "num_heads", self.num_heads)

    def _check_heads(self) -> None:
        if len(self.roi_extension) != 2:
            raise EVADConfigError(
                "roi_extension",
                f"roi_extension must be two non-negative (x, y) factors, got {list(self.roi_extension)}",
            )
        if self.num_dynamic != NUM_DYNAMIC_KERNELS:
            raise EVADConfigError(
                "num_dynamic",
                f"num_dynamic must be {NUM_DYNAMIC_KERNELS}: DynamicConv generates hidden->dynamic->hidden kernels "
                f"(got {self.num_dynamic})",
            )
        _check_divisible("hidden_dim", self.hidden_dim, "stage_num_heads", self.stage_num_heads)
        _check_divisible("crd_embed_dim", self.crd_embed_dim, "crd_num_heads", self.crd_num_heads)


@dataclass(frozen=True)
class VariantPreset:
    """A named architecture: the settings that differ from the ViT-B defaults, and where its KTP prunes."""

    settings: dict[str, Any]
    pruning_blocks: tuple[int, ...]


VARIANTS: dict[str, VariantPreset] = {
    "vit_b": VariantPreset(settings={}, pruning_blocks=(3, 6, 9)),
    "vit_l": VariantPreset(
        settings={
            "embed_dim": 1024, "depth": 24, "num_heads": 16, "drop_path_rate": 0.2, "fpn_indices": (5, 11, 17, 23),
            "crd_embed_dim": 512, "crd_depth": 12, "crd_num_heads": 8, "action_weight": 6.0,
        },
        pruning_blocks=(6, 12, 18),
    ),
    # Small enough for a 2-core CPU to train in minutes; same architecture, fewer and narrower layers.
    "tiny": VariantPreset(
        settings={
            "embed_dim": 96, "depth": 4, "num_heads": 4, "drop_path_rate": 0.0, "fpn_indices": (0, 1, 2, 3),
            "crd_embed_dim": 48, "crd_depth": 2, "crd_num_heads": 4, "crd_drop_path_rate": 0.0, "num_proposals": 10,
            "num_stages": 2, "stage_num_heads": 4, "dim_feedforward": 128, "dim_dynamic": 16, "act_fc_dim": 256,
        },
        pruning_blocks=(1, 2),
    ),
}


def keep_rates_at(depth: int, pruning_blocks: Sequence[int], keep_rate: float) -> tuple[float, ...]:
    """Per-block keep rates (length `depth`): `keep_rate` at `pruning_blocks`, 1.0 elsewhere.

    Raises EVADConfigError naming `keep_rate` (outside (0, 1]) or `pruning_blocks` (an index outside the blocks).
    """
    _check_in("keep_rate", keep_rate, KEEP_RATE_RANGE)
    outside = [index for index in pruning_blocks if not 0 <= index < depth]
    if outside:
        raise EVADConfigError("pruning_blocks", f"pruning_blocks {outside} outside the {depth} blocks")
    return tuple(float(keep_rate) if index in pruning_blocks else 1.0 for index in range(depth))


def _check_in(name: str, value: Any, allowed: Interval) -> None:
    """`value` (every element, for a tuple) must lie in `allowed`."""
    if isinstance(value, tuple):
        for index, element in enumerate(value):
            if element not in allowed:
                raise EVADConfigError(name, f"{name}[{index}] = {element!r} must be {allowed}")
    elif value not in allowed:
        raise EVADConfigError(name, f"{name} must be {allowed}, got {value!r}")


def _check_divisible(name: str, width: int, heads_name: str, num_heads: int) -> None:
    if width % num_heads:
        raise EVADConfigError(name, f"{name} {width} is not divisible by {heads_name} {num_heads}")
