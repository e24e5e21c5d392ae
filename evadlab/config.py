"""Validated experiment configuration: YAML files plus dotted ``key=value`` overrides.

An experiment file has the sections ``data``, ``model``, ``train``, ``eval``, ``tune`` and ``tracking``
(all optional) plus a top-level ``name`` and ``output_dir``. Unknown keys, wrong types and out-of-range
values stop with an error naming the dotted key (and, for an unknown key, the closest valid one). Types are strict:
a boolean is no number and a number no boolean (``model.keep_rate=true`` is an error, not 1.0), a whole number is
accepted where a real one is expected. A key written twice in one YAML mapping is an error naming it and its lines
(``yaml.safe_load`` would keep the last value without a word).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin, get_type_hints

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from evadlab.models.config import VARIANTS, EVADConfig, EVADConfigError, keep_rates_at
from evadlab.storage import absolute, is_local, local_path

AVA_ANNOTATIONS = {
    "train_annotations": "ava_train_v2.2.csv",
    "val_annotations": "ava_val_v2.2.csv",
    "exclusions": "ava_val_excluded_timestamps_v2.2.csv",
    "label_map": "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
}


# Checkpoint locations that MLflow resolves (``model.checkpoint=runs:/<run_id>/...``): kept as they are, not paths.
MLFLOW_URI_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used; raised before any work starts."""


class Section(BaseModel):
    # strict: YAML's true is no 1.0 and 1 no true; pydantic still takes an int for a float. No key means infinity
    # (YAML's .inf) or NaN: a learning rate, a CPU count or an offset of .inf is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def named_folder(value: str) -> str:
    """A folder key that has no default to fall back on: an empty value would silently mean the working directory."""
    if not value.strip():
        raise ValueError("must name a folder, not be empty")
    return value


def local_folder(value: str) -> str:
    """A folder read and written with plain file I/O (data, shards, outputs): a local path or a ``file://`` URI (a
    mounted shared file system), returned as an absolute path. Raises ValueError for a remote URI."""
    if not value:
        return value
    if not is_local(value):
        raise ValueError(f"{value} is not on this machine's file system: use a local path, a mounted shared folder "
                         f"or a file:// URI (object-store URIs are for train.storage_path and checkpoints)")
    return str(local_path(value))


class DataConfig(Section):
    root: str = "data/mini_ava"
    synthetic: bool = False
    synth_videos: int = Field(6, ge=2)
    synth_seconds: int = Field(12, ge=4)
    synth_seed: int = Field(0, ge=0)
    source: Literal["videos", "frames"] = "videos"
    shards: str = ""
    num_frames: int = Field(16, ge=1)
    sample_rate: int = Field(4, ge=1)
    short_side: int = Field(288, ge=16)
    max_long_side: int = Field(1333, ge=16)
    fps: int = Field(30, ge=1)
    video_offset_sec: float = Field(900.0, ge=0)
    jpeg_quality: int = Field(90, ge=1, le=100)
    flip_prob: float = Field(0.5, ge=0, le=1)
    # How the train split reaches the workers (evadlab/platform/ingest.py): decoded once and kept in Ray's object store,
    # or read and decoded every epoch; auto materializes when it fits.
    ingest: Literal["auto", "materialize", "stream"] = "auto"
    mean: float = 0.45
    std: float = Field(0.225, gt=0)
    train_annotations: str = AVA_ANNOTATIONS["train_annotations"]
    val_annotations: str = AVA_ANNOTATIONS["val_annotations"]
    exclusions: str = AVA_ANNOTATIONS["exclusions"]
    label_map: str = AVA_ANNOTATIONS["label_map"]
    train_frame_list: str = "train.csv"
    val_frame_list: str = "val.csv"
    # Cores of one prepare task: its decoder and torch threads (see evadlab/pipelines/prepare.py).
    prepare_cpus: float = Field(1.0, gt=0)
    # Keyframes per shard part, the unit a prepare writes atomically and resumes from.
    keyframes_per_part: int = Field(120, ge=1)

    _named_folders = field_validator("root")(named_folder)
    _local_folders = field_validator("root", "shards")(local_folder)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    @property
    def annotation_dir(self) -> Path:
        return self.root_path / "annotations"

    @property
    def shards_path(self) -> Path:
        """Shards live beside the data unless a location is given; the clip spec names the folder so
        that two specs never share shards."""
        if self.shards:
            return Path(self.shards)
        return self.root_path / "shards" / self.clip_spec_name

    @property
    def clip_spec(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_frames": self.num_frames,
            "sample_rate": self.sample_rate,
            "short_side": self.short_side,
            "max_long_side": self.max_long_side,
            "fps": self.fps,
            "video_offset_sec": self.video_offset_sec,
            "jpeg_quality": self.jpeg_quality,
        }

    @property
    def clip_spec_name(self) -> str:
        return f"{self.source}_{self.num_frames}x{self.sample_rate}_s{self.short_side}"


def _tuple_from_list(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _architecture_fields() -> dict[str, Any]:
    """EVADConfig's fields as pydantic field definitions: its types and (ViT-B) defaults, declared only there.

    `keep_rates` is left out: ModelConfig offers it as an optional override of `keep_rate`. Tuple fields take the
    lists YAML and JSON give (strict mode alone would want tuples); their elements stay strict.
    """
    types = get_type_hints(EVADConfig)
    return {
        setting.name: (Annotated[types[setting.name], BeforeValidator(_tuple_from_list)]
                       if get_origin(types[setting.name]) is tuple else types[setting.name], setting.default)
        for setting in dataclasses.fields(EVADConfig)
        if setting.name != "keep_rates"
    }


_ARCHITECTURE_FIELDS = _architecture_fields()
_ArchitectureSection = create_model("_ArchitectureSection", __base__=Section, **_ARCHITECTURE_FIELDS)


class ModelConfig(_ArchitectureSection):
    """The ``model`` section: every EVADConfig field as a key, plus conveniences.

    ``variant`` presets fill the architecture keys not given (``custom``: the EVADConfig defaults, ViT-B).
    ``keep_rate`` applies at ``pruning_blocks`` (default: the variant's KTP blocks) unless ``keep_rates`` gives
    one rate per block. Pydantic checks the types; EVADConfig checks the ranges, once, when it is built here
    (its errors name their key, see `describe_validation_error`). ``evad`` is the resolved EVADConfig.
    """

    variant: Literal["vit_b", "vit_l", "tiny", "custom"] = "vit_b"
    keep_rate: float = 1.0
    pruning_blocks: list[int]
    keep_rates: list[float] | None = None
    pretrained: str | None = None
    checkpoint: str | None = None
    _evad: EVADConfig = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        # "custom", and a misspelt name until the variant check reports it, start from the ViT-B defaults.
        preset = VARIANTS.get(values.get("variant", "vit_b"), VARIANTS["vit_b"])
        return {**preset.settings, "pruning_blocks": list(preset.pruning_blocks), **values}

    @model_validator(mode="after")
    def _resolve(self) -> ModelConfig:
        architecture = EVADConfig(**{name: getattr(self, name) for name in _ARCHITECTURE_FIELDS})
        rates = keep_rates_at(architecture.depth, self.pruning_blocks, self.keep_rate)
        self._evad = dataclasses.replace(architecture, keep_rates=rates if self.keep_rates is None else self.keep_rates)
        return self

    @property
    def evad(self) -> EVADConfig:
        """The validated architecture, keep rates resolved per block: what the model, FLOPs and tags read."""
        return self._evad


def _worker_count(value: Any) -> Any:
    """``train.num_workers`` as written: a whole number, or a list [min, max] (a tuple for the ScalingConfig). Raises
    ValueError for anything else, in one message rather than one per member of the type union."""
    pair = isinstance(value, (list, tuple)) and len(value) == 2
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (value if pair else [value])):
        raise ValueError("must be a whole number or a range [min, max] of whole numbers")
    low, high = value if pair else (value, value)
    if low < 1 or high < low:
        raise ValueError("must be >= 1, a range [min, max] with 1 <= min <= max")
    return tuple(value) if pair else value


# Resources Ray schedules by the keys of their own (use_gpu, cpus_per_worker), not as custom resources.
_BUILTIN_RESOURCES = ("CPU", "GPU", "TPU", "memory", "object_store_memory")


class TrainConfig(Section):
    # A whole number, or [min, max] for elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): the run
    # starts with as many workers as the cluster can place up to max, goes on with fewer (not below min) when nodes are
    # lost, and grows again when they return (checked every resize_interval_s). See effective_grad_accum.
    num_workers: Annotated[int | tuple[int, int], BeforeValidator(_worker_count)] = 1
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    # Custom resources every worker reserves, e.g. {gpu_node: 1} to place workers on nodes that offer it.
    resources_per_worker: dict[str, float] = {}
    resize_interval_s: float = Field(60.0, ge=0)
    batch_size: int = Field(2, ge=1)
    epochs: int = Field(12, ge=1)
    base_lr: float = Field(2.5e-5, gt=0)
    head_lr_scale: float = Field(8.0, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)
    warmup_start_lr: float = Field(2.5e-6, ge=0)
    lr_steps: list[float] = [0, 5, 8]
    lr_factors: list[float] = [1.0, 0.1, 0.01]
    grad_clip: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1)
    amp: bool = True
    storage_path: str = "runs/ray"
    keep_checkpoints: int = Field(2, ge=1)
    resume: bool = False
    max_failures: int = Field(0, ge=-1)
    # How often Ray Train's controller polls the workers (Ray's RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s): each
    # report and checkpoint is committed, the end of training noticed and a dead worker found within about this time.
    # A worker that misses polls is declared dead only after Ray's 10 minutes, so a short interval fails nothing.
    health_check_interval_s: float = Field(0.5, gt=0)
    # How long Ray Train waits for a new worker group's resources before it gives that size up and decides again
    # (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, default 60 s; a retry that is not counted in max_failures). After
    # a node loss an elastic run first asks for the old size, as Ray Data's autoscaling coordinator refreshes the
    # cluster's nodes only every 20 s, and starts smaller only once this has run out: a shorter wait recovers sooner,
    # while a fixed-size run waiting for a replacement node rebuilds its placement group this often.
    worker_group_start_timeout_s: float = Field(60.0, gt=0)
    # Seeds the initial weights, every epoch's order and flips (see ingest.training_dataset) and Tune's sampler.
    seed: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in _BUILTIN_RESOURCES:
                raise ValueError(f"'{name}' is no custom resource: set train.cpus_per_worker or train.use_gpu")
            if amount < 0:
                raise ValueError(f"'{name}' must be >= 0, got {amount}")
        return value

    _named_folders = field_validator("storage_path")(named_folder)

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if len(self.lr_steps) != len(self.lr_factors):
            raise ValueError("lr_steps and lr_factors must have the same length")
        if not self.lr_steps or self.lr_steps[0] != 0 or any(b <= a for a, b in zip(self.lr_steps, self.lr_steps[1:])):
            raise ValueError(f"lr_steps must start at epoch 0 and increase, got {self.lr_steps}")
        if any(factor <= 0 for factor in self.lr_factors):
            raise ValueError(f"lr_factors must be positive, got {self.lr_factors}")
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with: ``num_workers``, or the min of its range."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the run uses: ``num_workers``, or the max of its range."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def worker_resources(self) -> dict[str, float]:
        """What one Train worker holds, by Ray's resource names: ``cpus_per_worker`` CPUs, a GPU with ``use_gpu``, and
        ``resources_per_worker``."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {}), **self.resources_per_worker}

    def effective_grad_accum(self, world: int) -> int:
        """Micro-batches per optimiser step on each of ``world`` workers, so that the global batch stays
        ``batch_size x grad_accum x max_workers`` clips whatever the worker count, and the learning-rate recipe
        (tuned for that global batch) holds: ``ceil(grad_accum x max_workers / world)``. Exact when ``world`` divides
        ``grad_accum x max_workers`` (always for ranges [1, 2], [2, 4], [4, 8]); otherwise the global batch is the
        next larger multiple of ``batch_size x world``. Raises ValueError for a world outside 1..max_workers."""
        if not 1 <= world <= self.max_workers:
            raise ValueError(f"{world} workers is outside 1..{self.max_workers} (train.num_workers)")
        return -(-self.grad_accum * self.max_workers // world)


class EvalConfig(Section):
    every_epochs: int = Field(1, ge=0)
    batch_size: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    iou: Literal["0.5", "0.5:0.95"] = "0.5"


class TuneConfig(Section):
    """How ``evadlab tune`` searches (see evadlab/platform/tune.py).

    ``search``: ``basic`` is Tune's own generator (every ``grid`` value, ``choice`` / ``uniform`` / ``loguniform``
    sampled ``num_samples`` times) optimising ``metric`` / ``mode``; ``optuna`` is Optuna's multi-objective ``sampler``
    through Ray Tune's OptunaSearch, over (``metric`` in ``mode``, ``cost`` minimised), ``num_samples`` trials.
    ``cost``: ``gflops`` (at 16x288x288) or ``latency``, the inference latency each trial measures on its own
    hardware. ``max_concurrent_trials``: 0 runs as many trials at once as the cluster's free CPUs / GPUs hold (each
    needs its workers, ``data_cpus`` for Ray Data and the trial's driver); a larger number is capped by that too.
    """

    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(0, ge=0)
    metric: str = "val/mAP"
    mode: Literal["max", "min"] = "max"
    search: Literal["basic", "optuna"] = "basic"
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    cost: Literal["gflops", "latency"] = "gflops"
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    data_cpus: float = Field(1.0, ge=0)
    resume: bool = False


# A SQLite tracking store's URI: this, then the database file's path (a fourth slash for an absolute one).
SQLITE_PREFIX = "sqlite:///"


def default_tracking_uri() -> str:
    """Where runs are tracked when no ``mlflow server`` is named: ``mlflow.db`` in the working directory."""
    return f"{SQLITE_PREFIX}{Path('mlflow.db').resolve()}"


def sqlite_database_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` tracking URI (relative to the working folder unless absolute), else
    None."""
    return Path(uri.removeprefix(SQLITE_PREFIX)) if uri.startswith(SQLITE_PREFIX) else None


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative/path`` made absolute (it means the directory the command runs in, and the URI travels to
    Ray workers and into MLflow backlogs that are replayed from elsewhere); every other URI unchanged."""
    database = sqlite_database_path(uri)
    if database is None or database.is_absolute():
        return uri
    return SQLITE_PREFIX + str(database.expanduser().resolve())


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = ""
    experiment: str = ""
    # While the server is away, a job keeps its records in the run folder and tries to send them this often.
    retry_s: float = Field(30.0, ge=0)
    # MLflow's system metrics (CPU, memory, disk, network, GPU) of every training node, sampled this often.
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)

    def resolved_uri(self) -> str:
        """An ``mlflow server`` URI when given (a relative SQLite path made absolute), else a SQLite file under the
        working directory."""
        return absolute_tracking_uri(self.uri) if self.uri else default_tracking_uri()


# An experiment's name: one folder name.
RUN_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")


def folder_name(value: str) -> str:
    """An experiment's or a sweep's name, which becomes one folder's name. Raises ValueError otherwise."""
    if not RUN_NAME.fullmatch(value):
        raise ValueError(f"must be letters, digits, '.', '_' or '-', not starting with '.' (a folder name), got "
                         f"{value!r}")
    return value


_LOCAL_PATHS = (("data", "root"), ("data", "shards"), ("model", "pretrained"), ("model", "checkpoint"),
                ("train", "storage_path"), ("", "output_dir"))


class ExperimentConfig(Section):
    name: str = "experiment"
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    _named_folders = field_validator("output_dir")(named_folder)
    _local_folders = field_validator("output_dir")(local_folder)

    # The name becomes folder names (output_dir/<name>, <storage>/<name>_<time>) that resume finds again.
    _folder_name = field_validator("name")(folder_name)

    @model_validator(mode="after")
    def _clip_frames(self) -> ExperimentConfig:
        if self.data.num_frames != self.model.num_frames:
            raise ValueError(f"data.num_frames ({self.data.num_frames}) must be model.num_frames "
                             f"({self.model.num_frames}): the clips are the model's input")
        return self

    @model_validator(mode="after")
    def _absolute_paths(self) -> ExperimentConfig:
        """Relative paths mean the directory the command runs in; Ray workers run elsewhere, so they get
        absolute ones (the default SQLite tracking file too). URIs (s3://, gs://, ...) are left as they are."""
        for section, key in _LOCAL_PATHS:
            owner = getattr(self, section) if section else self
            value = getattr(owner, key)
            if value and not value.startswith(MLFLOW_URI_PREFIXES):
                object.__setattr__(owner, key, absolute(value))
        object.__setattr__(self.tracking, "uri", self.tracking.resolved_uri())
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def flat(self) -> dict[str, Any]:
        """The whole config as ``section.key -> value``, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += [f"{prefix}{name}", *_valid_keys(annotation, f"{prefix}{name}.")]
        else:
            keys.append(f"{prefix}{name}")
    return keys


VALID_KEYS = _valid_keys(ExperimentConfig)
# Keys that name a section (train, model, ...): an override of one sets the keys it gives, and keeps the others.
SECTION_KEYS = frozenset(key for key in VALID_KEYS if any(other.startswith(f"{key}.") for other in VALID_KEYS))


def unknown_key_message(key: str, valid_keys: Sequence[str] = VALID_KEYS) -> str:
    """``unknown key 'trian.epochs' (did you mean 'train.epochs'?)``, the hint when a key of ``valid_keys`` (a
    config's, by default) is close; a section (``train``) is no hint for a key, so only values' keys are offered."""
    close = difflib.get_close_matches(key, [name for name in valid_keys if name not in SECTION_KEYS], n=1, cutoff=0.5)
    return f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def describe_validation_error(error: ValidationError, valid_keys: Sequence[str] = VALID_KEYS) -> str:
    """One line for pydantic's ``error``, each problem named by its dotted key; an unknown key gets the closest of
    ``valid_keys`` (the file's own keys: a config's by default) as a hint."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            # A misspelt section holds whole keys; name those, as the user wrote them.
            value = item.get("input")
            typed = list(flatten(value, f"{key}.")) if isinstance(value, dict) and value else [key]
            lines += [unknown_key_message(unknown, valid_keys) for unknown in typed]
        elif isinstance(item.get("ctx", {}).get("error"), EVADConfigError):
            # EVADConfig validates the whole section at once; its error names the key within it.
            error = item["ctx"]["error"]
            lines.append(f"'{key}.{error.field}': {error}")
        elif item["type"] == "value_error":
            # A validator of ours: pydantic's prefix adds nothing, nor does a whole section as the value it got.
            shown = f"'{key}'" if key else "config"
            message, value = item["msg"].removeprefix("Value error, "), item.get("input")
            got = "" if isinstance(value, dict) or "got " in message else f" (got {value!r})"
            lines.append(f"{shown}: {message}{got}")
        elif item["type"] == "missing":
            # Its input is the mapping that lacks the key: the whole file, of no help.
            lines.append(f"'{key}': missing (a required key)")
        else:
            shown = f"'{key}'" if key else "config"
            lines.append(f"{shown}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (YAML's own tags only), refusing a key written twice in one mapping, where PyYAML
    would keep the last value without a word. Keys merged in with ``<<`` may still be overridden. Exponent numbers
    without a dot or an exponent sign (``1e-4``, ``1.0e5``) are numbers, as in YAML 1.2, where PyYAML's YAML 1.1 reads
    them as strings (the config's strict types take no strings for numbers)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: the base class names it
            if first is not None:
                raise yaml.YAMLError(f"line {line}: key {key!r} appears twice in one mapping (first on line {first})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicated keys (see ``_UniqueKeyLoader``). Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as a YAML scalar (or flow list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = safe_load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``tree`` with each ``key=value`` override set. A mapping given for a section (``train={epochs: 2}``, or
    ``train: {epochs: 2}`` in a sweep's overrides) sets the keys it names and keeps the section's others, as its
    dotted keys would; any other value replaces what was there. Raises ConfigError for an override that is not
    ``key=value`` or goes through a key that is not a section."""
    pending = [parse_override(text) for text in overrides]
    while pending:
        key, value = pending.pop(0)
        if key in SECTION_KEYS and isinstance(value, dict):
            pending[:0] = [(f"{key}.{name}", inner) for name, inner in value.items()]
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a config or sweep file. Raises ConfigError, naming the file (and the line of a YAML error), for
    a missing file, a folder, a file that is not UTF-8 text, invalid YAML, an empty file and a top level that is no
    mapping."""
    if not str(path):
        raise ConfigError("config file '': an empty path names no file")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder")
    if not path.exists():  # a pipe (bash's <(...)) or a device is read like a file
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = safe_load_yaml(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise ConfigError(f"{path}: {where}invalid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if tree is None:
        raise ConfigError(f"{path}: the file is empty (a config needs at least its name)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """The validated config; also checked against its label map when that exists (``check_action_ids``)."""
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None
    try:
        check_action_ids(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


def check_action_ids(cfg: ExperimentConfig) -> None:
    """Refuses a label map that lists an action id above ``model.num_actions``: the model would have no output for
    it, and training would stop inside a worker. The label map is ``data.label_map`` under ``data.root``'s
    annotations; nothing is checked while it does not exist (synthetic data is written later, and ``prepare``
    checks again then). Raises ConfigError naming the keys."""
    path = cfg.data.annotation_dir / cfg.data.label_map
    if not path.is_file():
        return
    from evadlab.pipelines.ava import read_label_map  # numpy and pyarrow: only once there is a label map to read

    try:
        highest = max(read_label_map(path))
    except ValueError as error:
        raise ConfigError(f"'data.label_map': {error}") from None
    if highest > cfg.model.num_actions:
        raise ConfigError(f"'model.num_actions' is {cfg.model.num_actions}, but the label map {path} ('data.label_map')"
                          f" lists action id {highest}: set model.num_actions to at least {highest}")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply ``key=value`` overrides, validate."""
    tree = apply_overrides(read_yaml(path), list(overrides))
    return build_config(tree, str(path))

