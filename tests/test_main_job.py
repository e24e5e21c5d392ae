"""The main job end to end, as a user runs it: `evadlab run experiments/quickstart.yaml` writes the synthetic
mini-AVA, prepares shards, trains with Ray Train, evaluates with Ray Data, and the detector it trains finds the
actions far better than chance on the held-out val videos. The console shows evadlab's lines only (a line per epoch,
the summary), and the MLflow run charts correctly: one x-axis (the optimiser step), no sentinels, no repeats."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from mlflow.tracking import MlflowClient

from evadlab.cli import main
from evadlab.config import load_config
from evadlab.pipelines.ava_map import evaluate_files

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
pytestmark = pytest.mark.slow
# The console budget of a healthy main job: its 30 epoch lines and a few dozen more.
MAX_CONSOLE_LINES = 60
# Ray's lines that must not show: a record at error level (Python's or the C++ core's), or the output of a worker,
# actor or daemon (Ray prefixes it with its name and pid). Ray's notices to the driver, "(raylet) ...", may show.
RAY_LINE = re.compile(r"\bERROR\b|\] E \d|\(\w+ pid=\d+\)|\(pid=gcs_server\)")


def with_random_scores(detections: Path, out: Path, seed: int) -> Path:
    """The same detection rows (boxes and classes) with scores drawn uniformly at random."""
    table = pcsv.read_csv(detections, read_options=pcsv.ReadOptions(autogenerate_column_names=True),
                          convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                              column_types={"f0": pa.string(), "f1": pa.string()}))
    scores = np.random.default_rng(seed).random(table.num_rows)
    table = table.set_column(7, "f7", pa.array(scores))
    pcsv.write_csv(table, out, write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"))
    return out


def run_command(tmp_path: Path, overrides: list[str]) -> list[str]:
    """`evadlab run quickstart.yaml` in its own process, as a user starts it; its console (stdout and stderr)."""
    completed = subprocess.run([sys.executable, "-m", "evadlab.cli", "run", str(QUICKSTART), *overrides], check=False,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stdout[-5000:]
    return completed.stdout.splitlines()


def test_quickstart_trains_a_detector_that_beats_random_scores(tmp_path, mlflow_server, capfd):
    overrides = [f"data.root={tmp_path / 'mini_ava'}", f"output_dir={tmp_path / 'runs'}",
                 f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_server}",
                 "tracking.experiment=main_job_test"]
    lines = run_command(tmp_path, overrides)
    console = "\n".join(lines)
    assert len(lines) <= MAX_CONSOLE_LINES, console
    assert "Traceback" not in console and not [line for line in lines if RAY_LINE.search(line)], console
    cfg = load_config(QUICKSTART, overrides)
    assert [line.split(" step")[0] for line in lines if line.startswith("epoch ")] == [
        f"epoch {epoch}/{cfg.train.epochs}" for epoch in range(1, cfg.train.epochs + 1)]

    (run_dir,) = cfg.run_dir.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"checkpoint: {summary['checkpoint']}" in lines and Path(summary["checkpoint"]).is_file()
    assert f"summary: {run_dir / 'summary.json'}" in lines
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
    final_step = check_metric_histories(client, run, cfg)
    check_models_and_datasets(client, run, cfg, final_step, summary)

    video = min((tmp_path / "mini_ava" / "videos").iterdir())
    out = tmp_path / "demo" / "annotated.mp4"
    capfd.readouterr()
    assert main(["demo", str(video), "--checkpoint", summary["models"]["final"], "--tracking-uri", mlflow_server,
                 "--out", str(out)]) == 0, "a logged model's models:/ URI is a checkpoint"
    assert out.with_suffix(".csv").stat().st_size > 0
    assert "Downloading artifacts" not in capfd.readouterr().err, "no download progress bar"


def check_metric_histories(client: MlflowClient, run, cfg) -> int:
    """Every metric at increasing steps with no value below 0; per-epoch metrics at the step each epoch ended, val/mAP
    only where an epoch was evaluated, best/mAP where it rose, the final evaluation at the final step. Returns it."""
    histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
    for key, history in histories.items():
        steps = [step for step, _ in history]
        assert steps == sorted(set(steps)), f"{key}: steps repeat or go back: {steps}"
        assert all(value >= 0 for _, value in history), f"{key}: {history}"
    epoch_end = {int(epoch): step for step, epoch in histories["epoch"]}
    assert sorted(epoch_end) == list(range(cfg.train.epochs))
    evaluated = [epoch_end[e] for e in range(cfg.train.epochs) if (e + 1) % cfg.eval.every_epochs == 0]
    assert [step for step, _ in histories["val/mAP"]] == evaluated
    assert [step for step, _ in histories["train/clips_per_s"]] == list(epoch_end.values())
    best = histories["best/mAP"]
    assert {step for step, _ in best} <= set(evaluated) and [v for _, v in best] == sorted({v for _, v in best})
    final_step = epoch_end[cfg.train.epochs - 1]
    assert max(step for step, _ in histories["train/loss"]) <= final_step
    # The last epoch's evaluation inside training is the final evaluation (run scores its detections, no second
    # inference): every evaluation's speed sits at its epoch's step.
    assert [step for step, _ in histories["speed/eval_clips_per_s"]] == evaluated
    assert [step for step, _ in histories["model/gflops"]] == [0]
    assert len(histories["system/node0/cpu_utilization_percentage"]) >= 1, "system metrics, keyed by node"
    return final_step


def check_models_and_datasets(client: MlflowClient, run, cfg, final_step: int, summary: dict) -> None:
    """The best and final checkpoints as READY logged models with the trade-off and mAP; the shards as datasets."""
    models = {m.name: m for m in client.search_logged_models([run.info.experiment_id],
                                                             filter_string=f"source_run_id = '{run.info.run_id}'")}
    assert set(models) == {"best", "final"}
    assert summary["models"] == {name: f"models:/{m.model_id}" for name, m in models.items()}
    outputs = {output.model_id: output.step for output in run.outputs.model_outputs}
    assert outputs[models["final"].model_id] == final_step
    for model in models.values():
        assert model.params["model.keep_rate"] == "0.7" and float(model.params["gflops"]) > 0
        assert [m.key for m in model.metrics] == ["val/mAP"]
    manifest = json.loads((cfg.data.shards_path / "manifest.json").read_text())
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert {name: [t.value for t in i.tags] for name, i in inputs.items()} == {
        "mini_ava/train": ["training"], "mini_ava/val": ["evaluation"]}
    for split in ("train", "val"):
        assert json.loads(inputs[f"mini_ava/{split}"].dataset.profile)["keyframes"] == manifest["counts"][split]
