"""The keep rate a run is tagged and compared with is the one its model really uses, per-block rates included.
No Ray, no tracking server: the tags and the compare row are built from the config and stand-in runs."""

from types import SimpleNamespace

from evadlab.config import ExperimentConfig
from evadlab.platform.compare import format_table, trade_off_table
from evadlab.platform.tracking import trade_off_tags


def finished_run(run_id: str, tags: dict[str, str], params: dict[str, str], gflops: float, mean_ap: float):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id),
        data=SimpleNamespace(tags=tags, params=params, metrics={"model/gflops": gflops, "val/mAP": mean_ap}),
    )


def test_per_block_keep_rates_label_the_tags_and_the_compare_row():
    cfg = ExperimentConfig.model_validate({"model": {"variant": "tiny", "keep_rates": [1, 0.7, 0.6, 1]}})
    assert cfg.model.keep_rate == 1.0, "the scalar default is not what the model uses"
    tags = trade_off_tags(cfg, gflops=1.23)
    assert tags["evadlab.keep_rate"] == "[1.0, 0.7, 0.6, 1.0]"
    assert tags["evadlab.gflops"] == "1.2"

    params = {key: str(value) for key, value in cfg.flat().items()}
    (row,) = trade_off_table([finished_run("a", tags, params, 1.2, 0.3)])
    assert row["keep_rate"] == "[1.0, 0.7, 0.6, 1.0]"
    assert "[1.0, 0.7, 0.6, 1.0]" in format_table([row])


def test_scalar_keep_rate_label_equals_the_logged_param():
    for keep_rate in (1.0, 0.7):
        cfg = ExperimentConfig.model_validate({"model": {"variant": "tiny", "keep_rate": keep_rate}})
        assert trade_off_tags(cfg)["evadlab.keep_rate"] == str(cfg.flat()["model.keep_rate"])


def test_runs_without_the_tag_fall_back_to_the_param():
    (row,) = trade_off_table([finished_run("old", {}, {"model.keep_rate": "0.7", "model.enhanced_weight": "1.0"},
                                           2.0, 0.1)])
    assert row["keep_rate"] == "0.7" and row["enhanced_weight"] == 1.0
