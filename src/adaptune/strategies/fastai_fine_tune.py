"""``fastai_fine_tune``: fastai's ``fine_tune``: the head alone for ``frozen_epochs`` epochs, then
every layer with discriminative rates, geometric from ``min_multiplier`` (input layer) to 1
(head)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptune.plans import ScoreTables, TensorPlan
from adaptune.settings import TrainSettings
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class FastaiSettings:
    frozen_epochs: int
    min_multiplier: float


def build(tables: ScoreTables, settings: FastaiSettings) -> list[TensorPlan]:
    top = int(tables.tensors["layer_index"].max()) or 1
    tensors = []
    for row in tables.rows():
        multiplier = settings.min_multiplier ** ((top - int(row.layer_index)) / top)
        start = 1 if row.is_head else 1 + settings.frozen_epochs
        reason = f"fastai fine_tune: lr x{multiplier:.3g} from epoch {start}"
        tensors.append(TensorPlan.from_row(row, False, multiplier, reason, start))
    return tensors


def check(settings: FastaiSettings, train: TrainSettings) -> str | None:
    if settings.frozen_epochs >= train.epochs:
        return (
            f"frozen_epochs = {settings.frozen_epochs} leaves no epoch of the {train.epochs} "
            "(train.epochs) in which the body trains"
        )
    return None


KIND = StrategyKind(
    name="fastai_fine_tune", build=build, settings=FastaiSettings, needs_head=True, check=check
)
