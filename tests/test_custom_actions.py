"""A custom vocabulary of 5 actions end to end: synthetic data with its own label map, prepare, one epoch of Ray Train
with evaluation, Ray Data evaluation. ``model.num_actions`` sets the targets, the heads, the detections and the
id check of prepare; a label map the model cannot score is refused when the config is loaded."""

from pathlib import Path

import numpy as np
import pytest
import torch

from evadlab.config import ConfigError, load_config
from evadlab.models.checkpoints import load_training_checkpoint
from evadlab.pipelines.ava import read_boxes_csv, read_label_map
from evadlab.pipelines.clips import iter_shard_rows
from evadlab.pipelines.prepare import prepare
from evadlab.pipelines.synthetic import generate_mini_ava
from evadlab.platform.evaluate import evaluate
from evadlab.platform.train import train

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
CUSTOM_LABELS = {1: "stand", 2: "walk", 3: "sit", 4: "talk to someone", 5: "watch a person"}
pytestmark = pytest.mark.slow


def test_five_custom_actions_prepare_train_and_evaluate(tmp_path, ray_local):
    root = tmp_path / "custom"
    summary = generate_mini_ava(root, videos=3, seconds=6, seed=1, width=128, height=96, label_map=CUSTOM_LABELS)
    assert set(summary["action_ids"]) <= set(CUSTOM_LABELS) and len(summary["action_ids"]) >= 3
    assert read_label_map(root / "annotations" / "ava_action_list_v2.2_for_activitynet_2019.pbtxt") == CUSTOM_LABELS
    overrides = [f"data.root={root}", f"data.shards={tmp_path / 'shards'}", f"train.storage_path={tmp_path / 'ray'}",
                 f"output_dir={tmp_path / 'runs'}", "train.epochs=1", "train.batch_size=2", "eval.every_epochs=1",
                 "train.num_workers=1", "train.cpus_per_worker=0.5", "model.act_fc_dim=64", "tracking.enabled=false"]
    with pytest.raises(ConfigError, match="'model.num_actions' is 4, but the label map .* lists action id 5"):
        load_config(QUICKSTART, [*overrides, "model.num_actions=4"])
    cfg = load_config(QUICKSTART, [*overrides, "model.num_actions=5"])

    prepared = prepare(cfg)
    assert prepared.rejected == []
    stored_ids = {action for row in iter_shard_rows(cfg.data.shards_path, "train") for box in row["actions"]
                  for action in box}
    assert stored_ids <= set(CUSTOM_LABELS)

    trained = train(cfg)
    assert trained.metrics["val/mAP"] == pytest.approx(trained.metrics["val/mAP"])  # a number, not NaN
    state = load_training_checkpoint(trained.checkpoint_path)["model_state"]
    heads = [key for key in state if key.endswith("action_logits.weight")]
    assert heads and all(state[key].shape[0] == 5 for key in heads)

    result = evaluate(cfg, trained.checkpoint_path, out_dir=tmp_path / "evaluation")
    assert set(result.per_class_named) == set(CUSTOM_LABELS.values()) and 0.0 <= result.mAP <= 1.0
    detections = read_boxes_csv(result.detections_path, is_detection=True)
    assert set(np.unique(detections["class_id"].to_numpy())) <= set(CUSTOM_LABELS)
    assert torch.isfinite(torch.tensor(result.mAP))
