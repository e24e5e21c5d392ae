"""Sweep files: what ``load_sweep`` refuses, in one line naming the key. The sweeps themselves (Ray Tune, MLflow,
resume, compare) run in ``test_sweeps.py``."""

from pathlib import Path

import pytest
import yaml

from evadlab.config import ConfigError
from evadlab.platform.tune import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write_sweep(folder: Path) -> Path:
    """A valid sweep file of two quickstart trials; the tests below break one key of it."""
    sweep = {
        "name": "tiny_sweep",
        "base": str(EXPERIMENTS / "quickstart.yaml"),
        "search_space": {"model.keep_rate": {"grid": [1.0, 0.4]}},
        "overrides": {"data.root": str(folder), "data.shards": str(folder / "shards"),
                      "train.storage_path": f"file://{folder / 'ray'}", "output_dir": str(folder / "runs"),
                      "train.epochs": 1, "train.cpus_per_worker": 0.5, "model.act_fc_dim": 64,
                      "name": "sweep_test"},
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_file_errors_name_the_key(tmp_path):
    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"]["model.keep_rat"] = {"grid": [0.5]}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="model.keep_rat"):
        load_sweep(path)
    text["search_space"] = {"model.keep_rate": {"grid": [0.5], "uniform": [0.1, 0.2]}}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_sweep(path)


@pytest.mark.parametrize(("dimension", "message"), [
    ({"grid": []}, "grid needs at least one value"),
    ({"choice": []}, "choice needs at least one value"),
    ({"uniform": [0.9, 0.1]}, r"uniform needs \[low, high\] with low < high, got \[0.9, 0.1\]"),
    ({"loguniform": [0.5, 0.5]}, r"loguniform needs \[low, high\] with low < high"),
])
def test_an_empty_or_reversed_search_dimension_is_refused(tmp_path, dimension, message):
    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"] = {"model.keep_rate": dimension}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=rf"search_space.*model.keep_rate.*{message}"):
        load_sweep(path)
