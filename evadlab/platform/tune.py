"""Ray Tune sweeps over any config key, chiefly the keep rate and the enhanced weight.

Ray 2.60 pattern: each trial is a function that builds and fits a ``TorchTrainer`` (through ``train``), and
``TuneReportCallback`` passes the workers' metrics up to Tune. The sweep is an MLflow parent run; every trial
is a child run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.tune import Callback

from evadlab.config import (
    VALID_KEYS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    describe_validation_error,
    read_yaml,
)
from evadlab.errors import original_error
from evadlab.pipelines.prepare import require_prepared
from evadlab.platform.compare import format_table, plot_map_vs_gflops, sweep_trials, trade_off_table
from evadlab.platform.tracking import RunLogger, dashboard_lines, is_outage, quick_http, start_run
from evadlab.platform.train import should_evaluate, train, training_splits
from evadlab.storage import absolute, exists, join, read_text, write_bytes, write_text


class SearchDimension(BaseModel):
    """Exactly one of: ``grid`` (every value), ``choice`` (sampled), ``uniform`` or ``loguniform`` ([low, high])."""

    model_config = ConfigDict(extra="forbid")
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = Field(None, description="low > 0")

    @model_validator(mode="after")
    def _one_kind(self) -> SearchDimension:
        given = [name for name in ("grid", "choice", "uniform", "loguniform") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive lower bound")
        return self

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(self.grid)
        if self.choice is not None:
            return tune.choice(self.choice)
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        return tune.loguniform(*self.loguniform)


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = {}
    search_space: dict[str, SearchDimension]
    trial_cpus: float = Field(0.01, ge=0, description="CPUs held by each trial's driver (the workers hold their own)")


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepSpec, ExperimentConfig]:
    """The sweep file and its base experiment with the sweep's and the command line's overrides applied."""
    path = Path(path)
    try:
        spec = SweepSpec.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from None
    unknown = [key for key in [*spec.search_space, *spec.overrides] if key not in VALID_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown config keys in the sweep: {unknown}")
    base_path = (path.parent / spec.base).resolve()
    tree = apply_overrides(read_yaml(base_path), [f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()])
    tree = apply_overrides(tree, list(overrides))
    return spec, build_config(tree, str(base_path))


def _trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str) -> ExperimentConfig:
    tree = apply_overrides(json.loads(json.dumps(base)), [f"{k}={json.dumps(v)}" for k, v in sampled.items()])
    # Trials log as children of the sweep's run, in the sweep's MLflow experiment.
    tree.setdefault("tracking", {})["experiment"] = tree["tracking"].get("experiment") or tree["name"]
    tree["name"] = f"{tree['name']}_{trial_id}"
    tree.setdefault("train", {})["resume"] = True
    return build_config(tree, f"trial {trial_id}")


def run_trial(trial_config: dict[str, Any]) -> None:
    """One Tune trial = one full Ray Train run, logged as a child of the sweep's MLflow run. A restored trial
    continues its own Ray Train run (``train.resume``) instead of starting over."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    sampled = {key: trial_config[key] for key in trial_config["search_keys"]}
    cfg = _trial_config(trial_config["base"], sampled, tune.get_context().get_trial_id())
    train(cfg, parent_run_id=trial_config["parent_run_id"], callbacks=[TuneReportCallback()])


def _scheduler(cfg: ExperimentConfig):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period)


def run_sweep(sweep_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``evadlab tune``: run (or, with ``tune.resume=true``, continue) a sweep and summarise it in MLflow."""
    from ray import tune

    from evadlab.ray_session import ensure_ray, verbose_console

    spec, base = load_sweep(sweep_path, overrides)
    require_prepared(base, training_splits(base))
    storage_path = absolute(base.train.storage_path)
    sweep_dir = join(storage_path, spec.name)
    parent_run_id = _parent_run(spec, base, sweep_dir)
    ensure_ray()
    trainable = tune.with_resources(run_trial, {"cpu": spec.trial_cpus})
    if base.tune.resume and tune.Tuner.can_restore(sweep_dir):
        print(f"evadlab tune: resuming {sweep_dir}; finished trials are kept")
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"base": base.model_dump(mode="json"), "parent_run_id": parent_run_id,
                         "search_keys": list(spec.search_space),
                         **{key: dim.to_tune() for key, dim in spec.search_space.items()}},
            tune_config=tune.TuneConfig(metric=base.tune.metric, mode=base.tune.mode,
                                        num_samples=base.tune.num_samples,
                                        max_concurrent_trials=base.tune.max_concurrent_trials,
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
    run_id = start_run(base, run_name=spec.name, tags={"evadlab.job": "sweep",
                                                       "evadlab.search_space": ",".join(spec.search_space)})
    write_text(marker, run_id)
    RunLogger(base.tracking.resolved_uri(), run_id).log_text(yaml.safe_dump(spec.model_dump(mode="json")), "sweep.yaml")
    return run_id


def summarise_sweep(spec: SweepSpec, base: ExperimentConfig, parent_run_id: str, sweep_dir: str) -> list[dict]:
    """Gives the parent run the table of all trials, the best config and the mAP-vs-GFLOPs Pareto plot."""
    from mlflow.tracking import MlflowClient

    uri = base.tracking.resolved_uri()
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    rows = trade_off_table(sweep_trials(client, parent))
    logger = RunLogger(uri, parent_run_id)
    if rows:
        table = format_table(rows)
        print(table)
        logger.log_text(table + "\n", "trials.txt")
        logger.log_text(json.dumps(rows, indent=1), "trials.json")
        plot = plot_map_vs_gflops(rows, f"sweep {spec.name}")
        write_bytes(join(sweep_dir, "map_vs_gflops.png"), plot)
        logger.log_bytes(plot, "map_vs_gflops.png")
        best = max(rows, key=lambda r: r["mAP"] if base.tune.mode == "max" else -r["mAP"])
        best_params = client.get_run(best["run_id"]).data.params
        logger.log_text(yaml.safe_dump({k: best_params[k] for k in sorted(best_params)}), "best_config.yaml")
        # At the parent's start time: a resumed sweep summarised again logs the same points, which MLflow keeps once.
        logger.log_metrics({"best/mAP": best["mAP"], "best/gflops": best["gflops"]}, step=0,
                           timestamp=parent.info.start_time)
        logger.set_tags({"evadlab.best_run_id": best["run_id"], "evadlab.best_keep_rate": str(best["keep_rate"]),
                         "evadlab.best_enhanced_weight": str(best["enhanced_weight"])})
    logger.end()
    experiment_id = parent.info.experiment_id
    print(f"evadlab tune: sweep {spec.name}, {len(rows)} trial(s) with a frame-mAP; MLflow parent run {parent_run_id}, "
          f"experiment {experiment_id}, at {uri}")
    for line in dashboard_lines(uri, experiment_id):
        print(f"  dashboard: {line}")
    print(f"  table and plot again: evadlab compare --sweep {spec.name} --tracking-uri {uri}")
    return rows
