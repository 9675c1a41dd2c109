"""Freeze plans: for every parameter tensor, whether it trains, its learning-rate multiplier, and
from which epoch.

A plan is data: written as JSON by ``make_freeze_plan``, read by ``finetune``, and reviewable by a
person beforehand (``.md`` summary and a figure beside it). It is made by a strategy kind
(:mod:`adaptune.strategies`) from what ``score_importance`` wrote (:class:`ScoreTables`), which
lists every tensor of the model with its layer, so a plan always covers the whole model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import pandas as pd

from adaptune.errors import PlanError


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

    @classmethod
    def from_row(
        cls, row: Any, frozen: bool, lr_multiplier: float, reason: str, unfreeze_epoch: int = 1
    ) -> Self:
        """The plan of the tensor in a row of the score table: a frozen tensor has multiplier 0
        and no thawing epoch."""
        return cls(
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


@dataclass
class Plan:
    """A strategy's decisions for every tensor of a model."""

    strategy: str
    kind: str
    tensors: list[TensorPlan]
    settings: dict[str, Any] = field(default_factory=dict)
    # What a run of the plan will need, in bytes (:func:`adaptune.memory.plan_memory`).
    memory: dict[str, Any] = field(default_factory=dict)
    # Which of the trainable tensors train when, for kinds that switch them during training
    # (LISA, BAdam): their blocks, the rule, and the periods drawn from the plan's seed
    # (:class:`adaptune.strategies.base.StrategyKind` ``schedule``); empty for the others.
    schedule: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def train_everything(cls, model: Any) -> Self:
        """Full fine-tuning of ``model`` (a ``torch.nn.Module``) without scores: every
        parameter tensor trains at the base learning rate (for benchmarks that time training
        alone)."""
        tensors = [
            TensorPlan(n, "l", 0, p.numel(), False, 1.0, "") for n, p in model.named_parameters()
        ]
        return cls("full", "full", tensors)

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
            "memory": self.memory,
            **({"schedule": self.schedule} if self.schedule else {}),
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
                memory=data.get("memory", {}),
                schedule=data.get("schedule", {}),
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
        return "\n".join(lines + self.schedule_lines() + self.memory_lines()) + "\n"

    def schedule_lines(self) -> list[str]:
        """The schedule of a switching kind (nothing for the others): its rule, each block's
        draw probability and share of the listed periods, and which blocks train in each
        period, so that a sampled plan is reviewed as it will run, not as of its first step."""
        schedule = self.schedule
        if not schedule:
            return []
        periods = schedule["periods"]
        lines = ["", "## Schedule", "", schedule["rule"], ""]
        drawn = schedule["draw"] == "sample"  # a cycle (BAdam) goes in order: no probability
        lines += [
            "| block | params |"
            + (" draw probability |" if drawn else "")
            + " periods active (of the listed) |",
            "|---|---:|" + ("---:|" if drawn else "") + "---:|",
        ]
        for block in schedule["blocks"]:
            active = sum(block["layer"] in period for period in periods)
            probability = f" {block['probability']:.3f} |" if drawn else ""
            lines.append(
                f"| {block['layer']} | {block['params']:,} |{probability} "
                f"{active} of {len(periods)} |"
            )
        lines += ["", "| period | blocks that train (with what always trains) |", "|---:|---|"]
        lines += [f"| {i} | {', '.join(period)} |" for i, period in enumerate(periods)]
        if schedule.get("continues"):
            lines += ["", schedule["continues"]]
        return lines

    def memory_lines(self) -> list[str]:
        """The memory estimate as a table (nothing when the plan has none)."""
        memory = self.memory
        if not memory:
            return []
        parts = [
            ("weights", f"every weight in {memory['weight_precision']}"),
            ("master_weights", "fp32 copies of what trains (bf16 weights)"),
            ("gradients", "of what trains"),
            ("optimizer_state", f"{memory['optimizer']}'s state of what trains"),
            (
                "activations",
                f"one micro-batch of {memory['batch_size']} / "
                f"{memory['accumulate_steps']}"
                + (", gradient checkpointing" if memory["gradient_checkpointing"] else ""),
            ),
        ]
        lines = [
            "",
            "## Memory this run needs (estimate)",
            "",
            "| part | MB | what |",
            "|---|---:|---|",
        ]
        for key, what in parts:
            if key in memory:
                lines.append(f"| {key.replace('_', ' ')} | {memory[key] / 1e6:,.1f} | {what} |")
        lines.append(f"| **total** | **{memory['total'] / 1e6:,.1f}** | |")
        return lines


@dataclass(frozen=True)
class ScoreTables:
    """What ``score_importance`` wrote and plans are made from: one row per tensor (``tensors``:
    name, numel, layer, layer_index, layer_kind, is_head and each metric's columns) and one row
    per layer (``layers``: the same metrics aggregated, ``combined`` with its configured
    weights)."""

    tensors: pd.DataFrame
    layers: pd.DataFrame

    @classmethod
    def read(cls, scores: str | Path, layers: str | Path) -> Self:
        return cls(pd.read_parquet(scores), pd.read_parquet(layers))

    @property
    def total_params(self) -> int:
        return int(self.tensors["numel"].sum())

    def rows(self) -> list[Any]:
        """The tensors' rows (attributes name, numel, layer, ...), in the model's order."""
        return list(self.tensors.itertuples(index=False))

    def metric_column(self, metric: str, table: pd.DataFrame | None = None) -> str:
        """The per-element column of ``metric``, or a PlanError saying how to get it."""
        column = f"{metric}_per_element"
        if column not in (self.tensors if table is None else table).columns:
            raise PlanError(
                f"metric {metric!r} is not in the importance scores: add it to importance.metrics"
            )
        return column
