"""``lora``: LoRA adapters (Hu et al. 2022) through PEFT, injected into the model in place so that
the plan's tensor names and the training loop stay as they are: the pretrained body is frozen,
the head and the adapters train, and after training the adapters are merged back into the base
weights, so the saved checkpoint is a plain model of the original architecture.

What is adapted, found from the module tree: every linear projection inside an attention module
(query, key, value and output in BERT, ``c_attn`` and ``c_proj`` in GPT-2, ``qkv`` and ``proj``
in timm's ViTs), and every ``nn.MultiheadAttention`` as a whole (torchvision's ViTs). The latter's
in-projection is a raw parameter, not a layer, and its forward reads ``out_proj``'s weight without
calling ``out_proj``: an adapter on ``out_proj`` alone would never be used (it got no gradient,
and LoRA trained the head only). PEFT's ``MultiheadAttention`` layer adapts both the fused
query/key/value in-projection and ``out_proj``, by merging the adapters into the weights for each
forward and taking them out after it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from adaptune.errors import PlanError
from adaptune.layers import output_dim
from adaptune.strategies.base import StrategyKind, TrainingContext, TrainingHooks, head_alone

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
    """Module paths of what LoRA adapts in the model's attention: the linear projections inside
    its attention modules (any module whose class name contains "Attention"): query, key, value
    and output in BERT, ``c_attn`` and ``c_proj`` in GPT-2, ``qkv`` and ``proj`` in timm's ViT;
    and each ``nn.MultiheadAttention`` itself, not its ``out_proj`` (see the module docstring).
    Found from the module tree, not names."""
    excluded = {name.rsplit(".", 1)[0] for name in exclude}
    whole = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    found = {name for name in whole if name not in excluded}
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower():
            continue
        for child, sub in module.named_modules():
            path = f"{name}.{child}" if name else child
            inside_whole = any(path.startswith(f"{w}.") for w in whole)
            if child and _is_projection(sub) and path not in excluded and not inside_whole:
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
    from peft.tuners.lora import LoraLayer

    targets = settings.targets or attention_projections(model, head)
    if not targets:
        raise PlanError(
            "lora: the model has no attention projections to adapt; name the modules in "
            "strategies.<name>.targets"
        )
    # Injection renames the adapted base weights (``query.base_layer.weight``) and may register
    # them again as new Parameter objects over the same storage (PEFT's MultiheadAttention):
    # the adapters are the parameters of PEFT's adapter layers, and every other parameter gets
    # back the flag of the tensor whose storage it holds.
    flags = {p.data_ptr(): p.requires_grad for p in model.parameters()}
    whole = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    whole = [n for n in whole if n in targets]
    # Conv1D stores its weight transposed (in x out): PEFT must know, or it warns and guesses.
    kinds = [output_dim(m) == 1 for n, m in model.named_modules() if n in targets]
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        fan_in_fan_out=bool(kinds) and all(kinds),
    )
    try:
        inject_adapter_in_model(config, model)
    except (ValueError, TypeError) as err:  # no matching module, unsupported module types
        raise PlanError(f"lora: cannot adapt {list(targets)}: {err}") from err
    adapter_ids = {
        id(param)
        for module in model.modules()
        if isinstance(module, LoraLayer)
        for layer in module.adapter_layer_names
        for param in getattr(module, layer).parameters(recurse=True)
    }
    adapters = {}
    for name, param in model.named_parameters():
        if id(param) in adapter_ids:
            adapters[name] = param
            param.requires_grad_(True)
        else:  # PEFT froze everything else; the plan decides that here
            param.requires_grad_(flags.get(param.data_ptr(), param.requires_grad))
    if settings.dropout and whole:
        log.info(
            "LoRA dropout %.2g does not apply inside nn.MultiheadAttention: PEFT merges those "
            "adapters into the weights for each forward",
            settings.dropout,
        )
    log.info(
        "LoRA r=%d on %d modules: %d adapter parameters",
        settings.r,
        len(targets),
        sum(p.numel() for p in adapters.values()),
    )
    return adapters


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weights and put the base module back in its place;
    returns how many modules were merged. A layer that holds another adapted one (PEFT's
    ``MultiheadAttention`` holds its ``out_proj``) merges and unloads both, with its own method."""
    from peft.tuners.lora import LoraLayer

    merged: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer) or any(name.startswith(f"{m}.") for m in merged):
            continue
        if hasattr(module, "unload_and_optionally_merge_module"):
            base = module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None
            )
        else:
            module.merge()
            base = module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
        merged.append(name)
    return len(merged)


class LoraHooks(TrainingHooks):
    def extra_groups(self, context: TrainingContext) -> list[dict[str, Any]]:
        """The adapters, in one group at the base rate."""
        head = [t.name for t in context.plan.tensors if not t.frozen]
        adapters = add_lora(context.task.model, self.settings, head)
        context.task.model.to(context.device)
        return [
            {
                "params": list(adapters.values()),
                "names": list(adapters),
                "lr_multiplier": 1.0,
                "weight_decay": self.train.weight_decay,
            }
        ]

    def finish(self, context: TrainingContext) -> None:
        log.info("LoRA merged into %d modules", merge_lora(context.task.model))


KIND = StrategyKind(
    name="lora",
    build=lambda tables, settings: head_alone(
        tables, f"lora: frozen; rank-{settings.r} adapters on attention projections train"
    ),
    settings=LoraSettings,
    hooks=LoraHooks,
    needs_head=True,
)
