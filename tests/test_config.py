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
        # A section is no hint for a key.
        ("train.lr=0.1", "unknown key 'train.lr' (did you mean 'train.base_lr'?)"),
        ("model.keep_rate=1.5", "'model.keep_rate'"),
        ("model.keep_rate=0", "'model.keep_rate'"),
        ("train.batch_size=-2", "'train.batch_size'"),
        ("train.epochs=three", "'train.epochs'"),
        ("model.keep_rates=[1, 1.2, 1, 1]", "'model.keep_rates'"),
        ("model.keep_rates=[1, 0.5]", "keep_rates has 2 entries but depth is 4"),
        ("eval.iou=0.7", "'eval.iou'"),
        ("train.epochs", "not of the form key=value"),
        # Strict types: YAML's true is no number and 1 no boolean (lax pydantic would take 1.0 and True).
        ("model.keep_rate=true", "'model.keep_rate': Input should be a valid number (got True)"),
        ("model.fpn_indices=[0, 1, true, 3]", "'model.fpn_indices.2': Input should be a valid integer (got True)"),
        ("train.amp=1", "'train.amp': Input should be a valid boolean (got 1)"),
        ("data.flip_prob=false", "'data.flip_prob': Input should be a valid number (got False)"),
        ("train.epochs=2.5", "'train.epochs': Input should be a valid integer (got 2.5)"),
        ("model.roi_extension={x: 0.4, x: 0.2}", "line 1: key 'x' appears twice in one mapping (first on line 1)"),
        # YAML's .inf and .nan are typos, never settings.
        ("train.base_lr=.inf", "'train.base_lr': Input should be a finite number (got inf)"),
        ("train.cpus_per_worker=.inf", "'train.cpus_per_worker': Input should be a finite number (got inf)"),
        ("data.video_offset_sec=.nan", "'data.video_offset_sec': Input should be a finite number (got nan)"),
        ("train.lr_steps=[24, 0]", "'train': lr_steps must start at epoch 0 and increase, got [24.0, 0.0]"),
        ("train.lr_steps=[-5, 24]", "'train': lr_steps must start at epoch 0 and increase, got [-5.0, 24.0]"),
        ("train.lr_factors=[1.0, -0.1]", "'train': lr_factors must be positive, got [1.0, -0.1]"),
        ("data.num_frames=8", "config: data.num_frames (8) must be model.num_frames (16): the clips are the model's"),
        ("name=a/b", ("'name': must be letters, digits, '.', '_' or '-', not starting with '.' (a folder name), "
                     "got 'a/b'")),
        ("name=../etc", "'name': must be letters"),
        # numpy's generators take no negative seeds: refused here, not in a training worker.
        ("train.seed=-1", "'train.seed': Input should be greater than or equal to 0 (got -1)"),
        ("data.synth_seed=-3", "'data.synth_seed': Input should be greater than or equal to 0 (got -3)"),
        ("name=''", "'name': must be letters"),
        # An empty folder key would silently mean the working directory (data.shards='' means its documented default).
        ("train.storage_path=", "'train.storage_path': must name a folder, not be empty (got '')"),
        ("data.root=", "'data.root': must name a folder, not be empty (got '')"),
        ("output_dir=' '", "'output_dir': must name a folder, not be empty (got ' ')"),
        ("train.num_workers=[2, 1]", ("'train.num_workers': must be >= 1, a range [min, max] with 1 <= min <= max "
                                     "(got [2, 1])")),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert message in str(err.value)


def test_a_section_given_as_a_mapping_sets_its_keys_and_keeps_the_others():
    """``train={epochs: 2}`` (or ``train: {epochs: 2}`` in a sweep's overrides) is ``train.epochs=2``: the quickstart's
    batch size, learning rate and precision stay, where replacing the section reset them to the defaults."""
    quickstart = load_config(QUICKSTART)
    cfg = load_config(QUICKSTART, ["train={epochs: 2, lr_steps: [0, 1]}", "train.lr_factors=[1.0, 0.5]",
                                   "train.resources_per_worker={slot: 1}"])
    assert cfg.train.epochs == 2 and cfg.train.lr_steps == [0, 1] and cfg.train.lr_factors == [1.0, 0.5]
    assert (cfg.train.batch_size, cfg.train.base_lr, cfg.train.amp) == \
        (quickstart.train.batch_size, quickstart.train.base_lr, quickstart.train.amp) == (4, 1.0e-4, False)
    assert cfg.model == quickstart.model
    # A mapping-valued key is a value, not a section: it is replaced whole.
    assert load_config(QUICKSTART, ["train.resources_per_worker={a: 1}", "train.resources_per_worker={b: 2}"]
                       ).train.resources_per_worker == {"b": 2}
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'train.epochs'\?\)"):
        load_config(QUICKSTART, ["train={epoch: 2}"])


def test_unsafe_yaml_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize(("content", "message"), [
    (b"name: x\ntrain:\n  epochs: 3\n - bad\n", ("line 4, column 2: invalid YAML: while parsing a block mapping; "
                                                "expected <block end>, but found '<block sequence start>'")),
    (b"# nothing but a comment\n", "the file is empty (a config needs at least its name)"),
    (b"name: \xff\n", "not UTF-8 text (byte 6: invalid start byte)"),
    (b"- name: x\n", "the top level must be a mapping of sections"),
])
def test_a_config_file_that_is_no_config_is_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "experiment.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(tmp_path)


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


def test_whole_numbers_stay_numbers_and_lists_stay_tuples():
    cfg = load_config(QUICKSTART, ["model.keep_rate=1", "data.video_offset_sec=0", "model.roi_extension=[1, 0]"])
    assert cfg.model.keep_rate == 1.0 and cfg.data.video_offset_sec == 0.0 and cfg.model.roi_extension == (1.0, 0.0)


def test_a_duplicated_yaml_key_is_named_with_its_lines(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("name: dup\nmodel:\n  variant: tiny\n  keep_rate: 0.7\n  token_order: position\n"
                      "  keep_rate: 0.5\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"{config}: invalid YAML: line 6: key 'keep_rate' appears twice in one mapping (first on line 4)"
    # The same key in two mappings is no duplicate; a merge key may still be overridden.
    config.write_text("name: ok\ntrain: {epochs: 1}\neval: {every_epochs: 1}\n")
    assert load_config(config).train.epochs == 1


def test_a_config_saved_with_a_bom_and_crlf(tmp_path):
    config = tmp_path / "windows.yaml"
    config.write_bytes(b"\xef\xbb\xbf" + b"name: windows\r\ntrain:\r\n  epochs: 2\r\n")
    cfg = load_config(config)
    assert cfg.name == "windows" and cfg.train.epochs == 2


def test_a_label_map_id_above_num_actions_is_refused_at_load(tmp_path):
    annotations = tmp_path / "ava" / "annotations"
    annotations.mkdir(parents=True)
    (annotations / "labels.pbtxt").write_text("1: stand\n2: walk\n7: sit\n")
    overrides = [f"data.root={tmp_path / 'ava'}", "data.label_map=labels.pbtxt"]
    assert load_config(QUICKSTART, [*overrides, "model.num_actions=7"]).model.num_actions == 7
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [*overrides, "model.num_actions=5"])
    assert str(err.value) == (f"{QUICKSTART}: 'model.num_actions' is 5, but the label map {annotations / 'labels.pbtxt'}"
                              f" ('data.label_map') lists action id 7: set model.num_actions to at least 7")
    (annotations / "labels.pbtxt").write_text("1: stand\nwalk\n")
    with pytest.raises(ConfigError, match="'data.label_map': .*labels.pbtxt:2: expected 'id: name'"):
        load_config(QUICKSTART, overrides)


@pytest.mark.parametrize(("uri", "expected"), [
    ("sqlite:///tracking/mlflow.db", "sqlite:///{cwd}/tracking/mlflow.db"),
    ("sqlite:////data/mlflow.db", "sqlite:////data/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("", "sqlite:///{cwd}/mlflow.db"),
])
def test_a_relative_sqlite_tracking_uri_means_the_working_folder_wherever_it_is_used(tmp_path, monkeypatch, uri,
                                                                                     expected):
    """The URI goes to Ray workers and into MLflow backlogs that may be replayed from another folder."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, [f"tracking.uri={uri}"])
    assert cfg.tracking.uri == cfg.tracking.resolved_uri() == expected.format(cwd=tmp_path.resolve())
