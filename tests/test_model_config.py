"""EVADConfig: presets, per-block keep rates, validation naming the field, and the user-facing ModelConfig built
from it (same fields, same defaults, one resolved EVADConfig)."""

import dataclasses
import subprocess
import sys

import pytest

from evadlab.config import ExperimentConfig, ModelConfig
from evadlab.models import VARIANTS, EVADConfig, EVADConfigError


@pytest.mark.parametrize(
    ("preset", "depth", "pruning_blocks"),
    [(EVADConfig.vit_b, 12, (3, 6, 9)), (EVADConfig.vit_l, 24, (6, 12, 18)), (EVADConfig.tiny, 4, (1, 2))],
)
def test_presets_apply_a_scalar_keep_rate_at_their_pruning_blocks(preset, depth, pruning_blocks):
    config = preset(keep_rate=0.7)
    assert len(config.keep_rates) == config.depth == depth
    assert config.pruning_blocks == pruning_blocks
    assert all(config.keep_rates[block] == 0.7 for block in pruning_blocks)
    assert config.keep_rate_label == "0.7"
    assert preset().pruning_blocks == () and preset().keep_rate_label == "1.0"


def test_defaults_are_the_released_vit_b_and_vit_l_differs_where_the_paper_says():
    assert EVADConfig() == EVADConfig.vit_b()
    vit_l = EVADConfig.vit_l()
    assert (vit_l.embed_dim, vit_l.depth, vit_l.num_heads, vit_l.fpn_indices) == (1024, 24, 16, (5, 11, 17, 23))
    assert (vit_l.crd_depth, vit_l.action_weight) == (12, 6.0)


def test_explicit_keep_rates_win_and_are_labelled_per_block():
    config = EVADConfig.tiny(keep_rate=0.7, keep_rates=[1, 0.7, 0.6, 1])
    assert config.keep_rates == (1.0, 0.7, 0.6, 1.0)
    assert config.pruning_blocks == (1, 2)
    assert config.keep_rate_label == "[1.0, 0.7, 0.6, 1.0]"
    assert EVADConfig.tiny(keep_rate=0.5, pruning_blocks=[3]).keep_rates == (1.0, 1.0, 1.0, 0.5)


def test_config_is_frozen_and_hashable():
    config = EVADConfig.tiny(fpn_indices=[0, 1, 2, 3])
    assert config.fpn_indices == (0, 1, 2, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 2
    assert hash(config) == hash(EVADConfig.tiny())


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: EVADConfig.tiny(keep_rate=1.5), "keep_rate"),
        (lambda: EVADConfig.tiny(keep_rate=0.5, pruning_blocks=[4]), "pruning_blocks"),
        (lambda: EVADConfig.tiny(keep_rates=[1, 0.5]), "keep_rates"),
        (lambda: EVADConfig(drop_path_rate=1.0), "drop_path_rate"),
        (lambda: EVADConfig(person_threshold=-0.1), "person_threshold"),
        (lambda: EVADConfig(embed_dim=100), "embed_dim"),
        (lambda: EVADConfig(roi_extension=(0.4, -0.2)), "roi_extension"),
        (lambda: EVADConfig.from_variant("vit_h"), "variant"),
    ],
)
def test_errors_name_the_field(build, field):
    with pytest.raises(EVADConfigError) as error:
        build()
    assert error.value.field == field
    assert field in str(error.value)


def test_model_config_declares_exactly_the_evad_fields_with_their_defaults():
    for setting in dataclasses.fields(EVADConfig):
        assert setting.name in ModelConfig.model_fields
        if setting.name != "keep_rates":
            assert ModelConfig.model_fields[setting.name].default == setting.default, setting.name
    conveniences = {"variant", "keep_rate", "pruning_blocks", "keep_rates", "pretrained", "checkpoint"}
    assert set(ModelConfig.model_fields) == {setting.name for setting in dataclasses.fields(EVADConfig)} | conveniences


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_config_resolves_the_same_config_as_the_preset(variant):
    model = ModelConfig(variant=variant, keep_rate=0.6, enhanced_weight=4.0)
    assert model.evad == EVADConfig.from_variant(variant, keep_rate=0.6, enhanced_weight=4.0)
    assert model.pruning_blocks == list(VARIANTS[variant].pruning_blocks)
    assert ModelConfig.model_validate(model.model_dump(mode="json")).evad == model.evad


def test_per_block_keep_rates_reach_the_resolved_config():
    cfg = ExperimentConfig.model_validate({"model": {"variant": "tiny", "keep_rates": [1, 0.5, 0.5, 1]}})
    assert cfg.model.evad.keep_rates == (1.0, 0.5, 0.5, 1.0)
    assert cfg.model.evad.keep_rate_label == "0.5"


def test_user_config_loads_without_torch_and_models_without_ray_or_mlflow():
    code = (
        "import sys\n"
        "import evadlab.config\n"
        "assert 'torch' not in sys.modules, 'evadlab.config imported torch'\n"
        "import evadlab.models.checkpoints, evadlab.models.evad, evadlab.models.flops\n"
        "heavy = sorted({name.split('.')[0] for name in sys.modules} & {'ray', 'mlflow'})\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
