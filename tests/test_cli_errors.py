"""Every command, given bad arguments or broken files, ends with one line `evadlab <command>: error: ...` naming the
file and what is wrong, exit code 2, no traceback (unless asked for) and never torch's advice to load with
weights_only=False. Errors raised inside Ray tasks and actors read the same."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from evadlab.cli import CONTINUE_HINTS, RETRY_HINT, main, report_error
from evadlab.config import load_config
from evadlab.errors import (
    LOST_PROCESS_KINDS,
    USER_ERROR_KINDS,
    RemoteError,
    is_lost_process,
    is_user_error,
    original_error,
)
from evadlab.models.checkpoints import save_training_checkpoint
from evadlab.pipelines.prepare import prepare
from evadlab.platform.modeling import build_model
from evadlab.platform.train import config_yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
SWEEP = ROOT / "experiments" / "sweeps" / "quickstart.yaml"
VIT_B = ROOT / "experiments" / "evad_vit_b_16x4_ktp.yaml"
IMAGE = ROOT / "tests" / "data" / "ava_samples" / "mmaction2_tests_data_imgs" / "img_00001.jpg"


@pytest.fixture(scope="module")
def files(tmp_path_factory, mini_ava, ray_local) -> dict[str, Path]:
    """Prepared quickstart shards and the files a user may get wrong."""
    folder = tmp_path_factory.mktemp("cli_errors")
    settings = quickstart_settings(folder, mini_ava)
    cfg = load_config(QUICKSTART, settings)
    prepare(cfg)
    model = build_model(cfg.model)
    checkpoint = save_training_checkpoint(folder / "quickstart.pt", model_state=model.state_dict(), optimizer_state={},
                                          epoch=3, config_yaml=config_yaml(cfg))
    released = folder / "EVAD_released.pth"
    torch.save({"epoch": 11, "model_state": model.state_dict(), "cfg": "TRAIN:\n  ENABLE: True\n"}, released)
    truncated = folder / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    notes = folder / "notes.txt"
    notes.write_text("not a checkpoint\n")
    (folder / "taken.csv").mkdir()  # where a demo's detections CSV would go
    with contextlib.closing(sqlite3.connect(folder / "other_app.db")) as other_app:
        other_app.execute("CREATE TABLE t (x)")
    (folder / "empty.db").touch()
    (folder / "bad_val.csv").write_text("synth_002,0902,0.1,0.1,0.5,0.5,12,0\nsynth_002,-5,0.1,0.1,0.5,0.5,12,0\n")
    video = folder / "clip.mp4"
    video.write_bytes((mini_ava / "videos" / min(p.name for p in (mini_ava / "videos").iterdir())).read_bytes())
    return {"folder": folder, "root": mini_ava, "checkpoint": checkpoint, "released": released,
            "truncated": truncated, "notes": notes, "video": video, "missing": folder / "missing.pt"}


def quickstart_settings(folder: Path, root: Path) -> list[str]:
    return [f"data.root={root}", f"data.shards={folder / 'shards'}", f"train.storage_path={folder / 'ray'}",
            f"output_dir={folder / 'runs'}", "tracking.enabled=false"]


def vit_b_settings(folder: Path, root: Path) -> list[str]:
    """The ViT-B config on the quickstart's shards (same clip spec)."""
    return [*quickstart_settings(folder, root), "data.source=videos", "data.short_side=64", "data.max_long_side=128"]


def cases(f: dict[str, Path]) -> list[tuple[list[str], str]]:
    """(arguments, the message after `evadlab <command>: error: `, as a regular expression)."""
    q, b = quickstart_settings(f["folder"], f["root"]), vit_b_settings(f["folder"], f["root"])
    pt, released, truncated, notes, missing, folder = (
        str(f[k]) for k in ("checkpoint", "released", "truncated", "notes", "missing", "folder"))
    e = re.escape
    evaluate, train, demo = ["evaluate", str(QUICKSTART)], ["train", str(QUICKSTART)], ["demo", str(f["video"])]
    absent = rf"checkpoint {e(missing)} does not exist"
    not_torch = r"is not a PyTorch checkpoint( .+)?"
    cut_short = rf"{e(truncated)} is not a PyTorch checkpoint or is truncated \(.+\)"
    misfit = (rf"{e(pt)} does not fit the configured model: \d+ missing keys: [^;]+; \d+ wrong shapes \(checkpoint "
              r"vs model\): patch_embed\.proj\.weight \(96, 3, 2, 16, 16\) vs model \(768, 3, 2, 16, 16\), "
              r"(\S+ \([\d, ]+\) vs model \([\d, ]+\), ){4}\.\.\.")
    unreachable = r"MLflow tracking server at http://127.0.0.1:9 is unreachable .*"
    return [
        ([*evaluate, "--checkpoint", missing, *q], absent),
        ([*evaluate, "--checkpoint", notes, *q], rf"{e(notes)} {not_torch}"),
        ([*evaluate, "--checkpoint", str(IMAGE), *q], rf"{e(str(IMAGE))} {not_torch}"),
        ([*evaluate, "--checkpoint", truncated, *q], cut_short),
        (["evaluate", str(VIT_B), "--checkpoint", pt, *b], misfit),
        ([*evaluate, *q], r"evaluate needs a checkpoint: pass --checkpoint or set model.checkpoint"),
        ([*evaluate, "--checkpoint", pt, *q, "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9"], unreachable),
        # Ray Data would wait forever for actors the cluster cannot place: refused before the evaluation's MLflow run.
        ([*evaluate, "--checkpoint", pt, *q, "eval.cpus_per_actor=64", "tracking.enabled=true",
          f"tracking.uri=sqlite:///{folder}/evaluate_refused.db"],
         (r"1 inference actor\(s\) \(eval.concurrency\) need 64 CPUs \(eval.cpus_per_actor=64, eval.num_gpus=0 each, "
          r"each actor on one node\) "
          r"but the cluster has [\d.]+ CPUs: lower eval.concurrency, eval.cpus_per_actor or eval.num_gpus, or add nodes")),
        ([*evaluate, "--checkpoint", pt, *q, "eval.concurrency=3", "eval.num_gpus=0.5"],
         (r"3 inference actor\(s\) \(eval.concurrency\) need 3 CPUs, 1.5 GPUs \(eval.cpus_per_actor=1, "
          r"eval.num_gpus=0.5 each, each actor on one node\) but the cluster has [\d.]+ CPUs, 0 GPUs: .*")),
        (["run", str(QUICKSTART), *q, "eval.every_epochs=0", "eval.concurrency=64"],
         r"64 inference actor\(s\) \(eval.concurrency\) need 64 CPUs .*"),
        ([*train, *q, f"model.checkpoint={missing}"], absent),
        ([*train, *q, f"model.checkpoint={truncated}"], cut_short),
        ([*train, *q, f"model.pretrained={notes}"], rf"{e(notes)} {not_torch}"),
        (["train", str(VIT_B), *b, f"model.checkpoint={pt}"], misfit),
        ([*train, *q, "trian.epochs=2"], r".*unknown key 'trian.epochs' \(did you mean 'train.epochs'\?\)"),
        ([*demo, "--checkpoint", released],
         rf"{e(released)} carries no evadlab config \(a released EVAD file\?\); pass --config .*"),
        ([*demo, "--checkpoint", pt, "--config", str(VIT_B)], misfit),
        ([*demo, "--checkpoint", missing], absent),
        ([*demo, "--checkpoint", truncated], cut_short),
        (["demo", f"{folder}/absent.mp4", "--checkpoint", pt], rf"video {e(folder)}/absent\.mp4 does not exist"),
        ([*demo, "--checkpoint", pt, "--fps", "0"], r"--fps must be positive, got 0.0"),
        ([*demo, "--checkpoint", pt, "--out", f"{notes}/annotated.mp4"], (rf"--out {e(notes)} cannot be written "
         rf"\({e(notes)} is a file\)")),
        (["flops", f"{folder}/absent.yaml"], rf"config file {e(folder)}/absent\.yaml does not exist"),
        (["flops", "/dev/null"], r"/dev/null: the file is empty \(a config needs at least its name\)"),
        (["flops", ""], r"config file '': an empty path names no file"),
        (["demo", folder, "--checkpoint", pt], rf"video {e(folder)} is a folder, not a video file"),
        (["flops", str(QUICKSTART), "model.keep_rate=1.5"], r".*'model.keep_rate'.*"),
        (["prepare", str(QUICKSTART), f"data.root={folder}/no_ava"],
         rf"the train annotations {e(folder)}/no_ava/annotations/ava_train_v2\.2\.csv do not exist"),
        (["run", str(QUICKSTART), f"data.root={folder}/never_written", "tracking.uri=http://127.0.0.1:9"], unreachable),
        (["tune", f"{folder}/absent_sweep.yaml"], rf"config file {e(folder)}/absent_sweep\.yaml does not exist"),
        (["ava-map", "--labelmap", notes, "--groundtruth", missing, "--detections", missing], rf".*{e(notes)}.*"),
        (["compare", "--tracking-uri", "http://127.0.0.1:9"], unreachable),
        ([*train, *q, "tracking.enabled=true", "tracking.uri=mlruns"], (r"tracking.uri 'mlruns' is no MLflow tracking "
         r"store evadlab can use: give a server \(http://host:port\) or a database .*")),
        ([*train, *q, "tracking.enabled=true", "tracking.uri=htp://127.0.0.1:5000"], r"tracking.uri 'htp://.*"),
        ([*train, *q, "tracking.enabled=true", f"tracking.uri=sqlite:///{notes}/mlflow.db"],
         (rf"cannot open the MLflow database {e(notes)}/mlflow\.db "
         rf"\(tracking.uri sqlite:///{e(notes)}/mlflow\.db\): .*")),
        ([*train, *q, "train.num_workers=[64, 128]", "train.cpus_per_worker=2"],
         (r"64 worker\(s\) \(train.num_workers\) need 128 CPUs \(train.cpus_per_worker=2 each, each worker on one "
         r"node\) but the cluster has "
         r"[\d.]+ CPUs: lower train.num_workers or train.cpus_per_worker, or add nodes")),
        ([*evaluate, "--checkpoint", pt, *q, "data.label_map=nope.pbtxt"],
         rf"the label map {e(str(f['root']))}/annotations/nope\.pbtxt \('data\.label_map'\) does not exist"),
        # The official reader's refusal comes before the inference, not after it.
        ([*evaluate, "--checkpoint", pt, *q, f"data.val_annotations={folder}/bad_val.csv"],
         rf"{e(folder)}/bad_val\.csv:2: timestamp -5 outside .*"),
        ([*train, *q, "data.val_annotations=val.csv", "eval.every_epochs=1"],
         rf"the val annotations {e(str(f['root']))}/annotations/val\.csv \('data\.val_annotations'\) does not exist"),
        ([*evaluate, "--checkpoint", pt, *q, f"output_dir={notes}/out"],
         rf"output_dir {e(notes)}/out/quickstart cannot be written \({e(notes)} is a file\)"),
        (["run", str(QUICKSTART), *q, f"output_dir={notes}/out"], (rf"output_dir {e(notes)}/out/quickstart cannot be "
         rf"written \({e(notes)} is a file\)")),
        # A key that names a folder to write, given a file: one line naming the key, before any work.
        (["prepare", str(QUICKSTART), *q, f"data.shards={notes}"],
         rf"data.shards {e(notes)} cannot be written \({e(notes)} is a file\)"),
        ([*train, *q, f"train.storage_path={notes}/ray"],
         rf"train.storage_path {e(notes)}/ray cannot be written \({e(notes)} is a file\)"),
        (["run", str(QUICKSTART), *q, f"train.storage_path={notes}"],
         rf"train.storage_path {e(notes)} cannot be written \({e(notes)} is a file\)"),
        (["run", str(QUICKSTART), *q, f"data.shards={notes}/shards"],
         rf"data.shards {e(notes)}/shards cannot be written \({e(notes)} is a file\)"),
        (["run", str(QUICKSTART), *q, f"data.root={notes}", "data.synthetic=true"],
         rf"data.root {e(notes)} cannot be written \({e(notes)} is a file\)"),
        (["tune", str(SWEEP), *q, f"train.storage_path={notes}"],
         rf"train.storage_path {e(notes)} cannot be written \({e(notes)} is a file\)"),
        (["tune", str(SWEEP), *q, f"warm_start.checkpoint={notes}/base.pt"],
         rf"warm_start.checkpoint {e(notes)} cannot be written \({e(notes)} is a file\)"),
        (["tune", str(SWEEP), *q, f"warm_start.checkpoint={missing}", "warm_start.train_if_missing=null"],
         rf"warm_start.checkpoint: {absent}"),
        (["tune", str(SWEEP), *q, f"warm_start.checkpoint={truncated}"], rf"warm_start.checkpoint: {cut_short}"),
        ([*train, *q, f"model.checkpoint={folder}"], rf"checkpoint {e(folder)} is a folder, not a checkpoint file"),
        ([*train, *q, "train.storage_path=s3://"],
         r"train.storage_path 's3://' is no storage Ray can open: s3:// names no bucket: give scheme://bucket/folder"),
        ([*train, *q, "train.storage_path=foo://bucket/ray"], (r"train.storage_path 'foo://bucket/ray' is no storage Ray "
         r"can open: Unrecognized filesystem type in URI: foo://bucket/ray")),
        # The demo's outputs: never the input video, never a CSV over the video, never a folder.
        ([*demo, "--checkpoint", pt, "--out", f"{folder}/annotated.csv"],
         rf"--out {e(folder)}/annotated\.csv must end in \.mp4: .*"),
        ([*demo, "--checkpoint", pt, "--out", str(f["video"])], rf"--out {e(str(f['video']))} is the input video: .*"),
        ([*demo, "--checkpoint", pt, "--out", f"{folder}/taken.mp4"],
         rf"--out: {e(folder)}/taken\.csv is a folder; name a file"),
        ([*demo, "--checkpoint", "runs:/0123/checkpoint.pt", "--tracking-uri", f"sqlite:///{notes}"],
         rf"cannot open the MLflow database {e(notes)} \(tracking.uri sqlite:///{e(notes)}\): file is not a database"),
        (["compare", "--out", notes, "--tracking-uri", "http://127.0.0.1:9"],
         rf"--out {e(notes)} cannot be written \({e(notes)} is a file\)"),
        # A binary file or a folder where a text file of AVA is expected: named, before any parser sees it.
        (["ava-map", "--labelmap", pt, "--groundtruth", missing, "--detections", missing],
         rf"label map file {e(pt)} is not a text file \(not UTF-8 at byte \d+\)"),
        (["ava-map", "--labelmap", str(f["root"] / "annotations" / "ava_action_list_v2.2_for_activitynet_2019.pbtxt"),
          "--groundtruth", str(f["root"] / "annotations" / "ava_val_v2.2.csv"), "--detections", pt],
         rf"detections file {e(pt)} is not a text file \(not UTF-8 at byte \d+\)"),
        (["ava-map", "--labelmap", folder, "--groundtruth", missing, "--detections", missing],
         rf"label map file {e(folder)} is a folder, not a file"),
        (["compare", "--tracking-uri", f"sqlite:///{folder}/mlflwo.db"],
         (rf"no MLflow database at {e(folder)}/mlflwo\.db \(tracking.uri sqlite:///{e(folder)}/mlflwo\.db\): "
         r"check the path")),
        # Another program's database is never written to, and a reader finds nothing in an empty one.
        (["compare", "--tracking-uri", f"sqlite:///{folder}/other_app.db"],
         rf"{e(folder)}/other_app\.db is no MLflow database \(tables t; tracking.uri sqlite:///.*\): check the path"),
        (["compare", "--tracking-uri", f"sqlite:///{folder}/empty.db"],
         rf"{e(folder)}/empty\.db is no MLflow database \(no tables; .*"),
        ([*train, *q, "tracking.enabled=true", f"tracking.uri=sqlite:///{folder}/other_app.db"],
         rf"{e(folder)}/other_app\.db is no MLflow database \(tables t; .*"),
        (["synth", "--out", f"{notes}/ava"], rf"--out {e(notes)}/ava cannot be written \({e(notes)} is a file\)"),
        (["synth", "--out", notes], rf"--out {e(notes)} cannot be written \({e(notes)} is a file\)"),
        (["synth", "--out", "s3://bucket/ava"], r"--out 's3://bucket/ava': synth writes to a local folder .*"),
        (["synth", "--out", ""], r"--out '': synth writes to a local folder .*"),
        (["synth", "--out", str(f["root"])], (rf"--out {e(str(f['root']))} is not empty: synth writes a whole dataset "
         r"there, replacing files of the same names; choose a new folder or remove this one")),
        (["tracking", "replay", missing], rf"no MLflow backlog at {e(missing)} .*"),
    ]


def test_each_bad_input_ends_in_one_line_with_exit_code_2(files, capsys):
    capsys.readouterr()
    for argv, message in cases(files):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        prefix = f"evadlab {' '.join(argv[:2]) if argv[0] == 'tracking' else argv[0]}: error: "
        assert lines[0].startswith(prefix) and re.fullmatch(message, lines[0].removeprefix(prefix)), (argv, lines[0])
        assert "Traceback" not in err and "weights_only=False" not in err
    assert not (files["folder"] / "never_written").exists(), "run checks the tracking server before it synthesises"
    assert (files["folder"] / "empty.db").stat().st_size == 0
    with contextlib.closing(sqlite3.connect(files["folder"] / "other_app.db")) as other_app:
        assert other_app.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
    assert not (files["folder"] / "ray").exists() and not (files["folder"] / "runs").exists(), "nothing may start"
    refused = MlflowClient(f"sqlite:///{files['folder']}/evaluate_refused.db")
    assert refused.search_runs([e.experiment_id for e in refused.search_experiments()]) == [], \
        "an evaluation the cluster cannot hold opens no MLflow run"


def test_argument_errors_are_one_line_too(capsys):
    for argv, message in [
        (["evaluate"], ("evadlab evaluate: error: the following arguments are required: config "
                       "(see 'evadlab evaluate --help')")),
        (["evaluate", str(QUICKSTART), "--checkpoint", "x.pt", "--bogus"],
         "evadlab evaluate: error: unrecognized arguments: --bogus (see 'evadlab evaluate --help')"),
        (["trian"], None),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and (message is None or lines[0] == message), lines
        assert lines[0].startswith("evadlab")


def evadlab(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evadlab.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, check=False)


def test_a_real_process_prints_one_line_and_the_traceback_only_when_asked(files):
    args = ("demo", str(files["video"]), "--checkpoint", str(files["truncated"]))
    plain = evadlab(*args, EVADLAB_DEBUG="")
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith(f"evadlab demo: error: {files['truncated']} is ")
    debug = evadlab("--debug", *args)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_command_refused_after_the_tracking_check_leaves_no_new_mlflow_database(files, tmp_path, capsys):
    store = tmp_path / "tracking" / "mlflow.db"
    arguments = ["train", str(QUICKSTART), *quickstart_settings(files["folder"], files["root"]), "tracking.enabled=true",
                 f"tracking.uri=sqlite:///{store}", "train.num_workers=[64, 128]", "train.cpus_per_worker=2"]
    assert main(arguments) == 2
    assert "64 worker(s) (train.num_workers) need 128 CPUs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [], "no empty database, no folder for it, no probe file"


def test_a_bad_config_or_sweep_file_is_refused_before_torch_ray_or_mlflow_are_imported(tmp_path):
    """A typo in a config is answered at once (~0.3 s), not after the ~6 s of imports the command itself needs."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrain:\n  epocs: 3\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {QUICKSTART}\nsearch_space: {{model.keep_rat: {{grid: [0.5]}}}}\n")
    code = (
        "import sys\n"
        "from evadlab.cli import main\n"
        f"codes = [main([command, {str(bad)!r}]) for command in ('train', 'prepare', 'evaluate', 'run')]\n"
        f"codes.append(main(['tune', {str(sweep)!r}]))\n"
        "heavy = sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'ray', 'mlflow'})\n"
        "print(codes, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.strip() == "[2, 2, 2, 2, 2] []", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"evadlab {command}" for command in
                                                       ("train", "prepare", "evaluate", "run", "tune")], lines
    assert all("'train.epocs' (did you mean 'train.epochs'?)" in line for line in lines[:4]), lines
    assert "search_space: unknown key 'model.keep_rat' (did you mean 'model.keep_rate'?)" in lines[4], lines


def test_errors_in_ray_tasks_and_data_actors_read_as_raised(ray_local, capsys):
    import ray
    import ray.data

    from evadlab.models.checkpoints import CheckpointError

    @ray.remote
    def load(path: str):
        raise CheckpointError(f"{path} does not fit the configured model: 1 missing keys: norm.weight")

    with pytest.raises(Exception) as task_error:
        ray.get(load.remote("/data/model.pt"))
    cause = original_error(task_error.value)
    assert type(cause) is CheckpointError

    class Detector:
        def __call__(self, batch):
            raise ValueError("keyframe vid,902: cannot decode its frames")

    with pytest.raises(Exception) as actor_error:
        ray.data.range(2).map_batches(Detector, concurrency=1).take_all()
    cause = original_error(actor_error.value)
    assert isinstance(cause, RemoteError) and cause.kind == "ValueError" and is_user_error(cause)

    @ray.remote(num_cpus=0)
    class Controller:  # as Ray Train's controller fails when its storage cannot be created
        def __init__(self):
            raise OSError("When creating bucket 'runs': AWS Error NETWORK_CONNECTION")

        def ready(self) -> bool:
            return True

    with pytest.raises(Exception) as init_error:
        ray.get(Controller.remote().ready.remote())
    assert "\x1b[" in str(init_error.value), "Ray colours the actor's name"

    args = type("Args", (), {"command": "evaluate", "debug": False})()
    for error, line in [(task_error.value, ("/data/model.pt does not fit the configured model: 1 missing keys: "
                                           "norm.weight")),
                        (actor_error.value, "keyframe vid,902: cannot decode its frames"),
                        (init_error.value, "When creating bucket 'runs': AWS Error NETWORK_CONNECTION")]:
        capsys.readouterr()
        assert report_error(args, error) == 2
        assert capsys.readouterr().err == f"evadlab evaluate: error: {line}\n"


def test_a_lost_ray_process_is_named_with_how_to_continue(ray_local, capsys):
    """A Ray worker killed under a command (the OOM killer, kill -9, a lost node) is neither bad input nor a fault of
    evadlab: one line with Ray's first sentence, the process, and how to keep going; exit code 1."""
    import ray
    from ray.train.v2._internal import exceptions as train_exceptions
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    assert all(hasattr(ray.exceptions, kind) or hasattr(train_exceptions, kind) for kind in LOST_PROCESS_KINDS)

    @ray.remote(max_restarts=0)
    class Worker:
        def pid(self) -> int:
            return os.getpid()

        def train(self) -> None:
            time.sleep(120)

    worker = Worker.remote()
    pid = ray.get(worker.pid.remote())
    training = worker.train.remote()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError) as actor_died:
        ray.get(training, timeout=60)
    # What Ray Train raises for it: a failed health check of the worker, holding Ray's error.
    health_check = WorkerHealthCheckFailedError("A worker health check failed. Worker info: " + "x" * 2000,
                                                failure=actor_died.value)
    assert is_lost_process(original_error(health_check)) and not is_user_error(original_error(health_check))

    @ray.remote(max_retries=0)
    def decode() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(ray.exceptions.WorkerCrashedError) as task_crashed:
        ray.get(decode.remote(), timeout=60)

    lost = "error: a Ray process was lost ("
    for command, error, expected in [
            ("train", health_check, f"The actor died unexpectedly before finishing this task; pid {pid}, ip "),
            ("prepare", task_crashed.value, "The worker died unexpectedly while executing this task)")]:
        capsys.readouterr()
        assert report_error(argparse.Namespace(command=command, debug=False), error) == 1
        line = capsys.readouterr().err
        assert line.count("\n") == 1 and line.startswith(f"evadlab {command}: {lost}") and expected in line, line
        assert "a fault of evadlab" not in line and len(line) < 400, line
        assert CONTINUE_HINTS[command] in line and (RETRY_HINT in line) == (command == "train"), line


def test_the_user_error_kinds_are_the_classes_they_name():
    from evadlab.config import ConfigError, TrackingError
    from evadlab.models.checkpoints import CheckpointError
    from evadlab.pipelines.prepare import UnpreparedDataError

    classes = {cls.__name__: cls for cls in (ValueError, OSError, FileNotFoundError, PermissionError,
                                              IsADirectoryError, ConfigError, TrackingError, CheckpointError,
                                              UnpreparedDataError)}
    assert set(classes) == USER_ERROR_KINDS
    assert all(is_user_error(cls("x")) for cls in classes.values())
    assert not is_user_error(RuntimeError("a fault")) and not is_user_error(RemoteError("KeyError", "'x'"))
