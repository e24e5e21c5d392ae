"""Sweep files (``evadlab tune``): the schema of a sweep YAML and its loading into a validated
:class:`SweepSpec` and base :class:`~evadlab.config.ExperimentConfig`. Kept apart from
:mod:`evadlab.platform.tune` (Ray Tune, MLflow, torch) so that a bad sweep file is refused before those imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evadlab.config import (
    MLFLOW_URI_PREFIXES,
    VALID_KEYS,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    describe_validation_error,
    folder_name,
    read_yaml,
    unknown_key_message,
)
from evadlab.storage import absolute


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
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice") and not values:
            raise ValueError(f"{kind} needs at least one value")
        if kind == "grid" and (repeated := [value for at, value in enumerate(values) if value in values[:at]]):
            raise ValueError(f"grid repeats {repeated[0]!r}: each grid value is one trial, so a repeat trains the same "
                             f"trial twice (choice samples with weights, if that was meant)")
        if kind in ("uniform", "loguniform") and not values[0] < values[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(values)}")
        if kind == "loguniform" and values[0] <= 0:
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


class WarmStart(BaseModel):
    """Every trial starts from one trained model (read once, on the driver) and fine-tunes it at the trial's keep rate
    and enhanced weight, which change no weights. ``checkpoint``: a local path (relative to the working directory), a
    storage URI or an MLflow ``runs:/`` / ``models:/`` URI. ``train_if_missing``: dotted overrides of the sweep's
    config that train the base model once when ``checkpoint`` (a path or storage URI) does not exist; its final
    checkpoint is written there, so later sweeps reuse it."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    train_if_missing: dict[str, Any] | None = None

    @property
    def location(self) -> str:
        return self.checkpoint if self.checkpoint.startswith(MLFLOW_URI_PREFIXES) else absolute(self.checkpoint)

    @property
    def can_train(self) -> bool:
        return self.train_if_missing is not None and not self.checkpoint.startswith(MLFLOW_URI_PREFIXES)


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base: str = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = {}
    search_space: dict[str, SearchDimension] = Field(min_length=1)
    warm_start: WarmStart | None = None
    trial_cpus: float = Field(0.01, ge=0, description="CPUs held by each trial's driver (the workers hold their own)")

    # The name becomes the sweep's folder under train.storage_path, which tune.resume finds again.
    _folder_name = field_validator("name")(folder_name)


# A sweep file's own keys, dotted as its errors name them (the hints for a misspelt one).
SWEEP_KEYS = (*(name for name in SweepSpec.model_fields if name != "warm_start"),
              *(f"warm_start.{key}" for key in WarmStart.model_fields))


def sweep_hint_keys(tree: dict) -> list[str]:
    """The keys a sweep file may have, for the hints of its unknown keys: :data:`SWEEP_KEYS` and, under each key
    of its search space, the kinds of a search dimension (``grid`` for ``gird``)."""
    space = tree.get("search_space")
    searched = list(space) if isinstance(space, dict) else []
    return [*SWEEP_KEYS, *(f"search_space.{key}.{kind}" for key in searched for kind in SearchDimension.model_fields)]


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepSpec, ExperimentConfig]:
    """The sweep file and its base experiment with the sweep's and the command line's overrides applied (those of
    ``warm_start.*`` change the sweep file's own section). Every value the search space can take (each grid or choice
    value, the bounds of a range) and the base stage's config are validated here, before any trial. Raises
    ConfigError naming the file and key."""
    path = Path(path).expanduser()
    own = [text for text in overrides if text.partition("=")[0].split(".")[0] == "warm_start"]
    tree = apply_overrides(read_yaml(path), own)
    if "search_space" not in tree and {"data", "model", "train"} & set(tree):
        raise ConfigError(f"{path}: an experiment config, not a sweep file (one with base: <config> and "
                          f"search_space:); run it with evadlab run or train, or name it as a sweep file's base")
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc, sweep_hint_keys(tree))}") from None
    for section, keys in (("search_space", spec.search_space), ("overrides", spec.overrides)):
        unknown = [key for key in keys if key not in VALID_KEYS]
        if unknown:
            raise ConfigError(f"{path}: {section}: {'; '.join(unknown_key_message(key) for key in unknown)}")
    base_path = (path.parent / spec.base).resolve()
    try:
        base_tree = read_yaml(base_path)
    except ConfigError as error:
        raise ConfigError(f"{path}: base: {error}") from None
    tree = apply_overrides(base_tree, [f"{k}={json.dumps(v)}" for k, v in spec.overrides.items()])
    tree = apply_overrides(tree, [text for text in overrides if text not in own])
    base = build_config(tree, f"{path} (its base {base_path} with the sweep's and the command line's overrides)")
    check_search_space(spec, base, path)
    if spec.warm_start is not None and spec.warm_start.can_train:
        base_stage_config(spec, base, path)
    return spec, base


def check_search_space(spec: SweepSpec, base: ExperimentConfig, path: Path) -> None:
    """Builds the trial config of every grid / choice value and range bound (:func:`search_space_configs`), so that a
    value the model refuses stops the sweep before it starts; refuses ``grid`` under ``tune.search=optuna`` (Optuna
    samples, it does not enumerate). Raises ConfigError."""
    for key, dimension in spec.search_space.items():
        if dimension.grid is not None and base.tune.search == "optuna":
            raise ConfigError(f"{path}: search_space.{key}: tune.search=optuna samples its values; use choice, "
                              f"uniform or loguniform instead of grid")
    search_space_configs(spec, base, path)


def search_space_configs(spec: SweepSpec, base: ExperimentConfig,
                         path: str | Path) -> list[tuple[str, ExperimentConfig]]:
    """``(label, config)`` for every grid / choice value and range bound of the search space, each applied alone to
    ``base``; the label (``<path>: search_space.<key> = <value>``) names it in errors. Raises ConfigError for a value
    the config refuses."""
    tree = base.model_dump(mode="json")
    configs = []
    for key, dimension in spec.search_space.items():
        values = next(v for v in (dimension.grid, dimension.choice, dimension.uniform, dimension.loguniform)
                      if v is not None)
        for value in values:
            label = f"{path}: search_space.{key} = {value!r}"
            configs.append((label, build_config(apply_overrides(json.loads(json.dumps(tree)),
                                                                [f"{key}={json.dumps(value)}"]), label)))
    return configs


def base_stage_config(spec: SweepSpec, base: ExperimentConfig, path: str | Path) -> ExperimentConfig:
    """The config that trains the warm start's base model: the sweep's with ``warm_start.train_if_missing`` applied,
    logged in the sweep's MLflow experiment unless those overrides name another."""
    changes = [f"{k}={json.dumps(v)}" for k, v in (spec.warm_start.train_if_missing or {}).items()]
    tree = base.model_dump(mode="json")
    tree["tracking"]["experiment"] = base.experiment_name
    tree = apply_overrides(tree, changes)
    return build_config(tree, f"{path}: warm_start.train_if_missing")
