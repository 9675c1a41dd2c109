"""``full``: every parameter trains at the base rate (the reference every other kind is
measured against)."""

from adaptune.strategies.base import StrategyKind, every_tensor

KIND = StrategyKind(
    name="full",
    build=lambda tables, settings: every_tensor(tables, "full: every tensor trains"),
)
