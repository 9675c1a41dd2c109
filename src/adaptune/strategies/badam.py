"""``badam``: BAdam (Luo et al., NeurIPS 2024, arXiv 2404.02827): block coordinate descent with
Adam's update, one block of the body at a time, switching every ``K`` optimizer steps in a set
``order`` (ascending: from the input side; descending, BAdam's default; random: a new
permutation of the blocks every round). The new head trains throughout (BAdam's
``active_modules``: a randomly initialised head cannot stay frozen). At every switch the whole
optimizer state is cleared, as BAdam's ``BlockOptimizer`` does, so the optimizer holds state for
the active block (and the head) only. The input and output layers are frozen for the run
unless ``include_input_output``, which makes each a block of the cycle (BAdam's
``include_embedding`` and ``include_lm_head``, off by default there too).

``K`` is ``interval_steps`` or, when that is 0, ``ceil(interval_fraction x`` the run's
steps``)``; the plan lists the order of the periods (:mod:`adaptune.strategies._switching`).
BAdam keeps bf16 weights with fp32 copies of the active block only; here the fp32 masters of
``train.weight_precision: bf16`` cover every trainable tensor, so that saving is not made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies._switching import (
    SwitchingHooks,
    body_blocks,
    interval_rule,
    make_schedule,
)
from adaptune.strategies.base import StrategyKind


@dataclass(frozen=True)
class BadamSettings:
    order: str
    interval_steps: int
    interval_fraction: float
    include_input_output: bool
    seed: int


def cycled(row: Any, settings: BadamSettings) -> bool:
    return row.layer_kind == "block" or (
        settings.include_input_output and row.layer_kind in ("input", "output")
    )


def build(tables: ScoreTables, settings: BadamSettings) -> list[TensorPlan]:
    tensors = []
    for row in tables.rows():
        if row.is_head:
            tensors.append(TensorPlan.from_row(row, False, 1.0, "head: new; trains throughout"))
        elif cycled(row, settings):
            reason = f"badam: trains in the periods of {row.layer} ({settings.order})"
            tensors.append(TensorPlan.from_row(row, False, 1.0, reason))
        else:
            reason = f"badam: frozen ({row.layer_kind} layer, include_input_output false)"
            tensors.append(TensorPlan.from_row(row, True, 0.0, reason))
    return tensors


def schedule(
    tables: ScoreTables, tensors: list[TensorPlan], settings: BadamSettings
) -> dict[str, Any]:
    blocks = body_blocks(tables)
    if settings.include_input_output:
        blocks = layer_entry(tables, "input") + blocks + layer_entry(tables, "output")
    rule = (
        f"One of the {len(blocks)} blocks trains at a time, {settings.order}"
        + (f" (seed {settings.seed})" if settings.order == "random" else "")
        + f", switching every {interval_rule(settings.interval_steps, settings.interval_fraction)}"
        "; the head always trains; the optimizer state is cleared at every switch."
        + ("" if settings.include_input_output else " The input and output layers are frozen.")
    )
    return make_schedule(rule, blocks, settings, draw="cycle", active=1, order=settings.order)


def layer_entry(tables: ScoreTables, kind: str) -> list[dict[str, Any]]:
    """The input or output layer as a block of the cycle (none where the model has none)."""
    part = tables.tensors[tables.tensors["layer_kind"] == kind]
    if part.empty:
        return []
    return [
        {
            "layer": str(part["layer"].iloc[0]),
            "layer_index": int(part["layer_index"].iloc[0]),
            "params": int(part["numel"].sum()),
        }
    ]


class BadamHooks(SwitchingHooks):
    def state_policy(self) -> str:
        return "clear"


KIND = StrategyKind(
    name="badam",
    build=build,
    settings=BadamSettings,
    hooks=BadamHooks,
    needs_head=True,
    schedule=schedule,
)
