"""The main job's wall time and frame-mAP, this checkout against an earlier commit, run back to back.

Each round runs ``evadlab run experiments/quickstart.yaml`` once per version, alternating, each in a fresh folder
(its own synthetic data, shards, Ray storage and SQLite MLflow), as a user runs it. The earlier commit is checked
out into a temporary git worktree and run with the same Python (``PYTHONPATH`` points at it), so only the code
differs. Wall time is the whole command, Ray start-up included; the job's own ``wall_s`` (from its summary.json)
and mAP are reported too.

    python benchmarks/main_job_speed.py --baseline ad885e7 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(code: Path, folder: Path) -> dict[str, float]:
    """One ``evadlab run`` of the quickstart with the package at ``code``, everything written under ``folder``."""
    folder.mkdir(parents=True)
    overrides = [f"data.root={folder / 'mini_ava'}", f"output_dir={folder / 'runs'}",
                 f"train.storage_path={folder / 'ray'}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
    command = [sys.executable, "-m", "evadlab.cli", "run", str(code / "experiments" / "quickstart.yaml"), *overrides]
    environment = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=environment, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{code}: evadlab run failed:\n{done.stderr[-3000:]}")
    (summary_path,) = (folder / "runs").glob("quickstart/*/summary.json")
    summary = json.loads(summary_path.read_text())
    (folder / "console.txt").write_text(done.stdout + done.stderr)
    return {"wall_s": seconds, "job_s": summary["wall_s"], "mAP": summary["mAP"],
            "console_lines": len((done.stdout + done.stderr).splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="ad885e7", help="the earlier commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="main_job_speed_"))
    baseline = workdir / "baseline_code"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                   check=True, capture_output=True)
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "current": []}
    try:
        for round_index in range(args.rounds):
            for name, code in (("baseline", baseline), ("current", REPO)):
                result = run_once(code, workdir / f"{name}_{round_index}")
                results[name].append(result)
                print(f"round {round_index} {name}: {json.dumps(result)}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True,
                       check=False)
    medians = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
               for name, runs in results.items()}
    print("\n| version | wall (s) | job (s) | frame-mAP | console lines |\n|---|---:|---:|---:|---:|")
    for name, label in (("baseline", args.baseline), ("current", "this checkout")):
        m = medians[name]
        print(f"| {label} | {m['wall_s']:.0f} | {m['job_s']:.0f} | {m['mAP']:.3f} | {m['console_lines']:.0f} |")
    ratio = medians["current"]["wall_s"] / medians["baseline"]["wall_s"]
    print(f"\nwall-time ratio (median of {args.rounds} rounds): {ratio:.2f}; runs kept in {workdir}")


if __name__ == "__main__":
    main()
