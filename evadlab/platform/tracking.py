"""MLflow: one run per training job (child runs for sweep trials), logged from rank 0 only.

Everything goes through an explicit ``MlflowClient`` and run id rather than MLflow's global active run,
so a Ray worker on any node can log into a run that the driver created.
"""

from __future__ import annotations

import json
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
    tags = {"evadlab.keep_rate": str(cfg.model.keep_rate), "evadlab.enhanced_weight": str(cfg.model.enhanced_weight),
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

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(path)

    def log_figure(self, figure, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            figure.savefig(path, dpi=110, bbox_inches="tight")
            self.log_artifact(path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def metric_history(self, key: str) -> list[float]:
        return [m.value for m in sorted(self.client.get_metric_history(self.run_id, key), key=lambda m: m.step)]


def log_per_class_ap(logger: RunLogger, per_class: dict[str, float | None], prefix: str = "") -> None:
    """Per-class AP as a CSV and a bar chart, for the MLflow artifact view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["class,ap"] + [f"\"{name}\",{'' if ap is None else f'{ap:.6f}'}" for name, ap in per_class.items()]
    logger.log_text("\n".join(rows) + "\n", f"{prefix}per_class_ap.csv")
    scored = [(name, ap) for name, ap in per_class.items() if ap is not None]
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(scored)), 4))
    axis.bar([name for name, _ in scored], [ap for _, ap in scored], color="tab:blue")
    axis.set_ylabel("AP@0.5")
    axis.set_ylim(0, 1)
    axis.tick_params(axis="x", labelrotation=90, labelsize=7)
    figure.tight_layout()
    logger.log_figure(figure, f"{prefix}per_class_ap.png")
    plt.close(figure)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Marks points (gflops, mAP) that no other point beats: less or equal compute and higher or equal mAP,
    strictly better in one."""
    front = []
    for i, (flops_i, map_i) in enumerate(points):
        dominated = any(
            flops_j <= flops_i and map_j >= map_i and (flops_j < flops_i or map_j > map_i)
            for j, (flops_j, map_j) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


def plot_map_vs_gflops(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """mAP against GFLOPs, Pareto-optimal runs joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.scatter([r["gflops"] for r in rows], [r["mAP"] for r in rows], color="tab:gray", label="runs")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["gflops"])
    axis.plot([r["gflops"] for r in front], [r["mAP"] for r in front], "o-", color="tab:red", label="Pareto front")
    for row in rows:
        axis.annotate(f"k={row['keep_rate']:g}, ew={row['enhanced_weight']:g}", (row["gflops"], row["mAP"]),
                      fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("GFLOPs (16x288x288)")
    axis.set_ylabel("frame-mAP@0.5")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def trade_off_table(runs) -> list[dict[str, Any]]:
    """One row per finished MLflow run that has both GFLOPs and mAP, Pareto-optimal ones marked."""
    rows = []
    for run in runs:
        metrics, params = run.data.metrics, run.data.params
        if "model/gflops" not in metrics or "val/mAP" not in metrics:
            continue
        rows.append({
            "run_id": run.info.run_id,
            "run_name": run.data.tags.get("mlflow.runName", ""),
            "keep_rate": float(params.get("model.keep_rate", "nan")),
            "enhanced_weight": float(params.get("model.enhanced_weight", "nan")),
            "gflops": metrics["model/gflops"],
            "mAP": metrics["val/mAP"],
            "clips_per_s": metrics.get("train/clips_per_s", float("nan")),
        })
    for row, on_front in zip(rows, pareto_front([(r["gflops"], r["mAP"]) for r in rows])):
        row["pareto"] = on_front
    return sorted(rows, key=lambda r: (r["gflops"], -r["mAP"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'keep':>5} {'EW':>4} {'GFLOPs':>8} {'mAP':>7} {'clips/s':>8}  pareto  run_id"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['keep_rate']:>5g} {r['enhanced_weight']:>4g} {r['gflops']:>8.2f} {r['mAP']:>7.4f} "
                     f"{r['clips_per_s']:>8.2f}  {'*' if r['pareto'] else ' ':^6}  {r['run_id']}")
    return "\n".join(lines)


def compare_runs(experiment: str | None, tracking_uri: str | None, out_dir: Path) -> list[dict[str, Any]]:
    """``evadlab compare``: the trade-off table of every run with mAP and GFLOPs, and its plot."""
    uri = tracking_uri or f"sqlite:///{Path('mlflow.db').resolve()}"
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named '{experiment}' at {uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, max_results=5000)
    rows = trade_off_table(runs)
    if not rows:
        print(f"no runs with both model/gflops and val/mAP in {experiment or 'any experiment'} at {uri}")
        return rows
    print(format_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_map_vs_gflops(rows, out_dir / "map_vs_gflops.png", experiment or "all experiments")
    (out_dir / "runs.json").write_text(json.dumps(rows, indent=1))
    print(f"plot: {plot}")
    return rows
