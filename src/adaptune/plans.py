"""Freeze plans: for every parameter tensor, whether it trains and its learning-rate multiplier.

A plan is data: written as JSON by ``make_freeze_plan``, read by ``finetune``, and reviewable by a
person beforehand (``.md`` summary beside it). It is made from the importance score table, which
lists every tensor of the model with its layer, so a plan always covers the whole model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from adaptune.errors import PlanError
from adaptune.settings import FreezeRule, LrRule, StrategySettings


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one parameter tensor during fine-tuning, and why."""

    name: str
    layer: str
    layer_index: int
    numel: int
    frozen: bool
    lr_multiplier: float
    reason: str
    # First epoch (from 1) in which a tensor that is not frozen trains: >1 for tensors thawed
    # later by gradual unfreezing.
    unfreeze_epoch: int = 1
    # Part of the task head, initialised for the task rather than pretrained.
    is_head: bool = False


@dataclass
class Plan:
    """A strategy's decisions for every tensor of a model."""

    strategy: str
    kind: str
    tensors: list[TensorPlan]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def totals(self) -> dict[str, float | int]:
        params = sum(t.numel for t in self.tensors)
        trainable = sum(t.numel for t in self.tensors if not t.frozen)
        return {
            "tensors": len(self.tensors),
            "trainable_tensors": sum(not t.frozen for t in self.tensors),
            "params": params,
            "trainable_params": trainable,
            "trainable_fraction": trainable / params if params else 0.0,
            "scheduled_tensors": sum(t.unfreeze_epoch > 1 for t in self.tensors),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "kind": self.kind,
            "settings": self.settings,
            "totals": self.totals,
            "tensors": [asdict(t) for t in self.tensors],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        data = json.loads(Path(path).read_text())
        try:
            return cls(
                strategy=data["strategy"],
                kind=data["kind"],
                settings=data.get("settings", {}),
                tensors=[TensorPlan(**t) for t in data["tensors"]],
            )
        except (KeyError, TypeError) as err:
            raise PlanError(f"{path} is not a freeze plan: {err}") from err

    def to_markdown(self) -> str:
        """A summary a person can review before anything trains: one row per layer."""
        totals = self.totals
        rows = {}
        for t in self.tensors:
            row = rows.setdefault(
                (t.layer_index, t.layer), {"tensors": 0, "params": 0, "trainable": 0, "lrs": set()}
            )
            row["tensors"] += 1
            row["params"] += t.numel
            row["trainable"] += 0 if t.frozen else t.numel
            if not t.frozen:
                row["lrs"].add(t.lr_multiplier)
        lines = [
            f"# Freeze plan `{self.strategy}` ({self.kind})",
            "",
            f"Trainable: {totals['trainable_params']:,} of {totals['params']:,} parameters "
            f"({totals['trainable_fraction']:.2%}), {totals['trainable_tensors']} of "
            f"{totals['tensors']} tensors.",
            "",
            "| layer | tensors | params | trainable | lr multipliers |",
            "|---|---:|---:|---:|---|",
        ]
        for (_, layer), row in sorted(rows.items()):
            lrs = sorted(row["lrs"])
            if len(lrs) > 3:
                lrs = f"{lrs[0]:.3g} to {lrs[-1]:.3g} ({len(lrs)} values)"
            else:
                lrs = ", ".join(f"{m:.3g}" for m in lrs) or "frozen"
            lines.append(
                f"| {layer} | {row['tensors']} | {row['params']:,} | {row['trainable']:,} | {lrs} |"
            )
        return "\n".join(lines) + "\n"


def read_scores(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _tensor(
    row: Any, frozen: bool, lr_multiplier: float, reason: str, unfreeze_epoch: int = 1
) -> TensorPlan:
    return TensorPlan(
        name=row.name,
        layer=row.layer,
        layer_index=int(row.layer_index),
        numel=int(row.numel),
        frozen=frozen,
        lr_multiplier=0.0 if frozen else float(lr_multiplier),
        reason=reason,
        unfreeze_epoch=1 if frozen else int(unfreeze_epoch),
        is_head=bool(row.is_head),
    )


def _metric_column(scores: pd.DataFrame, metric: str) -> str:
    column = f"{metric}_per_element"
    if column not in scores.columns:
        raise PlanError(
            f"metric {metric!r} is not in the importance scores: add it to importance.metrics"
        )
    return column


def _units(scores: pd.DataFrame, strategy: StrategySettings) -> pd.DataFrame:
    """The units an importance plan decides on, one row each: ``unit`` (tensor or layer name),
    ``numel``, ``is_head``, ``score`` (per element) and ``rank`` (percentile among the body's
    units, 1 = most important)."""
    from adaptune.importance import layer_table

    if strategy.granularity == "tensor":
        column = _metric_column(scores, strategy.metric)
        units = scores.assign(unit=scores["name"], score=scores[column])
    else:
        layers = layer_table(scores)
        column = _metric_column(layers, strategy.metric)
        units = layers.assign(
            unit=layers["layer"], score=layers[column], is_head=layers["layer_kind"] == "head"
        )
    units = units[["unit", "numel", "is_head", "score"]].reset_index(drop=True)
    body = ~units["is_head"]
    units["rank"] = units["score"].where(body).rank(pct=True)
    return units


def _freeze(units: pd.DataFrame, rule: FreezeRule, total_params: int) -> set[str]:
    """The units a freeze rule freezes (never the head)."""
    body = units[~units["is_head"]]
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
    capacity = rule.budget * total_params - units.loc[units["is_head"], "numel"].sum()
    if capacity < 0:
        raise PlanError(
            f"freeze.budget = {rule.budget}: the new head alone has "
            f"{units.loc[units['is_head'], 'numel'].sum():,} of {total_params:,} parameters"
        )
    return set(body["unit"]) - _knapsack(body, capacity, rule.protect)


def _knapsack(body: pd.DataFrame, capacity: float, protect: bool) -> set[str]:
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


def _lr_multipliers(units: pd.DataFrame, rule: LrRule, frozen: set[str]) -> dict[str, float]:
    """Multiplier per trainable body unit, min + (max - min) * f(score), f monotonic."""
    trainable = units[~units["is_head"] & ~units["unit"].isin(frozen)]
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


def _importance_plan(scores: pd.DataFrame, strategy: StrategySettings) -> list[TensorPlan]:
    units = _units(scores, strategy)
    total = int(scores["numel"].sum())
    frozen = _freeze(units, strategy.freeze, total) if strategy.freeze else set()
    multipliers = _lr_multipliers(units, strategy.lr, frozen) if strategy.lr else {}
    head_multiplier = strategy.lr.max if strategy.lr else 1.0
    by_unit = units.set_index("unit")
    key = "name" if strategy.granularity == "tensor" else "layer"
    tensors = []
    for row in scores.itertuples(index=False):
        unit = getattr(row, key)
        info = by_unit.loc[unit]
        described = f"{strategy.metric} {info['score']:.3g}"
        if row.is_head:
            tensors.append(_tensor(row, False, head_multiplier, "head: new for the task"))
        elif unit in frozen:
            rule = "most" if strategy.freeze.protect else "least"
            tensors.append(
                _tensor(row, True, 0.0, f"{described}: frozen, among the {rule} important")
            )
        else:
            multiplier = multipliers.get(unit, 1.0)
            how = f"lr x{multiplier:.3g} ({strategy.lr.mapping})" if strategy.lr else "trains"
            tensors.append(
                _tensor(row, False, multiplier, f"{described} (rank {info['rank']:.2f}): {how}")
            )
    return tensors


def _freeze_bottom_plan(scores: pd.DataFrame, strategy: StrategySettings) -> list[TensorPlan]:
    blocks = sorted(scores.loc[scores["layer_kind"] == "block", "layer_index"].unique())
    if strategy.layers > len(blocks):
        raise PlanError(
            f"freeze_bottom: layers = {strategy.layers}, but the model has {len(blocks)} blocks"
        )
    frozen_blocks = set(blocks[: strategy.layers])
    tensors = []
    for row in scores.itertuples(index=False):
        frozen = row.layer_kind == "input" or row.layer_index in frozen_blocks
        reason = f"freeze_bottom {strategy.layers}: {'frozen' if frozen else 'trains'}"
        tensors.append(_tensor(row, frozen, 1.0, reason))
    return tensors


def _llrd_plan(scores: pd.DataFrame, strategy: StrategySettings) -> list[TensorPlan]:
    """Layer-wise lr decay (Howard & Ruder 2018; Clark et al. 2020): the head at the base rate,
    each layer below at ``decay`` times the rate of the layer above it."""
    top = int(scores["layer_index"].max())
    return [
        _tensor(
            row,
            False,
            strategy.decay ** (top - int(row.layer_index)),
            f"llrd: {strategy.decay} ** {top - int(row.layer_index)} layers below the top",
        )
        for row in scores.itertuples(index=False)
    ]


def _layer_order(scores: pd.DataFrame, strategy: StrategySettings) -> list[int]:
    """Layer indices in thawing order: the head first, then from the top down, or by the
    strategy's importance metric (most important first)."""
    head = sorted(scores.loc[scores["is_head"], "layer_index"].unique())
    body = scores[~scores["is_head"]]
    if strategy.order == "importance":
        from adaptune.importance import layer_table

        layers = layer_table(scores)
        column = _metric_column(layers, strategy.metric)
        ranked = layers[~layers["layer_index"].isin(head)].sort_values(column, ascending=False)
        return [*head, *ranked["layer_index"].astype(int)]
    return [*head, *sorted(body["layer_index"].unique(), reverse=True)]


def _gradual_plan(scores: pd.DataFrame, strategy: StrategySettings) -> list[TensorPlan]:
    """Gradual unfreezing (Howard & Ruder 2018, ULMFiT): the head trains from epoch 1, then one
    more layer every ``every`` epochs, from the top down or by importance."""
    order = _layer_order(scores, strategy)
    head_layers = scores.loc[scores["is_head"], "layer_index"].nunique()
    start = {
        layer: 1 + max(0, position - head_layers + 1) * strategy.every
        for position, layer in enumerate(order)
    }
    return [
        _tensor(
            row,
            False,
            1.0,
            f"gradual_unfreeze ({strategy.order}): trains from epoch {start[row.layer_index]}",
            start[row.layer_index],
        )
        for row in scores.itertuples(index=False)
    ]


def _fastai_plan(scores: pd.DataFrame, strategy: StrategySettings) -> list[TensorPlan]:
    """fastai's ``fine_tune``: the head alone for ``frozen_epochs`` epochs, then everything with
    discriminative rates, geometric from ``min_multiplier`` (input layer) to 1 (head)."""
    top = int(scores["layer_index"].max()) or 1
    tensors = []
    for row in scores.itertuples(index=False):
        multiplier = strategy.min_multiplier ** ((top - int(row.layer_index)) / top)
        start = 1 if row.is_head else 1 + strategy.frozen_epochs
        reason = f"fastai fine_tune: lr x{multiplier:.3g} from epoch {start}"
        tensors.append(_tensor(row, False, multiplier, reason, start))
    return tensors


def build_plan(scores: pd.DataFrame, name: str, strategy: StrategySettings) -> Plan:
    """Make strategy ``name``'s plan from the importance score table."""
    rows = list(scores.itertuples(index=False))
    if strategy.kind in ("head_only", "importance", "lora") and not scores["is_head"].any():
        raise PlanError(f"{strategy.kind}: the score table marks no tensor as the head")
    if strategy.kind == "full":
        tensors = [_tensor(r, False, 1.0, "full: every tensor trains") for r in rows]
    elif strategy.kind == "head_only":
        tensors = [
            _tensor(
                r,
                not r.is_head,
                1.0,
                "head: new for the task" if r.is_head else "head_only: pretrained body frozen",
            )
            for r in rows
        ]
    elif strategy.kind == "freeze_bottom":
        tensors = _freeze_bottom_plan(scores, strategy)
    elif strategy.kind == "llrd":
        tensors = _llrd_plan(scores, strategy)
    elif strategy.kind == "importance":
        tensors = _importance_plan(scores, strategy)
    elif strategy.kind == "gradual_unfreeze":
        tensors = _gradual_plan(scores, strategy)
    elif strategy.kind == "fastai_fine_tune":
        tensors = _fastai_plan(scores, strategy)
    elif strategy.kind == "auto_rgn":
        reason = "auto_rgn: lr x ||g||/||w|| relative to the body's largest, recomputed every epoch"
        head_reason = "head: new for the task; trains at the base rate (auto_rgn)"
        tensors = [_tensor(r, False, 1.0, head_reason if r.is_head else reason) for r in rows]
    elif strategy.kind == "lora":
        tensors = [
            _tensor(
                r,
                not r.is_head,
                1.0,
                "head: new for the task"
                if r.is_head
                else f"lora: frozen; rank-{strategy.r} adapters on attention projections train",
            )
            for r in rows
        ]
    elif strategy.kind == "childtuning_d":
        reason = f"childtuning_d: only the top {strategy.p:.0%} of weights by task Fisher train"
        tensors = [_tensor(r, False, 1.0, reason) for r in rows]
    else:
        raise PlanError(f"strategies.{name}: no plan builder for kind {strategy.kind!r}")
    return Plan(strategy=name, kind=strategy.kind, tensors=tensors, settings=asdict(strategy))


def plot_plan(plan: Plan, path: str | Path) -> None:
    """Each tensor's lr multiplier by layer; frozen tensors in grey at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({(t.layer_index, t.layer) for t in plan.tensors})
    position = {index: i for i, (index, _) in enumerate(layers)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(layers) + 2), 3.8))
    rng = np.random.default_rng(0)
    for frozen, color, label in ((True, "0.7", "frozen"), (False, "tab:blue", "trains")):
        chosen = [t for t in plan.tensors if t.frozen == frozen]
        if chosen:
            x = [position[t.layer_index] + rng.uniform(-0.25, 0.25) for t in chosen]
            sizes = [10 + 40 * np.log10(t.numel) / 8 for t in chosen]
            ax.scatter(
                x,
                [t.lr_multiplier for t in chosen],
                s=sizes,
                c=color,
                label=label,
                alpha=0.8,
                edgecolors="none",
            )
    for i, (index, _) in enumerate(layers):
        members = [t for t in plan.tensors if t.layer_index == index]
        share = sum(t.numel for t in members if not t.frozen) / sum(t.numel for t in members)
        ax.text(
            i,
            1.02,
            f"{share:.0%}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            fontsize=7,
            color="0.3",
        )
    ax.set_xticks(range(len(layers)), [name for _, name in layers], rotation=45, ha="right")
    ax.set_ylabel("lr multiplier")
    ax.set_ylim(bottom=-0.05)
    ax.set_title(
        f"{plan.strategy}: {plan.totals['trainable_fraction']:.2%} of parameters train "
        "(top: share trained per layer)",
        fontsize=9,
        pad=18,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
