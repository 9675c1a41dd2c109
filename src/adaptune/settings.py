"""Typed settings, built from the validated config: one place says what each setting means.

The schema (:mod:`adaptune.config`) says every key's type, range and default; these dataclasses
give the sections names and types in code (as ``run_glue.py``'s ``ModelArguments`` do) and check
only what a schema cannot say, the rules between keys. ``from_config`` takes a section as the
workflow passes it (validated, defaults filled); given a partial section, as in a notebook, it
checks it against the schema and fills in the defaults first.

Seeds and shot counts are not settings of a stage: they are the workflow's ``{seed}`` and
``{shots}`` wildcards, and each run records its own (:func:`write_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

from adaptune import config
from adaptune.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Dataclass ``cls`` from a complete, validated mapping; nested dataclass fields (optional
    or not) are built from their mappings too. ``where`` is the key path, for messages."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        nested = [
            t
            for t in (typing.get_args(hints[name]) or (hints[name],))
            if dataclasses.is_dataclass(t)
        ]
        if nested and isinstance(value, Mapping):
            value = build(nested[0], value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _section(values: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    return config.complete(values, f"#/properties/{key}", key)


def parse_shots(value: int | str) -> int | None:
    """``16`` or ``"16"`` -> 16; ``"all"`` -> None (the whole training split)."""
    if value == "all":
        return None
    try:
        shots = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"data.shots: {value!r} is neither a positive integer nor 'all'"
        ) from None
    if shots < 1:
        raise ConfigError(f"data.shots: {value!r} must be at least 1")
    return shots


@dataclass(frozen=True)
class DataSettings:
    """Where the labelled examples come from and how they are split (``data:``, without
    ``shots`` and ``val_shots``: each shot count is its own job)."""

    source: str
    text_column: str
    label_column: str
    image_column: str
    root: str
    encoding: str
    separator: str
    revision: str
    duplicates: str
    unreadable_images: str
    val_size: float
    test_size: float
    max_length: int
    seed: int

    def __post_init__(self) -> None:
        if self.val_size + self.test_size >= 1:
            raise ConfigError(
                f"data.val_size + data.test_size = {self.val_size + self.test_size} leaves no "
                "training examples; make their sum less than 1"
            )
        for key in ("text_column", "image_column"):
            if getattr(self, key) == self.label_column:
                raise ConfigError(
                    f"data.{key} and data.label_column are both {self.label_column!r}: the "
                    "model would be given its answer; name the input and the label columns"
                )

    @property
    def kind(self) -> str:
        """The source's kind: ``csv`` for ``csv:data/x.csv``."""
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        """What follows the kind: ``data/x.csv`` for ``csv:data/x.csv``."""
        return self.source.partition(":")[2]

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> Self:
        values = _section(data, "data")
        for sample_size in ("shots", "val_shots"):  # the {shots} wildcard and its val sample
            values.pop(sample_size, None)
        return build(cls, values, "data")


@dataclass(frozen=True)
class ModelSettings:
    """The pretrained model (``model:``): ``name`` says which, ``weights`` which of its weights
    (image models: a torchvision weights name such as IMAGENET1K_V2, or a local weights file),
    ``image_size`` the side of an image model's input (0: its pretrained size)."""

    name: str
    weights: str
    image_size: int

    @property
    def kind(self) -> str:
        """``bundled``, ``hf``, ``path``, ``torchvision`` or ``timm``."""
        return self.name.partition(":")[0]

    @property
    def location(self) -> str:
        return self.name.partition(":")[2]

    @classmethod
    def from_config(cls, model: Mapping[str, Any] | str) -> Self:
        values = {"name": model} if isinstance(model, str) else model
        return build(cls, _section(values, "model"), "model")


@dataclass(frozen=True)
class ImportanceSettings:
    """How importance is scored (``importance:``): ``head`` says through which head, the new
    one as initialised (``random``) or after a linear probe of ``probe_epochs`` at ``probe_lr``
    (``probe``)."""

    metrics: list[str]
    batches: int
    batch_size: int
    hutchinson_probes: int
    hessian_examples: int
    chunk_size: int
    per_example: str
    combine: dict[str, float]
    seed: int
    head: str
    probe_epochs: int
    probe_lr: float

    def scoring_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`adaptune.importance.score_model` these settings set."""
        return {
            "probes": self.hutchinson_probes,
            "hessian_examples": self.hessian_examples,
            "chunk_size": self.chunk_size,
            "per_example": self.per_example,
            "seed": self.seed,
            "combine": self.combine,
        }

    def __post_init__(self) -> None:
        if "combined" in self.metrics and len(self.metrics) < 2:
            raise ConfigError("importance.metrics: 'combined' needs other metrics to combine")
        stray = sorted(m for m in self.combine if m not in self.metrics or m == "combined")
        if stray:
            raise ConfigError(
                f"importance.combine weighs {stray}, which importance.metrics does not compute "
                "(or is combined itself); add them to importance.metrics or remove their weights"
            )

    @classmethod
    def from_config(cls, importance: Mapping[str, Any] | None) -> Self:
        return build(cls, _section(importance, "importance"), "importance")


@dataclass(frozen=True)
class EarlyStopping:
    """``train.early_stopping``: stop after ``patience`` epochs without an improvement of the
    validation macro-F1 by more than ``min_delta`` (``patience`` 0: never)."""

    patience: int = 0
    min_delta: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.patience > 0


# The train settings a plan's memory estimate reads (adaptune.memory.plan_memory): the
# workflow's make_freeze_plan depends on these alone, so a new learning rate leaves plans be.
PLAN_MEMORY_SETTINGS = (
    "optimizer",
    "momentum",
    "batch_size",
    "accumulate_steps",
    "gradient_checkpointing",
    "weight_precision",
    "precision",
)


@dataclass(frozen=True)
class CheckpointSettings:
    """``train.checkpoint``: whether a ``finetune`` job keeps what it needs to resume after it
    is killed (``enabled``), at the end of the first epoch ``every_seconds`` after its last
    save (0: every epoch) and, with ``every_steps`` > 0, every that many optimizer steps too
    (:mod:`adaptune.checkpoints`). How often a job checkpoints changes none of its results."""

    enabled: bool = True
    every_steps: int = 0
    every_seconds: float = 60.0


@dataclass(frozen=True)
class TrainSettings:
    """How one run trains: ``train:`` with its strategy's ``train:`` overrides applied, without
    ``seeds`` (the run's seed is its wildcard)."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    decay_norm_and_bias: bool
    epochs: int
    batch_size: int
    eval_batch_size: int
    warmup_ratio: float
    max_grad_norm: float
    device: str
    devices: int
    precision: str
    augment: list[str]
    frozen_batchnorm: str
    feature_cache: str
    accumulate_steps: int = 1
    gradient_checkpointing: bool = False
    weight_precision: str = "fp32"
    early_stopping: EarlyStopping = EarlyStopping()
    sharding: str = "ddp"
    checkpoint: CheckpointSettings = CheckpointSettings()

    @property
    def compute_precision(self) -> str:
        """The autocast precision of the forward pass: bf16 weights compute in bf16."""
        return "bf16" if self.weight_precision == "bf16" else self.precision

    @property
    def results(self) -> dict[str, Any]:
        """The settings that decide what a run computes: all but ``checkpoint`` (how often a
        job saves its progress changes nothing it computes)."""
        values = asdict(self)
        values.pop("checkpoint")
        return values

    def __post_init__(self) -> None:
        if self.weight_precision == "bf16" and self.precision == "fp32":
            raise ConfigError(
                "train.weight_precision = 'bf16' stores the weights in bfloat16, but "
                "train.precision = 'fp32' computes in float32; set train.precision: bf16 (or "
                "auto), or train.weight_precision: fp32"
            )
        if self.devices > 1 and self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(
                f"train.devices = {self.devices} trains on several devices, but train.device "
                f"= {self.device!r} names one; use auto, cuda or cpu, or set train.devices: 1"
            )

    @classmethod
    def from_config(
        cls,
        train: Mapping[str, Any] | None,
        overrides: Mapping[str, Any] | None = None,
        strategy: str = "",
    ) -> Self:
        """Shared ``train:`` settings with one strategy's ``train:`` overrides on top."""
        if overrides:
            config.complete(overrides, "#/$defs/train_overrides", f"strategies.{strategy}.train")
        values = _section({**dict(train or {}), **dict(overrides or {})}, "train")
        values.pop("seeds", None)
        return build(cls, values, "train")


def write_settings(path: str | Path, **sections: Any) -> None:
    """Write resolved settings (dataclasses or plain values) as JSON next to a stage's outputs,
    the way timm's train.py writes args.yaml."""
    resolved = {
        name: asdict(value) if dataclasses.is_dataclass(value) else value  # type: ignore[arg-type]
        for name, value in sections.items()
    }
    Path(path).write_text(json.dumps(resolved, indent=2, default=str) + "\n")
