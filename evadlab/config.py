"""Validated experiment configuration: YAML files plus dotted ``key=value`` overrides.

An experiment file has the sections ``data``, ``model``, ``train``, ``eval``, ``tune`` and ``tracking``
(all optional) plus a top-level ``name`` and ``output_dir``. Unknown keys, wrong types and out-of-range
values stop with an error naming the dotted key (and, for an unknown key, the closest valid one).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evadlab.storage import absolute

AVA_ANNOTATIONS = {
    "train_annotations": "ava_train_v2.2.csv",
    "val_annotations": "ava_val_v2.2.csv",
    "exclusions": "ava_val_excluded_timestamps_v2.2.csv",
    "label_map": "ava_action_list_v2.2_for_activitynet_2019.pbtxt",
}


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used; raised before any work starts."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    root: str = "data/mini_ava"
    synthetic: bool = False
    synth_videos: int = Field(6, ge=2)
    synth_seconds: int = Field(12, ge=4)
    synth_seed: int = 0
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
    mean: float = 0.45
    std: float = Field(0.225, gt=0)
    train_annotations: str = AVA_ANNOTATIONS["train_annotations"]
    val_annotations: str = AVA_ANNOTATIONS["val_annotations"]
    exclusions: str = AVA_ANNOTATIONS["exclusions"]
    label_map: str = AVA_ANNOTATIONS["label_map"]
    train_frame_list: str = "train.csv"
    val_frame_list: str = "val.csv"
    prepare_cpus: float = Field(1.0, gt=0)

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


# Architecture presets; any field set explicitly in the experiment file wins over its preset.
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(
        embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, fpn_indices=[2, 5, 8, 11],
        pruning_blocks=[3, 6, 9], crd_embed_dim=384, crd_depth=6, crd_num_heads=6, action_weight=12.0,
    ),
    "vit_l": dict(
        embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.2, fpn_indices=[5, 11, 17, 23],
        pruning_blocks=[6, 12, 18], crd_embed_dim=512, crd_depth=12, crd_num_heads=8, action_weight=6.0,
    ),
    # Small enough for a 2-core CPU to train in minutes; same architecture, fewer and narrower layers.
    "tiny": dict(
        embed_dim=96, depth=4, num_heads=4, drop_path_rate=0.0, fpn_indices=[0, 1, 2, 3],
        pruning_blocks=[1, 2], crd_embed_dim=48, crd_depth=2, crd_num_heads=4, action_weight=12.0,
        num_proposals=10, stage_num_heads=4, num_stages=2, dim_feedforward=128, dim_dynamic=16,
        act_fc_dim=256, crd_drop_path_rate=0.0,
    ),
}

# ModelConfig fields that configure something other than the EVAD constructor.
_NON_ARCHITECTURE_FIELDS = {"variant", "keep_rate", "pruning_blocks", "pretrained", "checkpoint"}


class ModelConfig(Section):
    variant: Literal["vit_b", "vit_l", "tiny", "custom"] = "vit_b"
    embed_dim: int = Field(768, ge=8)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    fpn_indices: list[int] = [2, 5, 8, 11]
    keep_rate: float = Field(1.0, gt=0, le=1)
    pruning_blocks: list[int] = [3, 6, 9]
    keep_rates: list[float] | None = None
    enhanced_weight: float = Field(1.0, gt=0)
    token_order: Literal["released", "position"] = "released"
    num_frames: int = 16
    num_proposals: int = Field(100, ge=1)
    hidden_dim: int = Field(256, ge=1)
    num_stages: int = Field(6, ge=1)
    stage_num_heads: int = Field(8, ge=1)
    dim_feedforward: int = Field(2048, ge=1)
    num_dynamic: int = Field(2, ge=1)
    dim_dynamic: int = Field(64, ge=1)
    num_cls_layers: int = Field(1, ge=0)
    num_reg_layers: int = Field(3, ge=0)
    crd_embed_dim: int = Field(384, ge=8)
    crd_depth: int = Field(6, ge=1)
    crd_num_heads: int = Field(6, ge=1)
    crd_drop_path_rate: float = Field(0.1, ge=0, lt=1)
    roi_extension: tuple[float, float] = (0.4, 0.2)
    act_fc_dim: int = Field(2048, ge=1)
    num_actions: int = Field(80, ge=1)
    class_weight: float = Field(2.0, ge=0)
    l1_weight: float = Field(5.0, ge=0)
    giou_weight: float = Field(2.0, ge=0)
    action_weight: float = Field(12.0, ge=0)
    no_object_weight: float = Field(0.1, ge=0)
    person_threshold: float = Field(0.7, ge=0, le=1)
    grad_checkpointing: bool = False
    pretrained: str | None = None
    checkpoint: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("variant", "vit_b") in MODEL_VARIANTS:
            return {**MODEL_VARIANTS[values.get("variant", "vit_b")], **values}
        return values

    @field_validator("keep_rates")
    @classmethod
    def _rates_in_range(cls, rates: list[float] | None) -> list[float] | None:
        for i, rate in enumerate(rates or []):
            if not 0 < rate <= 1:
                raise ValueError(f"keep rate of block {i} is {rate}; it must be in (0, 1]")
        return rates

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.keep_rates is not None and len(self.keep_rates) != self.depth:
            raise ValueError(f"keep_rates has {len(self.keep_rates)} entries but depth is {self.depth}")
        for name in ("fpn_indices", "pruning_blocks"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"{name} {bad} outside the {self.depth} blocks")
        if len(self.fpn_indices) != 4:
            raise ValueError("fpn_indices needs exactly 4 blocks (p2..p5)")
        return self

    def resolved_keep_rates(self) -> list[float] | None:
        """Per-block keep rates: ``keep_rates`` if given, else ``keep_rate`` at ``pruning_blocks``."""
        if self.keep_rates is not None:
            rates = list(self.keep_rates)
        else:
            rates = [self.keep_rate if i in self.pruning_blocks else 1.0 for i in range(self.depth)]
        return rates if any(r < 1 for r in rates) else None

    def evad_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``evadlab.models.EVAD`` for this configuration."""
        kwargs = self.model_dump(exclude=_NON_ARCHITECTURE_FIELDS)
        kwargs["keep_rates"] = self.resolved_keep_rates()
        kwargs["roi_extension"] = tuple(self.roi_extension)
        return kwargs


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
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
    seed: int = 0
    log_every: int = Field(10, ge=1)
    fail_at_epoch: int | None = Field(
        None, ge=0, description="Test only: rank 1 (or 0) exits once during this epoch, to exercise recovery."
    )

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if len(self.lr_steps) != len(self.lr_factors):
            raise ValueError("lr_steps and lr_factors must have the same length")
        return self


class EvalConfig(Section):
    every_epochs: int = Field(1, ge=0)
    batch_size: int = Field(4, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    iou: Literal["0.5", "0.5:0.95"] = "0.5"


class TuneConfig(Section):
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    metric: str = "val/mAP"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["none", "asha"] = "none"
    grace_period: int = Field(1, ge=1)
    resume: bool = False


class TrackingConfig(Section):
    enabled: bool = True
    uri: str = ""
    experiment: str = ""

    def resolved_uri(self) -> str:
        """An ``mlflow server`` URI when given, else a SQLite file under the working directory."""
        return self.uri or f"sqlite:///{Path('mlflow.db').resolve()}"


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

    @model_validator(mode="after")
    def _absolute_paths(self) -> ExperimentConfig:
        """Relative paths mean the directory the command runs in; Ray workers run elsewhere, so they get
        absolute ones (the default SQLite tracking file too). URIs (s3://, gs://, ...) are left as they are."""
        for section, key in _LOCAL_PATHS:
            owner = getattr(self, section) if section else self
            value = getattr(owner, key)
            if value:
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


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            # A misspelt section holds whole keys; name those, as the user wrote them.
            value = item.get("input")
            typed = list(flatten(value, f"{key}.")) if isinstance(value, dict) and value else [key]
            for unknown in typed:
                close = difflib.get_close_matches(unknown, VALID_KEYS, n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                lines.append(f"unknown key '{unknown}'{hint}")
        else:
            shown = f"'{key}'" if key else "config"
            lines.append(f"{shown}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` with the value read as a YAML scalar (or flow list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': cannot parse value {raw!r}: {exc}") from exc
    return key.strip(), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        key, value = parse_override(text)
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
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def build_config(tree: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply ``key=value`` overrides, validate."""
    tree = apply_overrides(read_yaml(path), list(overrides))
    return build_config(tree, str(path))

