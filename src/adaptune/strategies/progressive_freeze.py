"""``progressive_freeze``: progressive freezing during training, after AutoFreeze (Liu et al.
2021, arXiv 2102.01386): every tensor starts training; after each epoch, the layers at the
bottom of the network whose gradient has settled are frozen for the rest of the run, bottom-up.

A layer's signal is the mean, over an epoch's optimizer steps, of the L2 norm of its gradient
(the gradient the optimizer receives, before clipping). After epoch ``e`` (from the second on,
and not after the last), its relative change ``|n_e - n_(e-1)| / n_(e-1)`` is compared with
``threshold``; starting from the lowest layer still training (the input layer, then block 1,
2, ...), layers are frozen while their change is below it, and the first one above it stops
the climb, so the frozen layers are always a prefix. The output layer and the head never
freeze. A frozen layer takes no gradient, no update and no weight decay from then on, and its
optimizer state is freed; the training loop's frozen-prefix cache picks the new frozen prefix up
at the next epoch (its inputs are computed once, when ``train.feature_cache`` is ``auto`` and
nothing is augmented), so later epochs are cheaper. Under DDP rank 0 decides and every rank
follows. The run records which layer froze after which epoch, and every epoch's changes
(``strategy_record`` in ``train_summary.json`` and MLflow).

Where the best epoch on validation comes before a freeze, the whole model of that epoch is
restored, the later-frozen layers with it: a model that validated, not a mix of epochs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from adaptune import distributed
from adaptune.layers import BLOCK, INPUT, assign_layers
from adaptune.plans import ScoreTables, TensorPlan
from adaptune.strategies.base import StrategyKind, TrainingContext, TrainingHooks, stepped_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressiveSettings:
    threshold: float


class ProgressiveHooks(TrainingHooks):
    def start(self, context: TrainingContext) -> None:
        model = context.task.model
        layers = assign_layers(model, context.task.head)
        stepped = stepped_tensors(context)
        params = dict(model.named_parameters())
        units: dict[int, tuple[str, list[tuple[Any, Any]]]] = {}
        for name, layer in layers.items():
            if layer.kind in (INPUT, BLOCK) and name in stepped:
                units.setdefault(layer.index, (layer.name, []))[1].append(
                    (params[name], stepped[name])
                )
        # The layers that may freeze, bottom-up: (name, [(model tensor, optimizer tensor)]).
        self.units = [units[index] for index in sorted(units)]
        self.optimizer = context.optimizer
        self.device = context.device
        self.lowest = 0  # the lowest layer still training
        self.sums = torch.zeros(len(self.units), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.previous: list[float] | None = None
        self.frozen_after: dict[str, int] = {}
        self.changes: list[dict[str, Any]] = []

    def before_step(self, first_step_of_epoch: bool) -> None:
        for i in range(self.lowest, len(self.units)):
            grads = [t.grad for _, t in self.units[i][1] if t.grad is not None]
            if grads:
                norms = torch.stack(
                    [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
                )
                self.sums[i] += torch.linalg.vector_norm(norms)
        self.steps += 1

    def on_epoch_end(self, epoch: int, row: dict[str, float]) -> None:
        means = (self.sums / max(self.steps, 1)).tolist()
        self.sums.zero_()
        self.steps = 0
        freeze: list[int] = []
        if self.previous is not None and epoch < self.train.epochs:
            changes = {
                i: abs(means[i] - self.previous[i]) / self.previous[i]
                if self.previous[i] > 0
                else math.inf
                for i in range(self.lowest, len(self.units))
            }
            self.changes.append(
                {"epoch": epoch, "change": {self.units[i][0]: changes[i] for i in changes}}
            )
            for i in range(self.lowest, len(self.units)):
                if changes[i] >= self.settings.threshold:
                    break
                freeze.append(i)
        self.previous = means
        freeze = distributed.from_main(freeze, distributed.current())
        for i in freeze:
            self.freeze(i, epoch)

    def freeze(self, index: int, epoch: int) -> None:
        name, members = self.units[index]
        for param, tensor in members:
            param.requires_grad_(False)
            param.grad = None
            tensor.grad = None
            self.optimizer.state.pop(tensor, None)
        self.frozen_after[name] = epoch
        self.lowest = index + 1
        log.info("progressive_freeze: %s frozen after epoch %d", name, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_after": dict(self.frozen_after), "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [name for name, _ in self.units]
        for name, epoch in state.get("frozen_after", {}).items():
            self.freeze(names.index(name), epoch)
        self.previous = state.get("previous")

    def record(self) -> dict[str, Any]:
        return {
            "threshold": self.settings.threshold,
            "frozen_after_epoch": self.frozen_after,
            "changes": self.changes,
        }


def build(tables: ScoreTables, settings: ProgressiveSettings) -> list[TensorPlan]:
    settles = (
        "progressive_freeze: trains until its gradient norm settles (change below "
        f"{settings.threshold:g}), then frozen bottom-up; the run records when"
    )
    tensors = []
    for row in tables.rows():
        if row.is_head:
            reason = "head: new for the task; never frozen"
        elif row.layer_kind in (INPUT, BLOCK):
            reason = settles
        else:
            reason = f"progressive_freeze: trains throughout ({row.layer_kind} layer)"
        tensors.append(TensorPlan.from_row(row, False, 1.0, reason))
    return tensors


KIND = StrategyKind(
    name="progressive_freeze",
    build=build,
    settings=ProgressiveSettings,
    hooks=ProgressiveHooks,
    needs_head=True,
)
