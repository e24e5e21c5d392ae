"""Actor localisation: an FPN on the keyframe tokens and Sparse R-CNN stages (spec §1.3 steps 6-7, §3.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .config import EVADConfig
from .structures import StageOutput

PYRAMID_LEVELS = (2, 3, 4, 5)
PYRAMID_STRIDES = (4, 8, 16, 32)
# The ViT tokens have stride 16; nearest resizing turns the four tapped blocks into strides 4, 8, 16, 32.
KEYFRAME_MAP_SCALES = (4.0, 2.0, 1.0, 0.5)
POOLER_RESOLUTION = 7
POOLER_SAMPLING_RATIO = 2
# detectron2's level rule: a 224-pixel box goes to p4.
CANONICAL_BOX_SIZE = 224
CANONICAL_LEVEL = 4
BOX_DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)
# Caps exp(dw) so a wild regression cannot overflow; the value detectron2 uses.
BOX_DELTA_SCALE_CLAMP = math.log(100000.0 / 16)
HEAD_LAYERNORM_EPS = 1e-5


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's XavierFill as detectron2 initialises FPN convs: kaiming_uniform(a=1), zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)


def build_fpn_convs(in_channels: int, out_channels: int) -> dict[str, nn.Conv2d]:
    """The FPN's lateral 1x1 and output 3x3 convs, named as in the released state_dict (fpn_lateral2 ... fpn_output5)."""
    convs = {}
    for level in PYRAMID_LEVELS:
        convs[f"fpn_lateral{level}"] = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        convs[f"fpn_output{level}"] = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
    for conv in convs.values():
        c2_xavier_fill(conv)
    return convs


def resize_keyframe_maps(keyframe_maps: list[Tensor]) -> list[Tensor]:
    """Nearest-resize the four stride-16 keyframe maps (fine to coarse block order) to strides 4, 8, 16, 32."""
    return [
        feature if scale == 1.0 else F.interpolate(feature, scale_factor=scale, mode="nearest")
        for feature, scale in zip(keyframe_maps, KEYFRAME_MAP_SCALES, strict=True)
    ]


def fpn_forward(features: list[Tensor], laterals: list[nn.Conv2d], outputs: list[nn.Conv2d]) -> list[Tensor]:
    """Top-down FPN without norm: lateral 1x1, nearest x2 upsampling summed in, then a 3x3 output conv per level.

    `features` go fine to coarse (p2 input first); so does the result.
    """
    merged = laterals[-1](features[-1])
    pyramid = [outputs[-1](merged)]
    for feature, lateral, output in zip(features[-2::-1], laterals[-2::-1], outputs[-2::-1]):
        merged = lateral(feature) + F.interpolate(merged, scale_factor=2.0, mode="nearest")
        pyramid.insert(0, output(merged))
    return pyramid


def assign_pyramid_levels(boxes: Tensor) -> Tensor:
    """Pyramid list index (0 = p2) of each (K, 4) box: floor(4 + log2(sqrt(area)/224 + 1e-8)) clamped to [2, 5]."""
    box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(box_sizes / CANONICAL_BOX_SIZE + 1e-8))
    return (levels.clamp(PYRAMID_LEVELS[0], PYRAMID_LEVELS[-1]) - PYRAMID_LEVELS[0]).to(torch.int64)


def boxes_to_rois(boxes: Tensor) -> Tensor:
    """(B, P, 4) boxes -> (B*P, 5) [batch index, x1, y1, x2, y2] rows, batch-major, as roi_align expects."""
    batch, num_boxes = boxes.shape[:2]
    batch_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype).repeat_interleave(num_boxes)
    return torch.cat([batch_index[:, None], boxes.reshape(-1, 4)], dim=1)


def multilevel_roi_align(pyramid: list[Tensor], boxes: Tensor) -> Tensor:
    """ROIAlignV2 (aligned, 7x7, sampling 2) of (B, P, 4) boxes, each on its own pyramid level -> (B*P, C, 7, 7).

    torchvision's MultiScaleRoIAlign infers its canonical scale differently, so the detectron2 level rule is
    applied here by hand with one roi_align call per level.
    """
    # roi_align needs one dtype; box coordinates must not drop to bf16 under autocast.
    dtype = torch.promote_types(pyramid[0].dtype, boxes.dtype)
    rois = boxes_to_rois(boxes.to(dtype))
    levels = assign_pyramid_levels(rois[:, 1:])
    pooled = rois.new_zeros(rois.shape[0], pyramid[0].shape[1], POOLER_RESOLUTION, POOLER_RESOLUTION)
    for level, (feature, stride) in enumerate(zip(pyramid, PYRAMID_STRIDES, strict=True)):
        selected = torch.nonzero(levels == level).squeeze(1)
        pooled[selected] = roi_align(
            feature.to(dtype),
            rois[selected],
            output_size=POOLER_RESOLUTION,
            spatial_scale=1.0 / stride,
            sampling_ratio=POOLER_SAMPLING_RATIO,
            aligned=True,
        )
    return pooled


def decode_box_deltas(deltas: Tensor, boxes: Tensor) -> Tensor:
    """Apply (K, 4) deltas (dx, dy, dw, dh), weighted by (2, 2, 1, 1), to (K, 4) `BoxMode.INPUT_XYXY_ABS` boxes.

    The result is not clipped.
    """
    deltas = deltas.to(boxes.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    center_x = boxes[:, 0] + 0.5 * widths
    center_y = boxes[:, 1] + 0.5 * heights
    weight_x, weight_y, weight_w, weight_h = BOX_DELTA_WEIGHTS
    dx = deltas[:, 0] / weight_x
    dy = deltas[:, 1] / weight_y
    dw = torch.clamp(deltas[:, 2] / weight_w, max=BOX_DELTA_SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3] / weight_h, max=BOX_DELTA_SCALE_CLAMP)
    pred_center_x = dx * widths + center_x
    pred_center_y = dy * heights + center_y
    pred_width = torch.exp(dw) * widths
    pred_height = torch.exp(dh) * heights
    return torch.stack(
        [
            pred_center_x - 0.5 * pred_width,
            pred_center_y - 0.5 * pred_height,
            pred_center_x + 0.5 * pred_width,
            pred_center_y + 0.5 * pred_height,
        ],
        dim=1,
    )


def linear_norm_relu_layers(dim: int, num_layers: int) -> nn.Sequential:
    """num_layers x [Linear(no bias), LayerNorm, ReLU]; Sequential indices match the released keys (0, 1, 3, 4, ...)."""
    layers = []
    for _ in range(num_layers):
        layers += [
            nn.Linear(dim, dim, bias=False),
            nn.LayerNorm(dim, eps=HEAD_LAYERNORM_EPS),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class DynamicConv(nn.Module):
    """Sparse R-CNN instance interaction: each proposal's features generate two 1x1 "conv" kernels
    (hidden -> dim_dynamic -> hidden) that are applied to its own pooled RoI features."""

    def __init__(self, config: EVADConfig):
        """Kernels of `config.hidden_dim` x `config.dim_dynamic`, generated from each proposal's features."""
        super().__init__()
        hidden_dim, dim_dynamic = config.hidden_dim, config.dim_dynamic
        self.hidden_dim = hidden_dim
        self.dim_dynamic = dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, config.num_dynamic * hidden_dim * dim_dynamic)
        self.norm1 = nn.LayerNorm(dim_dynamic, eps=HEAD_LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=HEAD_LAYERNORM_EPS)
        self.out_layer = nn.Linear(hidden_dim * POOLER_RESOLUTION**2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim, eps=HEAD_LAYERNORM_EPS)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        """(K, hidden) proposal features and (K, 49, hidden) RoI features -> (K, hidden)."""
        kernels = self.dynamic_layer(proposal_features)
        split = self.hidden_dim * self.dim_dynamic
        first = kernels[:, :split].view(-1, self.hidden_dim, self.dim_dynamic)
        second = kernels[:, split:].view(-1, self.dim_dynamic, self.hidden_dim)
        features = F.relu(self.norm1(torch.bmm(roi_features, first)))
        features = F.relu(self.norm2(torch.bmm(features, second)))
        return F.relu(self.norm3(self.out_layer(features.flatten(1))))


class SparseRCNNStage(nn.Module):
    """One iterative refinement stage: pool, self-attend among proposals, dynamic conv, FFN, then
    classify (person vs no-object) and regress box deltas."""

    def __init__(self, config: EVADConfig):
        """Width `config.hidden_dim`, `stage_num_heads` proposal self-attention heads, FFN `dim_feedforward`."""
        super().__init__()
        hidden_dim = config.hidden_dim
        self.self_attn = nn.MultiheadAttention(hidden_dim, config.stage_num_heads, batch_first=True)
        self.inst_interact = DynamicConv(config)
        self.linear1 = nn.Linear(hidden_dim, config.dim_feedforward)
        self.linear2 = nn.Linear(config.dim_feedforward, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim, eps=HEAD_LAYERNORM_EPS)
        self.norm2 = nn.LayerNorm(hidden_dim, eps=HEAD_LAYERNORM_EPS)
        self.norm3 = nn.LayerNorm(hidden_dim, eps=HEAD_LAYERNORM_EPS)
        self.cls_module = linear_norm_relu_layers(hidden_dim, config.num_cls_layers)
        self.reg_module = linear_norm_relu_layers(hidden_dim, config.num_reg_layers)
        self.class_logits = nn.Linear(hidden_dim, 2)
        self.bboxes_delta = nn.Linear(hidden_dim, 4)

    def forward(self, pyramid: list[Tensor], boxes: Tensor, proposal_features: Tensor) -> StageOutput:
        """Refine (B, P, 4) `BoxMode.INPUT_XYXY_ABS` boxes with (B, P, hidden) proposal features on FPN p2..p5."""
        batch, num_proposals, hidden = proposal_features.shape
        roi_features = multilevel_roi_align(pyramid, boxes).flatten(2).transpose(1, 2)

        attended = self.self_attn(
            proposal_features, proposal_features, proposal_features, need_weights=False
        )[0]
        features = self.norm1(proposal_features + attended).reshape(batch * num_proposals, hidden)
        features = self.norm2(features + self.inst_interact(features, roi_features.to(features.dtype)))
        features = self.norm3(features + self.linear2(F.relu(self.linear1(features))))

        logits = self.class_logits(self.cls_module(features))
        deltas = self.bboxes_delta(self.reg_module(features))
        pred_boxes = decode_box_deltas(deltas, boxes.reshape(-1, 4))
        return StageOutput(
            input_boxes=boxes,
            pred_logits=logits.view(batch, num_proposals, -1),
            pred_boxes=pred_boxes.view(batch, num_proposals, 4),
            proposal_features=features.view(batch, num_proposals, hidden),
        )
