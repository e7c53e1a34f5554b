"""Typed training configuration, read from YAML.

A configuration file has one section per stage of the trainer::

    name: small
    model:            # a preset of inference.model.PRESETS and/or ModelConfig fields
      preset: small
      feature_points:
        sagittal: {timestep: 200, block: mid_0}
    pretrain: {...}   # PretrainConfig
    classify: {...}   # ClassifyConfig
    segment: {...}    # SegmentConfig
    data: {...}       # DataConfig

Every section is a frozen pydantic model that rejects unknown keys, so a typo fails at load
time with the dotted key and the file in the message (``ConfigError``) instead of being
silently ignored.  The ``model`` section is validated by building the real
:class:`inference.model.ModelConfig` at load time, so an impossible architecture fails here too.

The shipped configurations live next to this module in ``configs/`` and are addressed by name
(``paper``, ``small``, ``tiny``, ``demo``); any other value is read as a path.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.config_files import ConfigFileError, error_locations, read_yaml

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from inference.model import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: configurations shipped with the package, addressed by name
BUILTIN_CONFIGS: tuple[str, ...] = ("paper", "small", "tiny", "demo")


class ConfigError(ConfigFileError):
    """A configuration file is unreadable or invalid; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PretrainConfig(_Section):
    """Unlabeled DDPM pretraining of one plane's backbone.

    The learning rate actually used is ``base_lr * batch_size * world_size`` when
    ``lr_scaling`` is ``"batch_and_gpus"`` (the reference scales its base rate by batch and
    number of GPUs), or ``base_lr`` unchanged with ``"none"``.
    """

    steps: int = Field(21500, ge=1, description="total optimizer steps")
    batch_size: int = Field(10, ge=1, description="volumes per step and per process")
    base_lr: float = Field(1e-5, gt=0)
    lr_scaling: Literal["batch_and_gpus", "none"] = "batch_and_gpus"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; null = no clipping")
    ema_decay: float = Field(0.995, gt=0, lt=1)
    ema_every: int = Field(10, ge=1, description="update the EMA every this many steps")
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1, description="periodic checkpoints kept besides the last one")
    log_every: int = Field(10, ge=1)
    amp: bool = Field(True, description="bf16 autocast; applied on CUDA only")
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    def lr(self, world_size: int) -> float:
        """Learning rate for ``world_size`` processes under this scaling rule."""
        if self.lr_scaling == "batch_and_gpus":
            return self.base_lr * self.batch_size * world_size
        return self.base_lr


class ClassifyConfig(_Section):
    """Fine-tuning of the classification heads (per plane or fused, optional EHR).

    Thresholds: with ``threshold_policy: youden`` each label's decision threshold is the
    point of the validation ROC curve that maximises sensitivity + specificity - 1.  A label
    keeps 0.5 when its validation split has fewer than ``min_threshold_cases`` positives or
    negatives (a threshold read off one or two cases is noise: it produced thresholds of 1.0
    and 0.01 on small splits) or when no threshold separates the classes better than chance.
    ``fixed`` keeps 0.5 for every label.  The model card records where each threshold came from.
    """

    epochs: int = Field(5, ge=1)
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(4, ge=1)
    head_lr: float = Field(5e-4, gt=0)
    pos_weight: Literal["auto", "none"] = Field(
        "auto", description="auto: each label's positives weigh negatives/positives of the training "
        "split (capped at max_pos_weight); none: plain BCE")
    max_pos_weight: float = Field(10.0, ge=1)
    backbone_lr_factor: float = Field(0.05, ge=0, description="backbone lr = factor x head lr; 0 freezes it")
    cache_features: bool = Field(True, description="with frozen diffusion backbones (backbone_lr_factor 0), "
                                 "compute each exam's backbone features once, with the fixed noise the node "
                                 "uses, and train the pools and heads on them")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    threshold_policy: Literal["youden", "fixed"] = "youden"
    min_threshold_cases: int = Field(5, ge=1, description="positives and negatives a label needs in the "
                                     "validation split before youden replaces 0.5")
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0


class SegmentConfig(_Section):
    """Fine-tuning of the segmentation decoder on one plane (sagittal by default).

    Loss: ``ce_weight * CE + dice_weight * (1 - soft Dice over foreground)``; voxels labelled
    -1 (unannotated slices) count in neither term.
    """

    plane: Literal["sagittal", "coronal", "axial"] = "sagittal"
    epochs: int = Field(30, ge=1)
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0, description="head (decoder) learning rate")
    backbone_lr_factor: float = Field(0.05, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    windows: Literal["central", "all"] = Field(
        "all", description="all: every sliding window over the whole series, as the node segments it; "
        "central: the central depth slices only (the reference's input)"
    )
    ce_weight: float = Field(0.2, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0


class DataConfig(_Section):
    """How training data are read and cached."""

    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="memory: preprocess once per run; disk: persistent cache in cache_dir"
    )
    cache_dir: str | None = None


class ModelSection(_Section):
    """The architecture: an optional preset name plus any :class:`ModelConfig` field.

    ``fields`` holds every key of the YAML section other than ``preset``; they override the
    preset's values.  ``feature_points`` may name only some planes: the others keep the
    preset's points.
    """

    preset: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        if isinstance(data, str):  # ``model: small`` is shorthand for ``model: {preset: small}``
            return {"preset": data, "fields": {}}
        if isinstance(data, dict) and "fields" not in data:
            data = dict(data)
            preset = data.pop("preset", None)
            return {"preset": preset, "fields": data}
        return data

    def resolve(self) -> ModelConfig:
        """Build the validated :class:`inference.model.ModelConfig` (raises ``ValueError``)."""
        from inference.model import PRESETS, model_config

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        base: dict[str, Any] = PRESETS[self.preset].to_dict() if self.preset is not None else {}
        fields = dict(self.fields)
        points = fields.pop("feature_points", None)
        base.update(fields)
        if points is not None:
            if not isinstance(points, dict):
                raise ValueError(f"feature_points must be a mapping plane -> {{timestep, block}}, got {points!r}")
            merged = dict(base.get("feature_points") or {})
            merged.update(points)
            base["feature_points"] = merged
        return model_config(base)


class TrainConfig(_Section):
    """The whole training configuration; ``source`` is the file it was read from."""

    name: str
    model: ModelSection = Field(default_factory=ModelSection)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    source: str | None = None

    @field_validator("name")
    @classmethod
    def _name_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    def model_cfg(self) -> ModelConfig:
        """The resolved architecture (``model_config`` is a reserved name in pydantic)."""
        return self.model.resolve()

    def to_dict(self) -> dict[str, Any]:
        """Plain data, stored in checkpoints so a run can be rebuilt and compared on resume."""
        data = self.model_dump(mode="json", exclude={"source"})
        data["model"] = {"preset": self.model.preset, **self.model.fields}
        return data

    def with_overrides(self, **sections: dict[str, Any]) -> TrainConfig:
        """A copy with some fields of some sections replaced, validated again.

        ``cfg.with_overrides(pretrain={"steps": 5})`` is how command-line options such as
        ``--steps`` reach the configuration without mutating it.
        """
        data = self.to_dict()
        for section, values in sections.items():
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"unknown configuration section {section!r}")
            data[section] = {**data[section], **values}
        return _validate(data, self.source or "<overrides>")


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for parts, msg in error_locations(exc, skip=("fields",)):
        loc = ".".join(str(part) for part in parts) or "<root>"
        lines.append(f"{source}: key {loc!r}: {msg}")
    return "\n".join(lines)


def _validate(data: Any, source: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of sections, got {type(data).__name__}")
    data = {**data, "source": source}
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
    try:
        cfg.model.resolve()
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"{source}: key 'model': {exc}") from None
    return cfg


def config_path(name_or_path: str | Path) -> Path:
    """Path of a built-in configuration (by name) or of a user file."""
    text = str(name_or_path)
    if text in BUILTIN_CONFIGS:
        return CONFIG_DIR / f"{text}.yaml"
    path = Path(text)
    if not path.is_file():
        raise ConfigError(
            f"configuration {text!r} is neither a built-in name {BUILTIN_CONFIGS} nor an existing file"
        )
    return path


def load_config(name_or_path: str | Path) -> TrainConfig:
    """Read and validate a configuration by built-in name or path."""
    path = config_path(name_or_path)
    return _validate(read_yaml(path, ConfigError, "configuration"), str(path))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    """Validate a configuration given as data (e.g. the copy stored in a checkpoint)."""
    return _validate(data, source)
