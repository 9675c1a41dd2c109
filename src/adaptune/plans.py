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

import pandas as pd

from adaptune.errors import PlanError
from adaptune.settings import StrategySettings


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
            lrs = ", ".join(f"{m:g}" for m in sorted(row["lrs"])) or "frozen"
            lines.append(
                f"| {layer} | {row['tensors']} | {row['params']:,} | {row['trainable']:,} | {lrs} |"
            )
        return "\n".join(lines) + "\n"


def read_scores(path: str | Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _tensor(row: Any, frozen: bool, lr_multiplier: float, reason: str) -> TensorPlan:
    return TensorPlan(
        name=row.name,
        layer=row.layer,
        layer_index=int(row.layer_index),
        numel=int(row.numel),
        frozen=frozen,
        lr_multiplier=0.0 if frozen else float(lr_multiplier),
        reason=reason,
    )


def build_plan(scores: pd.DataFrame, name: str, strategy: StrategySettings) -> Plan:
    """Make strategy ``name``'s plan from the importance score table."""
    rows = list(scores.itertuples(index=False))
    if strategy.kind == "full":
        tensors = [_tensor(r, False, 1.0, "full: every tensor trains") for r in rows]
    elif strategy.kind == "head_only":
        if not scores["is_head"].any():
            raise PlanError("head_only: the score table marks no tensor as the head")
        tensors = [
            _tensor(
                r,
                not r.is_head,
                1.0,
                "head: new for the task" if r.is_head else "head_only: pretrained body frozen",
            )
            for r in rows
        ]
    else:
        raise PlanError(f"strategies.{name}: no plan builder for kind {strategy.kind!r}")
    return Plan(strategy=name, kind=strategy.kind, tensors=tensors, settings=asdict(strategy))
