"""The one checkpoint entry point: local paths, file:// URIs and MLflow runs:/ URIs read the same file the same
way, the model.checkpoint fallback, and the config an evadlab checkpoint carries."""

from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from evadlab.config import load_config
from evadlab.models.checkpoints import CheckpointError, save_training_checkpoint
from evadlab.platform.modeling import build_model, complete_checkpoint, open_checkpoint, stored_config

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(QUICKSTART, ["model.act_fc_dim=64"])
    torch.manual_seed(3)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("modeling") / "model.pt"
    save_training_checkpoint(path, model_state=model.state_dict(), optimizer_state={}, epoch=4,
                             config_yaml=yaml.safe_dump(cfg.model_dump(mode="json")), extra={"mAP": 0.5})
    return cfg, model, path


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_paths_file_uris_and_mlflow_runs_give_the_same_checkpoint(trained, mlflow_server):
    cfg, model, path = trained
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment("modeling_test"))
    client.log_artifact(run.info.run_id, str(path), "checkpoints")
    for location in (str(path), f"file://{path}", f"runs:/{run.info.run_id}/checkpoints/model.pt"):
        checkpoint = open_checkpoint(location, tracking_uri=mlflow_server)
        assert checkpoint.source == location and checkpoint.epoch == 4 and checkpoint.extra == {"mAP": 0.5}
        assert_same_weights(checkpoint.weights, model.state_dict())
        assert stored_config(checkpoint).model.evad == cfg.model.evad
    with pytest.raises(CheckpointError, match=f"runs:/{run.info.run_id}/checkpoints/absent.pt cannot be downloaded"):
        open_checkpoint(f"runs:/{run.info.run_id}/checkpoints/absent.pt", tracking_uri=mlflow_server)


def test_model_checkpoint_is_the_fallback_and_must_fit(trained, tmp_path):
    cfg, model, path = trained
    assert complete_checkpoint(cfg.model) is None
    configured = load_config(QUICKSTART, ["model.act_fc_dim=64", f"model.checkpoint={path}"])
    start = complete_checkpoint(configured.model)
    assert start is not None and start.checkpoint.source == str(path) and not start.backbone_only
    assert_same_weights(build_model(configured.model, start).state_dict(), model.state_dict())
    # The quickstart's own width differs: caught on the meta device, before anything is allocated.
    with pytest.raises(CheckpointError, match="does not fit the configured model: .*act_module"):
        build_model(load_config(QUICKSTART).model, start, device="meta")


def test_a_released_file_carries_no_evadlab_config(trained, tmp_path):
    _, model, _ = trained
    released = tmp_path / "EVAD_released.pth"
    torch.save({"epoch": 11, "model_state": model.state_dict(), "cfg": "TRAIN:\n  ENABLE: True\n"}, released)
    with pytest.raises(CheckpointError, match="carries no evadlab config .*pass --config"):
        stored_config(open_checkpoint(str(released)))


def test_checking_the_fit_on_the_meta_device_prints_nothing(trained, recwarn):
    """The check runs before every train and evaluate; torch would warn once per tensor that a meta copy does
    nothing."""
    cfg, _, path = trained
    start = complete_checkpoint(load_config(QUICKSTART, ["model.act_fc_dim=64", f"model.checkpoint={path}"]).model)
    build_model(cfg.model, start, device="meta")
    assert [str(warning.message) for warning in recwarn] == []
