"""``head_only``: only the task's new classification head trains; the pretrained body is frozen
(a linear probe of the pretrained features)."""

from adaptune.strategies.base import StrategyKind, head_alone

KIND = StrategyKind(
    name="head_only",
    build=lambda tables, settings: head_alone(tables, "head_only: pretrained body frozen"),
    needs_head=True,
)
