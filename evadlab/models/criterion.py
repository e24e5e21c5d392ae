"""Set matching and losses of EVAD (spec §3.4): Sparse R-CNN box losses on every stage, BCE action losses
on every decoder block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou

from .config import EVADConfig
from .structures import StageOutput

PERSON, NO_OBJECT = 0, 1


@dataclass
class Match:
    """Hungarian assignment of one clip's proposals to its ground-truth persons."""

    pred_indices: Tensor  # (m,) int64, ascending
    gt_indices: Tensor  # (m,) int64
    cost_matrix: Tensor  # (P, n_gt)


@dataclass
class LossOutput:
    raw: dict[str, Tensor]  # unweighted terms in `SetCriterion.loss_names` order
    matches: list[list[Match]]  # per stage, per clip


def _float_at_least_32(x: Tensor) -> Tensor:
    """Costs and losses in float32 even under bf16 autocast (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class HungarianMatcher:
    """One-to-one matching with cost = l1 * L1(boxes / whwh) - class * p(person) - giou * GIoU."""

    def __init__(self, class_weight: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0):
        self.class_weight = class_weight
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_boxes: Tensor, image_whwh: Tensor) -> Tensor:
        """(P, n_gt) costs for one clip; boxes in `BoxMode.INPUT_XYXY_ABS`, `image_whwh` its unpadded [W, H, W, H]."""
        logits, boxes, gt_boxes = (
            _float_at_least_32(logits),
            _float_at_least_32(boxes),
            gt_boxes.to(boxes.dtype),
        )
        person_prob = logits.softmax(-1)[:, PERSON]
        cost_l1 = torch.cdist(boxes / image_whwh, gt_boxes / image_whwh, p=1)
        cost_giou = -generalized_box_iou(boxes, gt_boxes)
        return (
            self.l1_weight * cost_l1
            + self.class_weight * -person_prob[:, None]
            + self.giou_weight * cost_giou
        )

    @torch.no_grad()
    def __call__(self, stage: StageOutput, gt_boxes: list[Tensor], images_whwh: Tensor) -> list[Match]:
        matches = []
        for logits, boxes, targets, whwh in zip(stage.pred_logits, stage.pred_boxes, gt_boxes, images_whwh):
            cost = self.cost_matrix(logits, boxes, targets, whwh)
            pred_indices, gt_indices = linear_sum_assignment(cost.cpu().numpy())
            matches.append(
                Match(
                    pred_indices=torch.as_tensor(pred_indices, dtype=torch.int64, device=boxes.device),
                    gt_indices=torch.as_tensor(gt_indices, dtype=torch.int64, device=boxes.device),
                    cost_matrix=cost,
                )
            )
        return matches


class SetCriterion(nn.Module):
    """All EVAD loss terms, with deep supervision.

    Every localisation stage is matched on its own and gets CE / L1 / GIoU terms; every decoder block gets a
    BCE action term on the *last* stage's matching. Names: the last stage and last block carry no suffix
    (`loss_ce`, `loss_bce`), aux stage s and block i get `_s` / `_i`.
    """

    def __init__(self, config: EVADConfig):
        """Terms for `config.num_stages` stages and `config.crd_depth` decoder blocks, with `config`'s weights."""
        super().__init__()
        self.num_stages = config.num_stages
        self.num_decoder_blocks = config.crd_depth
        self.matcher = HungarianMatcher(config.class_weight, config.l1_weight, config.giou_weight)
        # A buffer because the released state_dict carries it as `criterion.empty_weight`.
        self.register_buffer("empty_weight", torch.tensor([1.0, config.no_object_weight]))
        box_weights = {"ce": config.class_weight, "giou": config.giou_weight, "bbox": config.l1_weight}
        self.loss_weights: dict[str, float] = {}
        for suffix in [""] + [f"_{stage}" for stage in range(self.num_stages - 1)]:
            self.loss_weights.update({f"loss_{name}{suffix}": weight for name, weight in box_weights.items()})
        for block in range(self.num_decoder_blocks - 1):
            self.loss_weights[f"loss_bce_{block}"] = config.action_weight
        self.loss_weights["loss_bce"] = config.action_weight

    @property
    def loss_names(self) -> list[str]:
        return list(self.loss_weights)

    def forward(
        self, stages: list[StageOutput], action_logits: list[Tensor], targets: list[dict], images_whwh: Tensor
    ) -> LossOutput:
        """Raw loss terms and per-stage matchings.

        `targets[b]` holds "boxes" (n_b, 4) in `BoxMode.INPUT_XYXY_ABS` of clip b and "actions" (n_b, A) multi-hot.
        Raises ValueError when the stage or decoder-output count differs from the configured one.
        """
        if len(stages) != self.num_stages or len(action_logits) != self.num_decoder_blocks:
            raise ValueError(
                f"expected {self.num_stages} stages and {self.num_decoder_blocks} decoder outputs, "
                f"got {len(stages)} and {len(action_logits)}"
            )
        gt_boxes = [target["boxes"] for target in targets]
        num_boxes = self.average_num_boxes(gt_boxes)
        raw: dict[str, Tensor] = {}
        matches = []
        for index, stage in enumerate(stages):
            stage_matches = self.matcher(stage, gt_boxes, images_whwh)
            matches.append(stage_matches)
            suffix = "" if index == self.num_stages - 1 else f"_{index}"
            raw[f"loss_ce{suffix}"] = self.classification_loss(stage.pred_logits, stage_matches)
            raw[f"loss_giou{suffix}"], raw[f"loss_bbox{suffix}"] = self.box_losses(
                stage.pred_boxes, stage_matches, gt_boxes, images_whwh, num_boxes
            )
        gt_actions = [target["actions"] for target in targets]
        for index, logits in enumerate(action_logits):
            suffix = "" if index == self.num_decoder_blocks - 1 else f"_{index}"
            raw[f"loss_bce{suffix}"] = self.action_loss(logits, matches[-1], gt_actions)
        return LossOutput(raw={name: raw[name] for name in self.loss_weights}, matches=matches)

    def weighted(self, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: raw[name] * weight for name, weight in self.loss_weights.items()}

    def total(self, weighted: dict[str, Tensor]) -> Tensor:
        """The released training loop back-propagates the *mean* of the weighted terms, not their sum."""
        return sum(weighted[name] for name in self.loss_weights) / len(self.loss_weights)

    @staticmethod
    def average_num_boxes(gt_boxes: list[Tensor]) -> float:
        """Ground-truth boxes per worker: the batch total, averaged over the distributed workers, at least 1."""
        device = gt_boxes[0].device if gt_boxes else None
        num_boxes = torch.tensor(float(sum(len(boxes) for boxes in gt_boxes)), device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def classification_loss(self, logits: Tensor, matches: list[Match]) -> Tensor:
        """Person vs no-object cross entropy over all B*P proposals, weighted mean with class weights [1, eos]."""
        targets = torch.full(logits.shape[:2], NO_OBJECT, dtype=torch.int64, device=logits.device)
        for clip_targets, match in zip(targets, matches):
            clip_targets[match.pred_indices] = PERSON
        return F.cross_entropy(_float_at_least_32(logits).transpose(1, 2), targets, weight=self.empty_weight)

    @staticmethod
    def box_losses(
        pred_boxes: Tensor,
        matches: list[Match],
        gt_boxes: list[Tensor],
        images_whwh: Tensor,
        num_boxes: float,
    ) -> tuple[Tensor, Tensor]:
        """(sum of 1 - GIoU, sum of L1 over whwh-normalised coordinates), each divided by num_boxes."""
        matched_pred = torch.cat([boxes[match.pred_indices] for boxes, match in zip(pred_boxes, matches)])
        matched_gt = torch.cat([gt[match.gt_indices] for gt, match in zip(gt_boxes, matches)]).to(
            matched_pred.dtype
        )
        whwh = torch.cat(
            [whwh.expand(len(match.gt_indices), -1) for whwh, match in zip(images_whwh, matches)]
        )
        loss_giou = (1 - torch.diag(generalized_box_iou(matched_pred, matched_gt))).sum() / num_boxes
        loss_l1 = F.l1_loss(matched_pred / whwh, matched_gt / whwh, reduction="none").sum() / num_boxes
        return loss_giou, loss_l1

    @staticmethod
    def action_loss(logits: Tensor, matches: list[Match], gt_actions: list[Tensor]) -> Tensor:
        """Mean BCE-with-logits over matched proposals x actions; unmatched proposals get no action loss."""
        matched_logits = torch.cat(
            [clip_logits[match.pred_indices] for clip_logits, match in zip(logits, matches)]
        )
        if matched_logits.numel() == 0:
            # No ground truth anywhere in the batch: keep the graph connected without producing NaN.
            return logits.sum() * 0.0
        matched_actions = torch.cat(
            [actions[match.gt_indices] for actions, match in zip(gt_actions, matches)]
        )
        return F.binary_cross_entropy_with_logits(
            _float_at_least_32(matched_logits), matched_actions.to(_float_at_least_32(matched_logits).dtype)
        )
