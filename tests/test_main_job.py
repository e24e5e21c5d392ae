"""The main job end to end, as a user runs it: `evadlab run experiments/quickstart.yaml` writes the synthetic
mini-AVA, prepares shards, trains with Ray Train, evaluates with Ray Data, and the detector it trains finds the
actions far better than chance on the held-out val videos."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from mlflow.tracking import MlflowClient

from evadlab.config import load_config
from evadlab.pipelines.ava_map import evaluate_files
from evadlab.platform.run import run_main_job

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def with_random_scores(detections: Path, out: Path, seed: int) -> Path:
    """The same detection rows (boxes and classes) with scores drawn uniformly at random."""
    table = pcsv.read_csv(detections, read_options=pcsv.ReadOptions(autogenerate_column_names=True),
                          convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                              column_types={"f0": pa.string(), "f1": pa.string()}))
    scores = np.random.default_rng(seed).random(table.num_rows)
    table = table.set_column(7, "f7", pa.array(scores))
    pcsv.write_csv(table, out, write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return out


def test_quickstart_trains_a_detector_that_beats_random_scores(tmp_path, ray_local, mlflow_server):
    cfg = load_config(QUICKSTART, [f"data.root={tmp_path / 'mini_ava'}", f"output_dir={tmp_path / 'runs'}",
                                   f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_server}",
                                   "tracking.experiment=main_job_test"])
    summary = run_main_job(cfg)

    (run_dir,) = cfg.run_dir.iterdir()
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    annotations = cfg.data.annotation_dir

    def frame_map(detections: Path) -> float:
        return evaluate_files(annotations / cfg.data.label_map, annotations / cfg.data.val_annotations, detections,
                              annotations / cfg.data.exclusions).mAP

    detections = run_dir / "evaluation" / "detections.csv"
    assert frame_map(detections) == pytest.approx(summary["mAP"], abs=1e-12)
    chance = [frame_map(with_random_scores(detections, tmp_path / f"random_{seed}.csv", seed)) for seed in range(5)]
    assert summary["mAP"] > max(chance) + 0.1, (summary["mAP"], chance)

    client = MlflowClient(mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["val/mAP"] == pytest.approx(summary["mAP"])
    assert run.data.metrics["model/gflops"] == pytest.approx(summary["gflops"])
    assert "checkpoints" in {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
