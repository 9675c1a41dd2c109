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
    """How to make one optimizer (after timm's ``OptimInfo`` registry): its class, whether it
    takes ``train.momentum``, and the state it keeps for each tensor it steps: ``buffers``
    tensors of the weight's shape (Adam's two moments), one more for momentum when momentum is
    set, and a scalar step counter where ``counts_steps`` (torch's, in float32)."""

    cls: type[torch.optim.Optimizer]
    takes_momentum: bool = False
    buffers: int = 0
    counts_steps: bool = False

    def state_bytes(self, weights: int, tensors: int, momentum: float, element: int = 4) -> int:
        """Bytes of state for ``weights`` trained weights in ``tensors`` tensors of
        ``element`` bytes each (the optimizer's tensors: fp32, masters included)."""
        buffers = self.buffers + (1 if self.takes_momentum and momentum > 0 else 0)
        return buffers * weights * element + (4 * tensors if self.counts_steps else 0)


OPTIMIZERS = {
    "sgd": OptimizerInfo(torch.optim.SGD, takes_momentum=True),
    "adam": OptimizerInfo(torch.optim.Adam, buffers=2, counts_steps=True),
    "adamw": OptimizerInfo(torch.optim.AdamW, buffers=2, counts_steps=True),
    "adagrad": OptimizerInfo(torch.optim.Adagrad, buffers=1, counts_steps=True),
    "rmsprop": OptimizerInfo(
        torch.optim.RMSprop, takes_momentum=True, buffers=1, counts_steps=True
    ),
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


class MasterWeights:
    """fp32 master copies of the trainable tensors of a model whose weights are stored in
    bfloat16 (``train.weight_precision: bf16``): the optimizer steps the masters, with fp32
    state, and each step's result is rounded into the model's bf16 weights. Without them, an
    update smaller than bf16's resolution near a weight (about 0.4% of it) would be lost.

    :attr:`groups` are the parameter groups with the masters in place of the model's tensors
    (names, multipliers and decay kept); :meth:`take_gradients` gives each master its
    tensor's gradient (None where it has none, so the optimizer skips it, as it would the
    tensor) and :meth:`give_weights` writes the stepped masters back."""

    def __init__(self, groups: Sequence[dict[str, Any]]) -> None:
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.groups = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = param.detach().float().clone().requires_grad_(True)
                masters.append(master)
                self.pairs.append((param, master))
            self.groups.append({**group, "params": masters})

    def take_gradients(self) -> None:
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()

    @torch.no_grad()
    def give_weights(self) -> None:
        for param, master in self.pairs:
            if master.grad is not None:
                param.copy_(master)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (Adam's moments, SGD's momentum buffers, step
    counters), as it holds them now."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


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
