"""Plan -> parameter groups -> torch optimizer, in one place (after timm's ``_param_groups.py``).

Frozen tensors get ``requires_grad=False`` and join no group, so they take no gradient and no
optimizer state. Trainable tensors are grouped by (lr multiplier, weight decay): one group per
distinct pair, never one per tensor. Each group's ``lr`` is ``base lr x multiplier``; the
multiplier and the tensor names are kept in the group for schedulers and logging. The training
loop never looks at names.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
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


def build_optimizer(
    groups: Sequence[dict[str, Any]], settings: TrainSettings
) -> torch.optim.Optimizer:
    """The torch optimizer named by ``train.optimizer`` over the groups, each at
    ``lr x lr_multiplier``."""
    groups = [{**g, "lr": settings.lr * g["lr_multiplier"]} for g in groups]
    name = settings.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if name == "adam":
        return torch.optim.Adam(groups, lr=settings.lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=settings.lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=settings.lr, momentum=settings.momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero. The factor
    scales every group's own lr, so multipliers hold throughout."""
    warmup = round(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Dynamics:
    """What a strategy changes while training, beyond its fixed plan: called by the training
    loop after each backward pass, before the optimizer step. The base class changes nothing."""

    per_tensor_groups = False

    def before_step(self, first_step_of_epoch: bool) -> None:
        """Adjust gradients or learning rates for the coming optimizer step."""


class AutoRGN(Dynamics):
    """Auto-RGN (Lee et al. 2023, Surgical Fine-Tuning): each pretrained tensor's lr is
    proportional to its relative gradient norm ||g|| / ||w||, normalised by the largest,
    recomputed at the first step of every epoch from that step's gradients (no extra pass).

    Tensors named in ``exempt`` (the new task head) train at the base rate and take no part in
    the normalisation: the method ranks *pretrained* layers, and a freshly initialised head has
    small weights and large gradients, so its ratio would dwarf every pretrained one and
    leave the body with about a thousandth of the base rate (measured on MiniLM: the run did
    not learn). A tensor with ||w|| = 0 (a bias initialised to zero) has no relative norm; it
    trains at the base rate too."""

    per_tensor_groups = True

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        base_lr: float,
        exempt: Collection[str] = (),
    ) -> None:
        self.optimizer, self.scheduler, self.base_lr = optimizer, scheduler, base_lr
        self.exempt = set(exempt)

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
            self.scheduler.base_lrs[i] = self.base_lr * group["lr_multiplier"]
            group["lr"] = self.scheduler.base_lrs[i] * factor


class ChildTuningD(Dynamics):
    """ChildTuning-D (Xu et al. 2021): only the ``p`` fraction of trainable weights with the
    largest Fisher information on the task data train; the gradient of every other weight is
    masked to zero. The mask is fixed before training; (decoupled) weight decay still applies
    to all trainable weights."""

    def __init__(self, params: list[torch.Tensor], fisher: list[torch.Tensor], p: float) -> None:
        flat = torch.cat([f.flatten() for f in fisher])
        keep = max(1, round(p * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=False).values.min()
        self.masks = [
            (f >= threshold).to(param.dtype) for f, param in zip(fisher, params, strict=True)
        ]
        self.params = params
        self.kept = int(sum(m.sum() for m in self.masks))

    def before_step(self, first_step_of_epoch: bool) -> None:
        for param, mask in zip(self.params, self.masks, strict=True):
            if param.grad is not None:
                param.grad.mul_(mask)
