"""``importance``: a freeze rule and/or an lr rule on the importance scores of ``granularity``
units (tensors or layers) by ``metric``: lr_i = (min + (max - min) f(score_i)) x lr with f
monotonic, and the units a freeze rule picks frozen. The new head trains at ``lr.max``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from adaptune.errors import ConfigError, PlanError
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class FreezeRule:
    """Which units to freeze: exactly one of ``fraction`` (of the body's parameters, lowest
    scores first), ``threshold`` (units whose percentile rank is below it) or ``budget`` (at
    most this fraction of all parameters trains, chosen to keep the most importance).
    ``protect`` turns it round: freeze the *most* important units, to keep their pretrained
    knowledge."""

    protect: bool
    fraction: float | None = None
    threshold: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("fraction", "threshold", "budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"freeze: give exactly one of fraction, threshold, budget (got {given or 'none'})"
            )


@dataclass(frozen=True)
class LrRule:
    """Multiplier = min + (max - min) * f(score), f monotonic in the score (``mapping``:
    linear, log, power (with ``power``), sigmoid, rank), decreasing instead when ``inverse``."""

    mapping: str
    min: float
    max: float
    power: float
    inverse: bool

    def __post_init__(self) -> None:
        if self.min > self.max:
            raise ConfigError(f"lr: need min <= max, got min={self.min}, max={self.max}")


@dataclass(frozen=True)
class ImportanceSettings:
    metric: str
    granularity: str
    freeze: FreezeRule | None = None
    lr: LrRule | None = None

    def __post_init__(self) -> None:
        if self.freeze is None and self.lr is None:
            raise ConfigError("an importance strategy needs a freeze rule, an lr rule, or both")


def units(tables: ScoreTables, settings: ImportanceSettings) -> pd.DataFrame:
    """The units the plan decides on, one row each: ``unit`` (tensor or layer name), ``numel``,
    ``is_head``, ``score`` (per element) and ``rank`` (percentile among the body's units,
    1 = most important). Layers are scored as ``score_importance`` wrote them."""
    if settings.granularity == "tensor":
        scores = tables.tensors
        column = tables.metric_column(settings.metric)
        table = scores.assign(unit=scores["name"], score=scores[column])
    else:
        layers = tables.layers
        column = tables.metric_column(settings.metric, layers)
        table = layers.assign(
            unit=layers["layer"], score=layers[column], is_head=layers["layer_kind"] == "head"
        )
    table = table[["unit", "numel", "is_head", "score"]].reset_index(drop=True)
    body = ~table["is_head"]
    table["rank"] = table["score"].where(body).rank(pct=True)
    return table


def frozen_units(table: pd.DataFrame, rule: FreezeRule, total_params: int) -> set[str]:
    """The units a freeze rule freezes (never the head)."""
    body = table[~table["is_head"]]
    # Candidates to freeze first: the least important, or the most important when protecting.
    order = body.sort_values("score", ascending=not rule.protect, kind="stable")
    if rule.fraction is not None:
        target = rule.fraction * body["numel"].sum()
        frozen, count = [], 0
        for row in order.itertuples():
            if count >= target:
                break
            frozen.append(row.unit)
            count += row.numel
        return set(frozen)
    if rule.threshold is not None:
        share = body["rank"] if not rule.protect else 1 - body["rank"]
        return set(body.loc[share < rule.threshold, "unit"]) if rule.threshold > 0 else set()
    head_params = table.loc[table["is_head"], "numel"].sum()
    capacity = rule.budget * total_params - head_params
    if capacity < 0:
        raise PlanError(
            f"freeze.budget = {rule.budget}: the new head alone has {head_params:,} of "
            f"{total_params:,} parameters"
        )
    return set(body["unit"]) - knapsack(body, capacity, rule.protect)


def knapsack(body: pd.DataFrame, capacity: float, protect: bool) -> set[str]:
    """Units to train under a parameter budget, maximising their total importance (per-element
    score x size): the greedy density rule (best score per parameter first, skipping what no
    longer fits), or the single most valuable unit that fits if that is worth more; the better
    of the two is within a factor 2 of the optimum (Dantzig 1957; Korte & Vygen, ch. 17).
    With ``protect`` the least important are trained instead."""
    density = -body["score"] if protect else body["score"]
    density = density - density.min() + 1e-12  # positive, same order
    value = density * body["numel"]
    chosen, used = [], 0
    for index in density.sort_values(ascending=False, kind="stable").index:
        if used + body.at[index, "numel"] <= capacity:
            chosen.append(index)
            used += body.at[index, "numel"]
    fits = body["numel"] <= capacity
    if fits.any():
        best = value[fits].idxmax()
        if value[best] > value[chosen].sum():
            chosen = [best]
    return set(body.loc[chosen, "unit"])


def lr_multipliers(table: pd.DataFrame, rule: LrRule, frozen: set[str]) -> dict[str, float]:
    """Multiplier per trainable body unit, min + (max - min) * f(score), f monotonic."""
    trainable = table[~table["is_head"] & ~table["unit"].isin(frozen)]
    if trainable.empty:
        return {}
    score = trainable["score"].astype("float64")
    low, high = score.min(), score.max()
    if rule.mapping == "rank":
        ranks = score.rank(method="average")
        x = (ranks - 1) / max(len(score) - 1, 1)
    elif rule.mapping == "sigmoid":
        z = (score - score.mean()) / (score.std(ddof=0) or 1.0)
        x = 1 / (1 + np.exp(-z))
    elif rule.mapping == "log":
        floor = score[score > 0].min() if (score > 0).any() else 1e-12
        logs = np.log(score.clip(lower=floor))
        span = logs.max() - logs.min()
        x = (logs - logs.min()) / span if span > 0 else pd.Series(1.0, index=score.index)
    else:
        x = (score - low) / (high - low) if high > low else pd.Series(1.0, index=score.index)
        if rule.mapping == "power":
            x = x**rule.power
    if rule.inverse:
        x = 1 - x
    multiplier = rule.min + (rule.max - rule.min) * x
    return dict(zip(trainable["unit"], multiplier.astype(float), strict=True))


def build(tables: ScoreTables, settings: ImportanceSettings) -> list[TensorPlan]:
    table = units(tables, settings)
    frozen = frozen_units(table, settings.freeze, tables.total_params) if settings.freeze else set()
    multipliers = lr_multipliers(table, settings.lr, frozen) if settings.lr else {}
    head_multiplier = settings.lr.max if settings.lr else 1.0
    by_unit = table.set_index("unit")
    key = "name" if settings.granularity == "tensor" else "layer"
    tensors = []
    for row in tables.rows():
        unit = getattr(row, key)
        info = by_unit.loc[unit]
        described = f"{settings.metric} {info['score']:.3g}"
        if row.is_head:
            tensors.append(
                TensorPlan.from_row(row, False, head_multiplier, "head: new for the task")
            )
        elif unit in frozen:
            rule = "most" if settings.freeze.protect else "least"
            reason = f"{described}: frozen, among the {rule} important"
            tensors.append(TensorPlan.from_row(row, True, 0.0, reason))
        else:
            multiplier = multipliers.get(unit, 1.0)
            how = f"lr x{multiplier:.3g} ({settings.lr.mapping})" if settings.lr else "trains"
            reason = f"{described} (rank {info['rank']:.2f}): {how}"
            tensors.append(TensorPlan.from_row(row, False, multiplier, reason))
    return tensors


KIND = StrategyKind(name="importance", build=build, settings=ImportanceSettings, needs_head=True)
