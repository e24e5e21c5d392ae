"""EVAD against reference numbers produced by the original EVAD code (tests/data/golden/*.pt).

Every check is driven by the fixture's own contents (batch size, clip sizes, keep rates, which intermediate
results it stores, ...), so any fixture file dropped into the golden folder runs through unchanged: a check whose
reference the fixture does not hold compares what is there, or is skipped with the missing entry named. Tolerances follow the golden
README: atol 1e-4 on logits and scores, 2e-3 px on boxes in the input frame, rtol 1e-5 on losses and
2e-3 on gradient norms; indices, masks and matchings must match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from evadlab.models import EVAD, EVADConfig, EVADTrace, boxes_to_original_frame

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
FIXTURE_PATHS = sorted(GOLDEN_DIR.glob("*.pt"))
assert FIXTURE_PATHS, f"no golden fixtures under {GOLDEN_DIR}"
PYRAMID_NAMES = ("p2", "p3", "p4", "p5")

LOGIT_ATOL = 1e-4
BOX_ATOL_PX = 2e-3
FEATURE_TOL = {"rtol": 1e-4, "atol": 1e-4}
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 2e-3

# Settings the implementation hard-codes. A fixture that changes one of them needs new code, not a pass.
FIXED_SETTINGS = {
    "ViT.TUBELET_SIZE": 2,
    "ViT.PATCH_SIZE": 16,
    "ViT.PRETRAIN_IMG_SIZE": 224,
    "ViT.QKV_BIAS": True,
    "ViT.INIT_VALUES": 0.0,
    "ViT.DROP_RATE": 0.0,
    "ViT.ATTN_DROP_RATE": 0.0,
    "ViT.USE_LEARNABLE_POS_EMB": False,
    "MODEL.CRD.MLP_RATIO": 4,
    "MODEL.CRD.DROP_RATE": 0.0,
    "MODEL.CRD.ATTN_DROP_RATE": 0.0,
    "MODEL.CRD.USE_LEARNABLE_POS_EMB": False,
    "MODEL.LOSS_FUNC": "bce",
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 2,
    "DETECTION.ROI_XFORM_RESOLUTION": 7,
    "DETECTION.SPATIAL_SCALE_FACTOR": 16,
    "MODEL.SparseRCNN.NUM_CLASSES": 1,
    "MODEL.SparseRCNN.DROPOUT": 0.0,
    "MODEL.SparseRCNN.ACTIVATION": "relu",
    "MODEL.SparseRCNN.DEEP_SUPERVISION": True,
    "MODEL.SparseRCNN.USE_FOCAL": False,
    "MODEL.SparseRCNN.NUM_ACT": 1,
    "MODEL.SparseRCNN.NUM_EVAL_ACT_CLASSES": 0,
    "fixed_in_code.FPN_STRIDES": [4, 8, 16, 32],
    "fixed_in_code.VIT_LAYERNORM_EPS": 1e-6,
    "fixed_in_code.CRD_LAYERNORM_EPS": 1e-6,
    "fixed_in_code.HEAD_LAYERNORM_EPS": 1e-5,
    "fixed_in_code.BBOX_DELTA_WEIGHTS": [2.0, 2.0, 1.0, 1.0],
    "fixed_in_code.SIZE_DIVISIBILITY": 32,
}


def golden_model_kwargs(fx_config: dict) -> dict:
    """Translate the fixture's flat yacs config into EVAD constructor arguments (the one place to swap for evadlab.config)."""
    return {
        "embed_dim": fx_config["ViT.EMBED_DIM"],
        "depth": fx_config["ViT.DEPTH"],
        "num_heads": fx_config["ViT.NUM_HEADS"],
        "mlp_ratio": float(fx_config["ViT.MLP_RATIO"]),
        "drop_path_rate": fx_config["ViT.DROP_PATH_RATE"],
        "fpn_indices": tuple(fx_config["ViT.FPN_INDICES"]),
        "keep_rates": [float(rate) for rate in fx_config["MODEL.KTP.KEEP_RATES"]],
        "enhanced_weight": float(fx_config["MODEL.KTP.ENHANCED_WEIGHT"]),
        "num_frames": fx_config["DATA.NUM_FRAMES"],
        "num_proposals": fx_config["MODEL.SparseRCNN.NUM_PROPOSALS"],
        "hidden_dim": fx_config["MODEL.SparseRCNN.HIDDEN_DIM"],
        "num_stages": fx_config["MODEL.SparseRCNN.NUM_HEADS"],
        "stage_num_heads": fx_config["MODEL.SparseRCNN.NHEADS"],
        "dim_feedforward": fx_config["MODEL.SparseRCNN.DIM_FEEDFORWARD"],
        "num_dynamic": fx_config["MODEL.SparseRCNN.NUM_DYNAMIC"],
        "dim_dynamic": fx_config["MODEL.SparseRCNN.DIM_DYNAMIC"],
        "num_cls_layers": fx_config["MODEL.SparseRCNN.NUM_CLS"],
        "num_reg_layers": fx_config["MODEL.SparseRCNN.NUM_REG"],
        "crd_embed_dim": fx_config["MODEL.CRD.EMBED_DIM"],
        "crd_depth": fx_config["MODEL.CRD.DEPTH"],
        "crd_num_heads": fx_config["MODEL.CRD.NUM_HEADS"],
        "crd_drop_path_rate": fx_config["MODEL.CRD.DROP_PATH_RATE"],
        "roi_extension": tuple(fx_config["MODEL.CRD.ROI_EXTENSION"]),
        "act_fc_dim": fx_config["MODEL.SparseRCNN.ACT_FC_DIM"],
        "num_actions": fx_config["MODEL.NUM_CLASSES"],
        "class_weight": fx_config["MODEL.SparseRCNN.CLASS_WEIGHT"],
        "l1_weight": fx_config["MODEL.SparseRCNN.L1_WEIGHT"],
        "giou_weight": fx_config["MODEL.SparseRCNN.GIOU_WEIGHT"],
        "action_weight": fx_config["MODEL.SparseRCNN.ACTION_WEIGHT"],
        "no_object_weight": fx_config["MODEL.SparseRCNN.NO_OBJECT_WEIGHT"],
        "person_threshold": fx_config["MODEL.SparseRCNN.PERSON_THRESHOLD"],
    }


def golden_targets(fx: dict) -> list[dict]:
    train = fx["train"]
    return [
        {"boxes": boxes, "actions": actions} for boxes, actions in zip(train["gt_boxes"], train["gt_actions"])
    ]


def build_golden_model(fx: dict, token_order: str) -> EVAD:
    model = EVAD(EVADConfig(**golden_model_kwargs(fx["config"]), token_order=token_order))
    model.load_state_dict({name: value.contiguous() for name, value in fx["state_dict"].items()}, strict=True)
    return model


@dataclass
class GoldenRun:
    fx: dict
    model: EVAD
    eval_trace: EVADTrace
    train_trace: EVADTrace
    grads: dict[str, Tensor | None]
    position_trace: EVADTrace


@pytest.fixture(scope="module", params=FIXTURE_PATHS, ids=[path.stem for path in FIXTURE_PATHS])
def run(request) -> GoldenRun:
    fx = torch.load(request.param, weights_only=True)
    model = build_golden_model(fx, token_order="released")
    model.eval()
    with torch.no_grad():
        eval_trace = model.forward_trace(fx["inputs"], record_intermediates=True)

    model.train()
    model.zero_grad(set_to_none=True)
    train_trace = model.forward_trace(fx["inputs"], golden_targets(fx))
    model.criterion.total(model.criterion.weighted(train_trace.losses.raw)).backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}

    position_model = build_golden_model(fx, token_order="position").eval()
    with torch.no_grad():
        position_trace = position_model.forward_trace(fx["inputs"])
    return GoldenRun(fx, model, eval_trace, train_trace, grads, position_trace)


def sort_by_nonkey_index(tokens: Tensor, nonkey_idx: Tensor) -> Tensor:
    """(B, Ns + n, C) tokens -> the same tokens with the non-key part ordered by ascending non-key index."""
    num_key = tokens.shape[1] - nonkey_idx.shape[1]
    order = nonkey_idx.argsort(dim=1)
    nonkey = tokens[:, num_key:].gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_key], nonkey], dim=1)


def reference(fx: dict, *keys: str):
    """The fixture entry at ``keys``; the calling check is skipped, naming the entry, when the fixture lacks it."""
    node = fx
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            pytest.skip(f"the fixture has no {'.'.join(keys[: depth + 1])}")
        node = node[key]
    return node


def assert_pyramid_close(pyramid: list[Tensor], expected: dict[str, Tensor]) -> None:
    """Compares the FPN levels the fixture stores (it may leave some out)."""
    stored = [name for name in PYRAMID_NAMES if name in expected]
    assert stored, "the fixture's fpn entry holds no level"
    for name, level in zip(PYRAMID_NAMES, pyramid, strict=True):
        if name in expected:
            torch.testing.assert_close(level, expected[name], **FEATURE_TOL, msg=name)


def as_list(values) -> list:
    """Fixture index lists may be stored as Python lists or as tensors."""
    return torch.as_tensor(values).tolist()


def assert_same_sets(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual.sort(dim=1).values, expected.sort(dim=1).values)


# ----------------------------------------------------------------------------------------------- setup


def test_fixture_uses_only_supported_settings(run):
    config = run.fx["config"]
    for key, expected in FIXED_SETTINGS.items():
        if key in config:
            assert config[key] == pytest.approx(expected), key


def test_state_dict_has_released_keys_and_no_position_tables(run):
    keys = list(run.model.state_dict())
    assert keys == list(run.fx["state_dict"])
    assert not any("pos_embed" in key for key in keys)


def test_batching_and_initial_boxes(run):
    fx, trace = run.fx, run.eval_trace
    torch.testing.assert_close(trace.images_whwh, fx["eval"]["images_whwh"], rtol=0, atol=0)
    assert tuple(trace.backbone.token_grid) == tuple(fx["token_grid"])
    torch.testing.assert_close(trace.init_boxes, fx["eval"]["init_boxes"], rtol=0, atol=BOX_ATOL_PX)


# ----------------------------------------------------------------------------------------------- backbone


def test_ktp_token_counts_and_kept_sets(run):
    expected, ktp = run.fx["eval"]["ktp"], run.eval_trace.backbone.ktp
    assert ktp.pruning_blocks == as_list(expected["pruning_blocks"])
    assert ktp.num_tokens_after_block == as_list(expected["num_tokens_after_block"])
    last_pruning = max(ktp.pruning_blocks, default=-1)
    for block, (actual, reference) in enumerate(
        zip(ktp.nonkey_idx_after_block, expected["nonkey_idx_after_block"], strict=True)
    ):
        if block >= last_pruning:
            # From the last pruning block on, the held order decides where the CRD places tokens: exact.
            assert torch.equal(actual, reference), f"block {block}"
        else:
            # Earlier orders only change rounding (the next pruning re-sorts); near ties may swap.
            assert_same_sets(actual, reference)
    assert torch.equal(ktp.dropped_mask, expected["dropped_mask"])


def test_ktp_scores(run):
    expected, ktp = run.fx["eval"]["ktp"], run.eval_trace.backbone.ktp
    for block in ktp.pruning_blocks:
        scores, incoming = ktp.scores[block], ktp.scores_input_nonkey_idx[block]
        reference_scores = expected["scores"][str(block)]
        reference_incoming = expected["scores_input_nonkey_idx"][str(block)]
        assert_same_sets(incoming, reference_incoming)
        torch.testing.assert_close(
            scores.gather(1, incoming.argsort(dim=1)),
            reference_scores.gather(1, reference_incoming.argsort(dim=1)),
            rtol=1e-4,
            atol=1e-8,
        )
        # The kept list is the top-k of the scores, in descending-score order ("released").
        num_kept = ktp.nonkey_idx_after_block[block].shape[1]
        top = scores.topk(num_kept, dim=1).indices
        assert torch.equal(incoming.gather(1, top), ktp.nonkey_idx_after_block[block])


def test_embedded_tokens(run):
    expected = reference(run.fx, "eval", "intermediates", "tokens_embed_pos")
    torch.testing.assert_close(run.eval_trace.backbone.embedded_tokens, expected, **FEATURE_TOL)


def test_block_outputs(run):
    expected = reference(run.fx, "eval", "intermediates", "block_tokens")
    backbone, reference_idx = run.eval_trace.backbone, run.fx["eval"]["ktp"]["nonkey_idx_after_block"]
    assert len(expected) == len(backbone.block_tokens)
    for block, tokens in enumerate(backbone.block_tokens):
        torch.testing.assert_close(
            sort_by_nonkey_index(tokens, backbone.ktp.nonkey_idx_after_block[block]),
            sort_by_nonkey_index(expected[block], reference_idx[block]),
            **FEATURE_TOL,
            msg=f"block {block}",
        )


def test_final_norm_tokens(run):
    expected = reference(run.fx, "eval", "intermediates", "tokens_final_norm")
    backbone, reference_idx = run.eval_trace.backbone, run.fx["eval"]["ktp"]["nonkey_idx_after_block"]
    torch.testing.assert_close(
        sort_by_nonkey_index(backbone.tokens, backbone.nonkey_idx),
        sort_by_nonkey_index(expected, reference_idx[-1]),
        **FEATURE_TOL,
    )


def test_fpn(run):
    assert_pyramid_close(run.eval_trace.pyramid, reference(run.fx, "eval", "intermediates", "fpn"))


# ----------------------------------------------------------------------------------------------- head


def test_localization_stages(run):
    expected = run.fx["eval"]["stages"]
    assert len(run.eval_trace.stages) == len(expected)
    for index, (stage, reference) in enumerate(zip(run.eval_trace.stages, expected)):
        torch.testing.assert_close(
            stage.input_boxes, reference["input_boxes"], rtol=0, atol=BOX_ATOL_PX, msg=f"stage {index}"
        )
        torch.testing.assert_close(
            stage.pred_logits, reference["pred_logits"], rtol=0, atol=LOGIT_ATOL, msg=f"stage {index}"
        )
        torch.testing.assert_close(
            stage.pred_boxes, reference["pred_boxes"], rtol=0, atol=BOX_ATOL_PX, msg=f"stage {index}"
        )
        if "proposal_features" in reference:
            torch.testing.assert_close(
                stage.proposal_features.reshape(-1, stage.proposal_features.shape[-1]),
                reference["proposal_features"].reshape(-1, stage.proposal_features.shape[-1]),
                **FEATURE_TOL,
            )


@pytest.mark.parametrize(("entry", "attribute", "tolerance"), [
    ("crd_roi_boxes", "roi_boxes", {"rtol": 0, "atol": BOX_ATOL_PX}),
    ("crd_grid", "grid", FEATURE_TOL),
    ("crd_input", "decoder_input", FEATURE_TOL),
])
def test_context_refinement_decoder_inputs(run, entry, attribute, tolerance):
    expected = reference(run.fx, "eval", "intermediates", entry)
    torch.testing.assert_close(getattr(run.eval_trace.classifier, attribute), expected, **tolerance)


def test_context_refinement_decoder_logits(run):
    classifier = run.eval_trace.classifier
    reference_logits = run.fx["eval"]["crd_action_logits"]
    assert len(classifier.action_logits) == len(reference_logits)
    for block, (logits, reference) in enumerate(zip(classifier.action_logits, reference_logits)):
        torch.testing.assert_close(logits, reference, rtol=0, atol=LOGIT_ATOL, msg=f"CRD block {block}")


def test_eval_forward_outputs(run):
    expected = run.fx["eval"]["outputs"]
    with torch.no_grad():
        outputs = run.model.eval()(run.fx["inputs"])
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"], rtol=0, atol=LOGIT_ATOL)
    torch.testing.assert_close(outputs["pred_boxes"], expected["pred_boxes"], rtol=0, atol=BOX_ATOL_PX)
    torch.testing.assert_close(outputs["pred_actions"], expected["pred_actions"], rtol=0, atol=LOGIT_ATOL)
    torch.testing.assert_close(outputs["images_whwh"], run.fx["eval"]["images_whwh"], rtol=0, atol=0)


def test_detections(run):
    fx, expected = run.fx, run.fx["eval"]["detections"]
    ori_sizes = [tuple(size) for size in fx["eval"]["meta"]["ori_sizes"]]
    detections = run.model.predict(fx["inputs"], ori_sizes)
    trace = run.eval_trace
    torch.testing.assert_close(
        trace.pred_logits.softmax(-1)[..., 0], expected["person_scores"], rtol=0, atol=LOGIT_ATOL
    )

    rows, action_scores = [], []
    for clip, (detection, selected) in enumerate(
        zip(detections, expected["selected_proposals"], strict=True)
    ):
        assert detection.proposal_indices.tolist() == as_list(selected), f"clip {clip}"
        torch.testing.assert_close(
            detection.person_scores, expected["person_scores"][clip, selected], rtol=0, atol=LOGIT_ATOL
        )
        rows.append(torch.cat([torch.full((len(detection.boxes), 1), float(clip)), detection.boxes], dim=1))
        action_scores.append(detection.action_scores)
        ori_height, ori_width = ori_sizes[clip]
        width, height = trace.images_whwh[clip, :2].tolist()
        torch.testing.assert_close(
            boxes_to_original_frame(trace.pred_boxes[clip], trace.images_whwh[clip], ori_sizes[clip]),
            expected["person_boxes"][clip],
            rtol=0,
            atol=BOX_ATOL_PX * max(ori_width / width, ori_height / height),
        )
    smallest_side = trace.images_whwh[:, :2].min().item()
    torch.testing.assert_close(torch.cat(rows), expected["boxes"], rtol=0, atol=BOX_ATOL_PX / smallest_side)
    torch.testing.assert_close(torch.cat(action_scores), expected["action_scores"], rtol=0, atol=LOGIT_ATOL)


# ----------------------------------------------------------------------------------------------- training


def test_train_forward_matches_eval(run):
    if not run.fx["train"].get("forward_outputs_equal_eval", False):
        pytest.skip("the fixture's training forward differs from eval (stochastic layers)")
    train, evaluated = run.train_trace, run.eval_trace
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            train.backbone.ktp.nonkey_idx_after_block, evaluated.backbone.ktp.nonkey_idx_after_block
        )
    )
    for stage_train, stage_eval in zip(train.stages, evaluated.stages):
        torch.testing.assert_close(stage_train.pred_logits, stage_eval.pred_logits, rtol=0, atol=LOGIT_ATOL)
        torch.testing.assert_close(stage_train.pred_boxes, stage_eval.pred_boxes, rtol=0, atol=BOX_ATOL_PX)
    for logits_train, logits_eval in zip(train.classifier.action_logits, evaluated.classifier.action_logits):
        torch.testing.assert_close(logits_train, logits_eval, rtol=0, atol=LOGIT_ATOL)


def test_matching(run):
    expected = run.fx["train"]["matching"]
    matches = run.train_trace.losses.matches
    assert len(matches) == len(expected)
    for stage, stage_matches in enumerate(matches):
        for clip, (match, reference) in enumerate(
            zip(stage_matches, expected[f"stage_{stage}"], strict=True)
        ):
            where = f"stage {stage} clip {clip}"
            assert match.pred_indices.tolist() == as_list(reference["pred_indices"]), where
            assert match.gt_indices.tolist() == as_list(reference["gt_indices"]), where
            torch.testing.assert_close(
                match.cost_matrix, torch.as_tensor(reference["cost_matrix"]), rtol=1e-5, atol=1e-4, msg=where
            )


def test_losses(run):
    expected, criterion = run.fx["train"], run.model.criterion
    raw = run.train_trace.losses.raw
    assert criterion.loss_names == list(expected["loss_keys"])
    assert len(criterion.loss_names) == expected["num_loss_terms"]
    assert criterion.loss_weights == pytest.approx(expected["loss_weights"])
    weighted = criterion.weighted(raw)
    for name in criterion.loss_names:
        assert raw[name].item() == pytest.approx(expected["loss_raw"][name], rel=LOSS_RTOL), name
        assert weighted[name].item() == pytest.approx(expected["loss_weighted"][name], rel=LOSS_RTOL), name
    total = criterion.total(weighted)
    assert total.item() == pytest.approx(float(expected["loss_total"]), rel=LOSS_RTOL)


def test_forward_returns_weighted_losses_in_training(run):
    run.model.train()
    with torch.no_grad():
        losses = run.model(run.fx["inputs"], golden_targets(run.fx))
    expected = run.fx["train"]
    assert list(losses) == ["loss", *expected["loss_keys"]]
    assert losses["loss"].item() == pytest.approx(float(expected["loss_total"]), rel=LOSS_RTOL)
    for name in expected["loss_keys"]:
        assert losses[name].item() == pytest.approx(expected["loss_weighted"][name], rel=LOSS_RTOL), name


def test_gradient_norms_of_every_parameter(run):
    expected = run.fx["train"]["grad_norms"]
    assert set(run.grads) == set(expected)
    for name, grad in run.grads.items():
        assert grad is not None, f"{name} got no gradient"
        assert grad.norm().item() == pytest.approx(float(expected[name]), rel=GRAD_NORM_RTOL), name
    for name, full_grad in run.fx["train"].get("grads", {}).items():
        torch.testing.assert_close(
            run.grads[name],
            full_grad,
            rtol=GRAD_NORM_RTOL,
            atol=GRAD_NORM_RTOL * full_grad.abs().max().item(),
            msg=name,
        )


# ----------------------------------------------------------------------------------------------- token order


def test_position_order_keeps_the_localization_branch(run):
    """Holding kept tokens by position changes only the CRD (golden README §5): kept sets, FPN, stages and
    person scores stay those of the released order."""
    fx, trace = run.fx, run.position_trace
    ktp = trace.backbone.ktp
    assert ktp.num_tokens_after_block == as_list(fx["eval"]["ktp"]["num_tokens_after_block"])
    for actual, reference in zip(
        ktp.nonkey_idx_after_block, fx["eval"]["ktp"]["nonkey_idx_after_block"], strict=True
    ):
        assert_same_sets(actual, reference)
        assert torch.equal(actual, actual.sort(dim=1).values), (
            "position order holds tokens by ascending index"
        )
    assert torch.equal(ktp.dropped_mask, fx["eval"]["ktp"]["dropped_mask"])
    fpn = fx["eval"].get("intermediates", {}).get("fpn")
    if fpn:
        assert_pyramid_close(trace.pyramid, fpn)
    for stage, reference in zip(trace.stages, fx["eval"]["stages"], strict=True):
        torch.testing.assert_close(stage.pred_logits, reference["pred_logits"], rtol=0, atol=LOGIT_ATOL)
        torch.testing.assert_close(stage.pred_boxes, reference["pred_boxes"], rtol=0, atol=BOX_ATOL_PX)
    person_scores = trace.pred_logits.softmax(-1)[..., 0]
    torch.testing.assert_close(
        person_scores, fx["eval"]["detections"]["person_scores"], rtol=0, atol=LOGIT_ATOL
    )
