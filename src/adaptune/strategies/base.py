"""What a strategy kind is: its settings, its plan builder and its training-time hooks.

Every kind is one module of :mod:`adaptune.strategies` holding one :class:`StrategyKind` entry
(``KIND``), after timm's optimizer registry (``timm/optim/_optim_factory.py``): the stages ask
the registry for a kind and never branch on its name. The kind's keys, their types and defaults
are its ``kind_<name>`` block of the schema; its settings dataclass adds only rules between keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd
import torch

from adaptune.modalities import TaskModel
from adaptune.optim import warmup_linear
from adaptune.plans import Plan, ScoreTables, TensorPlan
from adaptune.settings import TrainSettings


@dataclass(frozen=True)
class NoSettings:
    """A kind without keys of its own."""


@dataclass
class TrainingContext:
    """What a strategy's hooks see of the fine-tuning run they act on. ``optimizer`` and
    ``scheduler`` are set once they exist (before :meth:`TrainingHooks.start`)."""

    task: TaskModel
    plan: Plan
    train: pd.DataFrame
    settings: TrainSettings
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    groups: list[dict[str, Any]] = field(default_factory=list)


class TrainingHooks:
    """What a strategy does while training beyond its fixed plan; this base does nothing.

    The training loop calls, in this order: :meth:`extra_groups` (after the plan's parameter
    groups are built), :meth:`schedule` (to make the lr schedule), :meth:`start` (once the
    optimizer and scheduler exist); then for every optimizer step :meth:`on_step_start`
    (before its forward pass: the place to change which tensors train), :meth:`before_step`
    (after the backward pass, before the optimizer step: the place to change gradients and
    rates) and :meth:`after_step` (after it: the place to change weights or optimizer state);
    after each epoch's validation :meth:`on_epoch_end`; at the end :meth:`finish` (after the
    best weights are restored) and :meth:`trained_params`. Which tensors train in which epoch
    is the plan's data (``frozen``, ``unfreeze_epoch``), applied by the loop for every kind
    alike; what hooks change beyond it they say in :meth:`state_dict`, which a resumed run
    gives back to :meth:`load_state_dict`.

    Gradients and optimizer state belong to the tensors the optimizer steps,
    ``context.optimizer.param_groups``, in the order of the groups' ``names``: the model's own
    tensors, or their fp32 masters under ``train.weight_precision: bf16``.
    """

    # One optimizer group per tensor, for kinds whose multipliers change per tensor.
    per_tensor_groups: ClassVar[bool] = False
    # The kind changes which tensors train within an epoch (LISA, BAdam): the frozen-prefix
    # cache, built at an epoch's start from what is frozen then, cannot serve it.
    switches_within_epoch: ClassVar[bool] = False

    def __init__(self, settings: Any, train: TrainSettings) -> None:
        self.settings = settings
        self.train = train

    def extra_groups(self, context: TrainingContext) -> list[dict[str, Any]]:
        """Optimizer groups of parameters the plan does not list (adapters)."""
        return []

    def schedule(self, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
        """The lr factor of each optimizer step: linear warm-up, then linear decay to zero."""
        return warmup_linear(total_steps, self.train.warmup_ratio)

    def start(self, context: TrainingContext) -> None:
        """Prepare what the hooks need from the model, the data and the optimizer."""

    def on_step_start(self, step: int) -> None:
        """Before the forward pass of optimizer step ``step`` (from 0, counted over the run)."""

    def before_step(self, first_step_of_epoch: bool) -> None:
        """Adjust gradients or learning rates for the coming optimizer step."""

    def after_step(self, step: int) -> None:
        """After optimizer step ``step``: adjust weights or optimizer state."""

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        """After epoch ``epoch``'s validation (``row``: its line of the history)."""

    def state_dict(self) -> dict[str, Any]:
        """What the hooks changed during training that a resumed run needs back."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state_dict` (a resumed run, before its next step)."""

    def finish(self, context: TrainingContext) -> None:
        """Leave the trained model in its final, saveable form."""

    def trained_params(self, counted: int) -> int:
        """How many parameters trained; ``counted`` is the size of the optimizer's tensors."""
        return counted

    def record(self) -> dict[str, Any]:
        """What the hooks decided during the run that its plan could not say beforehand
        (the periods a sampled schedule used, the density of a mask, the epoch each block
        froze at), as JSON-ready values for the run's summary and MLflow; {} for none."""
        return {}


@dataclass(frozen=True)
class StrategyKind:
    """One kind of strategy: ``settings`` is the dataclass of its own keys; ``build`` makes
    every tensor's plan from the score tables and those settings; ``hooks`` acts during
    training; ``needs_head`` refuses a model without a new head; ``check`` returns what is wrong
    with the settings together with the run's training settings (or None)."""

    name: str
    build: Callable[[ScoreTables, Any], list[TensorPlan]]
    settings: type = NoSettings
    hooks: type[TrainingHooks] = TrainingHooks
    needs_head: bool = False
    check: Callable[[Any, TrainSettings], str | None] = field(default=lambda settings, train: None)
    # The tensors that hold gradients and optimizer state at one time, for the memory
    # estimate, where a kind trains some of the plan's trainable tensors at a time (None: all,
    # or the busiest period of the kind's schedule).
    at_once: Callable[[list[TensorPlan], Any], list[TensorPlan]] | None = None
    # The plan's schedule (:attr:`adaptune.plans.Plan.schedule`) for kinds that switch which
    # tensors train during a run: made from the score tables, the tensors' plans and settings.
    schedule: Callable[[ScoreTables, list[TensorPlan], Any], dict[str, Any]] | None = None


def stepped_tensors(context: TrainingContext) -> dict[str, torch.Tensor]:
    """The tensor the optimizer steps for each trainable tensor, by name: the model's own, or
    its fp32 master under bf16 weights (gradients and optimizer state live there)."""
    return {
        name: tensor
        for group in context.optimizer.param_groups
        for name, tensor in zip(group["names"], group["params"], strict=True)
    }


def every_tensor(
    tables: ScoreTables, reason: str, head_reason: str | None = None
) -> list[TensorPlan]:
    """Every tensor trains at the base rate, from the first epoch."""
    return [
        TensorPlan.from_row(row, False, 1.0, head_reason if row.is_head and head_reason else reason)
        for row in tables.rows()
    ]


def head_alone(tables: ScoreTables, body_reason: str) -> list[TensorPlan]:
    """The new head trains at the base rate; the pretrained body is frozen."""
    return [
        TensorPlan.from_row(
            row, not row.is_head, 1.0, "head: new for the task" if row.is_head else body_reason
        )
        for row in tables.rows()
    ]
