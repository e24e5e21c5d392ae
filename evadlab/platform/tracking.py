"""MLflow: one run per training job (child runs for sweep trials), logged from rank 0 only.

Everything goes through an explicit ``MlflowClient`` and run id rather than MLflow's global active run,
so a Ray worker on any node can log into a run that the driver created. Commands check the server before any work
(:func:`check_tracking_uri`); once a job runs, it does not depend on the server staying up: see :class:`RunLogger`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.tracking import MlflowClient

from evadlab import storage
from evadlab.config import ExperimentConfig, TrackingError

# Tags that make the MLflow compare view show the EVAD trade-off without any configuration.
TRADE_OFF_TAGS = ("evadlab.keep_rate", "evadlab.enhanced_weight", "evadlab.gflops")
MAX_PARAM_LENGTH = 6000
# What a run could not send while its server was away: JSON lines in the run folder, artifact copies beside them.
BACKLOG_FILE = "mlflow_backlog.jsonl"
BACKLOG_ARTIFACTS = "mlflow_backlog_artifacts"
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
METRICS_PER_BATCH = 1000


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
    """Create the MLflow run of a job with the flattened config as params; returns its id. Raises TrackingError when
    the server does not answer."""
    uri = cfg.tracking.resolved_uri()
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    all_tags = {"mlflow.runName": run_name, **trade_off_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        with quick_http():
            experiment = client.get_experiment_by_name(cfg.experiment_name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment_name)
            run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    except Exception as error:
        if not is_outage(error):
            raise
        raise TrackingError(f"MLflow tracking server at {uri} stopped answering ({short_reason(error)})") from None
    RunLogger(uri, run.info.run_id).log_params(cfg.flat())
    return run.info.run_id


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """MLflow's HTTP settings for the duration of a call, unless the user set them: one quick retry and a 10 s timeout
    instead of MLflow's 7 retries with exponential back-off (about 4 minutes against a server that is down)."""
    chosen = {name: value for name, value in HTTP_SETTINGS.items() if name not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


def is_outage(error: BaseException) -> bool:
    """The server could not be reached, did not answer in time or failed (5xx, 429): worth a retry later. A refusal
    (another 4xx, e.g. a param logged twice with two values) is an answer, not an outage."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, RestException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(error, (MlflowException, requests.RequestException, OSError, TrackingError))


def send_records(client: MlflowClient, records: list[dict[str, Any]]) -> None:
    """Sends backlog records (see :class:`RunLogger`) of one kind and run: metrics in one batch, the others one by
    one. Logging the same record twice changes nothing (MLflow keeps a metric once per key, step, time and value)."""
    first = records[0]
    run_id, kind = first["run_id"], first["kind"]
    if kind == "metrics":
        metrics = [mlflow.entities.Metric(key, value, record["timestamp"], record["step"])
                   for record in records for key, value in record["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
        return
    for record in records:
        if kind == "params":
            items = [mlflow.entities.Param(key, value) for key, value in record["params"].items()]
            for start in range(0, len(items), 100):
                client.log_batch(run_id, params=items[start:start + 100])
        elif kind == "tags":
            client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in record["tags"].items()])
        elif kind == "artifact":
            client.log_artifact(run_id, record["path"], record["artifact_path"])
        else:
            client.set_terminated(run_id, record["status"], end_time=record["end_time"])


def record_groups(records: list[dict[str, Any]]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(index of the first, records)`` in order, consecutive metric records of one run merged into batches of up
    to ``METRICS_PER_BATCH`` values (a long outage holds thousands of step records)."""
    start = 0
    while start < len(records):
        end, values = start + 1, len(records[start].get("metrics", ()))
        while (records[start]["kind"] == "metrics" and end < len(records) and records[end]["kind"] == "metrics"
               and records[end]["run_id"] == records[start]["run_id"]
               and values + len(records[end]["metrics"]) <= METRICS_PER_BATCH):
            values += len(records[end]["metrics"])
            end += 1
        yield start, records[start:end]
        start = end


def read_backlog(file: Path) -> list[dict[str, Any]]:
    """The records of a backlog file; a last line cut short by a crash is left out."""
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{file}: line {number} is not a JSON record") from None
    return records


def send_backlog(file: Path, uri: str | None = None) -> tuple[int, BaseException | None]:
    """Sends a backlog file's records in order (to ``uri``, else the server each record names). Records sent leave
    the file (and their artifact copies are removed); the file goes once empty. Returns how many were sent and the
    outage that stopped the rest (None when all went)."""
    records = read_backlog(file)
    for start, group in record_groups(records):
        try:
            with quick_http():
                send_records(MlflowClient(uri or group[0]["uri"]), group)
        except Exception as error:
            if not is_outage(error):
                raise
            storage.write_text(file, "".join(json.dumps(record) + "\n" for record in records[start:]))
            return start, error
        for record in group:
            if record["kind"] == "artifact":
                shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)
    file.unlink()
    shutil.rmtree(file.parent / BACKLOG_ARTIFACTS, ignore_errors=True)
    return len(records), None


def replay_backlog(location: str | Path, tracking_uri: str | None = None) -> int:
    """``evadlab tracking replay``: sends a backlog (the file, or the run folder that holds it) to its MLflow server,
    or to ``tracking_uri``; returns the number of records sent. Raises FileNotFoundError without a backlog,
    TrackingError when the server does not answer (what was not sent stays)."""
    file = Path(location) / BACKLOG_FILE if Path(location).is_dir() else Path(location)
    if not file.is_file():
        raise FileNotFoundError(f"no MLflow backlog at {location} (expected a {BACKLOG_FILE} or a run folder with one)")
    records = read_backlog(file)
    for uri in {tracking_uri} if tracking_uri else {record["uri"] for record in records}:
        check_tracking_uri(uri)
    sent, outage = send_backlog(file, tracking_uri)
    if outage is not None:
        raise TrackingError(f"the MLflow server stopped answering after {sent} of {len(records)} records "
                            f"({short_reason(outage)}); the rest stay in {file}: replay it again")
    return sent


def short_reason(error: BaseException) -> str:
    """The gist of a connection error: MLflow's messages embed whole URLs and retry histories."""
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass
class RunLogger:
    """Logs into one existing MLflow run; cheap to pickle into Ray workers.

    With a ``backlog`` folder (the run folder), logging survives a tracking server that goes away: a record that
    cannot be sent is appended to ``<backlog>/mlflow_backlog.jsonl`` (an artifact is copied beside it, under
    ``mlflow_backlog_artifacts/``), the job goes on, a warning is printed once per outage, and the first call
    ``retry_s`` seconds later sends the backlog, in order, before its own record. :meth:`finish` tries a last time and
    says how to replay what is left. Without a backlog, an unreachable server raises TrackingError.
    """

    uri: str
    run_id: str
    backlog: str | None = None
    retry_s: float = 30.0
    _retry_at: float = field(default=0.0, init=False, repr=False)
    _down: bool = field(default=False, init=False, repr=False)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    @property
    def backlog_file(self) -> Path | None:
        return Path(self.backlog) / BACKLOG_FILE if self.backlog else None

    def log_params(self, params: dict[str, Any]) -> None:
        self._send({"kind": "params", "params": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if values:
            self._send({"kind": "metrics", "metrics": values, "step": int(step), "timestamp": now_ms()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

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
        self._send({"kind": "end", "status": status, "end_time": now_ms()})

    def metric_history(self, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]

    def _send(self, record: dict[str, Any]) -> None:
        """Sends one record, after the backlog; keeps it in the backlog while the server is away."""
        record = {"uri": self.uri, "run_id": self.run_id, **record}
        if self.backlog and self.backlog_file.exists() and not self.flush():
            self._keep(record)
            return
        try:
            with quick_http():
                send_records(self.client, [record])
        except Exception as error:
            if not is_outage(error):
                raise
            if not self.backlog:
                raise TrackingError(f"MLflow tracking server at {self.uri} stopped answering "
                                    f"({short_reason(error)})") from None
            self._keep(record)
            self._went_away(error)

    def _keep(self, record: dict[str, Any]) -> None:
        """Appends a record to the backlog; an artifact's file is copied first (it is usually a temporary)."""
        file = self.backlog_file
        file.parent.mkdir(parents=True, exist_ok=True)
        if record["kind"] == "artifact":
            copy = file.parent / BACKLOG_ARTIFACTS / uuid.uuid4().hex / Path(record["path"]).name
            copy.parent.mkdir(parents=True)
            shutil.copy2(record["path"], copy)
            record = {**record, "path": str(copy)}
        with open(file, "a") as backlog:
            backlog.write(json.dumps(record) + "\n")

    def _went_away(self, error: BaseException) -> None:
        self._retry_at = time.time() + self.retry_s
        if not self._down:
            self._down = True
            print(f"evadlab: warning: MLflow server at {self.uri} does not answer ({short_reason(error)}); the job "
                  f"goes on, its records are kept in {self.backlog_file} and sent when the server answers again "
                  f"(tried every {self.retry_s:g} s)", file=sys.stderr, flush=True)

    def flush(self, force: bool = False) -> bool:
        """Sends the backlog when it is due (or ``force``); True when nothing is left to send."""
        file = self.backlog_file
        if file is None or not file.exists():
            return True
        if not force and time.time() < self._retry_at:
            return False
        sent, outage = send_backlog(file)
        if outage is not None:
            self._went_away(outage)
            return False
        self._down = False
        print(f"evadlab: MLflow server at {self.uri} answers: {sent} kept records sent", file=sys.stderr, flush=True)
        return True

    def finish(self) -> None:
        """A last try to send the backlog; when the server is still away, says how to send it later."""
        if not self.flush(force=True):
            print(f"evadlab: warning: MLflow server at {self.uri} did not come back; the run's records are kept "
                  f"in {self.backlog_file}: send them with `evadlab tracking replay {self.backlog_file}` once it "
                  f"answers", file=sys.stderr, flush=True)


def now_ms() -> int:
    return int(1000 * time.time())


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
