"""Decoder-only language models as classifiers: tiny random Llama, Qwen2, GPT-2 and GPT-NeoX
models (:mod:`tests.decoders`, no pad token in their tokenizers) through every stage in process,
on real BBC News articles: the padding rule and the token classified, truncation, layer
discovery, the frozen-prefix cache, and every strategy kind with what it promises."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from adaptune import strategies, training
from adaptune.errors import ConfigError, ModelError
from adaptune.importance import calibration_batches, layer_table, score_model
from adaptune.layers import BLOCK, HEAD, INPUT, OUTPUT, assign_layers, find_blocks
from adaptune.modalities.text import models, tokenize
from adaptune.plans import ScoreTables
from adaptune.settings import TrainSettings
from adaptune.strategies.lora import LoraSettings, add_lora, attention_projections, merge_lora

from .decoders import FAMILIES, decoder_task, family_tokenizer, news_splits, save_tiny_decoder
from .test_prefix import plan_for, without_dropout

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"train": 4, "val": 2}  # articles per topic: 20 to train on, 10 to validate


@pytest.fixture(scope="module")
def news(tiny_decoder_dir):
    """Real articles tokenised for the decoder, and their data facts (:class:`DataInfo`)."""
    return news_splits(tiny_decoder_dir, SIZES)


def short_texts(count: int = 6) -> pd.DataFrame:
    """Beginnings of real articles, of different lengths: batches of them need padding."""
    from adaptune.modalities.text.sources import load_bbc_news

    texts = load_bbc_news()["text"].iloc[::300][:count]
    return pd.DataFrame({"text": [t[: 10 + 15 * i] for i, t in enumerate(texts)]})


def head_module(task) -> nn.Module:
    return task.model.get_submodule(task.head[0].rpartition(".")[0])


# --- the padding rule ---------------------------------------------------------------------


def test_the_pad_token_is_saved_in_data_json_and_the_model_config(tiny_decoder_dir, news):
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(tiny_decoder_dir)
    tokenizer = models.load_tokenizer(f"path:{tiny_decoder_dir}")
    pad = tokenizer.pad_token_id
    assert pad is not None and pad not in models.added_tokens(tokenizer)
    assert tokenizer.padding_side == "right"
    if shipped.pad_token is None:  # Llama, GPT-2, GPT-NeoX: a new token, one new embedding row
        assert tokenizer.pad_token == models.PAD_TOKEN and pad == len(shipped)
    else:  # Qwen2's tokenizer pads with <|endoftext|>, which it never adds: kept
        assert tokenizer.pad_token == shipped.pad_token and pad < len(shipped)
    parts, info = news
    assert info.encoding["pad_token_id"] == pad
    assert not any(ids[-1] == pad for part in parts.values() for ids in part["input_ids"])
    task = decoder_task(tiny_decoder_dir, info)
    rows = task.model.get_input_embeddings().num_embeddings
    assert task.model.config.pad_token_id == pad
    assert rows == max(len(shipped), pad + 1)


def test_a_pad_token_the_tokenizer_appends_is_replaced(decoder_tokenizer, tmp_path):
    """A tokenizer whose pad token is the eos it appends to every text gets a pad token of its
    own; one whose pad token it never adds keeps it."""
    appends = family_tokenizer(decoder_tokenizer, FAMILIES["gpt_neox"])
    appends.pad_token = appends.eos_token
    appends.save_pretrained(tmp_path / "appends")
    (tmp_path / "appends/config.json").write_text("{}")
    tokenizer = models.load_tokenizer(f"path:{tmp_path / 'appends'}")
    assert tokenizer.pad_token == models.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    keeps = family_tokenizer(decoder_tokenizer, FAMILIES["gpt2"])
    keeps.pad_token = keeps.eos_token  # GPT-2 adds no eos
    keeps.save_pretrained(tmp_path / "keeps")
    (tmp_path / "keeps/config.json").write_text("{}")
    assert models.load_tokenizer(f"path:{tmp_path / 'keeps'}").pad_token == keeps.eos_token


def test_a_tokenizer_class_that_pads_left_is_saved_padding_right(
    tiny_decoder_dir, tmp_path, monkeypatch
):
    """Llama's, Gemma's and Cohere's tokenizer classes pad on the left unless the folder says
    otherwise: the model folder adaptune saves says right, as training padded."""
    from transformers import AutoTokenizer

    shipped = type(AutoTokenizer.from_pretrained(tiny_decoder_dir))
    monkeypatch.setattr(shipped, "padding_side", "left")
    assert AutoTokenizer.from_pretrained(tiny_decoder_dir).padding_side == "left"
    models.load_tokenizer(f"path:{tiny_decoder_dir}").save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "right"


def test_an_encoder_keeps_its_own_pad_token(tiny_bert_dir):
    tokenizer = models.load_tokenizer(f"path:{tiny_bert_dir}")
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id == 0


def test_the_classifier_reads_each_texts_last_real_token(tiny_decoder_dir, news):
    """In a right-padded batch each text is classified from its last token (an eos the
    tokenizer appends, where it does), exactly as when it is alone; with the eos as pad, the
    alternative rule, a text ending in eos would be read from the token before."""
    _, info = news
    task = decoder_task(tiny_decoder_dir, info)
    model = task.model.eval()
    tokenizer = models.load_tokenizer(f"path:{tiny_decoder_dir}")
    frame = tokenize(short_texts(), tokenizer, 64).assign(label_id=0)
    examples = task.modality.examples(frame)
    batch = examples.collate([examples[i] for i in range(len(examples))])
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(frame)  # every text padded but the longest
    with torch.no_grad():
        batched = task.logits(batch)
        alone = torch.cat([task.logits(examples.collate([examples[i]])) for i in range(len(frame))])
        hidden = getattr(model, model.base_model_prefix)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        last = head_module(task)(hidden[torch.arange(len(frame)), lengths - 1])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, last, rtol=1e-4, atol=1e-5)
    appended = models.added_tokens(tokenizer) & {int(i) for i in frame["input_ids"].iloc[0][-1:]}
    if appended:  # GPT-NeoX here: the eos is the last real token
        model.config.pad_token_id = tokenizer.eos_token_id
        with torch.no_grad():
            moved = task.logits(batch)
        assert (moved - last).abs().max() > 1e-3


def test_truncation_cuts_the_end_of_the_text_and_keeps_the_added_tokens(tiny_decoder_dir):
    tokenizer = models.load_tokenizer(f"path:{tiny_decoder_dir}")
    added = models.added_tokens(tokenizer)
    frame = short_texts(3).assign(text=lambda f: f["text"] + " and then some more words" * 20)
    cut = tokenize(frame, tokenizer, 16)["input_ids"]
    for text, ids in zip(frame["text"], cut, strict=True):
        whole = tokenizer(text)["input_ids"]
        own = tokenizer(text, add_special_tokens=False)["input_ids"]
        front = len(whole) - len(whole[next(i for i, t in enumerate(whole) if t not in added) :])
        back = len(whole) - front - len(own)
        assert len(own) > 16 and len(ids) == 16
        kept = whole[:front] + own[: 16 - front - back] + whole[len(whole) - back :]
        assert ids.tolist() == kept


def test_the_drift_features_of_a_text_do_not_depend_on_its_batch(tiny_decoder_dir, news):
    """``evaluate``'s drift reads the body's features at the head's input: a decoder's head
    reads every position, padding included, so a text's features are the mean over its own
    tokens, the same alone as in a padded batch."""
    from adaptune.evaluation import HeadInputs, predict

    _, info = news
    task = decoder_task(tiny_decoder_dir, info)
    tokenizer = models.load_tokenizer(f"path:{tiny_decoder_dir}")
    texts = tokenize(short_texts(), tokenizer, 64).assign(label_id=0)
    assert texts["input_ids"].map(len).nunique() == len(texts)  # a batch of them is padded
    features = {}
    for size in (1, len(texts)):
        features[size] = HeadInputs(task, len(texts))
        predict(task, texts, size, torch.device("cpu"), head_inputs=features[size])
    torch.testing.assert_close(
        features[1].features, features[len(texts)].features, rtol=1e-5, atol=1e-6
    )  # float32 activations: a batch's kernels differ from a single text's in the last bits


# --- layers and the frozen-prefix cache ---------------------------------------------------


def test_layer_discovery_finds_the_decoder_blocks(tiny_decoder_dir, news):
    """Input embeddings, one block per decoder layer (``model.layers``, ``transformer.h``,
    ``gpt_neox.layers``), the final norm as the output layer, the new score head."""
    _, info = news
    task = decoder_task(tiny_decoder_dir, info)
    model = task.model
    blocks = find_blocks(model, task.head)
    assert len(blocks) == model.config.num_hidden_layers
    assert len({type(model.get_submodule(b)) for b in blocks}) == 1
    layers = assign_layers(model, task.head)
    kinds = {name: layer.kind for name, layer in layers.items()}
    params = dict(model.named_parameters())
    embedding = next(n for n, p in params.items() if p is model.get_input_embeddings().weight)
    assert kinds[embedding] == INPUT
    assert [n for n, k in kinds.items() if k == HEAD] == list(task.head)
    assert head_module(task).out_features == info.num_labels
    outputs = [n for n, k in kinds.items() if k == OUTPUT]
    assert outputs and all(params[n].dim() == 1 for n in outputs)  # the final norm
    for index, block in enumerate(blocks, start=1):
        inside = [n for n in params if n.startswith(block + ".")]
        assert inside and {layers[n].name for n in inside} == {f"block{index:02d}"}
        assert {layers[n].kind for n in inside} == {BLOCK}


def frozen_below(model, layers, depth: int):
    return lambda name: layers[name].index > depth


@pytest.mark.parametrize("depth", [1, 3], ids=["bottom block frozen", "head only"])
def test_cached_training_is_exact_without_dropout(tiny_decoder_dir, news, depth, caplog):
    """Rotary or learned positions and causal masks are computed above the cached boundary:
    cached and uncached training give the same weights with dropout 0."""
    caplog.set_level("INFO")
    parts, info = news

    def train(cache: str) -> dict[str, torch.Tensor]:
        task = decoder_task(tiny_decoder_dir, info)
        without_dropout(task.model)
        layers = assign_layers(task.model, task.head)
        plan = plan_for(task.model, lambda n: layers[n].index > depth)
        settings = TrainSettings.from_config(
            {"epochs": 2, "batch_size": 8, "lr": 1e-2, "feature_cache": cache}
        )
        before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        training.train(task, plan, parts["train"], parts["val"], settings, 0, torch.device("cpu"))
        after = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        for t in plan.tensors:
            assert torch.equal(before[t.name], after[t.name]) == t.frozen, t.name
        return after

    cached = train("auto")
    assert "feature cache: every layer below" in caplog.text
    assert "feature cache off" not in caplog.text
    full = train("off")
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)


def test_a_cached_prefix_keeps_each_blocks_own_attention_mask(decoder_tokenizer, tmp_path, caplog):
    """A model that gives each block its mask by position (``config.layer_types[i]``: here a
    full-attention block, then a sliding-window one of 4 tokens) trains on the cache exactly as
    without it: the frozen block stays in its list, passing its input on, so the sliding block
    keeps its sliding mask (taking the block out of the list gave it the full mask: the check
    against the full forward then turned the cache off)."""
    caplog.set_level("INFO")
    directory = save_tiny_decoder(
        tmp_path,
        "qwen2",
        decoder_tokenizer,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
    )
    parts, info = news_splits(directory, SIZES)

    def train(cache: str) -> dict[str, torch.Tensor]:
        task = decoder_task(directory, info)
        layers = assign_layers(task.model, task.head)
        plan = plan_for(task.model, lambda n: layers[n].index > 1)
        settings = TrainSettings.from_config(
            {"epochs": 2, "batch_size": 8, "lr": 1e-2, "feature_cache": cache}
        )
        training.train(task, plan, parts["train"], parts["val"], settings, 0, torch.device("cpu"))
        return {n: p.detach().clone() for n, p in task.model.named_parameters()}

    cached = train("auto")
    assert "the inputs of model.layers.1 cached" in caplog.text
    assert "feature cache off" not in caplog.text
    full = train("off")
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_recomputes_each_decoder_block_and_changes_no_update(
    tiny_decoder_dir, news
):
    """Decoder blocks take their rotary position embeddings and masks as keyword arguments,
    which the recomputation must hand on: each block runs once more per training step, and the
    weights are those of a run without checkpointing (dropout 0)."""
    parts, info = news

    def run(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        task = decoder_task(tiny_decoder_dir, info)
        without_dropout(task.model)
        block = task.model.get_submodule(find_blocks(task.model, task.head)[0])
        # A module inside the block: recomputation calls the block's forward, not the block.
        inner = next(m for m in block.modules() if m is not block and m._parameters)
        calls = []
        inner.register_forward_hook(lambda *_: calls.append(1))
        layers = assign_layers(task.model, task.head)
        plan = plan_for(task.model, lambda n: layers[n].kind != INPUT)
        settings = TrainSettings.from_config(
            {"epochs": 1, "batch_size": 8, "lr": 1e-2, "gradient_checkpointing": checkpointing}
        )
        training.train(
            task,
            plan,
            parts["train"],
            parts["val"],
            settings,
            0,
            torch.device("cpu"),
            restore_best=False,
        )
        return {n: p.detach().clone() for n, p in task.model.named_parameters()}, len(calls)

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    steps = -(-len(parts["train"]) // 8)  # 20 articles in batches of 8
    assert checkpointed_calls - plain_calls == steps == 3
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=0, atol=1e-6, msg=name)


# --- every strategy kind ------------------------------------------------------------------

# One strategy of each kind, as a config would give it: ``adaptune.strategies.kinds()``.
KINDS = {
    "full": {"kind": "full"},
    "head_only": {"kind": "head_only"},
    "freeze_bottom": {"kind": "freeze_bottom", "layers": 1},
    "llrd": {"kind": "llrd", "decay": 0.5},
    "importance": {"kind": "importance", "metric": "fisher", "freeze": {"budget": 0.5}},
    "gradual_unfreeze": {"kind": "gradual_unfreeze"},
    "fastai_fine_tune": {"kind": "fastai_fine_tune", "frozen_epochs": 1},
    "auto_rgn": {"kind": "auto_rgn"},
    "childtuning_d": {"kind": "childtuning_d", "p": 0.05},
    "lora": {"kind": "lora", "r": 4, "dropout": 0.0},
    "lp_ft": {"kind": "lp_ft", "probe_epochs": 1},
    "lisa": {"kind": "lisa", "layers": 1, "interval_fraction": 0.25},
    "lisa_importance": {
        "kind": "lisa_importance",
        "layers": 1,
        "interval_fraction": 0.25,
        "metric": "fisher",
    },
    "badam": {"kind": "badam", "interval_fraction": 0.2},
    "sparse_mask": {"kind": "sparse_mask", "density": 0.1, "scope": "row"},
    "hft": {"kind": "hft"},
    "progressive_freeze": {"kind": "progressive_freeze", "threshold": 100.0},
}


def test_every_strategy_kind_is_tried_on_the_decoders():
    assert set(KINDS) == set(strategies.kinds())


@pytest.fixture(scope="module")
def scores(tiny_decoder_dir, news):
    """The importance stage's tables for the decoder: per-example gradients (vmap) on a batch
    of the training articles."""
    parts, info = news
    task = decoder_task(tiny_decoder_dir, info)
    batches = calibration_batches(task.modality, parts["train"], 1, 8, 0)
    table, _ = score_model(task, batches, ["weight_l2", "grad_norm", "fisher"])
    assert table["fisher"].gt(0).any() and table["grad_norm"].notna().all()
    return ScoreTables(table, layer_table(table))


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_strategy_kind_keeps_its_plan_on_a_decoder(tiny_decoder_dir, news, scores, kind):
    """Each kind trains the decoder under its plan: a tensor frozen for the run is
    bit-identical afterwards, one thawed in epoch e is unchanged before it and moves from it,
    and what the kind adds holds (LoRA's adapters merged back into the listed projections,
    ChildTuning-D's share of weights, Auto-RGN's per-tensor groups, LLRD's rates)."""
    parts, info = news
    plan = strategies.build_plan(scores, kind, KINDS[kind])
    task = decoder_task(tiny_decoder_dir, info)
    model = task.model
    names = [n for n, _ in model.named_parameters()]
    assert [t.name for t in plan.tensors] == names  # the plan covers the loaded model
    epochs = max(2, *(t.unfreeze_epoch for t in plan.tensors))
    settings = TrainSettings.from_config(
        {"epochs": epochs, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, "weight_decay": 0.0}
    )

    def snapshot(row: object = None) -> None:
        # LoRA's base weights are ``<module>.base_layer.weight`` while its adapters are in.
        weights = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}
        snapshots.append({n: weights[n].detach().clone() for n in names})

    snapshots: list[dict[str, torch.Tensor]] = []
    snapshot()
    targets = attention_projections(model, task.head)
    merged = {f"{t}.weight" for t in targets} if kind == "lora" else set()
    result = training.train(
        task,
        plan,
        parts["train"],
        parts["val"],
        settings,
        0,
        torch.device("cpu"),
        on_epoch=snapshot,
    )
    assert [n for n, _ in model.named_parameters()] == names  # LoRA merged and unloaded
    final = dict(model.named_parameters())
    for tensor in plan.tensors:
        moved = [
            not torch.equal(snapshots[e][tensor.name], snapshots[e - 1][tensor.name])
            for e in range(1, epochs + 1)
        ]
        if tensor.frozen:
            assert not any(moved), tensor.name
            if tensor.name not in merged:
                assert torch.equal(final[tensor.name], snapshots[0][tensor.name]), tensor.name
        else:
            assert not any(moved[: tensor.unfreeze_epoch - 1]), tensor.name
            if kind not in ("lora", "childtuning_d"):  # these train parts of tensors
                assert moved[tensor.unfreeze_epoch - 1], tensor.name
    changed = {n for n in names if not torch.equal(final[n], snapshots[0][n])}
    head = set(task.head)
    if kind == "head_only":
        assert changed == head and result.trainable_params == sum(final[n].numel() for n in head)
    if kind == "lora":
        assert changed == {f"{t}.weight" for t in targets} | head
        adapters = sum(4 * sum(final[f"{t}.weight"].shape) for t in targets)
        assert result.trainable_params == adapters + sum(final[n].numel() for n in head)
    if kind == "childtuning_d":
        total = sum(p.numel() for p in final.values())
        moved_weights = sum(int((final[n] != snapshots[0][n]).sum()) for n in names)
        assert 0 < moved_weights <= result.trainable_params <= round(0.05 * total) + 1
    if kind == "auto_rgn":
        assert result.optimizer_groups == len(names)
    if kind == "llrd":
        top = max(t.layer_index for t in plan.tensors)
        for t in plan.tensors:
            assert t.lr_multiplier == pytest.approx(0.5 ** (top - t.layer_index)), t.name
    if kind == "importance":
        assert 0 < plan.totals["trainable_fraction"] <= 0.5
    if kind in ("gradual_unfreeze", "fastai_fine_tune", "lp_ft"):
        assert {t.unfreeze_epoch for t in plan.tensors if t.is_head} == {1}
        assert max(t.unfreeze_epoch for t in plan.tensors) > 1


def test_sparse_mask_by_row_keeps_each_output_units_share_of_its_inputs(
    tiny_decoder_dir, news, scores
):
    """``sparse_mask`` with ``scope: row`` (GPS's rule) updates at most its density of each
    output unit's incoming weights in every projection: rows of an ``nn.Linear`` weight
    (outputs x inputs), columns of GPT-2's ``Conv1D`` one (inputs x outputs)."""
    from adaptune.strategies.sparse_mask import kept_count

    parts, info = news
    density = 0.1
    spec = {"kind": "sparse_mask", "density": density, "scope": "row"}
    plan = strategies.build_plan(scores, "sparse", spec)
    task = decoder_task(tiny_decoder_dir, info)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    settings = TrainSettings.from_config({"epochs": 1, "batch_size": 8, "lr": 1e-2})
    training.train(task, plan, parts["train"], parts["val"], settings, 0, torch.device("cpu"))
    checked = 0
    for path, module in task.model.named_modules():
        transposed = type(module).__name__ == "Conv1D"
        if not (isinstance(module, nn.Linear) or transposed) or f"{path}.weight" in task.head:
            continue
        moved = module.weight.detach() != before[f"{path}.weight"]
        per_output = moved.sum(0 if transposed else 1)  # over each output unit's inputs
        inputs = moved.shape[0 if transposed else 1]
        assert 0 < per_output.max() <= kept_count(inputs, density), path
        checked += 1
    assert checked >= 4 * task.model.config.num_hidden_layers


def test_lora_adapts_every_attention_projection_and_merges_exactly(tiny_decoder_dir, news):
    """The projections found are all of each attention module's weights (separate q, k, v, o
    with fewer key/value heads under grouped-query attention; GPT-2's fused ``Conv1D`` and
    GPT-NeoX's fused ``nn.Linear`` query-key-value), one attention module per block; merged
    back, the model computes what it computed with its adapters."""
    parts, info = news
    task = decoder_task(tiny_decoder_dir, info)
    model = task.model.eval()
    targets = attention_projections(model, task.head)
    attention = {t.rpartition(".")[0] for t in targets}
    assert len(attention) == model.config.num_hidden_layers
    params = [n for n, _ in model.named_parameters()]
    for module in attention:
        inside = {n for n in params if n.startswith(module + ".")}
        adapted = {n for n in inside if any(n.startswith(t + ".") for t in targets)}
        assert inside == adapted and len(adapted) >= 2, module
    examples = task.modality.examples(parts["val"])
    batch = examples.collate([examples[i] for i in range(len(examples))])
    with torch.no_grad():
        base_logits = task.logits(batch)
    adapters = add_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=[]), task.head)
    assert sum(p.numel() for p in adapters.values()) == sum(
        4 * sum(model.get_submodule(t).base_layer.weight.shape) for t in targets
    )
    torch.manual_seed(1)
    for name, param in adapters.items():
        if "lora_B" in name:  # B starts at zero: give the adapters something to merge
            torch.nn.init.normal_(param, std=0.5)
    with torch.no_grad():
        adapted_logits = task.logits(batch)
        assert merge_lora(model) == len(targets)
        merged_logits = task.logits(batch)
    assert [n for n, _ in model.named_parameters()] == params
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapters did something


# --- what a new user is told ----------------------------------------------------------------


def test_an_architecture_without_a_classifier_is_named_with_the_fix(decoder_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, CodeGenConfig

    tokenizer = family_tokenizer(decoder_tokenizer, FAMILIES["gpt2"])
    config = CodeGenConfig(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        ModelError, match=r"model_type 'codegen'.*choose a model whose architecture"
    ):
        news_splits(tmp_path, {"train": 1})


def test_a_model_folder_without_its_tokenizer_is_named_with_the_fix(tiny_decoder_dir, tmp_path):
    """transformers builds an empty tokenizer for some such folders (GPT-2's: 2 tokens, every
    text empty) and fails for others: either way the message names the folder's problem."""
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_decoder_dir / name).read_bytes())
    with pytest.raises(ModelError, match=r"tokenizer.*tokenizer\.save_pretrained\(DIR\)"):
        news_splits(tmp_path, {"train": 1})


def test_a_max_length_beyond_the_models_positions_is_refused(tiny_decoder_dir):
    from .decoders import POSITIONS

    with pytest.raises(
        ConfigError, match=rf"data.max_length = {POSITIONS + 1}.*at most {POSITIONS}"
    ):
        news_splits(tiny_decoder_dir, {"train": 1}, max_length=POSITIONS + 1)
