"""What a strategy kind is: its settings, its plan builder and its training-time hooks.

Every kind is one module of :mod:`adaptune.strategies` holding one :class:`StrategyKind` entry
(``KIND``), after timm's optimizer registry (``timm/optim/_optim_factory.py``): the stages ask
the registry for a kind and never branch on its name. The kind's keys, their types and defaults
are its ``kind_<name>`` block of the schema; its settings dataclass adds only rules between keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
class Run:
    """The fine-tuning run a strategy's hooks act on. ``optimizer`` and ``scheduler`` are set
    once they exist (before :meth:`TrainingHooks.start`)."""

    task: TaskModel
    plan: Plan
    train: pd.DataFrame
    info: Mapping[str, Any]
    settings: TrainSettings
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    groups: list[dict[str, Any]] = field(default_factory=list)


class TrainingHooks:
    """What a strategy does while training beyond its fixed plan; this base does nothing.

    The training loop calls, in this order: :meth:`extra_groups` (after the plan's parameter
    groups are built), :meth:`schedule` (to make the lr schedule), :meth:`start` (once the
    optimizer and scheduler exist), :meth:`before_step` (after each backward pass, before the
    optimizer step), :meth:`finish` (after the best weights are restored) and
    :meth:`trained_params`. Which tensors train in which epoch is the plan's data
    (``frozen``, ``unfreeze_epoch``), applied by the loop for every kind alike.
    """

    # One optimizer group per tensor, for kinds whose multipliers change per tensor.
    per_tensor_groups: ClassVar[bool] = False

    def __init__(self, settings: Any, train: TrainSettings) -> None:
        self.settings = settings
        self.train = train

    def extra_groups(self, run: Run) -> list[dict[str, Any]]:
        """Optimizer groups of parameters the plan does not list (adapters)."""
        return []

    def schedule(self, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
        """The lr factor of each optimizer step: linear warm-up, then linear decay to zero."""
        return warmup_linear(total_steps, self.train.warmup_ratio)

    def start(self, run: Run) -> None:
        """Prepare what the hooks need from the model, the data and the optimizer."""

    def before_step(self, first_step_of_epoch: bool) -> None:
        """Adjust gradients or learning rates for the coming optimizer step."""

    def finish(self, run: Run) -> None:
        """Leave the trained model in its final, saveable form."""

    def trained_params(self, counted: int) -> int:
        """How many parameters trained; ``counted`` is the size of the optimizer's tensors."""
        return counted


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
