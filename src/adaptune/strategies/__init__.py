"""Strategy kinds, one module each (``full.py``, ``importance.py``, ``lora.py``, ...), each with a
``KIND`` entry (:class:`StrategyKind`): its settings, its plan builder and its training hooks.
Adding a kind is one new module and its ``kind_<name>`` block in the schema.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from adaptune import config
from adaptune.errors import ConfigError, PlanError
from adaptune.memory import plan_memory
from adaptune.plans import Plan, ScoreTables
from adaptune.settings import TrainSettings, build
from adaptune.strategies._switching import busiest_period
from adaptune.strategies.base import NoSettings, StrategyKind, TrainingContext, TrainingHooks

__all__ = [
    "NoSettings",
    "StrategyKind",
    "TrainingContext",
    "TrainingHooks",
    "build_plan",
    "check",
    "get",
    "hooks_for",
    "kinds",
    "parse",
]

# Keys of a strategy that are not its kind's settings: the kind itself, the training overrides,
# and which importance scores the plan is made from (the workflow gives the builder that file).
OWN_KEYS_EXCLUDED = ("kind", "train", "head")


@functools.cache
def kinds() -> dict[str, StrategyKind]:
    """Every strategy kind: the ``KIND`` of each module of this package, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        # base.py and helpers shared by several kinds (``_switching.py``) hold no kind.
        if info.name != "base" and not info.name.startswith("_"):
            kind = importlib.import_module(f"{__name__}.{info.name}").KIND
            found[kind.name] = kind
    return found


def get(name: str) -> StrategyKind:
    registry = kinds()
    if name not in registry:
        raise ConfigError(f"strategy kind {name!r} is unknown; known: {', '.join(registry)}")
    return registry[name]


def parse(name: str, spec: Mapping[str, Any]) -> tuple[StrategyKind, Any]:
    """The kind of strategy ``name`` (its ``strategies:`` entry ``spec``) and its typed
    settings; a partial entry is checked against its kind's schema block and completed with
    its defaults first."""
    spec = config.complete(spec, "#/$defs/strategy", f"strategies.{name}")
    kind = get(spec["kind"])
    own = {k: v for k, v in spec.items() if k not in OWN_KEYS_EXCLUDED}
    try:
        return kind, build(kind.settings, own, f"strategies.{name}")
    except ConfigError as err:
        message = str(err)
        prefix = f"strategies.{name}"
        raise ConfigError(
            message if message.startswith(prefix) else f"{prefix}: {message}"
        ) from None


def check(name: str, spec: Mapping[str, Any], train: TrainSettings) -> None:
    """Strategy ``name``'s settings, and with the training settings of its runs: what a schema
    cannot say. Raises a ConfigError naming the strategy."""
    kind, settings = parse(name, spec)
    problem = kind.check(settings, train)
    if problem:
        raise ConfigError(f"strategies.{name}: {problem}")


def build_plan(
    tables: ScoreTables, name: str, spec: Mapping[str, Any], train: TrainSettings | None = None
) -> Plan:
    """Strategy ``name``'s plan for every tensor of the scored model; with the ``train``
    settings of its runs, with what a run will need of memory (:func:`plan_memory`)."""
    kind, settings = parse(name, spec)
    if kind.needs_head and not tables.tensors["is_head"].any():
        raise PlanError(f"{kind.name}: the score table marks no tensor as the head")
    tensors = kind.build(tables, settings)
    plan = Plan(name, kind.name, tensors, settings=asdict(settings))
    if kind.schedule is not None:
        plan.schedule = kind.schedule(tables, tensors, settings)
    if train is not None:
        if kind.at_once is not None:
            at_once = kind.at_once(tensors, settings)
        else:
            at_once = busiest_period(tensors, plan.schedule) if plan.schedule else None
        plan.memory = plan_memory(tensors, train, tables.layers, at_once)
    return plan


def hooks_for(plan: Plan, train: TrainSettings) -> TrainingHooks:
    """The training hooks of a plan's kind, with the settings the plan was made with."""
    kind = get(plan.kind)
    return kind.hooks(build(kind.settings, plan.settings, f"plan {plan.strategy}"), train)
