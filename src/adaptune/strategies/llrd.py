"""``llrd``: layer-wise learning-rate decay (Howard & Ruder 2018; Clark et al. 2020): the head at
the base rate, each layer below at ``decay`` times the rate of the layer above it."""

from __future__ import annotations

from dataclasses import dataclass

from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class LlrdSettings:
    decay: float


def build(tables: ScoreTables, settings: LlrdSettings) -> list[TensorPlan]:
    top = int(tables.tensors["layer_index"].max())
    return [
        TensorPlan.from_row(
            row,
            False,
            settings.decay ** (top - int(row.layer_index)),
            f"llrd: {settings.decay} ** {top - int(row.layer_index)} layers below the top",
        )
        for row in tables.rows()
    ]


KIND = StrategyKind(name="llrd", build=build, settings=LlrdSettings)
