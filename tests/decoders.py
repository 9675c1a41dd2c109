"""Tiny random decoder-only language models, built offline in seconds, the way a new user would
have them: a byte-level BPE tokenizer trained with the ``tokenizers`` library on bundled BBC News
text and saved as a ``PreTrainedTokenizerFast`` with no pad token (as Llama, Mistral and GPT-2
tokenizers ship), and a randomly initialised causal LM of the family saved with
``save_pretrained``: a ``path:`` model folder.

Each family differs where real ones do: grouped-query attention (Llama, Qwen2: fewer key/value
heads than query heads), a fused ``Conv1D`` query-key-value projection (GPT-2), a fused
``nn.Linear`` one (GPT-NeoX, named nowhere in ``src/``), tied input and output embeddings (Qwen2),
learned absolute positions (GPT-2) or rotary ones (the others), and which special tokens the
tokenizer adds: a bos in front (Llama), nothing (Qwen2, GPT-2), an eos at the end (GPT-NeoX here,
the case where a pad token equal to eos would move the pooled position).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptune.data_info import DataInfo

if TYPE_CHECKING:
    from adaptune.modalities import TaskModel

VOCAB_SIZE = 512
TRAINING_TEXTS = 300  # BBC articles the tokenizer learns its merges from (under a second)
POSITIONS = 128
SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>")


@dataclass(frozen=True)
class Family:
    """One decoder family: its config for a vocabulary size and special-token ids, and what its
    tokenizer adds to every text (``prefix``/``suffix``: special tokens, or empty)."""

    name: str
    config: Callable[[int, dict[str, int]], Any]
    bos: str
    eos: str
    prefix: str = ""
    suffix: str = ""
    # The class named in tokenizer_config.json where the family's own one reads a byte-level
    # tokenizer.json as it is (transformers 5 picks the class from there or from config.json).
    tokenizer_class: str = ""


def _llama(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=POSITIONS,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )


def _qwen2(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
    )


def _gpt2(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=POSITIONS,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
    )


def _gpt_neox(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=POSITIONS,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )


FAMILIES = {
    family.name: family
    for family in (
        Family("llama", _llama, bos="<s>", eos="</s>", prefix="<s>"),
        Family("qwen2", _qwen2, bos="", eos="<|endoftext|>"),
        Family(
            "gpt2", _gpt2, bos="<|endoftext|>", eos="<|endoftext|>", tokenizer_class="GPT2Tokenizer"
        ),
        Family("gpt_neox", _gpt_neox, bos="<s>", eos="</s>", suffix="</s>"),
    )
}


def train_tokenizer() -> Any:
    """A byte-level BPE (``tokenizers``) of :data:`VOCAB_SIZE` tokens, learned from real BBC
    News articles, with the special tokens of every family in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from adaptune.modalities.text.sources import load_bbc_news

    texts = load_bbc_news()["text"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts.iloc[:: len(texts) // TRAINING_TEXTS].tolist(), trainer)
    return tokenizer


def family_tokenizer(trained: Any, family: Family) -> Any:
    """``trained`` as ``family`` ships it: a ``PreTrainedTokenizerFast`` with the family's bos
    and eos, adding its prefix or suffix to every text, and no pad token."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(trained.to_str())
    if family.prefix or family.suffix:
        single = " ".join(t for t in (family.prefix, "$A", family.suffix) if t)
        pair = " ".join(t for t in (family.prefix, "$A", family.suffix, "$B:1", family.suffix) if t)
        specials = [(t, backend.token_to_id(t)) for t in {family.prefix, family.suffix} if t]
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokens = {"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)


def save_tiny_decoder(
    directory: Path, family: str, trained: Any | None = None, **overrides: Any
) -> Path:
    """A randomly initialised 2-block causal LM of ``family`` (hidden size 32; ``overrides``
    change its config) and its tokenizer, saved in ``directory`` with ``save_pretrained``, as a
    pretrained decoder ships (a ``...ForCausalLM`` checkpoint, no classification head, no pad
    token)."""
    from transformers import AutoModelForCausalLM

    kind = FAMILIES[family]
    tokenizer = family_tokenizer(trained or train_tokenizer(), kind)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = kind.config(len(tokenizer), ids)
    if overrides:
        config = type(config)(**{**config.to_dict(), **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if kind.tokenizer_class:
        path = Path(directory) / "tokenizer_config.json"
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, "tokenizer_class": kind.tokenizer_class}, indent=2))
    return directory


def news_splits(
    model_dir: Path, sizes: dict[str, int], max_length: int = 32
) -> tuple[dict[str, Any], DataInfo]:
    """Real BBC News articles, ``sizes[split]`` of each topic per split (the first ones of each
    topic, in order, no article in two splits), tokenised for the model in ``model_dir`` as
    ``prepare_data`` does, and their data facts (the labels and the encoding: ``pad_token_id``,
    ``max_length``) as ``data.json`` holds them."""
    from adaptune.modalities.text import MODALITY
    from adaptune.modalities.text.sources import load_bbc_news
    from adaptune.settings import DataSettings, ModelSettings

    news = load_bbc_news().drop_duplicates("text")
    labels = sorted(news["label"].unique())
    news = news.assign(label_id=news["label"].map({label: i for i, label in enumerate(labels)}))
    news = news.rename_axis("example_id").reset_index()
    start, parts = 0, {}
    for split, size in sizes.items():
        parts[split] = news.groupby("label").nth(list(range(start, start + size)))
        start += size
    data = DataSettings.from_config({"source": "bundled:bbc-news", "max_length": max_length})
    parts, encoding = MODALITY.encode(parts, data, ModelSettings.from_config(f"path:{model_dir}"))
    return parts, DataInfo.for_labels("text", labels, **encoding)


def decoder_task(model_dir: Path, info: DataInfo, seed: int = 0) -> TaskModel:
    """The decoder in ``model_dir`` with a new head for ``info``'s labels, as the text modality
    bound to that data loads it (``config.pad_token_id`` the tokenizer's pad id)."""
    from adaptune.modalities import for_data
    from adaptune.settings import ModelSettings

    return for_data(info).load_pretrained(ModelSettings.from_config(f"path:{model_dir}"), seed)
