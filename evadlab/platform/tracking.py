"""MLflow: one run per training job (child runs for sweep trials), logged from rank 0 only.

Everything goes through an explicit ``MlflowClient`` and run id rather than MLflow's global active run,
so a Ray worker on any node can log into a run that the driver created. Commands check the server before any work
(:func:`check_tracking_uri`); once a job runs, it does not depend on the server staying up: see :class:`RunLogger`.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.error
import urllib.parse
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
from evadlab.config import ExperimentConfig, TrackingError, sqlite_database_path

# Tags that make the MLflow compare view show the EVAD trade-off without any configuration.
TRADE_OFF_TAGS = ("evadlab.keep_rate", "evadlab.enhanced_weight", "evadlab.gflops")
MAX_PARAM_LENGTH = 6000
# What a run could not send while its server was away: JSON lines in the run folder, artifact copies beside them.
BACKLOG_FILE = "mlflow_backlog.jsonl"
BACKLOG_ARTIFACTS = "mlflow_backlog_artifacts"
# The stores MLflow 3 tracks runs in that evadlab accepts: a tracking server, a database (SQLAlchemy's schemes, whose
# driver may follow a '+': postgresql+psycopg2), Databricks. MLflow's file store is in maintenance mode.
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
# What a backlog record may log (see RunLogger._send and send_records).
BACKLOG_RECORD_KINDS = ("params", "metrics", "inputs", "model", "tags", "artifact", "end")
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
METRICS_PER_BATCH = 1000
# The saved view evadlab keeps in every experiment it logs to: the runs table and charts of the EVAD trade-off.
VIEW_KEY = "evadlab"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# A logged model carries the id of the backlog record that created it, so that sending the record twice creates it once.
MODEL_RECORD_TAG = "evadlab.record_id"
MODEL_TYPE = "evad-checkpoint"
# A table every MLflow tracking database has.
MLFLOW_TABLE = "experiments"


def check_tracking_uri(uri: str, timeout_s: float = 5.0, *, read_only: bool = False) -> None:
    """Fail at start, not hours later: an HTTP server must answer its health check; a SQLite database must open, or
    its folder be writable for a new one (unless ``read_only``: then the file must exist, as a reader finds nothing
    in a new one); other schemes must be a store MLflow 3 writes to (:data:`TRACKING_SCHEMES`). Raises TrackingError
    naming the URI."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        raise TrackingError(
            f"tracking.uri {uri!r} is no MLflow tracking store evadlab can use: give a server (http://host:port) or a "
            f"database (sqlite:///path/mlflow.db, postgresql://..., mysql://..., mssql://...); MLflow keeps its file "
            f"store ('./mlruns', file://) in maintenance mode only")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server at {uri} answered {response.status} to /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server at {uri} is unreachable ({exc}). Start one with "
                f"'mlflow server --host 127.0.0.1 --port 5000' (for a cluster, on a host every node reaches, behind an "
                f"authenticating proxy: the server has no login of its own) or set tracking.uri to a reachable server."
            ) from None
    elif (database := sqlite_database_path(uri)) is not None:
        check_sqlite_database(database, uri, read_only)


def check_sqlite_database(path: Path, uri: str, read_only: bool) -> None:
    """Opens the SQLite database at ``path`` (of ``uri``) read-only when it exists: it must hold MLflow's tables, or
    none at all for a writer (an empty file MLflow may fill), never another program's. A new one is not created
    here, nor its folder: the folder is checked to be writable (:func:`start_run` creates it, and MLflow the database
    with the first run), so that a command refused by a later check leaves no empty database or folder behind.
    Raises TrackingError naming the file. See :func:`check_tracking_uri`."""
    if read_only and not path.is_file():
        raise TrackingError(f"no MLflow database at {path} (tracking.uri {uri}): check the path")
    try:
        if not path.exists():
            storage.require_writable_folder(path.parent, "its folder")
            return
        # Read-only: MLflow would write its whole schema into any database it opens, another program's included.
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as database:
            tables = {row[0] for row in database.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except (OSError, sqlite3.Error) as error:
        raise TrackingError(f"cannot open the MLflow database {path} (tracking.uri {uri}): {error}") from None
    if MLFLOW_TABLE not in tables and (read_only or tables):
        held = f"tables {', '.join(sorted(tables))}" if tables else "no tables"
        raise TrackingError(f"{path} is no MLflow database ({held}; tracking.uri {uri}): check the path")


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
    """Create the MLflow run of a job with the flattened config as params (its name as the tag
    ``evadlab.config_name``) in the experiment of the config, which gets evadlab's saved view; returns the run's id.
    Raises TrackingError when the server does not answer."""
    uri = cfg.tracking.resolved_uri()
    check_tracking_uri(uri)
    if (database := sqlite_database_path(uri)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)  # MLflow creates a new database but not its folder
    client = MlflowClient(uri)
    all_tags = {"mlflow.runName": run_name, "evadlab.config_name": cfg.name, **trade_off_tags(cfg), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        with quick_http():
            experiment_id = experiment_with_view(client, cfg.experiment_name)
            run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    except Exception as error:
        if not is_outage(error):
            raise
        raise TrackingError(f"MLflow tracking server at {uri} stopped answering ({short_reason(error)})") from None
    # The config's name is a tag, not a param: it differs for every sweep trial, and MLflow's compare view plots the
    # params that differ between the runs (the first three by name), which are then the swept keys.
    RunLogger(uri, run.info.run_id).log_params({key: value for key, value in cfg.flat().items() if key != "name"})
    return run.info.run_id


def experiment_with_view(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name`` (created when missing), which gets (again) evadlab's saved view."""
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    client.set_experiment_tag(experiment_id, VIEW_TAG, saved_view())
    return experiment_id


def saved_view() -> str:
    """evadlab's saved view of an experiment's runs (the envelope MLflow's UI writes for a view it saves): the
    trade-off columns (Models, mAP, GFLOPs, clips/s, keep rate, enhanced weight), sorted by the final mAP
    (which also lists a sweep's trials flat instead of folded under their parent), and the charts val/mAP over
    steps, mAP against GFLOPs and the parallel coordinates of keep rate, enhanced weight, GFLOPs and mAP."""
    section = "evadlab-trade-off"
    common = {"runsCountToCompare": 100, "metricSectionId": section, "deleted": False, "isGenerated": False}
    charts = [
        {**common, "uuid": "evadlab-pcp", "type": "PARALLEL", "showAllRuns": True,
         "selectedParams": ["model.keep_rate", "model.enhanced_weight"],
         "selectedMetrics": ["model/gflops", "val/mAP"]},
        {**common, "uuid": "evadlab-scatter", "type": "SCATTER", "xaxis": {"key": "model/gflops", "type": "METRIC"},
         "yaxis": {"key": "val/mAP", "type": "METRIC"}},
        {**common, "uuid": "evadlab-val-map", "type": "LINE", "metricKey": "val/mAP", "selectedMetricKeys": ["val/mAP"],
         "xAxisKey": "step", "xAxisScaleType": "linear", "scaleType": "linear", "lineSmoothness": 0,
         "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False,
         "useGlobalXaxisKey": True, "useGlobalLineSmoothing": True,
         "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}},
        {**common, "uuid": "evadlab-best-map", "type": "BAR", "metricKey": "best/mAP"},
    ]
    state = {
        "searchFilter": "", "orderByKey": "metrics.`val/mAP`", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        # Without the Dataset column (MLflow's default view has it), which would take a third of a laptop's screen
        # and push the trade-off out of sight.
        "selectedColumns": ["attributes.`Models`", "metrics.`val/mAP`", "metrics.`best/mAP`", "metrics.`model/gflops`",
                            "metrics.`train/clips_per_s`", "params.`model.keep_rate`", "params.`model.enhanced_weight`"],
        "columnOrder": [], "columnWidths": {}, "runsHiddenMode": "SHOW_ALL", "groupBy": None,
        "compareRunCharts": charts,
        "compareRunSections": [{"uuid": section, "name": "EVAD trade-off", "display": True, "isReordered": False,
                                "deleted": False, "isGenerated": False}],
        "hideEmptyCharts": True, "useGroupedValuesInCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    # Fixed times: setting the view again leaves it as it was.
    return json.dumps({"name": "evadlab: mAP vs GFLOPs", "createdAt": 0, "updatedAt": 0, "state": json.dumps(state)})


def dashboard_lines(uri: str, experiment_id: str, run_id: str | None = None) -> list[str]:
    """How to see a run, or an experiment, in the MLflow UI: the command that serves a local store, and the page of
    the training view (``workflowType=machine_learning``; MLflow 3 opens on its GenAI view) with evadlab's saved
    view of the experiment's runs."""
    if uri.startswith(("http://", "https://")):
        base, lines = uri.rstrip("/"), []
    else:
        base, lines = "http://127.0.0.1:5000", [f"mlflow ui --backend-store-uri {uri}"]
    lines.append(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                 f"&viewStateShareKey={VIEW_KEY}")
    if run_id:
        lines.append(f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning")
    return lines


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
        elif kind == "inputs":
            client.log_inputs(run_id, datasets=[dataset_input(entry) for entry in record["datasets"]])
        elif kind == "model":
            send_logged_model(client, record)
        else:
            client.set_terminated(run_id, record["status"], end_time=record["end_time"])


def shard_datasets(cfg: ExperimentConfig, manifest: dict[str, Any], contexts: dict[str, str]) -> list[dict[str, Any]]:
    """The prepared shards of each split in ``contexts`` (split -> ``training`` or ``evaluation``) as a dataset record
    for :meth:`RunLogger.log_datasets`: named ``<data root's name>/<split>``; its digest the first 12 hex digits of the
    SHA-256 of what the manifest says of the split (clip spec, source files, keyframes per video), so the same shards
    have the same digest in every run; its source the split's shard folder; its profile the keyframes and videos of
    the split and the keyframes of every split."""
    records = []
    for split, context in contexts.items():
        described = {"clip_spec": manifest["clip_spec"], "split": split, "videos": manifest["videos"][split],
                     # A file's modification time says when it was copied, not what it holds.
                     "sources": {key: {field: value for field, value in record.items() if field != "modified_ns"}
                                 for key, record in manifest["sources"]["videos"].items()
                                 if key.startswith(f"{split}/")}}
        digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
        profile = {"keyframes": manifest["counts"][split], "videos": len(manifest["videos"][split]),
                   "clip_spec": manifest.get("clip_spec_name", ""), "keyframes_per_split": manifest["counts"]}
        records.append({"name": f"{cfg.data.root_path.name}/{split}", "digest": digest, "source_type": "local",
                        "source": json.dumps({"uri": str(cfg.data.shards_path / split)}),
                        "profile": json.dumps(profile), "context": context})
    return records


def dataset_input(entry: dict[str, Any]) -> mlflow.entities.DatasetInput:
    """A dataset record (``name``, ``digest``, ``source_type``, ``source``, ``profile``, ``context``) as MLflow's
    input of a run; the context (``training``, ``evaluation``) is the badge the UI shows beside the dataset."""
    dataset = mlflow.entities.Dataset(name=entry["name"], digest=entry["digest"], source_type=entry["source_type"],
                                      source=entry["source"], profile=entry["profile"])
    return mlflow.entities.DatasetInput(dataset, tags=[mlflow.entities.InputTag("mlflow.data.context",
                                                                                entry["context"])])


def send_logged_model(client: MlflowClient, record: dict[str, Any]) -> None:
    """Creates the logged model of a model record (see :meth:`RunLogger.log_model`): its files, params and tags, READY,
    an output of the run at the record's step, with the record's metrics. A model of the same name and run made by
    an earlier record is deleted (a newer best model replaces the older); one this record made already is kept."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run_id = record["run_id"]
    experiment_id = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        if model.tags.get(MODEL_RECORD_TAG) == record["record_id"] and model.status == LoggedModelStatus.READY:
            return
        if model.name == record["name"]:
            client.delete_logged_model(model.model_id)
    model = client.create_logged_model(experiment_id, name=record["name"], source_run_id=run_id,
                                       tags={**record["tags"], MODEL_RECORD_TAG: record["record_id"]},
                                       params=record["params"], model_type=MODEL_TYPE)
    client.log_model_artifacts(model.model_id, record["path"])
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, record["step"])])
    # The run logged these values already, at the same step and time: MLflow keeps them once in the run's history
    # and adds them to the model's metrics.
    metrics = [mlflow.entities.Metric(key, value["value"], value["timestamp"], value["step"], model_id=model.model_id)
               for key, value in record["metrics"].items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def experiment_of(uri: str, run_id: str) -> str:
    """The id of the experiment that holds ``run_id``."""
    with quick_http():
        return MlflowClient(uri).get_run(run_id).info.experiment_id


def logged_models_of(uri: str, experiment_id: str, run_id: str) -> dict[str, str]:
    """The run's logged models, name -> ``models:/<model_id>`` (oldest first); empty without a run or when the server
    does not answer (the models may still wait in the run's backlog)."""
    if not run_id:
        return {}
    try:
        with quick_http():
            models = MlflowClient(uri).search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    except Exception as error:
        if not is_outage(error):
            raise
        return {}
    return {model.name: f"models:/{model.model_id}" for model in sorted(models, key=lambda m: m.creation_timestamp)}


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
    """The records of a backlog file; a last line cut short by a crash (the start of a JSON object) is left out.
    Raises ValueError naming the file (and line) for an empty file, one whose only line is cut short, and anything
    else that is not a record :class:`RunLogger` writes, so that a file that is no backlog is never taken for an
    empty one (and removed)."""
    try:
        lines = [line for line in file.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not an MLflow backlog (not text)") from None
    if not lines:
        raise ValueError(f"{file}: empty, not an MLflow backlog (evadlab removes a backlog once it is sent)")
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and line.startswith('{"'):
                break
            raise ValueError(f"{file}: line {number} is not an MLflow backlog record (a JSON object)") from None
        if not (isinstance(record, dict) and record.get("kind") in BACKLOG_RECORD_KINDS
                and isinstance(record.get("uri"), str) and isinstance(record.get("run_id"), str)):
            raise ValueError(f"{file}: line {number} is not an MLflow backlog record (one with a uri, a run_id and a "
                             f"kind of {', '.join(BACKLOG_RECORD_KINDS)})")
        records.append(record)
    if not records:
        raise ValueError(f"{file}: line 1 is not an MLflow backlog record (it is cut short, and no record is whole)")
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
            if record["kind"] in ("artifact", "model"):
                shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)
    file.unlink()
    shutil.rmtree(file.parent / BACKLOG_ARTIFACTS, ignore_errors=True)
    return len(records), None


def replay_backlog(location: str | Path, tracking_uri: str | None = None) -> int:
    """``evadlab tracking replay``: sends a backlog (the file, or the run folder that holds it) to its MLflow server,
    or to ``tracking_uri``; returns the number of records sent. Raises FileNotFoundError without a backlog,
    ValueError for a file that is not one or names a run the store does not hold (it is kept), TrackingError when the
    server does not answer or a SQLite store does not exist (what was not sent stays)."""
    file = Path(location) / BACKLOG_FILE if Path(location).is_dir() else Path(location)
    if not file.is_file():
        raise FileNotFoundError(f"no MLflow backlog at {location} (expected a {BACKLOG_FILE} or a run folder with one)")
    records = read_backlog(file)
    runs = {(tracking_uri or record["uri"], record["run_id"]) for record in records}
    for uri in sorted({uri for uri, _ in runs}):
        check_tracking_uri(uri, read_only=True)
    for uri, run_id in sorted(runs):
        require_run(uri, run_id, file)
    sent, outage = send_backlog(file, tracking_uri)
    if outage is not None:
        raise TrackingError(f"the MLflow server stopped answering after {sent} of {len(records)} records "
                            f"({short_reason(outage)}); the rest stay in {file}: replay it again")
    return sent


def require_run(uri: str, run_id: str, file: Path) -> None:
    """Raises ValueError naming the backlog ``file`` when the store at ``uri`` answers that it holds no run
    ``run_id``: a backlog replayed to the wrong server, which is no outage to wait out."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        with quick_http():
            MlflowClient(uri).get_run(run_id)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        raise ValueError(f"{file}: its run {run_id} does not exist at {uri}: replay it to the tracking server of "
                         f"that run (--tracking-uri)") from None


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

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp: int | None = None) -> None:
        """``metrics`` at ``step`` (see the x-axis convention in the README), at ``timestamp`` (ms; default now).
        None and non-finite values are left out."""
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if values:
            self._send({"kind": "metrics", "metrics": values, "step": int(step),
                        "timestamp": now_ms() if timestamp is None else int(timestamp)})

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Dataset inputs of the run (see :func:`dataset_input` for the fields of each); logging one again changes
        nothing."""
        self._send({"kind": "inputs", "datasets": datasets})

    def log_model(self, folder: str | Path, name: str, *, step: int, params: dict[str, Any], tags: dict[str, str],
                  metrics: dict[str, dict[str, float]]) -> None:
        """The files of ``folder`` as the run's logged model ``name`` (``models:/<model_id>``), output at ``step``;
        ``metrics`` maps a key to the ``value``, ``step`` and ``timestamp`` the run logged it with (the model shares
        those points). A later model of the same name replaces it (see :func:`send_logged_model`)."""
        self._send({"kind": "model", "path": str(folder), "name": name, "step": int(step),
                    "params": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()},
                    "tags": {k: str(v) for k, v in tags.items()}, "metrics": metrics, "record_id": uuid.uuid4().hex})

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
        """Appends a record to the backlog; an artifact's file, or a model's folder, is copied first (it is usually a
        temporary)."""
        file = self.backlog_file
        file.parent.mkdir(parents=True, exist_ok=True)
        if record["kind"] in ("artifact", "model"):
            copy = file.parent / BACKLOG_ARTIFACTS / uuid.uuid4().hex / Path(record["path"]).name
            copy.parent.mkdir(parents=True)
            if record["kind"] == "model":
                shutil.copytree(record["path"], copy)
            else:
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


def log_per_class_ap(logger: RunLogger, per_class: dict[str, float | None], title: str, prefix: str = "") -> None:
    """Per-class AP as a CSV and a bar chart titled ``title`` (the run, the epoch and the mAP), for the MLflow artifact
    view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logger.log_text(per_class_ap_csv(per_class), f"{prefix}per_class_ap.csv")
    scored = [(name, ap) for name, ap in per_class.items() if ap is not None]
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(scored)), 4))
    axis.bar([name for name, _ in scored], [ap for _, ap in scored], color="tab:blue")
    axis.set_ylabel("AP@0.5")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelrotation=90, labelsize=7)
    figure.tight_layout()
    logger.log_figure(figure, f"{prefix}per_class_ap.png")
    plt.close(figure)


def start_system_metrics(logger: RunLogger, node_id: str, interval_s: float):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; GPU where NVML finds one) of this machine for the
    logger's run, its keys ``system/<node_id>/<name>``, sampled every ``interval_s`` seconds and continuing the steps a
    resumed run logged. Returns the monitor; stop it with ``finish()``. A server lost while it runs ends it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # The monitor's thread calls the server at any time, so the quick HTTP settings hold for the whole process (only
    # training workers run monitors, and their other calls use those settings too): against a lost server it gives
    # up in seconds instead of holding the worker's end for minutes.
    os.environ.update({name: value for name, value in HTTP_SETTINGS.items() if name not in os.environ})
    monitor = SystemMetricsMonitor(logger.run_id, sampling_interval=interval_s, resume_logging=True,
                                   node_id=node_id, tracking_uri=logger.uri)
    monitor.start()
    return monitor
