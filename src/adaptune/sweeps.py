"""Several values of a strategy's settings, each its own strategy: a fair comparison tunes
every method, not only one.

A strategy's ``sweep:`` (config/schema.yaml) lists values for some of its keys (``train.lr``,
a key of its kind). :func:`expand` replaces the strategy by one strategy per combination,
named ``NAME@KEY=VALUE[,KEY=VALUE]`` (``llrd@lr=0.0001``): each is an ordinary strategy of the
workflow, with its own plan and runs. The report then keeps, per (strategy, shots, seed), the
value best on validation (:func:`adaptune.report.select_values`); the test split plays no part
in the choice.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

from adaptune.errors import ConfigError

SEPARATOR = "@"
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def family(name: str) -> str:
    """The strategy a (swept) strategy's runs belong to: ``llrd@lr=0.0001`` -> ``llrd``."""
    return name.partition(SEPARATOR)[0]


def setting(name: str) -> str:
    """The swept values of a strategy name (``lr=0.0001``; "" for one that was not swept)."""
    return name.partition(SEPARATOR)[2]


def variant(name: str, values: str) -> str:
    """The strategy that ran ``name`` with swept ``values`` (the inverse of :func:`family` and
    :func:`setting`)."""
    return f"{name}{SEPARATOR}{values}" if values else name


def _label(value: Any, where: str) -> str:
    """A value as it appears in a strategy name (and so in paths and run names)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = format(value, "g")
    elif isinstance(value, list):
        text = "+".join(_label(v, where) for v in value) or "none"
    else:
        text = str(value)
    if not _VALUE.match(text):
        raise ConfigError(
            f"{where}: the value {value!r} cannot name a run (letters, digits, _ . + - only)"
        )
    return text


def _variant(spec: Mapping[str, Any], keys: list[str], values: tuple[Any, ...]) -> dict:
    variant = copy.deepcopy({k: v for k, v in spec.items() if k != "sweep"})
    for key, value in zip(keys, values, strict=True):
        section, _, leaf = key.rpartition(".")
        target = variant.setdefault("train", {}) if section == "train" else variant
        target[leaf] = copy.deepcopy(value)
    return variant


def expand(strategies: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace, in place and in order, every strategy with a ``sweep`` by its variants (see
    the module docstring); strategies without one stay as they are. Idempotent: a variant has
    no ``sweep``."""
    expanded: dict[str, Any] = {}
    for name, spec in strategies.items():
        sweep = spec.get("sweep") if isinstance(spec, Mapping) else None
        if not sweep:
            expanded[name] = spec
            continue
        keys = list(sweep)
        for values in itertools.product(*(sweep[key] for key in keys)):
            label = ",".join(
                f"{key.rpartition('.')[2]}={_label(value, f'strategies.{name}.sweep.{key}')}"
                for key, value in zip(keys, values, strict=True)
            )
            expanded[f"{name}{SEPARATOR}{label}"] = _variant(spec, keys, values)
    strategies.clear()
    strategies.update(expanded)
    return strategies
