"""Sweep files: what ``load_sweep`` refuses, in one line naming the key. The sweeps themselves (Ray Tune, MLflow,
resume, compare) run in ``test_sweeps.py``."""

import time
from pathlib import Path

import pytest
import yaml

from evadlab.config import ConfigError
from evadlab.sweep_config import load_sweep

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


@pytest.mark.parametrize(("change", "message"), [
    ({"search_space": {"model.keep_rat": {"grid": [0.5]}}},
     r"search_space: unknown key 'model.keep_rat' \(did you mean 'model.keep_rate'\?\)"),
    ({"overrides": {"train.epoch": 2}}, r"overrides: unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
    # A misspelt key of the sweep file itself is hinted from the sweep file's keys, not a config's.
    ({"warm_start": {"chekpoint": "base.pt"}},
     r"unknown key 'warm_start.chekpoint' \(did you mean 'warm_start.checkpoint'\?\)"),
    ({"trial_cpu": 0.1}, r"unknown key 'trial_cpu' \(did you mean 'trial_cpus'\?\)"),
    ({"search_space": {"model.keep_rate": {"gird": [0.5]}}},
     r"unknown key 'search_space.model.keep_rate.gird' \(did you mean 'search_space.model.keep_rate.grid'\?\)"),
    ({"base": "nope.yaml"}, r"sweep\.yaml: base: config file .*/nope\.yaml does not exist"),
    ({"search_space": {"model.keep_rate": {"grid": [0.5], "uniform": [0.1, 0.2]}}}, "exactly one of"),
    ({"search_space": {}}, r"'search_space': Dictionary should have at least 1 item"),
    # The name becomes the sweep's folder under train.storage_path.
    ({"name": "a/b"}, r"'name': must be letters, digits, '.', '_' or '-', .* got 'a/b'"),
    # A value of the sweep's overrides is named with the sweep file, where it was written.
    ({"overrides": {"train.batch_size": "four"}}, (r"sweep\.yaml \(its base .*quickstart\.yaml with the sweep's .*"
                                                  r"'train.batch_size'")),
])
def test_sweep_file_errors_name_the_key(tmp_path, change, message):
    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    text.update({key: {**text[key], **value} if key == "overrides" else value for key, value in change.items()})
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_an_experiment_config_given_as_a_sweep_file_is_named_so():
    with pytest.raises(ConfigError, match=r"quickstart\.yaml: an experiment config, not a sweep file"):
        load_sweep(EXPERIMENTS / "quickstart.yaml")


def test_a_sweep_file_without_its_search_space_names_the_key_alone(tmp_path):
    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    del text["search_space"]
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError) as refused:
        load_sweep(path)
    assert str(refused.value) == f"{path}: 'search_space': missing (a required key)"


@pytest.mark.parametrize(("dimension", "message"), [
    ({"grid": []}, "grid needs at least one value"),
    ({"choice": []}, "choice needs at least one value"),
    ({"uniform": [0.9, 0.1]}, r"uniform needs \[low, high\] with low < high, got \[0.9, 0.1\]"),
    ({"loguniform": [0.5, 0.5]}, r"loguniform needs \[low, high\] with low < high"),
    ({"grid": [0.5, 0.7, 0.5]}, r"grid repeats 0.5: each grid value is one trial"),
    ({"grid": [[1.0, 0.7], [1.0, 0.7]]}, r"grid repeats \[1.0, 0.7\]"),
])
def test_an_empty_reversed_or_repeating_search_dimension_is_refused(tmp_path, dimension, message):
    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"] = {"model.keep_rate": dimension}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ConfigError, match=rf"search_space.*model.keep_rate.*{message}"):
        load_sweep(path)


@pytest.mark.parametrize(("overrides", "printed"), [
    (["train.num_workers=1"], "2 trial(s) at a time: each needs 0.91 CPUs, the cluster has 2 CPUs free"),
    # Elastic trials are counted at their max, so that each gets its largest size on a whole cluster...
    (["train.num_workers=[1, 2]"], ("1 trial(s) at a time: each needs 1.41 CPUs at its largest, the cluster has 2 CPUs "
     "free; an elastic trial trains with the workers the cluster can place, from its min")),
    # ...and run one at a time, without waiting for CPUs to come free, when the cluster never holds their max.
    (["train.num_workers=[2, 8]"], ("1 trial(s) at a time: each needs 4.41 CPUs at its largest, the cluster has 2 CPUs "
     "free; an elastic trial trains with the workers the cluster can place, from its min")),
])
def test_trials_at_once_count_the_workers_an_elastic_trial_may_grow_to(tmp_path, ray_local, capsys, overrides, printed):
    from evadlab.platform.tune import concurrent_trials

    spec, base = load_sweep(write_sweep(tmp_path), ["tune.data_cpus=0.4", *overrides])
    started = time.monotonic()
    assert concurrent_trials(spec, base, tmp_path / 'sweep.yaml') == int(printed[0])
    assert time.monotonic() - started < 10 and capsys.readouterr().out.strip() == f"evadlab tune: {printed}"


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.num_workers=[4, 8]"], (r"one trial needs 2\.41 CPUs \(4 worker\(s\) x train\.cpus_per_worker=0\.5, "
     r"each worker on one node, "
     r"tune\.data_cpus=0\.4 for Ray Data, 0\.01 for its driver\) but the cluster has 2 CPUs: lower train\.num_workers")),
    (["train.resources_per_worker={gpu_node: 1}"], (r"one trial needs 0\.91 CPUs, 1 gpu_node .* but the cluster has "
     r"2 CPUs, 0 gpu_node: lower train.num_workers or train.cpus_per_worker, change train.resources_per_worker, or "
     r"add nodes")),
])
def test_a_trial_the_cluster_cannot_hold_is_refused_in_one_line(tmp_path, ray_local, overrides, message):
    from evadlab.platform.tune import concurrent_trials

    spec, base = load_sweep(write_sweep(tmp_path), ["tune.data_cpus=0.4", *overrides])
    with pytest.raises(ConfigError, match=message):
        concurrent_trials(spec, base, tmp_path / 'sweep.yaml')


def test_resources_are_counted_node_by_node_as_ray_places_each_worker_or_actor():
    """A worker, an actor or a task lives on one node: 6 CPUs on 3 nodes of 2 hold no 4-CPU worker."""
    from evadlab.ray_session import cluster_text, copies_that_fit

    nodes = [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0, "gpu_node": 1.0}]
    assert copies_that_fit(nodes, {"CPU": 4.0}) == 0
    assert copies_that_fit([{"CPU": 6.0}], {"CPU": 4.0}) == 1, "the same CPUs as one pool"
    assert copies_that_fit(nodes, {"CPU": 0.5}) == 12 and copies_that_fit(nodes, {"CPU": 1.5}) == 3
    assert copies_that_fit(nodes, {"CPU": 0.5, "GPU": 1.0}) == 1 and copies_that_fit(nodes, {"gpu_node": 1.0}) == 1
    assert copies_that_fit(nodes, {"CPU": 1.0, "other": 0.0}) == 6, "a need of 0 does not limit"
    assert copies_that_fit(nodes, {"CPU": 1.1 * 3 / 3.3}) == 6, "1.0000000000000002 CPUs: 2 on each node still"
    assert cluster_text(nodes, ["CPU", "GPU"]) == "6 CPUs, 1 GPU on 3 nodes, at most 2 CPUs, 1 GPU on one"
    assert cluster_text(nodes[:1], ["CPU"]) == "2 CPUs"


def test_a_search_space_value_the_cluster_cannot_hold_is_refused_before_the_sweep(tmp_path, ray_local):
    """Each value of the search space is a trial of its own: one that cannot fit stops the sweep before it starts."""
    from evadlab.platform.tune import concurrent_trials

    path = write_sweep(tmp_path)
    text = yaml.safe_load(path.read_text())
    text["search_space"] = {"train.num_workers": {"grid": [1, 64]}}
    path.write_text(yaml.safe_dump(text))
    spec, base = load_sweep(path, ["tune.data_cpus=0.4"])
    with pytest.raises(ConfigError, match=r"sweep\.yaml: search_space\.train\.num_workers = 64: one trial needs "
                                          r"32\.41 CPUs \(64 worker\(s\)"):
        concurrent_trials(spec, base, path)
