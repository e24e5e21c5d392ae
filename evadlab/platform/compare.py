"""``evadlab compare``: the EVAD trade-off (keep rate, enhanced weight, GFLOPs, mAP, speed) of MLflow runs as a
table, its Pareto front and a plot. Sweeps summarise their trials with the same functions.

The cost axis is ``gflops`` (the model's GFLOPs at 16x288x288) or ``latency`` (the inference latency in ms each run
measured on its own hardware, ``speed/latency_16x288x288_ms``); a sweep names its own in its parent run's tag
``evadlab.cost``.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from evadlab import storage
from evadlab.config import default_tracking_uri
from evadlab.platform.tracking import check_tracking_uri

# cost name -> (its column in the table, the axis label of the plot)
COSTS = {"gflops": ("gflops", "GFLOPs (16x288x288)"),
         "latency": ("latency_ms", "inference latency, ms per 16x288x288 clip (measured)")}
LATENCY_METRIC = "speed/latency_16x288x288_ms"
INFERENCE_RATE_METRIC = "speed/infer_clips_per_s"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Marks points (cost, mAP) that no other point beats: less or equal cost and higher or equal mAP, strictly
    better in one. A point with an unknown (NaN) cost is never on the front and beats none."""
    known = [not math.isnan(cost) for cost, _ in points]
    front = []
    for i, (cost_i, map_i) in enumerate(points):
        dominated = any(
            cost_j <= cost_i and map_j >= map_i and (cost_j < cost_i or map_j > map_i)
            for j, (cost_j, map_j) in enumerate(points) if j != i and known[j]
        )
        front.append(known[i] and not dominated)
    return front


def plot_trade_off(rows: list[dict[str, Any]], title: str, cost: str = "gflops") -> bytes:
    """mAP against the ``cost`` (see COSTS) as a PNG image, Pareto-optimal runs joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column, label = COSTS[cost]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.scatter([r[column] for r in rows], [r["mAP"] for r in rows], color="tab:gray", label="runs")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r[column])
    axis.plot([r[column] for r in front], [r["mAP"] for r in front], "o-", color="tab:red", label="Pareto front")
    for row in rows:
        axis.annotate(f"k={row['keep_rate']}, ew={row['enhanced_weight']:g}", (row[column], row["mAP"]),
                      fontsize=7, xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel(label)
    axis.set_ylabel("frame-mAP@0.5")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    return image.getvalue()


def trade_off_table(runs, cost: str = "gflops") -> list[dict[str, Any]]:
    """One row per finished MLflow run that has both GFLOPs and mAP, the runs on the Pareto front of (``cost``, mAP)
    marked. ``clips_per_s`` is the training throughput, ``infer_clips_per_s`` and ``latency_ms`` the measured
    inference speed (NaN for runs that did not measure it).

    ``keep_rate`` is the run's ``evadlab.keep_rate`` tag, the label of the rates its model really used (runs logged
    before that tag existed fall back to the ``model.keep_rate`` param)."""
    rows = []
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        if "model/gflops" not in metrics or "val/mAP" not in metrics:
            continue
        rows.append({
            "run_id": run.info.run_id,
            "run_name": tags.get("mlflow.runName", ""),
            "keep_rate": tags.get("evadlab.keep_rate") or params.get("model.keep_rate", "?"),
            "enhanced_weight": float(params.get("model.enhanced_weight", "nan")),
            "gflops": metrics["model/gflops"],
            "mAP": metrics["val/mAP"],
            "clips_per_s": metrics.get("train/clips_per_s", float("nan")),
            "latency_ms": metrics.get(LATENCY_METRIC, float("nan")),
            "infer_clips_per_s": metrics.get(INFERENCE_RATE_METRIC, float("nan")),
        })
    column = COSTS[cost][0]
    for row, on_front in zip(rows, pareto_front([(r[column], r["mAP"]) for r in rows])):
        row["pareto"] = on_front
    return sorted(rows, key=lambda r: (r["gflops"], -r["mAP"]))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as text; ``train c/s`` is the training throughput, ``infer c/s`` and ``lat ms`` the measured inference
    speed at 16x288x288, ``pareto`` marks the front of the rows' cost."""
    header = (f"{'keep':>5} {'EW':>4} {'GFLOPs':>8} {'mAP':>7} {'train c/s':>9} {'infer c/s':>9} {'lat ms':>8}  pareto"
              f"  run_id")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['keep_rate']:>5} {r['enhanced_weight']:>4g} {r['gflops']:>8.2f} {r['mAP']:>7.4f} "
                     f"{r['clips_per_s']:>9.2f} {r['infer_clips_per_s']:>9.2f} {r['latency_ms']:>8.1f}  "
                     f"{'*' if r['pareto'] else ' ':^6}  {r['run_id']}")
    return "\n".join(lines)


def experiment_ids(client: MlflowClient, experiment: str | None) -> list[str]:
    """The id of the experiment named ``experiment``, or of every experiment. Raises ValueError for an unknown name."""
    if not experiment:
        return [found.experiment_id for found in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named '{experiment}' at {client.tracking_uri}")
    return [found.experiment_id]


def sweep_parent(client: MlflowClient, ids: list[str], sweep: str):
    """The parent run of a sweep: the run with id ``sweep``, else the newest sweep run named ``sweep`` in the
    experiments ``ids``. Raises ValueError when there is none."""
    runs = client.search_runs(ids, filter_string=f"tags.mlflow.runName = '{sweep}' and tags.`evadlab.job` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        return runs[0]
    try:
        return client.get_run(sweep)
    except Exception:  # noqa: BLE001 - MLflow raises its own error for a run id it does not know, or a malformed one
        raise ValueError(f"no sweep named '{sweep}' (nor a run with that id) at {client.tracking_uri}") from None


def sweep_trials(client: MlflowClient, parent) -> list:
    """The trials (child runs) of the sweep whose parent run is ``parent``."""
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=5000)


def best_per_objective(rows: list[dict[str, Any]], cost: str) -> dict[str, dict[str, Any]]:
    """The best row for each objective: ``mAP`` (the highest frame-mAP) and ``cost`` (the lowest cost, ties broken by
    mAP; left out when no row has that cost)."""
    column = COSTS[cost][0]
    best = {"mAP": max(rows, key=lambda r: r["mAP"])}
    costed = [r for r in rows if not math.isnan(r[column])]
    if costed:
        best[cost] = min(costed, key=lambda r: (r[column], -r["mAP"]))
    return best


def report_lines(rows: list[dict[str, Any]], cost: str) -> list[str]:
    """The table, the Pareto set of (``cost``, mAP) and the best run per objective, as ``evadlab tune`` and ``evadlab
    compare`` print them."""
    column = COSTS[cost][0]

    def described(row: dict[str, Any]) -> str:
        return (f"keep {row['keep_rate']}, EW {row['enhanced_weight']:g}: mAP {row['mAP']:.4f}, {cost} "
                f"{row[column]:.2f} ({row['run_id']})")

    lines = [format_table(rows), f"Pareto set (max mAP, min {cost}):"]
    lines += [f"  {described(row)}" for row in rows if row["pareto"]]
    lines += [f"best {objective}: {described(row)}" for objective, row in best_per_objective(rows, cost).items()]
    return lines


def compare_runs(experiment: str | None, tracking_uri: str | None, out_dir: str | Path,
                 sweep: str | None = None, cost: str | None = None) -> list[dict[str, Any]]:
    """``evadlab compare``: the trade-off table of every run with mAP and GFLOPs in ``experiment`` (or every
    experiment), or of the trials of ``sweep``, its Pareto set and best run per objective for ``cost`` (default: the
    sweep's own cost, else GFLOPs), and the plot. Everything is read from the tracking server (a local store or a
    remote ``mlflow server``); the table and plot are written to ``out_dir``, a local one checked before anything is
    read (ValueError or OSError naming ``--out``)."""
    if str(out_dir) == "":
        raise ValueError("--out is empty: name a folder or a storage URI")
    if storage.is_local(out_dir):
        storage.require_writable_folder(storage.local_path(out_dir), "--out")
    uri = tracking_uri or default_tracking_uri()
    check_tracking_uri(uri, read_only=True)
    client = MlflowClient(uri)
    ids = experiment_ids(client, experiment)
    if sweep:
        parent = sweep_parent(client, ids, sweep)
        runs, label = sweep_trials(client, parent), f"sweep {parent.data.tags.get('mlflow.runName', sweep)}"
        cost = cost or parent.data.tags.get("evadlab.cost", "gflops")
    else:
        runs, label = client.search_runs(ids, max_results=5000), experiment or "all experiments"
    cost = cost or "gflops"
    rows = trade_off_table(runs, cost)
    if not rows:
        print(f"no runs with both model/gflops and val/mAP in {label} at {uri}")
        return rows
    print("\n".join(report_lines(rows, cost)))
    plot = storage.join(out_dir, f"map_vs_{cost}.png")
    storage.write_bytes(plot, plot_trade_off(rows, label, cost))
    storage.write_text(storage.join(out_dir, "runs.json"), json.dumps(rows, indent=1))
    print(f"{len(rows)} runs of {label} at {uri}; plot: {plot}; table: {storage.join(out_dir, 'runs.json')}")
    return rows
