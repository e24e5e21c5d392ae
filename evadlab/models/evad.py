"""The assembled EVAD detector (spec §1): KTP ViT -> FPN -> Sparse R-CNN stages -> context refinement decoder.

Module names equal the released state_dict keys, so released checkpoints load without a key map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import EVADConfig
from .criterion import LossOutput, SetCriterion
from .decoder import (
    ContextRefinementDecoder,
    build_decoder_inputs,
    extend_boxes,
    pool_actor_tokens,
    token_grid_positions,
)
from .localizer import (
    PYRAMID_LEVELS,
    SparseRCNNStage,
    build_fpn_convs,
    fpn_forward,
    resize_keyframe_maps,
)
from .structures import Boxes, BoxMode, Detections, StageOutput, pad_and_stack_clips
from .vit import BackboneOutput, KeyframeViT


@dataclass
class ClassifierOutput:
    box_mode: ClassVar[BoxMode] = BoxMode.INPUT_XYXY_ABS
    action_logits: list[Tensor]  # per decoder block, (B, P, num_actions)
    roi_boxes: Tensor  # (B, P, 4) extended, clipped boxes the decoder pooled with
    grid: Tensor  # (B, C_d, t, h, w) dense token map the RoIAlign sampled
    decoder_input: Tensor  # (B, Ns + n + P, C_d)


@dataclass
class EVADTrace:
    """Everything one forward pass computed, for debugging and for checking against reference numbers."""

    box_mode: ClassVar[BoxMode] = BoxMode.INPUT_XYXY_ABS
    images_whwh: Tensor  # (B, 4) unpadded [W, H, W, H]
    init_boxes: Tensor  # (B, P, 4)
    backbone: BackboneOutput
    pyramid: list[Tensor]  # FPN p2..p5
    stages: list[StageOutput]
    classifier: ClassifierOutput
    losses: LossOutput | None = None

    @property
    def pred_logits(self) -> Tensor:
        return self.stages[-1].pred_logits

    @property
    def pred_boxes(self) -> Tensor:
        return self.stages[-1].pred_boxes

    @property
    def pred_actions(self) -> Tensor:
        return self.classifier.action_logits[-1]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height],
        dim=-1,
    )


def select_detections(
    pred_logits: Tensor,
    pred_boxes: Boxes,
    pred_actions: Tensor,
    image_whwh: Tensor,
    original_size: tuple[int, int],
    person_threshold: float,
) -> Detections:
    """Spec §6.1 for one clip: keep the proposals with person probability >= threshold (all of them if none passes).

    (P, 2) logits, P boxes in `BoxMode.INPUT_XYXY_ABS`, (P, A) action logits and the clip's unpadded [W, H, W, H];
    the detection boxes come out clipped, in `BoxMode.ORIGINAL_XYXY_REL` of the original (H, W) frame.
    """
    person_scores = pred_logits.softmax(-1)[:, 0]
    selected = torch.nonzero(person_scores >= person_threshold).squeeze(1)
    if selected.numel() == 0:
        selected = torch.arange(len(person_scores), device=person_scores.device)
    boxes = pred_boxes[selected].convert(
        BoxMode.ORIGINAL_XYXY_REL, image_whwh=image_whwh, original_size=original_size
    )
    return Detections(
        boxes=boxes,
        person_scores=person_scores[selected],
        action_scores=pred_actions[selected].sigmoid(),
        proposal_indices=selected,
    )


class DetectionHead(nn.Module):
    """`det_head` of the released checkpoints: the Sparse R-CNN stages (`s0_headseries`) and the CRD together
    with its token projection (`encoder_to_decoder`) and `mask_token`."""

    def __init__(self, config: EVADConfig):
        """Stages, token projection and CRD of `config`."""
        super().__init__()
        self.roi_extension = config.roi_extension
        self.token_order = config.token_order
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.crd_embed_dim))
        self.s0_headseries = nn.ModuleList(SparseRCNNStage(config) for _ in range(config.num_stages))
        self.encoder_to_decoder = nn.Linear(config.embed_dim, config.crd_embed_dim, bias=False)
        self.decoder = ContextRefinementDecoder(config)
        # The released head re-initialises every matrix-shaped parameter (the mask token included) this way.
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def localize(self, pyramid: list[Tensor], init_boxes: Tensor, init_features: Tensor) -> list[StageOutput]:
        """Run the stages; each pools with the previous stage's boxes, detached and unclipped."""
        stages = []
        boxes, features = init_boxes, init_features
        for stage in self.s0_headseries:
            output = stage(pyramid, boxes, features)
            stages.append(output)
            boxes, features = output.pred_boxes.detach(), output.proposal_features
        return stages

    def classify(
        self, backbone: BackboneOutput, actor_boxes: Tensor, images_whwh: Tensor
    ) -> ClassifierOutput:
        """Action logits of each decoder block for the (B, P, 4) actor boxes (`BoxMode.INPUT_XYXY_ABS`)."""
        inputs = build_decoder_inputs(
            self.encoder_to_decoder(backbone.tokens),
            token_grid_positions(backbone.nonkey_idx, self.token_order),
            self.mask_token,
            self.decoder.position_table(backbone.token_grid),
            backbone.token_grid,
        )
        roi_boxes = extend_boxes(actor_boxes.detach(), self.roi_extension, images_whwh)
        actor_tokens = pool_actor_tokens(inputs.grid, roi_boxes)
        decoder_input = torch.cat([inputs.tokens, actor_tokens.to(inputs.tokens.dtype)], dim=1)
        return ClassifierOutput(
            action_logits=self.decoder(decoder_input, actor_boxes.shape[1]),
            roi_boxes=roi_boxes,
            grid=inputs.grid,
            decoder_input=decoder_input,
        )


class EVAD(KeyframeViT):
    """EVAD video action detector.

    It *is* the KTP ViT (inherited, so the backbone parameters keep their top-level VideoMAE names
    `patch_embed`, `blocks`, `norm`), extended with the FPN convs, learned proposals, `det_head` and the
    loss `criterion`. `forward` takes a list of normalised (3, T, H_b, W_b) clips of any sizes.
    """

    def __init__(self, config: EVADConfig | None = None):
        """The detector `config` describes (None: released ViT-B without pruning); `self.config` keeps it.

        Raises TypeError for anything but an EVADConfig (its values were validated when it was built).
        """
        super().__init__(config)
        config = self.config
        self.det_head = DetectionHead(config)
        # Top-level names (fpn_lateral2 ...) because that is where the released checkpoints keep them.
        for name, conv in build_fpn_convs(config.embed_dim, config.hidden_dim).items():
            self.add_module(name, conv)
        self.init_proposal_features = nn.Embedding(config.num_proposals, config.hidden_dim)
        self.init_proposal_boxes = nn.Embedding(config.num_proposals, 4)
        # Every proposal starts as the whole image: normalised (cx, cy, w, h) = (0.5, 0.5, 1, 1).
        nn.init.constant_(self.init_proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.init_proposal_boxes.weight[:, 2:], 1.0)
        self.criterion = SetCriterion(config)
        self.set_grad_checkpointing(config.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone attention/MLP and decoder blocks in backward instead of storing their activations.

        Starts as `config.grad_checkpointing`; the (frozen) config is not updated when this is called later.
        """
        for block in [*self.blocks, *self.det_head.decoder.blocks]:
            block.grad_checkpointing = enable

    def fpn_convs(self) -> tuple[list[nn.Conv2d], list[nn.Conv2d]]:
        laterals = [getattr(self, f"fpn_lateral{level}") for level in PYRAMID_LEVELS]
        outputs = [getattr(self, f"fpn_output{level}") for level in PYRAMID_LEVELS]
        return laterals, outputs

    def initial_proposals(self, images_whwh: Tensor) -> tuple[Tensor, Tensor]:
        """(B, P, 4) learned boxes in `BoxMode.INPUT_XYXY_ABS` (stored image-relative) and (B, P, hidden) features."""
        boxes = box_cxcywh_to_xyxy(self.init_proposal_boxes.weight)[None] * images_whwh[:, None, :]
        features = self.init_proposal_features.weight[None].expand(len(images_whwh), -1, -1)
        return boxes, features

    def forward_head(self, backbone: BackboneOutput, images_whwh: Tensor) -> EVADTrace:
        """FPN, localisation stages and the CRD on top of a backbone output."""
        pyramid = fpn_forward(resize_keyframe_maps(backbone.keyframe_maps), *self.fpn_convs())
        init_boxes, init_features = self.initial_proposals(images_whwh)
        stages = self.det_head.localize(pyramid, init_boxes, init_features)
        classifier = self.det_head.classify(backbone, stages[-1].pred_boxes, images_whwh)
        return EVADTrace(
            images_whwh=images_whwh,
            init_boxes=init_boxes,
            backbone=backbone,
            pyramid=pyramid,
            stages=stages,
            classifier=classifier,
        )

    def forward_trace(
        self, clips: list[Tensor], targets: list[dict] | None = None, *, record_intermediates: bool = False
    ) -> EVADTrace:
        """Full forward pass returning every intermediate result; with `targets` also the loss terms and matchings.

        `record_intermediates` additionally keeps the embedded tokens and every block's output (memory heavy).
        """
        images, images_whwh = pad_and_stack_clips(clips)
        backbone = self.forward_features(images, record_intermediates=record_intermediates)
        trace = self.forward_head(backbone, images_whwh)
        if targets is not None:
            if len(targets) != len(clips):
                raise ValueError(f"got {len(targets)} targets for {len(clips)} clips")
            trace.losses = self.criterion(trace.stages, trace.classifier.action_logits, targets, images_whwh)
        return trace

    def forward(self, clips: list[Tensor], targets: list[dict] | None = None) -> dict[str, Tensor]:
        """Training with targets: {"loss": mean of the weighted terms, "loss_ce": weighted term, ...}.

        Otherwise the raw head outputs: pred_logits (B, P, 2), pred_boxes (B, P, 4) in `BoxMode.INPUT_XYXY_ABS`,
        unclipped, pred_actions (B, P, num_actions) logits of the last decoder block, and images_whwh (B, 4).
        """
        computes_loss = self.training and targets is not None
        trace = self.forward_trace(clips, targets if computes_loss else None)
        if computes_loss:
            weighted = self.criterion.weighted(trace.losses.raw)
            return {"loss": self.criterion.total(weighted), **weighted}
        return {
            "pred_logits": trace.pred_logits,
            "pred_boxes": trace.pred_boxes,
            "pred_actions": trace.pred_actions,
            "images_whwh": trace.images_whwh,
        }

    @torch.no_grad()
    def predict(self, clips: list[Tensor], ori_sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """Detections of each (3, T, H_b, W_b) clip, boxes relative to its original (H, W) video frame (spec §6.1).

        Runs in eval mode and restores the caller's mode. Raises ValueError when the counts of clips and sizes differ.
        """
        if len(ori_sizes) != len(clips):
            raise ValueError(f"got {len(ori_sizes)} original sizes for {len(clips)} clips")
        was_training = self.training
        self.eval()
        try:
            outputs = self.forward(clips)
        finally:
            self.train(was_training)
        return [
            select_detections(
                logits, Boxes(boxes, BoxMode.INPUT_XYXY_ABS), actions, whwh, tuple(size), self.config.person_threshold
            )
            for logits, boxes, actions, whwh, size in zip(
                outputs["pred_logits"],
                outputs["pred_boxes"],
                outputs["pred_actions"],
                outputs["images_whwh"],
                ori_sizes,
            )
        ]
