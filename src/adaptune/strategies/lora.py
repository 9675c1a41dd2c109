"""``lora``: LoRA adapters (Hu et al. 2022) through PEFT, injected into the model in place so that
the plan's tensor names and the training loop stay as they are: the pretrained body is frozen,
the head and the adapters train, and after training the adapters are merged back into the base
weights, so the saved checkpoint is a plain model of the original architecture."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from adaptune.errors import PlanError
from adaptune.strategies.base import Run, StrategyKind, TrainingHooks, head_alone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    targets: list[str]


def _is_projection(module: nn.Module) -> bool:
    # nn.Linear, and transformers' Conv1D (GPT-2's fused projections), which PEFT also adapts.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def attention_projections(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """Module paths of the linear projections inside the model's attention modules (any module
    whose class name contains "Attention"): query, key, value and output in BERT, ``c_attn`` and
    ``c_proj`` in GPT-2, ``qkv`` and ``proj`` in ViT. Found from the module tree, not names."""
    excluded = {name.rsplit(".", 1)[0] for name in exclude}
    found = set()
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child, sub in module.named_modules():
            path = f"{name}.{child}" if name else child
            if child and _is_projection(sub) and path not in excluded:
                found.add(path)
    return sorted(found)


def add_lora(
    model: nn.Module, settings: LoraSettings, head: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Inject LoRA adapters of rank ``r`` (scale ``alpha / r``, dropout ``dropout``) into the
    ``targets`` modules, or into every attention projection; returns the new parameters, the
    only ones of the adapted modules that train. Other parameters keep their ``requires_grad``."""
    # Imported here: PEFT takes several seconds to import, and only LoRA runs need it.
    from peft import LoraConfig, inject_adapter_in_model

    targets = settings.targets or attention_projections(model, head)
    if not targets:
        raise PlanError(
            "lora: the model has no attention projections to adapt; name the modules in "
            "strategies.<name>.targets"
        )
    # Injection renames the adapted base weights (``query.base_layer.weight``) but keeps the same
    # tensors: new parameters are told apart by identity, not by name.
    before = {id(p) for p in model.parameters()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
    )
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # PEFT's NoMatchingPeftModuleError, unsupported module types
        raise PlanError(f"lora: cannot adapt {list(targets)}: {err}") from err
    for param, flag in flags:  # PEFT freezes everything else; the plan decides that here
        param.requires_grad_(flag)
    adapters = {n: p for n, p in model.named_parameters() if id(p) not in before}
    for param in adapters.values():
        param.requires_grad_(True)
    log.info(
        "LoRA r=%d on %d modules: %d adapter parameters",
        settings.r,
        len(targets),
        sum(p.numel() for p in adapters.values()),
    )
    return adapters


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the base module back in its place;
    returns how many modules were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged


class LoraHooks(TrainingHooks):
    def extra_groups(self, run: Run) -> list[dict[str, Any]]:
        """The adapters, in one group at the base rate."""
        head = [t.name for t in run.plan.tensors if not t.frozen]
        adapters = add_lora(run.task.model, self.settings, head)
        run.task.model.to(run.device)
        return [
            {
                "params": list(adapters.values()),
                "names": list(adapters),
                "lr_multiplier": 1.0,
                "weight_decay": self.train.weight_decay,
            }
        ]

    def finish(self, run: Run) -> None:
        log.info("LoRA merged into %d modules", merge_lora(run.task.model))


KIND = StrategyKind(
    name="lora",
    build=lambda tables, settings: head_alone(
        tables, f"lora: frozen; rank-{settings.r} adapters on attention projections train"
    ),
    settings=LoraSettings,
    hooks=LoraHooks,
    needs_head=True,
)
