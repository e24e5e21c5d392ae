"""MLflow: one run per training job (child runs for sweep trials), logged from rank 0 only.

Everything goes through an explicit ``MlflowClient`` and run id rather than MLflow's global active run,
so a Ray worker on any node can log into a run that the driver created.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from evadlab.config import ExperimentConfig, TrackingError

# Tags that make the MLflow compare view show the EVAD trade-off without any configuration.
TRADE_OFF_TAGS = ("evadlab.keep_rate", "evadlab.enhanced_weight", "evadlab.gflops")
MAX_PARAM_LENGTH = 6000


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at start, not hours later: an HTTP server must answer its health check."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered {response.status} to /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server at {uri} is unreachable ({exc}). Start one with "
                f"'mlflow server --host 0.0.0.0 --port 5000' or set tracking.uri to a reachable server."
            ) from None
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def trade_off_tags(cfg: ExperimentConfig, gflops: float | None = None) -> dict[str, str]:
    """The run's trade-off tags; the keep rate is the label of the rates the model really uses (per-block
    ``model.keep_rates`` included), not the scalar ``model.keep_rate``."""
    evad = cfg.model.evad
    tags = {"evadlab.keep_rate": evad.keep_rate_label, "evadlab.enhanced_weight": str(evad.enhanced_weight),
            "evadlab.variant": cfg.model.variant}
    if gflops is not None:
        tags["evadlab.gflops"] = f"{gflops:.1f}"
    return tags


def start_run(cfg: ExperimentConfig, *, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run of a job with the flattened config as params; returns its id."""
    uri = cfg.tracking.resolved_uri()
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment_name)
    all_tags = {"mlflow.runName": run_name, **trade_off_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    RunLogger(uri, run.info.run_id).log_params(cfg.flat())
    return run.info.run_id


@dataclass
class RunLogger:
    """Logs into one existing MLflow run; cheap to pickle into Ray workers."""

    uri: str
    run_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [mlflow.entities.Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        items = [mlflow.entities.Metric(k, float(v), int(1000 * time.time()), step)
                 for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_bytes(self, data: bytes, name: str) -> None:
        """``data`` as the artifact ``name`` at the run's artifact root."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_artifact(path)

    def log_text(self, text: str, name: str) -> None:
        self.log_bytes(text.encode("utf-8"), name)

    def log_figure(self, figure, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            figure.savefig(path, dpi=110, bbox_inches="tight")
            self.log_artifact(path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def metric_history(self, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]


def per_class_ap_csv(per_class: dict[str, float | None]) -> str:
    """CSV text with the header ``class,ap`` and one row per class (AP with 6 decimals, empty where the class has
    none), quoted as the csv module quotes, so that any class name reads back."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["class", "ap"])
    writer.writerows([name, "" if ap is None else f"{ap:.6f}"] for name, ap in per_class.items())
    return text.getvalue()


def log_per_class_ap(logger: RunLogger, per_class: dict[str, float | None], prefix: str = "") -> None:
    """Per-class AP as a CSV and a bar chart, for the MLflow artifact view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logger.log_text(per_class_ap_csv(per_class), f"{prefix}per_class_ap.csv")
    scored = [(name, ap) for name, ap in per_class.items() if ap is not None]
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(scored)), 4))
    axis.bar([name for name, _ in scored], [ap for _, ap in scored], color="tab:blue")
    axis.set_ylabel("AP@0.5")
    axis.set_ylim(0, 1)
    axis.tick_params(axis="x", labelrotation=90, labelsize=7)
    figure.tight_layout()
    logger.log_figure(figure, f"{prefix}per_class_ap.png")
    plt.close(figure)
