"""Ray Train end to end on the synthetic mini-AVA: DDP equivalence, exactly-once epochs, fault tolerance,
resume, and a real MLflow server. Each test is a real TorchTrainer run, so they are few and tiny."""

import json
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from evadlab.cli import CONTINUE_HINTS, INTERRUPTED_EXIT_CODE, main
from evadlab.config import load_config
from evadlab.console import EpochProgress
from evadlab.errors import one_line, original_error
from evadlab.models.checkpoints import load_training_checkpoint
from evadlab.pipelines.clips import decode_jpegs, iter_shard_rows
from evadlab.pipelines.prepare import prepare
from evadlab.platform.data_config import ExactlyOnceDataConfig
from evadlab.platform.hooks import (
    BlockCheckpointAtEpoch,
    FailOnceAtEpoch,
    RecordEnvironment,
    RecordSeenSamples,
    RecordWeights,
)
from evadlab.platform.ingest import epoch_batches, plan_ingest, training_dataset
from evadlab.platform.modeling import build_model
from evadlab.platform.runs import committed_epochs
from evadlab.platform.train import RunSetup, build_trainer, train

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
pytestmark = pytest.mark.slow


def tiny_overrides(tmp_path, data_root, *overrides) -> list[str]:
    return [f"data.root={data_root}", f"data.shards={tmp_path / 'shards'}", f"train.storage_path={tmp_path / 'ray'}",
            f"output_dir={tmp_path / 'runs'}", "train.epochs=1", "train.batch_size=2", "eval.every_epochs=0",
            "train.cpus_per_worker=0.5", "model.act_fc_dim=64", *overrides]


def tiny_config(tmp_path, data_root, *overrides):
    return load_config(QUICKSTART, tiny_overrides(tmp_path, data_root, *overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mini_ava, ray_local):
    """Shards of the session's mini-AVA, prepared once for this module."""
    folder = tmp_path_factory.mktemp("train")
    cfg = tiny_config(folder, mini_ava)
    prepare(cfg)
    return folder, cfg.data.shards_path


def seen_keys(folder: Path, epoch: int) -> list[str]:
    keys = []
    for file in sorted(folder.glob(f"epoch_{epoch:03d}_rank_*.txt")):
        keys += file.read_text().split()
    return keys


def all_train_keys(shards: Path) -> list[str]:
    table = pq.read_table(shards / "train", columns=["video_id", "timestamp"])
    return [f"{v},{t}" for v, t in zip(table["video_id"].to_pylist(), table["timestamp"].to_pylist())]


def test_ingest_materializes_what_fits_and_every_epoch_splits_each_keyframe_once(prepared, mini_ava, tmp_path):
    """The decoded train split is kept in Ray's object store when it fits (auto), streamed otherwise. A materialized
    split is decoded once: its epochs go on with the shard files gone, its blocks of one batch in a new order each
    epoch. Either way each epoch hands every keyframe to exactly one of 2 workers. A materialized split's orders, what
    each worker gets and in which order its batches come, are those of ``train.seed``: the same in a second run of
    the seed, others with another seed."""
    folder, shards = prepared
    expected = sorted(all_train_keys(shards))
    cfg = tiny_config(folder, mini_ava, f"data.shards={shards}")
    plan = plan_ingest(cfg)
    decoded = sum(decode_jpegs(row["frames"]).nbytes for row in iter_shard_rows(shards, "train"))
    assert plan.mode == "materialize" and plan.decoded_bytes == decoded and plan.object_store_bytes > 2 * decoded
    assert plan_ingest(cfg, object_store_bytes=decoded).mode == "stream"
    runs = {}
    for mode, seed in (("materialize", 0), ("materialize", 0), ("materialize", 1), ("stream", 0)):
        copy = tmp_path / f"{mode}_{len(runs)}"
        shutil.copytree(shards, copy)
        cfg = tiny_config(folder, mini_ava, f"data.shards={copy}", f"data.ingest={mode}", f"train.seed={seed}")
        dataset = training_dataset(cfg, plan_ingest(cfg))
        if mode == "materialize":
            shutil.rmtree(copy / "train")
        splits = ExactlyOnceDataConfig(len(expected)).configure({"train": dataset}, world_size=2, worker_handles=None,
                                                                worker_node_ids=None)
        orders = []
        for epoch in range(3):
            with ThreadPoolExecutor(2) as pool:  # streaming splits are consumed side by side, as by DDP workers
                seen = list(pool.map(lambda split, rank, cfg=cfg, epoch=epoch: split_keys(split["train"], cfg, epoch, rank),
                                     splits, range(2)))
            assert sorted(seen[0] + seen[1]) == expected and seen[0] and seen[1], mode
            orders.append(tuple(map(tuple, seen)))
        assert len(set(orders)) == 3, f"{mode}: an order repeats across epochs"
        runs[(mode, seed, len(runs))] = orders
    first, again, other_seed = (orders for key, orders in runs.items() if key[0] == "materialize")
    assert again == first, "a second run of the same seed got other orders"
    assert other_seed != first, "another seed got the same orders"
    # A worker group that starts at epoch 2 (a resumed run, a restart) trains it as an uninterrupted run does.
    resumed = epoch_orders(tiny_config(folder, mini_ava, f"data.shards={shards}"), epoch=2, world=2, start=2)
    assert tuple(map(tuple, resumed)) == first[2], "a run resumed at epoch 2 trains it in another order"


def test_ray_trains_own_actors_unpickle_their_arguments_without_mlflow_or_torch(prepared, mini_ava, tmp_path):
    """Ray Train's controller unpickles the trainer's run context (the train_loop_config with it) and its dataset
    manager the DataConfig, each in a new process on the path to the first step: the MLflow logger goes by
    reference (the controller imports no MLflow), and the DataConfig's module imports no torch."""
    folder, shards = prepared
    cfg = tiny_config(folder, mini_ava, f"data.shards={shards}")
    setup = RunSetup(run_name="r", storage=str(tmp_path), local_path=str(tmp_path), mlflow_run_id="0" * 32,
                     experiment_id="1", tracking_uri="http://127.0.0.1:9", model_metrics={"model/gflops": 1.0})
    trainer = build_trainer(cfg, setup, None, [], None, EpochProgress(), ray.data.range(2))
    # A process of this Ray, as Ray's actors are (object references and actor handles need one).
    probe = ("import json, pickle, sys; import ray.train; ray.init(address=sys.argv[1], log_to_driver=False); "
             "pickle.loads(sys.stdin.buffer.read()); "
             "print(json.dumps(sorted(m for m in ('mlflow', 'torch', 'evadlab.platform.tracking') if m in sys.modules)))")

    def imported_by_unpickling(payload: object) -> list[str]:
        done = subprocess.run([sys.executable, "-c", probe, ray.get_runtime_context().gcs_address],
                              input=ray.cloudpickle.dumps(payload), capture_output=True, check=False, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        return json.loads(done.stdout)

    assert imported_by_unpickling(trainer.train_run_context) == ["torch"], "torch by Ray's TorchConfig only"
    assert imported_by_unpickling(trainer.data_config) == []


def test_a_small_split_decoded_by_the_driver_gets_the_blocks_ray_data_tasks_make(prepared, mini_ava):
    """A materialized split of at most ``decode_here_bytes`` is decoded by this process instead of Ray Data's tasks,
    whose processes take seconds to start; the dataset the workers get is the same to the byte: the same blocks of
    ``train.batch_size`` rows (the last one shorter) in the same shuffled order, so a seed trains the same model."""
    folder, shards = prepared
    rows = len(all_train_keys(shards))
    uneven = next(size for size in (3, 4, 5, 7) if rows % size)
    for batch in (uneven, rows):  # blocks of a batch and a shorter last one; the whole split in one block
        cfg = tiny_config(folder, mini_ava, f"data.shards={shards}", f"train.batch_size={batch}")
        here, by_tasks = plan_ingest(cfg), plan_ingest(cfg, decode_here_bytes=0)
        assert here.decode_here and "; decoded by this process)" in here.describe()
        assert not by_tasks.decode_here and "decoded by this process" not in by_tasks.describe()
        assert not plan_ingest(cfg, decode_here_bytes=here.decoded_bytes - 1).decode_here
        assert plan_ingest(cfg, decode_here_bytes=here.decoded_bytes).decode_here
        assert not plan_ingest(cfg, object_store_bytes=here.decoded_bytes).decode_here, "a streamed split is never"
        decoded_here, decoded_by_tasks = dataset_blocks(training_dataset(cfg, here)), dataset_blocks(
            training_dataset(cfg, by_tasks))
        sizes = [block.num_rows for block in decoded_here]
        assert sorted(sizes) == ([rows % batch] if rows % batch else []) + [batch] * (rows // batch)
        assert sizes == [block.num_rows for block in decoded_by_tasks]
        assert all(a.equals(b) for a, b in zip(decoded_here, decoded_by_tasks, strict=True))


def dataset_blocks(dataset) -> list:
    """A materialized dataset's blocks (pyarrow tables), in its order."""
    import ray

    return [ray.get(ref) for bundle in dataset.iter_internal_ref_bundles() for ref in bundle.block_refs]


def split_keys(split, cfg, epoch: int, rank: int) -> list[str]:
    """One epoch of the split of worker ``rank`` as training iterates it (local shuffle buffer included): its
    keyframes as ``video_id,timestamp``, in the order they came."""
    return [f"{video},{timestamp}" for batch in epoch_batches(split, cfg, torch.device("cpu"), epoch, rank)
            for video, timestamp in batch.keys]


def epoch_orders(cfg, epoch: int, world: int, start: int = 0) -> list[list[str]]:
    """Each rank's keyframes in training order in epoch ``epoch`` of a run of ``cfg`` on ``world`` workers whose worker
    group started at epoch ``start`` (0: an uninterrupted run): the datasets Ray Train hands the workers, iterated here
    epoch after epoch."""
    rows = len(all_train_keys(cfg.data.shards_path))
    splits = ExactlyOnceDataConfig(rows, epochs_done=lambda: start).configure(
        {"train": training_dataset(cfg, plan_ingest(cfg))}, world_size=world, worker_handles=None, worker_node_ids=None)
    with ThreadPoolExecutor(world) as pool:
        for done in range(start, epoch + 1):
            orders = list(pool.map(lambda split, rank, done=done: split_keys(split["train"], cfg, done, rank), splits,
                                   range(world)))
    return orders


def test_two_workers_equal_one_worker_with_twice_the_batch(prepared, mini_ava, tmp_path):
    """One optimisation step on the same 4 clips: DDP over 2 workers x 2 clips == 1 worker x 4 clips. Then the same
    with train.grad_accum=2, where each worker's epoch is a single (odd) micro-batch, so the step is a short
    accumulation group at the end of the epoch: both ranks must still step on the all-reduced gradient."""
    _folder, shards = prepared
    table = pq.read_table(shards / "train")
    # Equal person counts per clip, so the per-worker action-loss means average to the global one.
    box_counts = [len(boxes) for boxes in table["boxes"].to_pylist()]
    common = max(set(box_counts), key=box_counts.count)
    same_boxes = [i for i, count in enumerate(box_counts) if count == common][:4]
    assert len(same_boxes) == 4
    subset = tmp_path / "subset"
    (subset / "train").mkdir(parents=True)
    pq.write_table(table.take(same_boxes), subset / "train" / "part-0.parquet")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["counts"]["train"] = 4
    (subset / "manifest.json").write_text(json.dumps(manifest))

    def one_step(workers: int, batch: int, grad_accum: int) -> dict[str, torch.Tensor]:
        name = f"w{workers}_accum{grad_accum}"
        cfg = tiny_config(tmp_path / name, mini_ava, f"data.shards={subset}", f"train.num_workers={workers}",
                          f"train.batch_size={batch}", f"train.grad_accum={grad_accum}", "data.flip_prob=0",
                          "train.warmup_epochs=0", "train.base_lr=1e-3", "tracking.enabled=false")
        result = train(cfg, hooks=[RecordWeights(tmp_path / name / "weights")])
        ranks = [torch.load(tmp_path / name / "weights" / f"epoch_000_rank_{rank}.pt", weights_only=True)
                 for rank in range(workers)]
        for other in ranks[1:]:
            assert all(torch.equal(ranks[0][key], other[key]) for key in ranks[0]), f"{name}: ranks drifted apart"
        return load_training_checkpoint(result.checkpoint_path)["model_state"], cfg

    reference, cfg = one_step(1, 4, 1)
    initial = build_model(cfg.model).state_dict()
    for grad_accum in (1, 2):
        state, _ = one_step(2, 2, grad_accum)
        # Adam's first step is lr * g / (|g| + eps): about +-lr for every element whatever |g|, so an element
        # whose gradient is ~eps (float noise of the all-reduce) may move differently. Everything else must match.
        moved = mismatched = total = 0
        for key, value in reference.items():
            close = torch.isclose(state[key], value, rtol=1e-4, atol=1e-6)
            mismatched += int((~close).sum())
            total += value.numel()
            largest_step = 1e-3 * cfg.train.head_lr_scale
            assert (state[key] - value).abs().max() <= 2 * largest_step, key
            moved += int(not torch.equal(value, initial[key]))
        assert mismatched <= 1e-3 * total, f"grad_accum={grad_accum}: {mismatched} of {total} parameters differ"
        assert moved > 100, "the step must change the parameters"


def test_worker_failure_resumes_from_last_checkpoint_and_resume_continues_the_same_mlflow_run(
        prepared, mini_ava, tmp_path, mlflow_server):
    """A worker dies during epoch 2 of 3: Ray replaces it, training resumes from the epoch-1 checkpoint,
    every epoch still sees each sample exactly once, and one MLflow run holds the whole history. Then
    ``train.resume=true`` with ``train.epochs=4`` continues that run at epoch 4, in the same MLflow run. (One test:
    each Ray Train start costs ~25 s here.)"""
    folder, shards = prepared
    common = [f"data.shards={shards}", f"train.storage_path={tmp_path / 'ray'}", "train.num_workers=2",
              "train.log_every=1", "eval.every_epochs=3", f"tracking.uri={mlflow_server}"]
    names = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    seen = tmp_path / "seen"
    cfg = tiny_config(folder, mini_ava, *common, "train.epochs=3", "train.max_failures=1",
                      "train.health_check_interval_s=0.25", "train.worker_group_start_timeout_s=15")
    result = train(cfg, hooks=[FailOnceAtEpoch(1, tmp_path / "failure"), RecordSeenSamples(seen),
                               RecordEnvironment(tmp_path / "variables_first.txt", *names)])
    assert (tmp_path / "failure" / "failure_injected_epoch_1").exists()
    expected = sorted(all_train_keys(shards))
    for epoch in range(3):
        assert sorted(seen_keys(seen, epoch)) == expected, f"epoch {epoch}"
    # The restarted workers train epoch 1 in its own order (that of an uninterrupted run), not in epoch 0's.
    assert [(seen / f"epoch_001_rank_{rank}.txt").read_text().split() for rank in range(2)] == \
        epoch_orders(cfg, epoch=1, world=2)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(epochs) == [0, 1, 2], "epoch 0 must not be trained twice (resume, not restart)"
    kept = sorted(path.name for path in Path(result.run_path).glob("checkpoint_epoch_*"))
    assert kept == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"], kept  # train.keep_checkpoints=2
    assert load_training_checkpoint(result.checkpoint_path)["extra"]["progress"]["epoch"] == 3
    assert {"train/loss", "train/lr", "train/clips_per_s", "val/mAP", "model/gflops", "model/params"} <= set(
        run.data.metrics)
    # Measured speed: the first-batch wait and the epoch every epoch, the evaluation's clips/s, the latency once per
    # attempt (after its first epoch), the ingest's set-up and mode.
    assert len(client.get_metric_history(run.info.run_id, "speed/first_batch_s")) == 3
    latencies = client.get_metric_history(run.info.run_id, "speed/latency_16x288x288_ms")
    assert len(latencies) == 2 and all(metric.value > 0 for metric in latencies)
    assert {"speed/epoch_s", "speed/eval_clips_per_s", "speed/ingest_setup_s"} <= set(run.data.metrics)
    assert run.data.tags["evadlab.ingest"] == "materialize"
    assert run.data.params["model.keep_rate"] == "0.7" and run.data.params["train.num_workers"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "checkpoints" in artifacts
    assert any(a.path.endswith("per_class_ap.csv") for a in client.list_artifacts(run.info.run_id))

    # Resume: train.health_check_interval_s and train.worker_group_start_timeout_s reach Ray Train's controller
    # (which passes them on to the workers, where they are read back here) and may change on resume.
    resumed = tiny_config(folder, mini_ava, *common, "train.epochs=4", "train.resume=true")
    second = train(resumed, hooks=[RecordSeenSamples(seen), RecordEnvironment(tmp_path / "variables.txt", *names)])
    assert set((tmp_path / "variables_first.txt").read_text().split()) == {f"{names[0]}=0.25", f"{names[1]}=15.0"}
    assert set((tmp_path / "variables.txt").read_text().split()) == {f"{names[0]}=0.5", f"{names[1]}=60.0"}
    assert second.run_name == result.run_name and second.mlflow_run_id == result.mlflow_run_id
    assert load_training_checkpoint(second.checkpoint_path)["extra"]["progress"]["epoch"] == 4
    assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "epoch")) == [0, 1, 2, 3]
    assert seen.joinpath("epoch_002_rank_0.txt").stat().st_mtime < seen.joinpath("epoch_003_rank_0.txt").stat().st_mtime
    assert [(seen / f"epoch_003_rank_{rank}.txt").read_text().split() for rank in range(2)] == \
        epoch_orders(resumed, epoch=3, world=2), "the resumed run trains epoch 3 in an uninterrupted run's order"


def test_a_checkpoint_that_cannot_be_written_fails_the_run(prepared, mini_ava, tmp_path, mlflow_server):
    """Checkpoints are written while the next epoch trains (Ray Train's asynchronous upload); one that cannot be
    written, here the last, still ends the run, with the error naming it (the command's one line): nothing is
    committed for it, and MLflow gets no final model, only a FAILED run."""
    _folder, shards = prepared
    cfg = tiny_config(tmp_path, mini_ava, f"data.shards={shards}", "train.epochs=2", "train.max_failures=0",
                      f"tracking.uri={mlflow_server}", "tracking.experiment=checkpoint_failure_test")
    with pytest.raises(Exception) as failure:  # Ray wraps the cause, checked below
        train(cfg, hooks=[BlockCheckpointAtEpoch(1)])
    cause = original_error(failure.value)
    assert isinstance(cause, OSError) and "checkpoint_epoch_0002" in one_line(cause), one_line(cause)
    (run_folder,) = [path for path in (tmp_path / "ray").iterdir() if path.is_dir()]
    assert committed_epochs(run_folder) == 1
    assert [path.parent.name for path in run_folder.glob("checkpoint_epoch_*/checkpoint.pt")] == ["checkpoint_epoch_0001"]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("checkpoint_failure_test").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FAILED"
    assert [model.name for model in client.search_logged_models([experiment])] == []


def test_ctrl_c_ends_training_in_one_line_and_the_mlflow_run_as_killed(prepared, mini_ava, tmp_path, mlflow_server):
    """Ctrl-C as the training starts (Ray Train answers it by aborting the run and raising SystemExit in the driver;
    before its handler is in place Python raises KeyboardInterrupt): the command says it was interrupted and how to
    continue, exit code 130, and its MLflow run ends KILLED (not FAILED, not RUNNING). Interrupting a later epoch
    reads the same but costs this machine ~40 s more."""
    folder, shards = prepared
    overrides = tiny_overrides(folder, mini_ava, f"data.shards={shards}", f"train.storage_path={tmp_path / 'ray'}",
                               f"tracking.uri={mlflow_server}", "tracking.experiment=interrupt_test", "train.epochs=50")
    process = subprocess.Popen([sys.executable, "-m", "evadlab.cli", "train", str(QUICKSTART), *overrides],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("evadlab train: ingest: "):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == INTERRUPTED_EXIT_CODE, "\n".join(lines)
    assert lines[-1] == f"evadlab train: interrupted; {CONTINUE_HINTS['train']}", "\n".join(lines)
    assert not any(line.startswith("epoch 2/") for line in lines) and "Traceback" not in "\n".join(lines)
    run_id = re.search(r"MLflow run (\w+)", lines[0])[1]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"


def test_unreachable_tracking_server_stops_at_start(prepared, mini_ava, tmp_path):
    _folder, shards = prepared
    cfg = tiny_config(tmp_path, mini_ava, f"data.shards={shards}", "tracking.uri=http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match="unreachable"):
        train(cfg)
    assert not (tmp_path / "ray").exists(), "nothing may start before the tracking check"


@pytest.mark.parametrize("ingest", ["materialize", "stream"])
def test_an_error_raised_in_ray_data_ends_the_command_in_its_own_line(prepared, mini_ava, tmp_path, capsys, ingest):
    """A shard row whose JPEG is damaged fails inside Ray Data as the train split is decoded: in the driver when it
    is materialized, inside the training worker when it streams (Ray wraps the error three times there:
    WorkerGroupError, RayTaskError, UserCodeException). Either way the command prints the one line the code raised,
    naming the row and the frame."""
    _folder, shards = prepared
    damaged = tmp_path / "damaged_shards"
    shutil.copytree(shards, damaged)
    shard = min((damaged / "train").glob("part-*.parquet"))
    table = pq.read_table(shard)
    frames = table["frames"].to_pylist()
    frames[0][3] = b"\xff\xd8 this is no JPEG"
    pq.write_table(table.set_column(table.schema.get_field_index("frames"), "frames",
                                    pa.array(frames, table.schema.field("frames").type)), shard)
    video, timestamp = table["video_id"][0].as_py(), table["timestamp"][0].as_py()
    argv = ["train", str(QUICKSTART), *tiny_overrides(tmp_path, mini_ava, f"data.shards={damaged}",
                                                      f"data.ingest={ingest}", "tracking.enabled=false")]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evadlab train: error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"evadlab train: error: row {video},{timestamp}: frame 3 is not a readable JPEG"), \
        errors[0]
