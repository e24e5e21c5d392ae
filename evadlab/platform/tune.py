"""Ray Tune sweeps over any config key, chiefly the keep rate and the enhanced weight.

Ray 2.60 pattern: each trial is a function that builds and fits a ``TorchTrainer`` (through ``train``), and
``TuneReportCallback`` passes the workers' metrics up to Tune. The sweep is an MLflow parent run; every trial
is a child run. Before the first trial the driver checks and prepares everything once (:func:`prepare_sweep`); a
warm-started sweep reads its base model once and hands it to every trial through Ray's object store. The search is
Tune's own (grid / random) or Optuna's multi-objective search over (frame-mAP, cost), with ASHA early stopping.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from evadlab.config import ConfigError, ExperimentConfig, apply_overrides, build_config
from evadlab.errors import original_error
from evadlab.models.checkpoints import CheckpointError
from evadlab.platform.compare import (
    COSTS,
    best_per_objective,
    plot_trade_off,
    report_lines,
    sweep_trials,
    trade_off_table,
)
from evadlab.platform.modeling import StartingWeights, build_model, complete_checkpoint
from evadlab.platform.run import ensure_prepared, require_writable_outputs, synthesise_if_needed
from evadlab.platform.tracking import (
    RunLogger,
    check_tracking_uri,
    dashboard_lines,
    is_outage,
    quick_http,
    start_run,
)
from evadlab.platform.train import INFERENCE_RATE_METRIC, LATENCY_METRIC, should_evaluate, train, worker_remedy
from evadlab.ray_session import cluster_text, copies_that_fit, node_resources, resources_text, total_resources
from evadlab.storage import (
    absolute,
    exists,
    is_local,
    join,
    local_path,
    read_bytes,
    read_text,
    require_writable_folder,
    write_bytes,
    write_text,
)
from evadlab.sweep_config import SweepSpec, WarmStart, base_stage_config, search_space_configs

# How long tune waits for CPUs/GPUs that another (ending) job still holds before it plans its trials.
FREE_WAIT_S = 30.0


def _trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str) -> ExperimentConfig:
    tree = apply_overrides(json.loads(json.dumps(base)), [f"{k}={json.dumps(v)}" for k, v in sampled.items()])
    # Trials log as children of the sweep's run, in the sweep's MLflow experiment.
    tree.setdefault("tracking", {})["experiment"] = tree["tracking"].get("experiment") or tree["name"]
    tree["name"] = f"{tree['name']}_{trial_id}"
    tree.setdefault("train", {})["resume"] = True
    return build_config(tree, f"trial {trial_id}")


def run_trial(trial_config: dict[str, Any], start: StartingWeights | None = None) -> None:
    """One Tune trial = one full Ray Train run, logged as a child of the sweep's MLflow run. ``start`` are the warm
    start's weights, read once by the sweep's driver and handed over through Ray's object store (``tune.with_parameters``).
    A restored trial continues its own Ray Train run (``train.resume``) instead of starting over."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sampled = {key: trial_config[key] for key in trial_config["search_keys"]}
    cfg = _trial_config(trial_config["base"], sampled, tune.get_context().get_trial_id())
    train(cfg, parent_run_id=trial_config["parent_run_id"], callbacks=[TuneReportCallback()], start=start)


def cost_metric(cfg: ExperimentConfig) -> str:
    """The metric of the sweep's cost objective: the model's GFLOPs or its measured inference latency."""
    return "model/gflops" if cfg.tune.cost == "gflops" else LATENCY_METRIC


def _scheduler(cfg: ExperimentConfig):
    """ASHA stops trials on ``tune.metric`` alone (a trial's cost is fixed by its config), after
    ``tune.grace_period`` epochs."""
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", metric=cfg.tune.metric, mode=cfg.tune.mode, max_t=cfg.train.epochs,
                         grace_period=cfg.tune.grace_period)


def search_algorithm(cfg: ExperimentConfig):
    """None for Tune's own generator; for ``tune.search=optuna``, Ray Tune's OptunaSearch over two objectives
    (``tune.metric`` in ``tune.mode``, the cost minimised) with Optuna's NSGA-II or multi-objective TPE sampler,
    seeded with ``train.seed``. The sampler's random first phase is half of ``tune.num_samples`` (at most Optuna's
    defaults: a population of 50, 10 start-up trials), so that a small sweep still gets guided trials."""
    if cfg.tune.search != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    first = max(2, cfg.tune.num_samples // 2)
    if cfg.tune.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=min(first, 50), seed=cfg.train.seed)
    else:
        sampler = optuna.samplers.TPESampler(n_startup_trials=min(first, 10), seed=cfg.train.seed)
    return OptunaSearch(metric=[cfg.tune.metric, cost_metric(cfg)], mode=[cfg.tune.mode, "min"], sampler=sampler)


def concurrent_trials(spec: SweepSpec, cfg: ExperimentConfig, path: str | Path) -> int:
    """How many trials run at once: as many as the cluster's free resources hold, at most
    ``tune.max_concurrent_trials`` (0: no further limit). One trial holds its driver (``trial_cpus``), its
    ``train.num_workers`` workers (each :attr:`~evadlab.config.TrainConfig.worker_resources`: its CPUs, a GPU with
    ``train.use_gpu``, ``train.resources_per_worker``) and ``tune.data_cpus`` for Ray Data's tasks; an elastic trial
    (a range of workers) is counted at its max, so that each gets its largest size when the cluster is whole, and a
    search space over those keys by its largest value. Raises ConfigError, in one line, when a trial of the base
    config or of any value of the search space (:func:`search_space_configs`) does not fit the cluster's total
    resources or its workers do not fit on its nodes (an elastic one at its min). Resources that other jobs hold now
    (or a job that is just ending: Ray frees its CPUs a moment later) are waited for up to ``FREE_WAIT_S``; then the
    trials run one at a time and Tune queues them. Trials whose max the cluster can never hold run one at a time at
    once."""
    import ray

    variants = [(str(path), cfg), *search_space_configs(spec, cfg, path)]
    nodes = node_resources()
    total = total_resources(nodes)
    for label, variant in variants:
        train_cfg = variant.train
        smallest = trial_resources(spec, variant, train_cfg.min_workers)
        if copies_that_fit(nodes, train_cfg.worker_resources) < train_cfg.min_workers or \
                copies_that_fit([total], smallest) < 1:
            raise ConfigError(f"{label}: one trial needs {resources_text(smallest)} ({train_cfg.min_workers} "
                              f"worker(s) x train.cpus_per_worker={train_cfg.cpus_per_worker:g}, each worker on one "
                              f"node, tune.data_cpus={variant.tune.data_cpus:g} for Ray Data, {spec.trial_cpus:g} for "
                              f"its driver) but the cluster has {cluster_text(nodes, smallest)}: "
                              f"{worker_remedy(train_cfg)}")
    sizes = [trial_resources(spec, variant, variant.train.max_workers) for _, variant in variants]
    largest = min(sizes, key=lambda needs: copies_that_fit([total], needs))
    # Waiting helps only when the cluster could hold a trial at its largest, were nothing else running.
    deadline = time.monotonic() + (FREE_WAIT_S if copies_that_fit([total], largest) >= 1 else 0.0)
    free = ray.available_resources()
    while (fits := copies_that_fit([free], largest)) < 1 and time.monotonic() < deadline:
        time.sleep(1.0)
        free = ray.available_resources()
    fits = max(fits, 1)
    wanted = cfg.tune.max_concurrent_trials or fits
    elastic = any(variant.train.elastic for _, variant in variants)
    print(f"evadlab tune: {min(wanted, fits)} trial(s) at a time: each needs {resources_text(largest)}"
          + (" at its largest" if elastic or any(needs != largest for needs in sizes) else "")
          + f", the cluster has {resources_text({name: free.get(name, 0.0) for name in largest})} free"
          + (f" (tune.max_concurrent_trials={wanted} capped)" if wanted > fits else "")
          + ("; an elastic trial trains with the workers the cluster can place, from its min" if elastic else ""))
    return min(wanted, fits)


def trial_resources(spec: SweepSpec, cfg: ExperimentConfig, workers: int) -> dict[str, float]:
    """What one trial of ``workers`` Train workers holds, by Ray's resource names: the workers', its driver's
    ``trial_cpus`` and ``tune.data_cpus``."""
    needs = {name: workers * amount for name, amount in cfg.train.worker_resources.items()}
    needs["CPU"] += spec.trial_cpus + cfg.tune.data_cpus
    return needs


def prepare_sweep(spec: SweepSpec, base: ExperimentConfig,
                  sweep_path: str | Path) -> tuple[StartingWeights | None, int]:
    """Everything a trial would otherwise check or do itself, once, before the first trial: the folders it writes
    (:func:`~evadlab.platform.run.require_writable_outputs`), the MLflow server, the warm start's weights (read and
    fitted on the meta device) or, when its base model is to be trained, the folder of ``warm_start.checkpoint``, all
    before Ray starts; then the cluster's room for a trial, the synthetic data if the config asks for it, the
    prepared shards (a complete prepare is reused, an interrupted one resumed), and the warm start's base model when
    it must be trained. Returns the starting weights (None without a warm start) and how many trials run at once
    (:func:`concurrent_trials`)."""
    from evadlab.ray_session import ensure_ray

    require_writable_outputs(base)
    if base.tracking.enabled:
        check_tracking_uri(base.tracking.resolved_uri())
    warm = spec.warm_start
    trains_base = warm is not None and warm.can_train and not exists(warm.location)
    if trains_base and is_local(warm.location):
        # The base model trains for minutes; where its checkpoint goes is checked first.
        require_writable_folder(local_path(warm.location).parent, "warm_start.checkpoint")
    start = None if warm is None or trains_base else read_warm_start(warm, base)
    ensure_ray()
    concurrency = concurrent_trials(spec, base, sweep_path)
    synthesise_if_needed(base)
    ensure_prepared(base)
    if trains_base:
        start = train_base_model(spec, base, sweep_path)
    elif warm is not None:
        print(f"[3/4] warm start: every trial fine-tunes {warm.location}")
    return start, concurrency


def read_warm_start(warm: WarmStart, cfg: ExperimentConfig) -> StartingWeights:
    """The warm start's checkpoint, read once and fitted to the sweep's model on the meta device (keep rate and EW
    change no weights, so one fit holds for every trial). Raises CheckpointError naming the key and the location."""
    try:
        weights = complete_checkpoint(cfg.model, warm.location, cfg.tracking.resolved_uri())
        build_model(cfg.model, weights, device="meta")
    except CheckpointError as error:
        raise CheckpointError(f"warm_start.checkpoint: {error}") from None
    return weights


def train_base_model(spec: SweepSpec, base: ExperimentConfig, sweep_path: str | Path) -> StartingWeights:
    """The warm start's base stage: trains ``warm_start.train_if_missing``'s config once (its own MLflow run, not a
    trial), copies its final checkpoint to ``warm_start.checkpoint`` and reads it from there."""
    warm = spec.warm_start
    cfg = base_stage_config(spec, base, sweep_path)
    print(f"[3/4] warm start: {warm.location} does not exist; training the base model once ({cfg.name}, "
          f"{cfg.train.epochs} epochs); later sweeps reuse it")
    result = train(cfg)
    if result.checkpoint_path is None:
        raise RuntimeError("the warm start's base stage reported no checkpoint")
    write_bytes(warm.location, read_bytes(result.checkpoint_path))
    mAP = result.metrics.get("progress/last_map")
    print(f"[3/4] warm start: base model written to {warm.location}"
          + (f" (frame-mAP@0.5 {mAP:.4f})" if mAP is not None else "")
          + "".join(f"; model '{name}': {uri}" for name, uri in result.models.items()))
    return read_warm_start(warm, base)


def run_sweep(spec: SweepSpec, base: ExperimentConfig, sweep_path: str | Path) -> list[dict[str, Any]]:
    """``evadlab tune`` of the sweep file ``sweep_path``, loaded by :func:`~evadlab.sweep_config.load_sweep`: check
    and prepare everything once (:func:`prepare_sweep`), then run (or, with ``tune.resume=true``, continue) the sweep
    and summarise it in MLflow. Returns the trade-off table's rows."""
    from ray import tune

    from evadlab.ray_session import verbose_console

    start, concurrency = prepare_sweep(spec, base, sweep_path)
    storage_path = absolute(base.train.storage_path)
    sweep_dir = join(storage_path, spec.name)
    parent_run_id = _parent_run(spec, base, sweep_dir)
    trial = run_trial if start is None else tune.with_parameters(run_trial, start=start)
    trainable = tune.with_resources(trial, {"cpu": spec.trial_cpus})
    print(f"[4/4] trials: {base.tune.search} search over {', '.join(spec.search_space)}")
    if not verbose_console():
        # Tune's new output engine prints its configuration box and TensorBoard hint even at verbose=0; the legacy
        # reporter honours verbose=0. RAY_AIR_NEW_OUTPUT is Tune's own switch between the two.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if base.tune.resume and tune.Tuner.can_restore(sweep_dir):
        print(f"evadlab tune: resuming {sweep_dir}; finished trials are kept")
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"base": base.model_dump(mode="json"), "parent_run_id": parent_run_id,
                         "search_keys": list(spec.search_space),
                         **{key: dim.to_tune() for key, dim in spec.search_space.items()}},
            tune_config=tune.TuneConfig(num_samples=base.tune.num_samples, search_alg=search_algorithm(base),
                                        max_concurrent_trials=concurrency,
                                        scheduler=_scheduler(base)),
            # Tune's own status tables only with --verbose; TrialLines prints a line per trial and epoch.
            run_config=tune.RunConfig(name=spec.name, storage_path=storage_path, callbacks=[TrialLines(base)],
                                      verbose=None if verbose_console() else 0),
        )
    results = tuner.fit()
    rows = summarise_or_say_why_not(spec, base, parent_run_id, sweep_dir, results)
    errors = [original_error(r.error) for r in results if r.error]
    if errors:
        # The first trial's own error ends the command (in one line, as the trial raised it); the count comes first.
        print(f"evadlab tune: {len(errors)} of {len(results)} trial(s) failed; the first failure follows",
              file=sys.stderr)
        raise errors[0]
    return rows


class TrialLines(Callback):
    """Tune callback, in the driver: one line per trial and epoch (its sampled values, loss, clips/s, and the
    frame-mAP of an evaluated epoch) and one per failed trial."""

    def __init__(self, base: ExperimentConfig):
        self.base = base

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        epoch = int(result.get("progress/epoch", 0)) - 1
        sampled = ", ".join(f"{key}={trial.config[key]}" for key in trial.config.get("search_keys", []))
        line = (f"trial {trial.trial_id} ({sampled}): epoch {epoch + 1}/{self.base.train.epochs}, loss "
                f"{result.get('train/epoch_loss', float('nan')):.3f}, {result.get('train/clips_per_s', 0.0):.1f} clips/s")
        if LATENCY_METRIC in result and epoch == 0:
            line += f", inference {result[INFERENCE_RATE_METRIC]:.2f} clips/s ({result[LATENCY_METRIC]:.0f} ms)"
        if should_evaluate(self.base, epoch):
            line += f", frame-mAP {result.get('val/mAP', float('nan')):.4f}"
        print(line, flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        print(f"trial {trial.trial_id}: failed (the error follows at the end)", flush=True)


def summarise_or_say_why_not(spec: SweepSpec, base: ExperimentConfig, parent_run_id: str, sweep_dir: str,
                             results) -> list[dict]:
    """The sweep's summary in MLflow; when the server is away at the end, the trials' results as Tune has them and how
    to summarise later (the finished trials are kept: a resume only summarises)."""
    try:
        with quick_http():
            return summarise_sweep(spec, base, parent_run_id, sweep_dir)
    except Exception as error:
        if not is_outage(error):
            raise
    print(f"evadlab tune: warning: the MLflow server at {base.tracking.resolved_uri()} does not answer, so the sweep "
          f"is not summarised in MLflow; rerun with tune.resume=true when it answers. Trials ({sweep_dir}):",
          file=sys.stderr)
    for result in results:
        metrics = result.metrics or {}
        print(f"  {result.path}: {base.tune.metric} = {metrics.get(base.tune.metric)}", file=sys.stderr)
    return []


def _parent_run(spec: SweepSpec, base: ExperimentConfig, sweep_dir: str) -> str:
    """The sweep's MLflow parent run; a resumed sweep finds its id in the sweep folder."""
    marker = join(sweep_dir, "mlflow_parent_run_id")
    if base.tune.resume and exists(marker):
        return read_text(marker).strip()
    tags = {"evadlab.job": "sweep", "evadlab.search_space": ",".join(spec.search_space),
            "evadlab.search": base.tune.search, "evadlab.cost": base.tune.cost}
    if spec.warm_start is not None:
        tags["evadlab.warm_start"] = spec.warm_start.location
    run_id = start_run(base, run_name=spec.name, tags=tags)
    write_text(marker, run_id)
    RunLogger(base.tracking.resolved_uri(), run_id).log_text(yaml.safe_dump(spec.model_dump(mode="json")), "sweep.yaml")
    return run_id


def summarise_sweep(spec: SweepSpec, base: ExperimentConfig, parent_run_id: str, sweep_dir: str) -> list[dict]:
    """Gives the parent run the table of all trials (``trials.txt``, ``trials.json``), the Pareto set of (mAP,
    ``tune.cost``) (``pareto.json``), the best config per objective (``best_config.yaml`` for mAP,
    ``best_config_<cost>.yaml``), their metrics and tags, and the plot ``map_vs_<cost>.png``; prints the same."""
    from mlflow.tracking import MlflowClient

    uri = base.tracking.resolved_uri()
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    cost = base.tune.cost
    rows = trade_off_table(sweep_trials(client, parent), cost)
    logger = RunLogger(uri, parent_run_id)
    if rows:
        text = "\n".join(report_lines(rows, cost))
        print(text)
        logger.log_text(text + "\n", "trials.txt")
        logger.log_text(json.dumps(rows, indent=1), "trials.json")
        logger.log_text(json.dumps([row for row in rows if row["pareto"]], indent=1), "pareto.json")
        plot = plot_trade_off(rows, f"sweep {spec.name}", cost)
        write_bytes(join(sweep_dir, f"map_vs_{cost}.png"), plot)
        logger.log_bytes(plot, f"map_vs_{cost}.png")
        log_best_per_objective(client, logger, rows, cost, parent.info.start_time)
    logger.end()
    experiment_id = parent.info.experiment_id
    print(f"evadlab tune: sweep {spec.name}, {len(rows)} trial(s) with a frame-mAP; MLflow parent run {parent_run_id}, "
          f"experiment {experiment_id}, at {uri}")
    for line in dashboard_lines(uri, experiment_id):
        print(f"  dashboard: {line}")
    print(f"  table and plot again: evadlab compare --sweep {spec.name} --tracking-uri {uri}")
    return rows


def log_best_per_objective(client, logger: RunLogger, rows: list[dict], cost: str, timestamp: int) -> None:
    """The best trial per objective on the parent run: its config as ``best_config.yaml`` (mAP) and
    ``best_config_<cost>.yaml``, ``best/*`` metrics and ``evadlab.best*`` tags."""
    column = COSTS[cost][0]
    for objective, row in best_per_objective(rows, cost).items():
        params = client.get_run(row["run_id"]).data.params
        suffix = "" if objective == "mAP" else f"_{cost}"
        logger.log_text(yaml.safe_dump({k: params[k] for k in sorted(params)}), f"best_config{suffix}.yaml")
        logger.set_tags({f"evadlab.best{suffix}_run_id": row["run_id"],
                         f"evadlab.best{suffix}_keep_rate": str(row["keep_rate"]),
                         f"evadlab.best{suffix}_enhanced_weight": str(row["enhanced_weight"])})
        # At the parent's start time: a resumed sweep summarised again logs the same points, which MLflow keeps once.
        metrics = {f"best{suffix}/mAP": row["mAP"], f"best{suffix}/gflops": row["gflops"]}
        if not math.isnan(row[column]) and column != "gflops":
            metrics[f"best{suffix}/{column}"] = row[column]
        logger.log_metrics(metrics, step=0, timestamp=timestamp)
