"""``lisa``: LISA, layerwise importance sampled AdamW (Pan et al., NeurIPS 2024,
arXiv 2403.17919; LMFlow's ``--lisa_activated_layers`` and ``--lisa_interval_steps``): every
``K`` optimizer steps, ``layers`` of the body's blocks are drawn uniformly to train; the input
layer (embeddings, a CNN's stem), the output layer (pooler, final norm) and the new head always
train; the other blocks are frozen for that period.

The optimizer state of a block that stops training is dropped (``optimizer_state: drop``, as
LMFlow's trainer does: it rebuilds its optimizer at every switch and carries over only the state
of what always trains), so the state held at once is that of the always-trained layers and
``layers`` blocks; ``keep`` holds every drawn block's state for the whole run instead. ``K`` is
``interval_steps`` or, when that is 0, ``ceil(interval_fraction x`` the run's steps``)``. The
periods are drawn from ``seed`` and listed in the plan (:mod:`adaptune.strategies._switching`);
the run records the ones it used. The frozen-prefix cache does not serve these runs (the frozen
set changes within an epoch, and the input layer always trains)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adaptune.errors import PlanError
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies._switching import (
    SwitchingHooks,
    body_blocks,
    interval_rule,
    make_schedule,
)
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class LisaSettings:
    layers: int
    interval_steps: int
    interval_fraction: float
    optimizer_state: str
    seed: int


def builder(kind: str) -> Callable[[ScoreTables, Any], list[TensorPlan]]:
    """The plan builder of a LISA kind: every tensor trainable (the union over the periods);
    the schedule says when each block trains."""

    def build(tables: ScoreTables, settings: Any) -> list[TensorPlan]:
        return [
            TensorPlan.from_row(
                row,
                False,
                1.0,
                f"{kind}: trains in the periods that draw {row.layer}"
                if row.layer_kind == "block"
                else f"{kind}: trains throughout ({row.layer_kind})",
            )
            for row in tables.rows()
        ]

    return build


def checked_blocks(tables: ScoreTables, settings: Any, kind: str) -> list[dict[str, Any]]:
    blocks = body_blocks(tables)
    if settings.layers > len(blocks):
        raise PlanError(
            f"{kind}: layers = {settings.layers}, but the model has {len(blocks)} blocks; "
            "draw fewer"
        )
    return blocks


def uniform_schedule(
    tables: ScoreTables, tensors: list[TensorPlan], settings: LisaSettings
) -> dict[str, Any]:
    blocks = checked_blocks(tables, settings, "lisa")
    for block in blocks:
        block["probability"] = 1 / len(blocks)
    return lisa_schedule(blocks, settings, "uniformly")


def lisa_schedule(blocks: list[dict[str, Any]], settings: Any, how: str) -> dict[str, Any]:
    interval = interval_rule(settings.interval_steps, settings.interval_fraction)
    rule = (
        f"Every {interval}, {settings.layers} of the {len(blocks)} blocks are drawn {how} "
        f"(seed {settings.seed}) to train; the input layer, the output layer and the head "
        f"always train; the other blocks are frozen for the period. Optimizer state of a "
        f"block that stops training: {settings.optimizer_state}."
    )
    return make_schedule(rule, blocks, settings, draw="sample", active=settings.layers)


class LisaHooks(SwitchingHooks):
    def state_policy(self) -> str:
        return self.settings.optimizer_state


KIND = StrategyKind(
    name="lisa",
    build=builder("lisa"),
    settings=LisaSettings,
    hooks=LisaHooks,
    needs_head=True,
    schedule=uniform_schedule,
)
