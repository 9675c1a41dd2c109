"""``lp_ft``: LP-FT, linear probe then fine-tune (Kumar et al., ICLR 2022): the new head trains
alone for ``probe_epochs`` at ``probe_lr`` (a constant rate: a linear model on fixed features),
then every tensor trains from that fitted head, with the run's warm-up and linear decay over the
remaining epochs at the base rate. Fine-tuning from a fitted head distorts the pretrained
features less than from a random one, which the paper finds helps most out of distribution."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adaptune.optim import warmup_linear
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.settings import TrainSettings
from adaptune.strategies.base import StrategyKind, TrainingHooks


@dataclass(frozen=True)
class LpFtSettings:
    probe_epochs: int
    probe_lr: float


def build(tables: ScoreTables, settings: LpFtSettings) -> list[TensorPlan]:
    start = settings.probe_epochs + 1
    return [
        TensorPlan.from_row(row, False, 1.0, "head: probed alone, then fine-tuned")
        if row.is_head
        else TensorPlan.from_row(row, False, 1.0, f"lp_ft: fine-tuned from epoch {start}", start)
        for row in tables.rows()
    ]


class LpFtHooks(TrainingHooks):
    def schedule(self, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
        """``probe_lr`` (as a factor of the base rate) during the probe, in which only the head
        has gradients; then the usual warm-up and decay over the fine-tuning steps."""
        probe_steps = self.settings.probe_epochs * steps_per_epoch
        probe_factor = self.settings.probe_lr / self.train.lr
        fine_tune = warmup_linear(total_steps - probe_steps, self.train.warmup_ratio)
        return lambda step: probe_factor if step < probe_steps else fine_tune(step - probe_steps)


def check(settings: LpFtSettings, train: TrainSettings) -> str | None:
    if settings.probe_epochs >= train.epochs:
        return (
            f"probe_epochs = {settings.probe_epochs} leaves no fine-tuning epoch of the "
            f"{train.epochs} (train.epochs)"
        )
    return None


KIND = StrategyKind(
    name="lp_ft",
    build=build,
    settings=LpFtSettings,
    hooks=LpFtHooks,
    needs_head=True,
    check=check,
)
