from pathlib import Path

import pytest

from evadlab.config import ConfigError, ExperimentConfig, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
QUICKSTART = EXPERIMENTS / "quickstart.yaml"


def test_overrides_are_yaml_scalars_and_reach_nested_keys():
    cfg = load_config(QUICKSTART, ["data.root=/mnt/ava", "train.epochs=3", "model.roi_extension=[0.5, 0.25]",
                                   "train.amp=true", "train.grad_clip=1e-1"])
    assert cfg.data.root == "/mnt/ava"
    assert cfg.train.epochs == 3
    assert cfg.model.roi_extension == (0.5, 0.25)
    assert cfg.train.amp is True
    assert cfg.train.grad_clip == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.keep_rat=0.5", "unknown key 'model.keep_rat' (did you mean 'model.keep_rate'?)"),
        ("modle.depth=2", "unknown key 'modle.depth' (did you mean 'model.depth'?)"),
        ("model.keep_rate=1.5", "'model.keep_rate'"),
        ("model.keep_rate=0", "'model.keep_rate'"),
        ("train.batch_size=-2", "'train.batch_size'"),
        ("train.epochs=three", "'train.epochs'"),
        ("model.keep_rates=[1, 1.2, 1, 1]", "'model.keep_rates'"),
        ("model.keep_rates=[1, 0.5]", "keep_rates has 2 entries but depth is 4"),
        ("eval.iou=0.7", "'eval.iou'"),
        ("train.epochs", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert message in str(err.value)


def test_unsafe_yaml_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_keep_rate_is_applied_at_the_variant_pruning_blocks():
    vit_b = ExperimentConfig.model_validate({"model": {"variant": "vit_b", "keep_rate": 0.7}}).model
    assert list(vit_b.evad.keep_rates) == [1, 1, 1, 0.7, 1, 1, 0.7, 1, 1, 0.7, 1, 1]
    vit_l = ExperimentConfig.model_validate({"model": {"variant": "vit_l", "keep_rate": 0.7}}).model
    assert [i for i, r in enumerate(vit_l.evad.keep_rates) if r < 1] == [6, 12, 18]
    assert vit_l.action_weight == 6.0 and vit_l.crd_depth == 12
    assert ExperimentConfig().model.evad.pruning_blocks == ()


def test_explicit_values_win_over_the_variant_preset():
    model = ExperimentConfig.model_validate({"model": {"variant": "vit_b", "depth": 6, "fpn_indices": [1, 2, 3, 5],
                                                       "pruning_blocks": [2]}}).model
    assert model.depth == 6 and model.embed_dim == 768


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
