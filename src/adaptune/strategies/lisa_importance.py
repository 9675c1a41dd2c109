"""``lisa_importance``: LISA (:mod:`adaptune.strategies.lisa`) with the blocks drawn by their
measured importance instead of uniformly (ours; no published method does exactly this): the
same periods, state policy and always-trained layers, but each period draws its ``layers``
blocks with probabilities from ``score_importance``'s per-layer scores (``metric``, per
parameter):

    p_i = floor / B + (1 - floor) x s_i^(1 / temperature) / sum_j s_j^(1 / temperature)

over the body's ``B`` blocks, so that every block keeps at least ``floor / B`` (``floor`` > 0:
each block can be drawn; ``floor: 1`` is uniform LISA) and ``temperature`` flattens (> 1) or
sharpens (< 1) the scores' differences. The plan lists each block's probability and the drawn
periods. Does measured importance beat uniform sampling? ``config/methods.yaml`` asks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind
from adaptune.strategies.lisa import LisaHooks, builder, checked_blocks, lisa_schedule


@dataclass(frozen=True)
class ImportanceLisaSettings:
    layers: int
    interval_steps: int
    interval_fraction: float
    optimizer_state: str
    seed: int
    metric: str
    temperature: float
    floor: float


def block_probabilities(scores: np.ndarray, temperature: float, floor: float) -> np.ndarray:
    """The draw probability of each block from its score (see the module docstring)."""
    weights = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None) ** (1.0 / temperature)
    total = weights.sum()
    shares = weights / total if total > 0 else np.full(len(weights), 1.0 / len(weights))
    return floor / len(weights) + (1.0 - floor) * shares


def importance_schedule(
    tables: ScoreTables, tensors: list[TensorPlan], settings: ImportanceLisaSettings
) -> dict[str, Any]:
    blocks = checked_blocks(tables, settings, "lisa_importance")
    layers = tables.layers
    column = tables.metric_column(settings.metric, layers)
    score_of = dict(zip(layers["layer_index"].astype(int), layers[column], strict=True))
    scores = np.array([score_of[b["layer_index"]] for b in blocks])
    for block, score, probability in zip(
        blocks,
        scores,
        block_probabilities(scores, settings.temperature, settings.floor),
        strict=True,
    ):
        block["score"] = float(score)
        block["probability"] = float(probability)
    how = (
        f"with probabilities from their {settings.metric} per parameter (temperature "
        f"{settings.temperature:g}, floor {settings.floor:g})"
    )
    return lisa_schedule(blocks, settings, how)


KIND = StrategyKind(
    name="lisa_importance",
    build=builder("lisa_importance"),
    settings=ImportanceLisaSettings,
    hooks=LisaHooks,
    needs_head=True,
    schedule=importance_schedule,
)
