"""EVAD in plain torch + timm + torchvision.ops (no Ray, no MLflow).

Names load on first use: ``evadlab.models.config`` (no torch) must import without the model code, because the
user-facing configuration builds on it and has to answer at once.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES_OF_MODULE = {
    "config": ("VARIANTS", "EVADConfig", "EVADConfigError"),
    "criterion": ("HungarianMatcher", "LossOutput", "Match", "SetCriterion"),
    "decoder": ("ContextRefinementDecoder",),
    "evad": ("EVAD", "ClassifierOutput", "EVADTrace", "select_detections"),
    "localizer": ("SparseRCNNStage",),
    "structures": (
        "BoxMode", "Boxes", "Detections", "KTPTrace", "StageOutput", "boxes_to_original_frame", "pad_and_stack_clips",
    ),
    "vit": ("BackboneOutput", "KeyframeViT"),
}
_MODULE_OF = {name: module for module, names in _NAMES_OF_MODULE.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
