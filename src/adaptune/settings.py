"""Typed settings built from the validated config: one place says what each setting means.

``config/schema.yaml`` documents every key for users and Snakemake fills in its defaults; these
dataclasses carry the same defaults (a test keeps the two in step) so that the package can be used
without Snakemake, and their ``__post_init__`` checks raise a :class:`ConfigError` that names
the key.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self, TypeVar

from adaptune.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
IMPORTANCE_METRICS = (
    "weight_l1",
    "weight_l2",
    "grad_norm",
    "fisher",
    "hessian_trace",
    "depth",
    "combined",
)
STRATEGY_KINDS = (
    "full",
    "head_only",
    "freeze_bottom",
    "llrd",
    "importance",
    "gradual_unfreeze",
    "fastai_fine_tune",
    "auto_rgn",
    "childtuning_d",
    "lora",
)
# Keys of ``train`` that a strategy may override: everything that shapes the optimisation.
OVERRIDABLE_TRAIN_KEYS = (
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "decay_norm_and_bias",
    "epochs",
    "batch_size",
    "eval_batch_size",
    "warmup_ratio",
    "max_grad_norm",
    "augment",
    "frozen_batchnorm",
)
AUGMENTATIONS = ("random_resized_crop", "horizontal_flip")
DATA_SOURCE_KINDS = ("bundled:", "csv:", "parquet:", "hf:", "imagefolder:", "torchvision:")
BASELINES = {"tfidf_logreg": "text", "pixel_logreg": "image"}  # name: the data it fits
MODEL_KINDS = ("bundled:", "hf:", "path:", "torchvision:", "timm:")


T = TypeVar("T")


def _from_mapping(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a config section, naming unknown keys."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )
    return cls(**values)


def _check_range(where: str, value: float, low: float | None, high: float | None) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{where} = {value!r} is outside [{low}, {high}]")


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
    """Where the labelled examples come from and how they are split (``data:``)."""

    source: str
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = ""
    root: str = "data/downloads"
    shots: list[int | str] = field(default_factory=lambda: [16])
    val_size: float = 0.1
    test_size: float = 0.2
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not any(self.source.startswith(p) for p in DATA_SOURCE_KINDS):
            raise ConfigError(
                f"data.source = {self.source!r}: use bundled:bbc-news, bundled:digits, csv:PATH, "
                "parquet:PATH, hf:NAME, imagefolder:DIR or torchvision:DATASET"
            )
        _check_range("data.val_size", self.val_size, 0, 1)
        _check_range("data.test_size", self.test_size, 0, 1)
        if self.val_size + self.test_size >= 1:
            raise ConfigError(
                f"data.val_size + data.test_size = {self.val_size + self.test_size} leaves no "
                "training examples; make their sum less than 1"
            )
        for shots in self.shots:
            parse_shots(shots)
        if self.max_length < 8:
            raise ConfigError(f"data.max_length = {self.max_length} is too short (at least 8)")

    @property
    def is_image(self) -> bool:
        """Images, not text: an image source, or a CSV with an image-path column."""
        from adaptune.vision import is_image_source

        return is_image_source(self.source) or (
            self.source.startswith("csv:") and bool(self.image_column)
        )

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> Self:
        return _from_mapping(cls, data, "data")


@dataclass(frozen=True)
class ModelSettings:
    """The pretrained model (``model:``): ``name`` says which, ``weights`` which of its weights
    (image models: a torchvision weights name such as IMAGENET1K_V2, or a local weights file),
    ``image_size`` the side of an image model's input (0: its pretrained size)."""

    name: str
    weights: str = ""
    image_size: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 0 or 0 < self.image_size < 16:
            raise ConfigError(
                f"model.image_size = {self.image_size}: 0 (the model's own) or at least 16"
            )
        if not any(self.name.startswith(p) for p in MODEL_KINDS):
            raise ConfigError(
                f"model.name = {self.name!r}: use bundled:all-MiniLM-L6-v2, "
                "bundled:efficientnet-lite0, hf:ID, path:DIR, torchvision:NAME or timm:NAME"
            )

    @property
    def is_image(self) -> bool:
        from adaptune.vision import is_vision_model

        return is_vision_model(self.name)

    @classmethod
    def from_config(cls, model: Mapping[str, Any] | str) -> Self:
        if isinstance(model, str):
            return cls(name=model)
        return _from_mapping(cls, model, "model")


@dataclass(frozen=True)
class ImportanceSettings:
    """How importance is scored (``importance:``)."""

    metrics: list[str] = field(default_factory=lambda: list(IMPORTANCE_METRICS))
    batches: int = 2
    batch_size: int = 16
    hutchinson_probes: int = 4
    hessian_batches: int = 1
    chunk_size: int = 8
    per_example: str = "auto"
    combine: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in IMPORTANCE_METRICS]
        if unknown or not self.metrics:
            raise ConfigError(
                f"importance.metrics: unknown or empty {unknown or self.metrics}; "
                f"allowed: {', '.join(IMPORTANCE_METRICS)}"
            )
        if self.per_example not in ("auto", "vmap", "loop"):
            raise ConfigError(
                f"importance.per_example = {self.per_example!r}; allowed: auto, vmap, loop"
            )
        for key in ("batches", "batch_size", "chunk_size", "hessian_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"importance.{key} = {getattr(self, key)} must be at least 1")
        if "hessian_trace" in self.metrics and self.hutchinson_probes < 2:
            raise ConfigError(
                "importance.hutchinson_probes must be at least 2 for a standard error"
            )
        if "combined" in self.metrics and len(self.metrics) < 2:
            raise ConfigError("importance.metrics: 'combined' needs other metrics to combine")
        bad = {m: w for m, w in self.combine.items() if m not in self.metrics or w < 0}
        if bad or any(m == "combined" for m in self.combine):
            raise ConfigError(
                f"importance.combine: {bad} — weights must be >= 0 and name metrics listed in "
                "importance.metrics (other than combined)"
            )

    @classmethod
    def from_config(cls, importance: Mapping[str, Any] | None) -> Self:
        return _from_mapping(cls, importance, "importance")


@dataclass(frozen=True)
class TrainSettings:
    """How one run trains (``train:``, with a strategy's ``train:`` overrides applied)."""

    optimizer: str = "adamw"
    lr: float = 5e-5
    momentum: float = 0.9
    weight_decay: float = 0.01
    decay_norm_and_bias: bool = False
    epochs: int = 10
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "auto"
    precision: str = "auto"
    augment: list[str] = field(default_factory=list)
    frozen_batchnorm: str = "eval"

    def __post_init__(self) -> None:
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise ConfigError(f"train.augment: {bad}; allowed: {', '.join(AUGMENTATIONS)}")
        if self.frozen_batchnorm not in ("eval", "train"):
            raise ConfigError(
                f"train.frozen_batchnorm = {self.frozen_batchnorm!r}; allowed: eval, train"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"train.optimizer = {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}"
            )
        _check_range("train.lr", self.lr, 0, None)
        if self.lr <= 0:
            raise ConfigError(f"train.lr = {self.lr} must be positive")
        _check_range("train.momentum", self.momentum, 0, 1)
        _check_range("train.weight_decay", self.weight_decay, 0, None)
        _check_range("train.warmup_ratio", self.warmup_ratio, 0, 1)
        _check_range("train.max_grad_norm", self.max_grad_norm, 0, None)
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"train.{key} = {getattr(self, key)!r} must be an integer >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision = {self.precision!r}; allowed: auto, fp32, bf16")

    @classmethod
    def from_config(
        cls,
        train: Mapping[str, Any] | None,
        overrides: Mapping[str, Any] | None = None,
        strategy: str = "",
    ) -> Self:
        """Shared ``train:`` settings with one strategy's ``train:`` overrides on top."""
        overrides = dict(overrides or {})
        bad = sorted(set(overrides) - set(OVERRIDABLE_TRAIN_KEYS))
        if bad:
            raise ConfigError(
                f"strategies.{strategy}.train: {', '.join(bad)} cannot differ per strategy; "
                f"allowed: {', '.join(OVERRIDABLE_TRAIN_KEYS)}"
            )
        try:
            return _from_mapping(cls, {**dict(train or {}), **overrides}, "train")
        except ConfigError as err:
            if overrides:
                raise ConfigError(f"{err} (with the overrides of strategies.{strategy})") from None
            raise


LR_MAPPINGS = ("linear", "log", "power", "sigmoid", "rank")


@dataclass(frozen=True)
class FreezeRule:
    """Which units an importance plan freezes: exactly one of ``fraction`` (of the body's
    parameters, lowest scores first), ``threshold`` (units whose percentile rank is below it) or
    ``budget`` (at most this fraction of all parameters trains, chosen to keep the most
    importance). ``protect`` turns it round: freeze the *most* important units, to keep their
    pretrained knowledge."""

    fraction: float | None = None
    threshold: float | None = None
    budget: float | None = None
    protect: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("fraction", "threshold", "budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"freeze: give exactly one of fraction, threshold, budget (got {given or 'none'})"
            )
        value = getattr(self, given[0])
        if not 0 <= value <= 1:
            raise ConfigError(f"freeze.{given[0]} = {value} must lie in [0, 1]")


@dataclass(frozen=True)
class LrRule:
    """Importance learning rates: multiplier = min + (max - min) * f(score), f monotonic in the
    score (``mapping``: linear, log, power (with ``power``), sigmoid, rank), decreasing instead
    when ``inverse``. The new head trains at ``max``."""

    mapping: str = "linear"
    min: float = 0.1
    max: float = 1.0
    power: float = 2.0
    inverse: bool = False

    def __post_init__(self) -> None:
        if self.mapping not in LR_MAPPINGS:
            raise ConfigError(f"lr.mapping = {self.mapping!r}; allowed: {', '.join(LR_MAPPINGS)}")
        if not 0 < self.min <= self.max:
            raise ConfigError(f"lr: need 0 < min <= max, got min={self.min}, max={self.max}")
        if self.power <= 0:
            raise ConfigError(f"lr.power = {self.power} must be positive")


@dataclass(frozen=True)
class StrategySettings:
    """One entry of ``strategies:``: how its freeze plan is made.

    - ``full``: everything trains at the base rate;
    - ``head_only``: only the task's new head trains;
    - ``freeze_bottom``: the input layer and the first ``layers`` blocks are frozen;
    - ``llrd``: layer-wise lr decay, multiplier ``decay ** (distance from the head)``;
    - ``importance``: from the ``metric`` scores of ``granularity`` units (tensors or layers),
      a ``freeze`` rule and/or an ``lr`` rule;
    - ``gradual_unfreeze``: the head first, then one more layer every ``every`` epochs, in
      ``order`` top_down or by importance (``metric``);
    - ``fastai_fine_tune``: the head alone for ``frozen_epochs``, then all layers with rates from
      ``min_multiplier`` (input) to 1 (head);
    - ``auto_rgn``: Surgical fine-tuning's Auto-RGN, lr per tensor from its relative gradient
      norm, recomputed every epoch;
    - ``childtuning_d``: ChildTuning-D, only the top ``p`` of weights by task Fisher train;
    - ``lora``: LoRA adapters of rank ``r`` on the attention projections (or ``targets``),
      the pretrained body frozen, the head trained.
    """

    kind: str
    train: dict[str, Any] = field(default_factory=dict)
    layers: int | None = None
    decay: float = 0.8
    metric: str = "combined"
    granularity: str = "layer"
    freeze: FreezeRule | None = None
    lr: LrRule | None = None
    order: str = "top_down"
    every: int = 1
    frozen_epochs: int = 1
    min_multiplier: float = 0.01
    p: float = 0.3
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in STRATEGY_KINDS:
            raise ConfigError(
                f"strategy kind {self.kind!r} is unknown; allowed: {', '.join(STRATEGY_KINDS)}"
            )
        if self.kind == "freeze_bottom" and (self.layers is None or self.layers < 0):
            raise ConfigError("freeze_bottom needs layers: K, the number of blocks to freeze")
        if self.kind == "llrd" and not 0 < self.decay <= 1:
            raise ConfigError(f"llrd: decay = {self.decay} must lie in (0, 1]")
        if self.order not in ("top_down", "importance"):
            raise ConfigError(f"order = {self.order!r}; allowed: top_down, importance")
        if self.every < 1 or self.frozen_epochs < 0:
            raise ConfigError("every must be at least 1 and frozen_epochs at least 0")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("lora: need r >= 1, alpha > 0 and 0 <= dropout < 1")
        if not 0 < self.p <= 1:
            raise ConfigError(f"p = {self.p} must lie in (0, 1]")
        if not 0 < self.min_multiplier <= 1:
            raise ConfigError(f"min_multiplier = {self.min_multiplier} must lie in (0, 1]")
        if self.granularity not in ("tensor", "layer"):
            raise ConfigError(f"granularity = {self.granularity!r}; allowed: tensor, layer")
        if self.kind == "importance" and self.freeze is None and self.lr is None:
            raise ConfigError("an importance strategy needs a freeze rule, an lr rule, or both")
        if self.metric not in IMPORTANCE_METRICS:
            raise ConfigError(f"metric = {self.metric!r}; allowed: {', '.join(IMPORTANCE_METRICS)}")

    @classmethod
    def from_config(cls, name: str, spec: Mapping[str, Any]) -> Self:
        spec = dict(spec)
        try:
            if spec.get("freeze") is not None:
                spec["freeze"] = _from_mapping(FreezeRule, spec["freeze"], "freeze")
            if spec.get("lr") is not None:
                spec["lr"] = _from_mapping(LrRule, spec["lr"], "lr")
            return _from_mapping(cls, spec, f"strategies.{name}")
        except ConfigError as err:
            raise ConfigError(f"strategies.{name}: {err}") from None


def write_settings(path: str | Path, **sections: Any) -> None:
    """Write resolved settings (dataclasses or plain values) as JSON next to a stage's outputs,
    the way timm's train.py writes args.yaml."""
    resolved = {
        name: asdict(value) if dataclasses.is_dataclass(value) else value  # type: ignore[arg-type]
        for name, value in sections.items()
    }
    Path(path).write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def modality_mismatch(data: DataSettings, model: ModelSettings) -> str | None:
    """What is wrong when the data and the model are not both text or both images, else None."""
    if data.is_image == model.is_image:
        return None
    data_kind, model_kind = ("images", "text") if data.is_image else ("text", "images")
    return (
        f"data.source = {data.source!r} holds {data_kind}, but model.name = {model.name!r} is a "
        f"model for {model_kind}"
    )


def baselines_mismatch(baselines: list[str], modality: str) -> str | None:
    """What is wrong when some ``baselines`` cannot fit ``modality`` data, else None."""
    wrong = [b for b in baselines if BASELINES.get(b, modality) != modality]
    if not wrong:
        return None
    fitting = [b for b, m in BASELINES.items() if m == modality]
    return f"baselines: {', '.join(wrong)} cannot run on {modality} data; use {', '.join(fitting)}"


def check_modalities(config: Mapping[str, Any]) -> None:
    """The data, the model and the baselines must all be text or all images; say which key is
    off before any job starts (the stages check again, with the same messages)."""
    data = DataSettings.from_config(config["data"])
    model = ModelSettings.from_config(config["model"])
    modality = "image" if data.is_image else "text"
    problem = modality_mismatch(data, model) or baselines_mismatch(
        config.get("baselines", []), modality
    )
    if problem:
        raise ConfigError(problem)
