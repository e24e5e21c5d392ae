"""The released EVAD optimisation recipe (spec section 4): AdamW parameter groups and the learning-rate schedule.

Source: ``slowfast/models/optimizer.py`` (groups) and ``slowfast/utils/lr_policy.py`` (steps with linear warm-up).
"""

from __future__ import annotations

from typing import Any

import torch

from evadlab.config import TrainConfig

ADAM_BETAS = (0.9, 0.999)


def parameter_groups(model: torch.nn.Module, train_cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups as the released optimizer builds them: no weight decay on 1-D parameters, biases and the mask
    token; ``head_lr_scale`` (x8 in the recipe) on ``det_head.*`` (the FPN and the learned proposals are not part of
    it). Each group carries its ``lr_scale`` for :func:`set_learning_rate`."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = name.removeprefix("module.")
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "mask_token" in name or "pos_embed" in name
        groups.setdefault((no_decay, name.startswith("det_head.")), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else train_cfg.weight_decay,
         "lr_scale": train_cfg.head_lr_scale if in_head else 1.0}
        for (no_decay, in_head), params in sorted(groups.items())
    ]


def build_optimizer(model: torch.nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """The released AdamW over :func:`parameter_groups`, as torch's fused kernel: the same update, one kernel for all
    parameters. On a CPU torch's default is a loop of ~10 small ops per parameter tensor: 87 ms against the fused
    kernel's 24 ms for the quickstart model, whose whole training step takes 0.84x the time with the fused kernel
    (``benchmarks/optimizer_step.py``, ``benchmarks/RESULTS.md`` section 5)."""
    return torch.optim.AdamW(parameter_groups(model, train_cfg), lr=train_cfg.base_lr, betas=ADAM_BETAS, fused=True)


def learning_rate(epoch: float, train_cfg: TrainConfig) -> float:
    """The base learning rate at a fractional ``epoch``: linear warm-up from ``warmup_start_lr`` over
    ``warmup_epochs``, then ``base_lr`` times the factor of the last step in ``lr_steps`` that has started."""
    if epoch < train_cfg.warmup_epochs:
        end = train_cfg.base_lr * train_cfg.lr_factors[0]
        return train_cfg.warmup_start_lr + epoch * (end - train_cfg.warmup_start_lr) / train_cfg.warmup_epochs
    started = [i for i, start in enumerate(train_cfg.lr_steps) if epoch >= start]
    return train_cfg.base_lr * train_cfg.lr_factors[max(started, default=0)]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Applies ``lr`` times each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
