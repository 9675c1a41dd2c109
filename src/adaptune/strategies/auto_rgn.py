"""``auto_rgn``: Surgical fine-tuning's Auto-RGN (Lee et al. 2023): each pretrained tensor's lr
is proportional to its relative gradient norm ||g|| / ||w||, normalised by the largest,
recomputed at the first step of every epoch from that step's gradients (no extra pass).

The new head trains at the base rate and takes no part in the normalisation: the method ranks
*pretrained* layers, and a freshly initialised head has small weights and large gradients, so
its ratio would dwarf every pretrained one and leave the body with about a thousandth of the
base rate (measured on MiniLM: the run did not learn). A tensor with ||w|| = 0 (a bias
initialised to zero) has no relative norm; it trains at the base rate too.
"""

from __future__ import annotations

from typing import ClassVar

from adaptune.strategies.base import StrategyKind, TrainingContext, TrainingHooks, every_tensor


class AutoRGNHooks(TrainingHooks):
    per_tensor_groups: ClassVar[bool] = True

    def start(self, context: TrainingContext) -> None:
        self.optimizer, self.scheduler = context.optimizer, context.scheduler
        self.exempt = {t.name for t in context.plan.tensors if t.is_head}

    def before_step(self, first_step_of_epoch: bool) -> None:
        if not first_step_of_epoch:
            return
        ratios: list[float | None] = []
        for group in self.optimizer.param_groups:
            (param,) = group["params"]
            weight = float(param.detach().norm())
            grad = 0.0 if param.grad is None else float(param.grad.norm())
            exempt = weight == 0 or group["names"][0] in self.exempt
            ratios.append(None if exempt else grad / weight)
        top = max((r for r in ratios if r is not None), default=0.0) or 1.0
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for i, (group, ratio) in enumerate(zip(self.optimizer.param_groups, ratios, strict=True)):
            group["lr_multiplier"] = 1.0 if ratio is None else ratio / top
            self.scheduler.base_lrs[i] = self.train.lr * group["lr_multiplier"]
            group["lr"] = self.scheduler.base_lrs[i] * factor


KIND = StrategyKind(
    name="auto_rgn",
    build=lambda tables, settings: every_tensor(
        tables,
        "auto_rgn: lr x ||g||/||w|| relative to the body's largest, recomputed every epoch",
        head_reason="head: new for the task; trains at the base rate (auto_rgn)",
    ),
    hooks=AutoRGNHooks,
)
