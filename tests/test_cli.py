"""The ``evadlab`` command line as a user calls it: one JSON object where promised, errors that name keys."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from evadlab.cli import main, warnings_as_lines
from evadlab.pipelines.ava import read_boxes_csv

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def evadlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evadlab.cli", *args], check=False, capture_output=True,
                          text=True, timeout=300)


def test_flops_json_is_one_object_with_the_promised_fields():
    done = evadlab("flops", str(EXPERIMENTS / "evad_vit_b_16x4_ktp.yaml"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"gflops", "gflops_16x288x288", "params"}
    assert report["gflops_16x288x288"] == pytest.approx(242.8, rel=0.01)
    assert report["gflops"] == report["gflops_16x288x288"] and report["params"] == 185_359_636


def test_flops_prints_the_reference_size_once(capsys):
    assert main(["flops", str(EXPERIMENTS / "quickstart.yaml")]) == 0
    at_64, at_288, params = capsys.readouterr().out.splitlines()
    assert at_64.startswith("GFLOPs at 16x64x64: ") and at_288.startswith("GFLOPs at 16x288x288: ")
    assert main(["flops", str(EXPERIMENTS / "quickstart.yaml"), "data.short_side=288", "data.max_long_side=512"]) == 0
    assert capsys.readouterr().out.splitlines() == [at_288, params]


def test_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["flops", str(EXPERIMENTS / "quickstart.yaml"), "model.keep_rate=1.5"]) == 2
    assert "'model.keep_rate'" in capsys.readouterr().err
    assert main(["train", str(EXPERIMENTS / "quickstart.yaml"), "trian.epochs=2"]) == 2
    assert "did you mean 'train.epochs'" in capsys.readouterr().err


def test_synth_writes_the_official_layout(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "ava"), "--videos", "2", "--seconds", "4"]) == 0
    assert (tmp_path / "ava" / "annotations" / "ava_train_v2.2.csv").stat().st_size > 0
    assert len(list((tmp_path / "ava" / "videos").glob("*.mp4"))) == 2


def test_evadlabs_warnings_are_one_line_of_the_command(tmp_path, capsys):
    """As ``evaluate`` reads its detections: rows left out are one line; another library's warning keeps its form."""
    detections = tmp_path / "detections.csv"
    detections.write_text("vid,0902,0.0,0.1,0.0,0.5,12,0.9\nvid,0902,0.1,0.1,0.5,0.5,12,0.8\n")
    with warnings.catch_warnings(record=True) as passed_on, warnings_as_lines("evaluate"):
        warnings.simplefilter("always")
        read_boxes_csv(detections, is_detection=True)
        warnings.warn("a library's own", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        (f"evadlab evaluate: warning: {detections}: 1 row(s) left out, as the official evaluator leaves them out; the "
         f"first, line 1: x2 0.0 <= x1 0.0: the box has no width")]
    assert [str(warning.message) for warning in passed_on] == ["a library's own"]
