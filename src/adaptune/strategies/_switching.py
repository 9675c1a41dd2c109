"""What the kinds that switch blocks during a run share (LISA, importance-sampled LISA, BAdam):
their schedule, written into the plan before anything trains, and the hooks that follow it.

A run of ``T`` optimizer steps is cut into periods of ``K`` steps (``interval_steps``, or
``ceil(interval_fraction x T)`` so that a few-shot run of 20-50 steps still switches several
times); in each period some of the body's blocks (:mod:`adaptune.layers`) train, the others are
frozen (``requires_grad`` off, so they take no gradient, no update and no weight decay). Which
blocks train in which period is drawn from the plan's ``seed`` alone: the plan lists the
periods (all of them when ``K`` is a fraction of the run, whose periods number at most
``ceil(1 / fraction)``; the first :data:`LISTED_PERIODS` when ``K`` is a step count), and every
run of the plan, whatever its training seed, follows that list. The hooks draw the same periods
with the same function (:func:`draw_periods`) and record the ones a run used.

The frozen-prefix cache is built at an epoch's start for a bottom frozen for the whole epoch;
these kinds change the frozen set every ``K`` steps, so their runs run the whole network
(:attr:`TrainingHooks.switches_within_epoch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from adaptune.errors import PlanError
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import TrainingContext, TrainingHooks, stepped_tensors

log = logging.getLogger(__name__)

# Periods a plan lists when its interval is a step count (the run's length is not known when
# the plan is made); a longer run draws on from the same generator and records what it used.
LISTED_PERIODS = 64


def body_blocks(tables: ScoreTables) -> list[dict[str, Any]]:
    """The body's blocks in forward order: ``layer`` (name), ``layer_index``, ``params``."""
    scores = tables.tensors
    blocks = scores[scores["layer_kind"] == "block"]
    if blocks.empty:
        raise PlanError("the score table has no blocks to switch between (layer_kind 'block')")
    sizes = blocks.groupby(["layer_index", "layer"], sort=True)["numel"].sum()
    return [
        {"layer": layer, "layer_index": int(index), "params": int(params)}
        for (index, layer), params in sizes.items()
    ]


def interval_rule(steps: int, fraction: float) -> str:
    return f"{steps} optimizer steps" if steps > 0 else f"{fraction:g} of the run's steps"


def listed_periods(steps: int, fraction: float) -> int:
    """How many periods a plan lists: every one of a run whose interval is a fraction of it."""
    return LISTED_PERIODS if steps > 0 else math.ceil(1 / fraction - 1e-9)


def interval_steps(schedule: dict[str, Any], total_steps: int) -> int:
    """``K``, the steps of one period of a run of ``total_steps``."""
    steps, fraction = schedule["interval_steps"], schedule["interval_fraction"]
    return steps if steps > 0 else max(1, math.ceil(fraction * total_steps))


def draw_periods(schedule: dict[str, Any], count: int) -> list[list[str]]:
    """The blocks (names, in forward order) that train in each of the first ``count`` periods.

    ``draw: sample`` (LISA): each period draws ``active`` blocks without replacement, the
    first with the blocks' ``probability``, each further one renormalised over those left
    (``numpy.random.Generator.choice``). ``draw: cycle`` (BAdam): one block a period, in
    ``order`` ascending (input side first), descending, or random (a new permutation of the
    blocks every round). Both from ``numpy.random.default_rng(seed)``, so a prefix of a longer
    draw is the shorter draw."""
    blocks = [b["layer"] for b in schedule["blocks"]]
    rng = np.random.default_rng(schedule["seed"])
    if schedule["draw"] == "sample":
        probabilities = np.array([b["probability"] for b in schedule["blocks"]], dtype=np.float64)
        probabilities /= probabilities.sum()
        periods = []
        for _ in range(count):
            chosen = rng.choice(len(blocks), schedule["active"], replace=False, p=probabilities)
            periods.append([blocks[i] for i in sorted(chosen)])
        return periods
    order = schedule["order"]
    sequence: list[int] = []
    while len(sequence) < count:
        if order == "ascending":
            sequence += list(range(len(blocks)))
        elif order == "descending":
            sequence += list(reversed(range(len(blocks))))
        else:
            sequence += [int(i) for i in rng.permutation(len(blocks))]
    return [[blocks[i]] for i in sequence[:count]]


def make_schedule(
    rule: str, blocks: list[dict[str, Any]], settings: Any, **draw: Any
) -> dict[str, Any]:
    """A plan's schedule: the rule in words, the blocks (with their ``probability`` where they
    are drawn, ``draw: sample``), how periods are drawn (``draw``, ``active``, ``order``, from
    ``settings.seed``) and the periods listed."""
    steps, fraction = settings.interval_steps, settings.interval_fraction
    schedule = {
        "rule": rule,
        "interval_steps": steps,
        "interval_fraction": fraction,
        "seed": settings.seed,
        "blocks": blocks,
        **draw,
    }
    count = listed_periods(steps, fraction)
    schedule["periods"] = draw_periods(schedule, count)
    if steps > 0:
        schedule["continues"] = (
            f"A run longer than {count} periods of {steps} steps draws on from the same seeded "
            "generator; every run's train_summary.json lists the periods it used."
        )
    return schedule


def busiest_period(tensors: Sequence[TensorPlan], schedule: dict[str, Any]) -> list[TensorPlan]:
    """The tensors that train at once in the schedule's busiest possible period: every
    trainable tensor outside the switched blocks, and the ``active`` largest blocks."""
    sizes = {b["layer"]: b["params"] for b in schedule["blocks"]}
    largest = set(sorted(sizes, key=lambda layer: -sizes[layer])[: schedule["active"]])
    return [t for t in tensors if not t.frozen and (t.layer not in sizes or t.layer in largest)]


class SwitchingHooks(TrainingHooks):
    """Follows a plan's schedule: at the first step of every period, the blocks of the period
    train and the other scheduled blocks are frozen; what becomes of the optimizer state of a
    block that stops training is :meth:`state_policy`'s: ``drop`` it (freed; it starts afresh
    when the block is drawn again), ``keep`` it, or ``clear`` every tensor's state at every
    switch (BAdam). Tensors outside the scheduled blocks (the new head, and for LISA the
    input and output layers) train throughout."""

    switches_within_epoch: ClassVar[bool] = True

    def state_policy(self) -> str:
        return "drop"

    def schedule(self, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
        """The usual schedule; the run's length also sets the period (:func:`interval_steps`)."""
        self.total_steps = total_steps
        return super().schedule(total_steps, steps_per_epoch)

    def start(self, context: TrainingContext) -> None:
        plan = context.plan
        if not plan.schedule:
            raise PlanError(
                f"plan {plan.strategy!r} ({plan.kind}) has no schedule: it was made by an "
                "older adaptune; rerun make_freeze_plan"
            )
        self.interval = interval_steps(plan.schedule, self.total_steps)
        self.periods = draw_periods(plan.schedule, -(-self.total_steps // self.interval))
        params = dict(context.task.model.named_parameters())
        stepped = stepped_tensors(context)
        scheduled = {b["layer"] for b in plan.schedule["blocks"]}
        self.blocks: dict[str, list[tuple[Any, Any]]] = {layer: [] for layer in scheduled}
        self.sizes = dict.fromkeys(scheduled, 0)
        self.always = 0
        for tensor in plan.tensors:
            if tensor.frozen:
                continue
            if tensor.layer in scheduled:
                self.blocks[tensor.layer].append((params[tensor.name], stepped[tensor.name]))
                self.sizes[tensor.layer] += tensor.numel
            else:
                self.always += tensor.numel
        self.optimizer = context.optimizer
        self.period: int | None = None
        self.used: list[dict[str, Any]] = []
        log.info(
            "%s: %d periods of %d steps over %d steps; optimizer state of a block that stops "
            "training: %s",
            plan.kind,
            len(self.periods),
            self.interval,
            self.total_steps,
            self.state_policy(),
        )

    def on_step_start(self, step: int) -> None:
        period = step // self.interval
        if period == self.period:
            return
        active = set(self.periods[period])
        policy = self.state_policy()
        if policy == "clear":
            self.optimizer.state.clear()
        for layer, members in self.blocks.items():
            training = layer in active
            for param, tensor in members:
                if param.requires_grad and not training and policy == "drop":
                    self.optimizer.state.pop(tensor, None)
                param.requires_grad_(training)
        self.period = period
        if not self.used or self.used[-1]["period"] != period:
            self.used.append({"period": period, "from_step": step, "blocks": self.periods[period]})

    def state_dict(self) -> dict[str, Any]:
        """Which blocks train is a function of the step; the periods used so far are the
        run's record."""
        return {"used": list(self.used)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = list(state.get("used", []))
        self.period = None  # the next step sets its period's blocks again

    def trained_params(self, counted: int) -> int:
        """What trained at some point: the tensors outside the scheduled blocks and every
        block a period drew."""
        drawn = {layer for period in self.used for layer in period["blocks"]}
        return self.always + sum(self.sizes[layer] for layer in drawn)

    def record(self) -> dict[str, Any]:
        at_once = max(sum(self.sizes[layer] for layer in p["blocks"]) for p in self.used)
        return {
            "interval_steps": self.interval,
            "periods": self.used,
            "most_params_at_once": self.always + at_once,
        }
