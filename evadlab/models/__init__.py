"""EVAD in plain torch + timm + torchvision.ops (no Ray, no MLflow)."""

from .criterion import HungarianMatcher, LossOutput, Match, SetCriterion
from .decoder import ContextRefinementDecoder
from .evad import (
    EVAD,
    ClassifierOutput,
    EVADTrace,
    boxes_to_original_frame,
    select_detections,
)
from .localizer import SparseRCNNStage
from .structures import Detections, KTPTrace, StageOutput, pad_and_stack_clips
from .vit import BackboneOutput, KeyframeViT

__all__ = [
    "EVAD",
    "BackboneOutput",
    "ClassifierOutput",
    "ContextRefinementDecoder",
    "Detections",
    "EVADTrace",
    "HungarianMatcher",
    "KTPTrace",
    "KeyframeViT",
    "LossOutput",
    "Match",
    "SetCriterion",
    "SparseRCNNStage",
    "StageOutput",
    "boxes_to_original_frame",
    "pad_and_stack_clips",
    "select_detections",
]
