"""The ``evadlab`` command line. Heavy imports (torch, Ray, MLflow) happen inside each command so that
``evadlab --help`` and config errors answer at once.

Every error ends the command with one line, ``evadlab <command>: error: <message>``, on stderr: exit code 2 for bad
input (arguments, files, configs, unreachable services), 1 for anything else (a lost Ray process says which and how
to continue). Errors raised inside Ray workers and actors are reported as the worker raised them. ``--debug`` or
``EVADLAB_DEBUG=1`` adds the traceback. Ctrl-C ends it with ``evadlab <command>: interrupted``, exit code 130.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from evadlab.config import load_config
from evadlab.errors import (
    INTERRUPTIONS,
    is_lost_process,
    is_user_error,
    kind_of,
    lost_process_line,
    one_line,
    original_error,
)
from evadlab.memory import reuse_freed_memory

DEBUG_VARIABLE = "EVADLAB_DEBUG"
# 128 + SIGINT, as shells report a command ended by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130
# How to continue what a command was doing when it stopped part way (Ctrl-C, a lost Ray process).
CONTINUE_HINTS = {
    "prepare": "run it again to continue: the finished shard parts are kept",
    "train": "add train.resume=true to continue the run from its last checkpoint",
    "run": "run it again with train.resume=true: the shards are kept and the run continues from its last checkpoint",
    "tune": "add tune.resume=true to continue the sweep: the prepared shards and any finished trials are kept",
}
# What keeps a training going when one of its workers or nodes is lost.
RETRY_HINT = "train.max_failures=N has Ray replace lost workers and resume from the last checkpoint"
# The same name as evadlab.ray_session.VERBOSE_VARIABLE, which is not imported here: it imports Ray.
VERBOSE_VARIABLE = "EVADLAB_VERBOSE"


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in the command's one-line form (argparse would print the usage first), which reads
    an argument that names an existing file as a value even when it starts with '-', as real AVA video ids do
    (``-5KQ66BBWC4.mp4``); argparse alone would take it for an unknown option."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _parse_optional(self, arg_string: str):
        if arg_string.startswith("-") and arg_string not in self._option_string_actions and Path(arg_string).exists():
            return None
        return super()._parse_optional(arg_string)


def _config_command(parser: argparse.ArgumentParser, name: str, help_text: str,
                    config_help: str = "experiment YAML (see experiments/)") -> argparse.ArgumentParser:
    sub = parser.add_parser(name, help=help_text, description=help_text)
    sub.add_argument("config", help=config_help)
    sub.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                     help="dotted overrides, e.g. train.epochs=3")
    return sub


def _synth_command(commands: argparse._SubParsersAction) -> None:
    """``evadlab synth``: its options."""
    synth_help = "write a synthetic mini-AVA in the official layout"
    synth = commands.add_parser("synth", help=synth_help, description=synth_help + " into a new or empty folder")
    synth.add_argument("--out", required=True, help="the dataset's folder (new or empty; a path or a file:// URI)")
    synth.add_argument("--videos", type=int, default=6,
                       help="videos; the last third (at least one) are val (default 6)")
    synth.add_argument("--seconds", type=int, default=12, help="seconds per video, keyframes: seconds - 3 (default 12)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same dataset (default 0)")
    synth.add_argument("--frames", action="store_true", help="also write 30 fps JPEG frame folders")
    synth.add_argument("--label-map", help="custom classes (pbtxt or 'id: name'), named stand/walk/sit/bend/talk/watch")


def _ava_map_command(commands: argparse._SubParsersAction) -> None:
    """``evadlab ava-map``: its options."""
    ava_map_help = "AVA frame-mAP of a detections CSV (the official ActivityNet evaluation's rules)"
    ava_map = commands.add_parser("ava-map", help=ava_map_help, description=ava_map_help)
    ava_map.add_argument("--labelmap", required=True, help="the label map (pbtxt) of the evaluated classes")
    ava_map.add_argument("--groundtruth", required=True, help="the ground-truth CSV (e.g. ava_val_v2.2.csv)")
    ava_map.add_argument("--detections", required=True, help="the detections CSV (video,t,x1,y1,x2,y2,action,score)")
    ava_map.add_argument("--exclusions", help="the excluded timestamps CSV")
    ava_map.add_argument("--iou", default="0.5", choices=["0.5", "0.5:0.95"],
                         help="0.5 (frame-mAP@0.5, default) or the mean over 0.5:0.95")
    ava_map.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="evadlab", description="EVAD on AVA with Ray and MLflow.")
    parser.add_argument("--debug", action="store_true", help=f"show tracebacks (or set {DEBUG_VARIABLE}=1)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"let Ray and MLflow print their own output too (or set {VERBOSE_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    _synth_command(commands)

    _config_command(commands, "prepare", "Ray Data: AVA videos or frames -> Parquet shards (resumable)")
    _config_command(commands, "train", "Ray Train: train EVAD, log to MLflow")
    evaluate = _config_command(commands, "evaluate", "Ray Data batch inference + AVA frame-mAP")
    evaluate.add_argument("--checkpoint", help="EVAD checkpoint (released or evadlab); default: model.checkpoint")
    _config_command(commands, "tune", "Ray Tune sweep of an experiment's keys, one MLflow child run per trial",
                    config_help="sweep YAML (see experiments/sweeps/)")
    _config_command(commands, "run", "the main job: synth if needed, prepare, train, evaluate")
    flops = _config_command(commands, "flops", "GFLOPs and parameters of the configured model")
    flops.add_argument("--json", action="store_true", help="print one JSON object")

    _ava_map_command(commands)

    demo = commands.add_parser("demo", help="detect actions in any video and write an annotated mp4")
    demo.add_argument("video", help="any video file FFmpeg reads")
    demo.add_argument("--checkpoint", required=True, help="a path, a storage URI, or runs:/ or models:/ in MLflow")
    demo.add_argument("--config", help="experiment YAML of the checkpoint (default: the one stored in it)")
    demo.add_argument("--out", default="annotated.mp4", help="the annotated .mp4 (default: %(default)s); its "
                                                            "detections go beside it as the same name .csv")
    demo.add_argument("--fps", type=float, default=1.0, help="keyframes per second (default: %(default)s)")
    demo.add_argument("--video-id", help="video id of the detections CSV (default: the file name, ',' -> '_')")
    demo.add_argument("--tracking-uri", help="MLflow server of a runs:/ or models:/ checkpoint (default: sqlite "
                                             "mlflow.db in the working directory)")

    compare_help = "mAP vs GFLOPs (or latency) table and Pareto plot of the runs in MLflow"
    compare = commands.add_parser("compare", help=compare_help, description=compare_help)
    compare.add_argument("--experiment", help="MLflow experiment name (default: all)")
    compare.add_argument("--sweep", help="only the trials of this sweep (its name, or its MLflow parent run id)")
    compare.add_argument("--tracking-uri", help="an mlflow server, or a store URI (default: sqlite mlflow.db in the "
                                                "working directory)")
    compare.add_argument("--out", default="runs/compare", help="a folder or a storage URI (file://, s3://, ...)")
    compare.add_argument("--cost", choices=["gflops", "latency"],
                         help="the cost axis of the Pareto front: GFLOPs or the measured inference latency (default: "
                              "the sweep's own, else gflops)")

    tracking = commands.add_parser("tracking", help="MLflow tracking: replay what a run kept while its server was away")
    actions = tracking.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=OneLineParser)
    replay = actions.add_parser("replay", help="send a run's MLflow backlog to the tracking server")
    replay.add_argument("backlog", help="the run's mlflow_backlog.jsonl, or the run folder that holds it")
    replay.add_argument("--tracking-uri", help="send to this server instead of the one the records name")
    return parser


def _synth(args: argparse.Namespace) -> None:
    from evadlab.pipelines.ava import read_label_map
    from evadlab.pipelines.synthetic import generate_mini_ava
    from evadlab.storage import is_local, local_path, require_writable_folder

    if not args.out or not is_local(args.out):
        raise ValueError(f"--out {args.out!r}: synth writes to a local folder (a path or a file:// URI)")
    out = local_path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty: synth writes a whole dataset there, replacing files of the "
                              f"same names; choose a new folder or remove this one")
    require_writable_folder(out, "--out")
    label_map = read_label_map(args.label_map) if args.label_map else None
    summary = generate_mini_ava(out, videos=args.videos, seconds=args.seconds, seed=args.seed, frames=args.frames,
                                label_map=label_map)
    print(json.dumps(summary, default=str))


def _prepare(args: argparse.Namespace) -> None:
    cfg = _load(args)  # before the heavy imports below (~5 s here), so that a bad config is answered at once
    from evadlab.pipelines.prepare import prepare

    prepare(cfg)


def _train(args: argparse.Namespace) -> None:
    cfg = _load(args)
    from evadlab.platform.train import summary_lines, train

    print("\n".join(summary_lines(train(cfg), cfg.train.epochs)))


def _evaluate(args: argparse.Namespace) -> None:
    cfg = _load(args)
    from evadlab.platform.evaluate import evaluate, summary_lines

    for line in summary_lines(evaluate(cfg, checkpoint=args.checkpoint), cfg):
        print(line)


def _tune(args: argparse.Namespace) -> None:
    from evadlab.sweep_config import load_sweep

    spec, base = load_sweep(args.config, args.overrides)  # before the heavy imports below (~6 s here)
    from evadlab.platform.tune import run_sweep

    run_sweep(spec, base, args.config)


def _run(args: argparse.Namespace) -> None:
    cfg = _load(args)
    from evadlab.platform.run import run_main_job

    run_main_job(cfg)


def _flops(args: argparse.Namespace) -> None:
    from evadlab.models.flops import REFERENCE_INPUT_SIZE, flops_report

    cfg = _load(args)
    input_size = (cfg.model.num_frames, cfg.data.short_side, cfg.data.short_side)
    report = flops_report(cfg.model.evad, input_size)
    if args.json:
        print(json.dumps(report))
    else:
        frames, side, _ = input_size
        if input_size != REFERENCE_INPUT_SIZE:
            print(f"GFLOPs at {frames}x{side}x{side}: {report['gflops']:.1f}")
        print(f"GFLOPs at 16x288x288: {report['gflops_16x288x288']:.1f}")
        print(f"parameters: {report['params'] / 1e6:.2f} M")


def _ava_map(args: argparse.Namespace) -> None:
    from evadlab.pipelines.ava_map import ava_map_command

    ava_map_command(args.labelmap, args.groundtruth, args.detections, args.exclusions, args.json, args.iou)


def _demo(args: argparse.Namespace) -> None:
    from evadlab.platform.demo import run_demo

    run_demo(args.video, checkpoint=args.checkpoint, config=args.config, out=args.out, fps=args.fps,
             video_id=args.video_id, tracking_uri=args.tracking_uri)


def _compare(args: argparse.Namespace) -> None:
    from evadlab.platform.compare import compare_runs

    compare_runs(experiment=args.experiment, tracking_uri=args.tracking_uri, out_dir=args.out, sweep=args.sweep,
                 cost=args.cost)


def _tracking(args: argparse.Namespace) -> None:
    from evadlab.platform.tracking import replay_backlog

    sent = replay_backlog(args.backlog, args.tracking_uri)
    print(f"evadlab tracking replay: {sent} records sent; the backlog {args.backlog} is empty and removed")


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


COMMANDS = {
    "synth": _synth, "prepare": _prepare, "train": _train, "evaluate": _evaluate, "tune": _tune,
    "run": _run, "flops": _flops, "ava-map": _ava_map, "demo": _demo, "compare": _compare, "tracking": _tracking,
}


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (0; 1 for a fault of evadlab or a lost Ray process; 2 for bad input;
    130 when interrupted)."""
    args = parse_arguments(build_parser(), argv)
    configure_console(args.verbose)
    try:
        with warnings_as_lines(command_name(args)):
            COMMANDS[args.command](args)
    except Exception as error:  # noqa: BLE001 - every error ends in the command's one line
        return report_error(args, error)
    except INTERRUPTIONS:
        hint = CONTINUE_HINTS.get(args.command)
        print(f"evadlab {command_name(args)}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        session = sys.modules.get("evadlab.ray_session")  # imported by the commands that use Ray, and only by them
        if session is not None:
            session.release_ray()
    return 0


@contextlib.contextmanager
def warnings_as_lines(command: str) -> Iterator[None]:
    """While a command runs, a warning that evadlab's own code raises (rows left out of a file, suspect rows) is one
    line, ``evadlab <command>: warning: <message>``, as errors are, instead of Python's two lines of source file and
    code; other libraries' warnings keep Python's form."""
    package = Path(__file__).resolve().parent
    python_form = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(package):
            print(f"evadlab {command}: warning: {message}", file=file or sys.stderr)
        else:
            python_form(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = python_form


def configure_console(verbose: bool) -> None:
    """``--verbose``: Ray and MLflow print what they print by themselves (see evadlab.ray_session). Otherwise MLflow
    prints its warnings and errors only (its INFO lines, such as creating a SQLite store's tables, ask nothing of a
    user), no link per finished run (the commands' summaries give the dashboard's page) and no progress bar per
    artifact it downloads (a checkpoint read as ``models:/``), through MLflow's own settings, unless they are set."""
    if verbose:
        os.environ[VERBOSE_VARIABLE] = "1"
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed after options too (``evaluate CONFIG --checkpoint F
    key=value``), which argparse alone refuses once the positional list has ended."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if unknown:
        prog = f"{parser.prog} {args.command}"
        parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')\n")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, with its action where it has one (``tracking replay``), for the one-line messages."""
    return f"{args.command} {args.action}" if getattr(args, "action", None) else args.command


def report_error(args: argparse.Namespace, error: Exception) -> int:
    """Prints the one line (after the traceback when debugging) and returns the exit code."""
    if args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(error)
    cause, name = original_error(error), command_name(args)
    if is_user_error(cause):
        print(f"evadlab {name}: error: {one_line(cause)}", file=sys.stderr)
        return 2
    if is_lost_process(cause):
        hints = [RETRY_HINT] if args.command in ("train", "run", "tune") else []
        hints += [CONTINUE_HINTS[args.command]] if args.command in CONTINUE_HINTS else []
        print(f"evadlab {name}: error: {'; '.join([lost_process_line(cause), *hints])}", file=sys.stderr)
        return 1
    print(f"evadlab {name}: error: {kind_of(cause)}: {one_line(cause)} (a fault of evadlab; "
          f"{DEBUG_VARIABLE}=1 shows the traceback)", file=sys.stderr)
    return 1


def command_line() -> int:
    """The ``evadlab`` program (and ``python -m evadlab.cli``): :func:`main`, then an exit without the interpreter's
    final garbage collections, which walk every object the command left (~800,000 after a training run: 2.4 s on a
    2-core machine) only to find nothing to free that exiting does not free. ``gc.freeze`` takes those objects out
    of the collector; every file the command wrote is closed by then. In-process callers (tests) call :func:`main`
    and keep their collector. The process keeps the memory it frees for reuse (:func:`evadlab.memory.reuse_freed_memory`;
    the demo runs its model here)."""
    reuse_freed_memory()
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command_line())
