"""``gradual_unfreeze``: ULMFiT's gradual unfreezing (Howard & Ruder 2018): the head trains from
the first epoch, then one more layer every ``every`` epochs, from the top down or by
importance (``metric``, most important first)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptune.plans import ScoreTables, TensorPlan
from adaptune.settings import TrainSettings
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class GradualSettings:
    order: str
    every: int
    metric: str


def thawing_order(tables: ScoreTables, settings: GradualSettings) -> list[int]:
    """Layer indices in thawing order: the head first, then from the top down, or by the
    metric's per-layer score (what ``score_importance`` wrote in ``layers.parquet``)."""
    scores = tables.tensors
    head = sorted(scores.loc[scores["is_head"], "layer_index"].unique())
    if settings.order == "importance":
        layers = tables.layers
        column = tables.metric_column(settings.metric, layers)
        ranked = layers[~layers["layer_index"].isin(head)].sort_values(column, ascending=False)
        return [*head, *ranked["layer_index"].astype(int)]
    body = scores[~scores["is_head"]]
    return [*head, *sorted(body["layer_index"].unique(), reverse=True)]


def build(tables: ScoreTables, settings: GradualSettings) -> list[TensorPlan]:
    order = thawing_order(tables, settings)
    head_layers = tables.tensors.loc[tables.tensors["is_head"], "layer_index"].nunique()
    start = {
        layer: 1 + max(0, position - head_layers + 1) * settings.every
        for position, layer in enumerate(order)
    }
    return [
        TensorPlan.from_row(
            row,
            False,
            1.0,
            f"gradual_unfreeze ({settings.order}): trains from epoch {start[row.layer_index]}",
            start[row.layer_index],
        )
        for row in tables.rows()
    ]


def check(settings: GradualSettings, train: TrainSettings) -> str | None:
    if settings.every >= train.epochs:
        return (
            f"every = {settings.every} thaws nothing below the head within the {train.epochs} "
            "epochs of train.epochs"
        )
    return None


KIND = StrategyKind(name="gradual_unfreeze", build=build, settings=GradualSettings, check=check)
