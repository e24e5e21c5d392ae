"""Build the configured EVAD and load the weights the config (or the caller) names."""

from __future__ import annotations

from evadlab.config import ModelConfig
from evadlab.models import EVAD
from evadlab.models.checkpoints import load_evad_checkpoint, load_pretrained_backbone


def build_model(model_cfg: ModelConfig, checkpoint: str | None = None) -> EVAD:
    """EVAD from its config. ``checkpoint`` (or ``model.checkpoint``) is a full EVAD checkpoint, released or
    ours; otherwise ``model.pretrained`` initialises the backbone from a VideoMAE file."""
    model = EVAD(model_cfg.evad)
    checkpoint = checkpoint or model_cfg.checkpoint
    if checkpoint:
        load_evad_checkpoint(model, checkpoint)
    elif model_cfg.pretrained:
        load_pretrained_backbone(model, model_cfg.pretrained)
    return model
