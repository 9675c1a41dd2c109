"""Plan -> parameter groups -> torch optimizer, in one place (after timm's ``_param_groups.py``).

Frozen tensors get ``requires_grad=False`` and join no group, so they take no gradient and no
optimizer state. Trainable tensors are grouped by (lr multiplier, weight decay): one group per
distinct pair, never one per tensor. Each group's ``lr`` is ``base lr x multiplier``; the
multiplier and the tensor names are kept in the group for schedulers and logging. The training
loop never looks at names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptune.errors import PlanError
from adaptune.plans import Plan
from adaptune.settings import TrainSettings


def apply_plan(model: nn.Module, plan: Plan, epoch: int = 1) -> None:
    """Set ``requires_grad`` of every parameter from the plan as it stands in ``epoch`` (a
    tensor trains once it is not frozen and its ``unfreeze_epoch`` has come); the plan must name
    exactly the model's parameters."""
    params = dict(model.named_parameters())
    planned = {t.name for t in plan.tensors}
    missing, extra = sorted(set(params) - planned), sorted(planned - set(params))
    if missing or extra:
        raise PlanError(
            f"plan {plan.strategy!r} does not match the model: not in the plan {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, not in the model {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}. Was the plan made for another model? "
            "Rerun score_importance and make_freeze_plan."
        )
    for tensor in plan.tensors:
        params[tensor.name].requires_grad_(not tensor.frozen and tensor.unfreeze_epoch <= epoch)


def param_groups(
    model: nn.Module,
    plan: Plan,
    weight_decay: float,
    decay_norm_and_bias: bool = False,
    per_tensor: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups from a plan (applies the plan, as of epoch 1, to ``model``
    first). Tensors thawed in later epochs are in their groups from the start; until then they
    have no gradient, so the optimizer skips them and keeps no state for them.

    No weight decay for tensors of one dimension or fewer (biases, norm scales) unless
    ``decay_norm_and_bias``. ``per_tensor`` gives every tensor its own group, for strategies
    whose multipliers change per tensor during training (Auto-RGN).
    """
    apply_plan(model, plan)
    params = dict(model.named_parameters())
    groups: dict[tuple, dict[str, Any]] = {}
    for tensor in plan.tensors:
        if tensor.frozen:
            continue
        param = params[tensor.name]
        decay = weight_decay if (param.ndim > 1 or decay_norm_and_bias) else 0.0
        key = (tensor.name,) if per_tensor else (tensor.lr_multiplier, decay)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "names": [],
                "lr_multiplier": tensor.lr_multiplier,
                "weight_decay": decay,
            },
        )
        group["params"].append(param)
        group["names"].append(tensor.name)
    if not groups:
        raise PlanError(f"plan {plan.strategy!r} freezes every tensor: nothing would train")
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerInfo:
    """How to make one optimizer (after timm's ``OptimInfo`` registry): its class, and whether
    it takes ``train.momentum``."""

    cls: type[torch.optim.Optimizer]
    takes_momentum: bool = False


OPTIMIZERS = {
    "sgd": OptimizerInfo(torch.optim.SGD, takes_momentum=True),
    "adam": OptimizerInfo(torch.optim.Adam),
    "adamw": OptimizerInfo(torch.optim.AdamW),
    "adagrad": OptimizerInfo(torch.optim.Adagrad),
    "rmsprop": OptimizerInfo(torch.optim.RMSprop, takes_momentum=True),
}


def build_optimizer(
    groups: Sequence[dict[str, Any]], settings: TrainSettings
) -> torch.optim.Optimizer:
    """The torch optimizer named by ``train.optimizer`` over the groups, each at
    ``lr x lr_multiplier``."""
    info = OPTIMIZERS[settings.optimizer]
    groups = [{**g, "lr": settings.lr * g["lr_multiplier"]} for g in groups]
    options = {"momentum": settings.momentum} if info.takes_momentum else {}
    return info.cls(groups, lr=settings.lr, **options)


def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The lr factor of step ``step``: linear warm-up over ``warmup_ratio`` of the steps, then
    linear decay to zero. It scales every group's own lr, so multipliers hold throughout."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_linear` as a scheduler of ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, warmup_ratio))
