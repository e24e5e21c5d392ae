"""Build the configured EVAD and the weights it starts from; the one entry point that reads checkpoints.

``evaluate``, ``demo``, training from ``model.checkpoint`` / ``model.pretrained`` and the Ray actors all go through
:func:`starting_weights` (or :func:`open_checkpoint`), which reads each file once. The driver reads it; workers and
actors receive the weights through Ray's object store instead of reading the file again.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from evadlab import storage
from evadlab.config import MLFLOW_URI_PREFIXES, ConfigError, ExperimentConfig, ModelConfig, build_config
from evadlab.models import EVAD
from evadlab.models.checkpoints import Checkpoint, CheckpointError, load_evad_checkpoint, load_pretrained_backbone
from evadlab.models.checkpoints import read_checkpoint as read_checkpoint_file


@dataclass
class StartingWeights:
    """The weights a model starts from: a complete EVAD checkpoint, or (``backbone_only``) a VideoMAE backbone."""

    checkpoint: Checkpoint
    backbone_only: bool


def open_checkpoint(location: str, tracking_uri: str | None = None) -> Checkpoint:
    """Read a checkpoint once, with ``weights_only=True``, from a local path, a storage URI (``file://``, ``s3://``,
    ``gs://``, ... through pyarrow.fs) or an MLflow artifact URI (``runs:/<run_id>/<path>``, ``models:/...``, resolved
    with ``mlflow.artifacts.download_artifacts`` against ``tracking_uri``).

    Raises CheckpointError (one line naming ``location``) when it cannot be found or read, and, for an MLflow URI,
    TrackingError when ``tracking_uri`` is no store that can be read (an absent SQLite file, a file that is no
    database, a server that does not answer).
    """
    if location.startswith(MLFLOW_URI_PREFIXES):
        return _open_mlflow_artifact(location, tracking_uri)
    if storage.is_local(location):
        return read_checkpoint_file(storage.local_path(location), name=location)
    try:
        data = storage.read_bytes(location)
    except (FileNotFoundError, OSError) as error:
        raise CheckpointError(f"checkpoint {location} cannot be read: {error}") from None
    return read_checkpoint_file(io.BytesIO(data), name=location)


def _open_mlflow_artifact(location: str, tracking_uri: str | None) -> Checkpoint:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from evadlab.platform.tracking import check_tracking_uri

    if tracking_uri:
        # A reader: an absent SQLite file is refused, not created, and a file that is no database named as such.
        check_tracking_uri(tracking_uri, read_only=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_location(location, tracking_uri),
                                                             dst_path=folder, tracking_uri=tracking_uri))
        except (MlflowException, OSError) as error:
            message = " ".join(str(error).split())[:300]
            raise CheckpointError(f"checkpoint {location} cannot be downloaded from MLflow: {message}") from None
        if local.is_dir():
            # A logged model is a folder; its weights are the one checkpoint file inside.
            files = sorted(local.rglob("*.pt")) + sorted(local.rglob("*.pth"))
            if len(files) != 1:
                raise CheckpointError(f"{location} is a folder with {len(files)} checkpoint files, expected one")
            local = files[0]
        return read_checkpoint_file(local, name=location)


def artifact_location(location: str, tracking_uri: str | None) -> str:
    """A logged model's URI ``models:/<model_id>`` as the location of its files on ``tracking_uri``; any other URI as
    it is. MLflow itself looks a logged model up on its global tracking URI, not on the one a download names."""
    from mlflow.tracking import MlflowClient

    model_id = location.removeprefix("models:/")
    if not location.startswith("models:/") or "/" in model_id or not model_id.startswith("m-"):
        return location
    return MlflowClient(tracking_uri).get_logged_model(model_id).artifact_location


def complete_checkpoint(model_cfg: ModelConfig, checkpoint: str | None = None,
                        tracking_uri: str | None = None) -> StartingWeights | None:
    """``checkpoint``, else ``model.checkpoint``: a complete EVAD checkpoint (released or ours), read once; None when
    neither is given."""
    location = checkpoint or model_cfg.checkpoint
    return StartingWeights(open_checkpoint(location, tracking_uri), backbone_only=False) if location else None


def starting_weights(model_cfg: ModelConfig, tracking_uri: str | None = None) -> StartingWeights | None:
    """What training starts from: ``model.checkpoint`` (complete), else ``model.pretrained`` (a VideoMAE backbone),
    read once; None when the model starts from its initialisation."""
    complete = complete_checkpoint(model_cfg, tracking_uri=tracking_uri)
    if complete is None and model_cfg.pretrained:
        return StartingWeights(open_checkpoint(model_cfg.pretrained, tracking_uri), backbone_only=True)
    return complete


def build_model(model_cfg: ModelConfig, start: StartingWeights | None = None, device: str | torch.device = "cpu") -> EVAD:
    """The configured EVAD on ``device`` with its starting weights loaded (strictly for a complete checkpoint).
    On the ``meta`` device this only checks that the weights fit, at no memory cost. Raises CheckpointError."""
    with torch.device(device):
        model = EVAD(model_cfg.evad)
    with warnings.catch_warnings():
        # On the meta device a load only checks keys and shapes, and torch warns, once per tensor (hundreds of lines),
        # that copying into a meta parameter does nothing.
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter", category=UserWarning)
        if start is not None and start.backbone_only:
            load_pretrained_backbone(model, start.checkpoint)
        elif start is not None:
            load_evad_checkpoint(model, start.checkpoint)
    return model


def stored_config(checkpoint: Checkpoint) -> ExperimentConfig:
    """The experiment config an evadlab checkpoint carries. Raises CheckpointError for files that carry none
    (released EVAD files store a yacs config that evadlab does not read)."""
    text = checkpoint.config_text
    if text is None:
        raise CheckpointError(f"{checkpoint.source} carries no evadlab config (a released EVAD file?); "
                              f"pass --config experiments/<the model>.yaml")
    try:
        return build_config(yaml.safe_load(text), f"config stored in {checkpoint.source}")
    except (yaml.YAMLError, ConfigError) as error:
        raise CheckpointError(f"{checkpoint.source}: its stored config is not valid: {error}") from None
