import json

import pytest
import torch

from evadlab.config import ModelConfig
from evadlab.models import EVAD
from evadlab.models.flops import count_flops, count_parameters, flops_report


def meta_model(**config) -> EVAD:
    with torch.device("meta"):
        return EVAD(ModelConfig(**config).evad)


# The README / paper table (spec §7): whole detector at 16x288x288, batch 1, fvcore convention.
@pytest.mark.parametrize(
    ("config", "target_gflops"),
    [
        ({"variant": "vit_b", "keep_rate": 1.0}, 424.5),
        ({"variant": "vit_b", "keep_rate": 0.7}, 242.8),
        ({"variant": "vit_b", "keep_rate": 0.6, "enhanced_weight": 4.0}, 208.9),
        ({"variant": "vit_l", "keep_rate": 0.7}, 737.1),
    ],
    ids=["vit_b", "vit_b_ktp", "vit_b_ktp_ew", "vit_l_ktp"],
)
def test_published_gflops(config, target_gflops):
    gflops = count_flops(meta_model(**config)) / 1e9
    assert gflops == pytest.approx(target_gflops, rel=0.01)


def test_flops_report_fields_and_other_input_sizes():
    report = flops_report(ModelConfig(variant="vit_b", keep_rate=0.7).evad, (16, 256, 256))
    assert set(report) == {"gflops", "gflops_16x288x288", "params"}
    assert json.loads(json.dumps(report)) == report
    assert report["gflops"] == pytest.approx(182.3, rel=0.01)  # spec §7, 256x256
    assert report["gflops_16x288x288"] == pytest.approx(242.8, rel=0.01)
    assert isinstance(report["params"], int) and round(report["params"] / 1e6, 2) == 185.36


def test_parameter_counts_match_the_spec():
    assert round(count_parameters(meta_model(variant="vit_l", keep_rate=0.7)) / 1e6, 2) == 439.54


def test_real_weights_count_like_meta_ones_and_batch_scales_linearly():
    torch.manual_seed(0)
    model = EVAD(ModelConfig(variant="tiny").evad)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    single = count_flops(model, (16, 96, 128))
    assert model.training
    assert single == count_flops(meta_model(variant="tiny"), (16, 96, 128))
    assert count_flops(model, (16, 96, 128), batch=2) == 2 * single
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
