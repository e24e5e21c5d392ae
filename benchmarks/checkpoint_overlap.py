"""What a per-epoch checkpoint costs the quickstart's training, written the way evadlab did before (saved to a
temporary folder, then copied into the run folder, both on the training thread: Ray Train's synchronous upload) and
the way it does now (serialized in memory on the training thread, written into the run folder by another thread
while training goes on: :class:`evadlab.platform.train.CheckpointWriter`), against no checkpoint at all.

Each "epoch" is ``--steps`` training steps of the quickstart model on the quickstart's batch (see
``optimizer_step.py``) plus the checkpoint; the three ways alternate epoch by epoch in one process, one torch thread
(as in a Ray Train worker with 1 CPU), so all see the same machine. The medians of ``--rounds`` epochs are printed.

    python benchmarks/checkpoint_overlap.py [--steps 14] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from optimizer_step import quickstart_training

from evadlab import storage
from evadlab.models.checkpoints import save_training_checkpoint, training_checkpoint_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14, help="training steps per epoch (the quickstart's: 14)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    model, optimizer, clips, targets = quickstart_training(threads=1)

    def train_steps() -> None:
        for _ in range(args.steps):
            model(clips, targets)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def state() -> dict:
        return {"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(), "epoch": 0,
                "config_yaml": "", "extra": {}}

    with tempfile.TemporaryDirectory() as scratch:
        run_folder = Path(scratch, "run")

        def none() -> float:
            start = time.perf_counter()
            train_steps()
            return time.perf_counter() - start

        def synchronous() -> float:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=scratch) as folder:
                save_training_checkpoint(Path(folder) / "checkpoint.pt", **state())
                shutil.copytree(folder, run_folder / "sync", dirs_exist_ok=True)
            train_steps()
            return time.perf_counter() - start

        def overlapped() -> float:
            start = time.perf_counter()
            content = training_checkpoint_bytes(**state())
            writer = threading.Thread(target=storage.write_bytes, args=(run_folder / "async" / "checkpoint.pt", content))
            writer.start()
            train_steps()
            writer.join()  # the next epoch's report waits for the previous write: counted in this epoch
            return time.perf_counter() - start

        ways = {"no checkpoint": none, "synchronous (before)": synchronous, "overlapped (now)": overlapped}
        train_steps()  # warm-up
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                seconds[name].append(way())
        size_mb = (run_folder / "async" / "checkpoint.pt").stat().st_size / 1e6
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    bare = medians["no checkpoint"]
    print(json.dumps({
        "steps_per_epoch": args.steps, "rounds": args.rounds, "checkpoint_mb": round(size_mb, 1),
        "epoch_s": {name: round(value, 3) for name, value in medians.items()},
        "checkpoint_cost_s": {name: round(value - bare, 3) for name, value in medians.items() if value is not bare},
        "epoch_ratio_now_vs_before": round(medians["overlapped (now)"] / medians["synchronous (before)"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
