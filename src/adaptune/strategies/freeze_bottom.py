"""``freeze_bottom``: the input layer and the first ``layers`` blocks are frozen; the blocks
above, the output layer and the head train at the base rate."""

from __future__ import annotations

from dataclasses import dataclass

from adaptune.errors import PlanError
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class FreezeBottomSettings:
    layers: int


def build(tables: ScoreTables, settings: FreezeBottomSettings) -> list[TensorPlan]:
    scores = tables.tensors
    blocks = sorted(scores.loc[scores["layer_kind"] == "block", "layer_index"].unique())
    if settings.layers > len(blocks):
        raise PlanError(
            f"freeze_bottom: layers = {settings.layers}, but the model has {len(blocks)} blocks"
        )
    frozen_blocks = set(blocks[: settings.layers])
    tensors = []
    for row in tables.rows():
        frozen = row.layer_kind == "input" or row.layer_index in frozen_blocks
        reason = f"freeze_bottom {settings.layers}: {'frozen' if frozen else 'trains'}"
        tensors.append(TensorPlan.from_row(row, frozen, 1.0, reason))
    return tensors


KIND = StrategyKind(name="freeze_bottom", build=build, settings=FreezeBottomSettings)
