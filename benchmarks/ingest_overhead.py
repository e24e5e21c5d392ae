"""Per-epoch ingest overhead of training: the wait from an epoch's start to its first batch, over the epoch's time, for
1x, 4x and 16x the quickstart's data, with the train split materialized in Ray's object store and streamed.

Each size is the quickstart's synthetic mini-AVA with 8, 32 and 128 videos of 14 s (55, 220 and 880 train keyframes
at seed 0), prepared once; then ``evadlab train`` of the quickstart model for ``--epochs`` epochs without evaluation,
once per ingest mode, in one Ray session. The figures come from the run's MLflow metrics (``speed/first_batch_s``,
``speed/epoch_s``, ``speed/ingest_setup_s``); the first epoch (worker warm-up) is left out of the medians.

    python benchmarks/ingest_overhead.py --workdir /tmp/ingest_overhead [--scales 1 4 16] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from mlflow.tracking import MlflowClient

from evadlab.config import load_config
from evadlab.platform.ingest import count_rows
from evadlab.platform.run import ensure_prepared, synthesise_if_needed
from evadlab.platform.train import train

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_VIDEOS = 8


def metric_by_epoch(client: MlflowClient, run_id: str, key: str) -> list[float]:
    """The metric's values in the order the epochs logged them."""
    return [metric.value for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def measure(workdir: Path, scale: int, mode: str, epochs: int) -> dict[str, float]:
    """One training run of the quickstart model on ``scale`` times its data with ``data.ingest=mode``."""
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(REPO / "experiments" / "quickstart.yaml", [
        f"data.root={workdir / f'data_{scale}x'}", f"data.synth_videos={QUICKSTART_VIDEOS * scale}",
        f"data.ingest={mode}", f"train.epochs={epochs}", "eval.every_epochs=0", f"output_dir={workdir / 'runs'}",
        f"train.storage_path={workdir / 'ray'}", f"tracking.uri={tracking}", "tracking.experiment=ingest_overhead"])
    synthesise_if_needed(cfg)
    ensure_prepared(cfg)
    result = train(cfg)
    client = MlflowClient(tracking)
    first = metric_by_epoch(client, result.mlflow_run_id, "speed/first_batch_s")[1:]
    epoch = metric_by_epoch(client, result.mlflow_run_id, "speed/epoch_s")[1:]
    setup = metric_by_epoch(client, result.mlflow_run_id, "speed/ingest_setup_s")
    return {"rows": count_rows(cfg, "train"), "first_batch_s": statistics.median(first),
            "epoch_s": statistics.median(epoch), "share": statistics.median(f / e for f, e in zip(first, epoch)),
            "setup_s": setup[-1] if setup else 0.0, "epochs": len(first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--modes", nargs="+", default=["materialize", "stream"])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()}")
    rows = []
    for scale in args.scales:
        for mode in args.modes:
            figures = measure(args.workdir, scale, mode, args.epochs)
            rows.append((scale, mode, figures))
            print(f"{scale}x {mode}: {figures}", flush=True)
    print(f"load after: {os.getloadavg()}\n")
    print("| data | ingest | first batch (s) | epoch (s) | first batch / epoch | set-up before training (s) |\n"
          "|---|---|---:|---:|---:|---:|")
    for scale, mode, f in rows:
        print(f"| {scale}x ({f['rows']} train clips) | {mode} | {f['first_batch_s']:.3f} | "
              f"{f['epoch_s']:.2f} | {100 * f['share']:.1f} % | {f['setup_s']:.1f} |")


if __name__ == "__main__":
    main()
