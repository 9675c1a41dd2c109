"""``childtuning_d``: ChildTuning-D (Xu et al. 2021): only the ``p`` fraction of trainable weights
with the largest Fisher information on the task's training data train; the gradient of every
other weight is masked to zero. The mask is fixed before training, from the Fisher information
of the model as loaded (eval mode, like the importance stage); (decoupled) weight decay still
applies to all trainable weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adaptune.importance import gradient_moments, scoring_mode
from adaptune.strategies.base import StrategyKind, TrainingContext, TrainingHooks, every_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildTuningSettings:
    p: float


class ChildTuningHooks(TrainingHooks):
    def start(self, context: TrainingContext) -> None:
        task, device = context.task, context.device
        examples = [
            {k: v.to(device) for k, v in batch.items()}
            for batch in task.modality.batches(context.train, self.train.batch_size)
        ]
        with scoring_mode(task.model):
            fisher = gradient_moments(task, examples)[1]
        groups = context.optimizer.param_groups
        names = [n for g in groups for n in g["names"]]
        # The tensors the optimizer steps (fp32 masters under bf16 weights), in group order.
        self.params = [p for g in groups for p in g["params"]]
        flat = torch.cat([fisher[n].flatten() for n in names])
        keep = max(1, round(self.settings.p * flat.numel()))
        threshold = torch.topk(flat, keep, sorted=False).values.min()
        # A weight without Fisher information (an embedding row of a token the task never
        # shows) has no gradient to keep, even where it ties a threshold of zero.
        self.masks = [
            ((fisher[n] >= threshold) & (fisher[n] > 0)).to(p.dtype)
            for n, p in zip(names, self.params, strict=True)
        ]
        self.kept = int(sum(m.sum() for m in self.masks))
        log.info(
            "ChildTuning-D: %d of %d trainable weights keep their gradient",
            self.kept,
            sum(p.numel() for p in self.params),
        )

    def before_step(self, first_step_of_epoch: bool) -> None:
        for param, mask in zip(self.params, self.masks, strict=True):
            if param.grad is not None:
                param.grad.mul_(mask)

    def trained_params(self, counted: int) -> int:
        return self.kept


KIND = StrategyKind(
    name="childtuning_d",
    build=lambda tables, settings: every_tensor(
        tables, f"childtuning_d: only the top {settings.p:.0%} of weights by task Fisher train"
    ),
    settings=ChildTuningSettings,
    hooks=ChildTuningHooks,
)
