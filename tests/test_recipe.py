"""The released optimisation recipe (parameter groups, schedule) and the optimiser evadlab builds from it."""

from pathlib import Path

import pytest
import torch

from evadlab.config import load_config
from evadlab.platform.modeling import build_model
from evadlab.platform.recipe import ADAM_BETAS, build_optimizer, learning_rate, parameter_groups

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def test_recipe_groups_and_schedule():
    cfg = load_config(QUICKSTART, ["train.warmup_epochs=2", "train.warmup_start_lr=1e-5", "train.base_lr=1e-4",
                                   "train.lr_steps=[0, 5, 8]", "train.lr_factors=[1, 0.1, 0.01]"])
    assert learning_rate(0.0, cfg.train) == pytest.approx(1e-5)
    assert learning_rate(1.0, cfg.train) == pytest.approx(5.5e-5)
    assert learning_rate(3.0, cfg.train) == pytest.approx(1e-4)
    assert learning_rate(5.5, cfg.train) == pytest.approx(1e-5)
    assert learning_rate(9.0, cfg.train) == pytest.approx(1e-6)
    model = build_model(cfg.model)
    groups = parameter_groups(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for group in groups:
        group_names = [names[id(p)] for p in group["params"]]
        in_head = {n.startswith("det_head.") for n in group_names}
        assert len(in_head) == 1 and group["lr_scale"] == (8.0 if in_head.pop() else 1.0)
        if group["weight_decay"] > 0:
            assert all(p.ndim > 1 and names[id(p)] != "det_head.mask_token" for p in group["params"])
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"det_head.mask_token", "norm.weight", "blocks.0.attn.q_bias", "fpn_lateral2.bias"} <= no_decay
    assert "init_proposal_boxes.weight" not in no_decay


def test_the_fused_optimizer_makes_the_reference_adamw_update():
    """build_optimizer's fused AdamW against torch's reference (for-loop) AdamW on the same parameter groups, over
    three steps with weight decay and the head's learning-rate scale: the same weights and optimiser state, to float32
    rounding, and a state dict either one loads."""
    cfg = load_config(QUICKSTART, ["train.weight_decay=0.05"])
    torch.manual_seed(0)
    fused_model = build_model(cfg.model)
    reference_model = build_model(cfg.model)
    reference_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg.train)
    reference = torch.optim.AdamW(parameter_groups(reference_model, cfg.train), lr=cfg.train.base_lr,
                                  betas=ADAM_BETAS, foreach=False)
    assert fused.defaults["fused"] and {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.05}
    for step in range(3):
        for model, optimizer in ((fused_model, fused), (reference_model, reference)):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * group["lr_scale"]
            generator = torch.Generator().manual_seed(step)
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
    for (name, param), reference_param in zip(fused_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, reference_param, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("exp_avg", "exp_avg_sq"):
        for param, reference_param in zip(fused_model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(fused.state[param][key], reference.state[reference_param][key])
    reference.load_state_dict(fused.state_dict())
    fused.load_state_dict(reference.state_dict())
