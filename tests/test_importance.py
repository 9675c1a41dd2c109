import numpy as np
import pandas as pd
import pytest
import torch

from adaptune import modalities
from adaptune.data_info import DataInfo
from adaptune.figures import plot_heatmap
from adaptune.importance import (
    calibration_batches,
    layer_table,
    metric_agreement,
    score_model,
)

from .conftest import tiny_batches, tiny_task

METRICS = ["weight_l1", "weight_l2", "grad_norm"]


@pytest.fixture(scope="module")
def task(tiny_bert_dir):
    return tiny_task(tiny_bert_dir, ["a", "b", "c"])


def test_grad_norm_matches_plain_autograd(task, tiny_bert_dir):
    batches = tiny_batches(tiny_bert_dir)
    table, _ = score_model(task, batches, ["grad_norm"])
    model = task.model.eval()
    inputs = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits, inputs["labels"])
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected = [0.0 if g is None else float(g.norm()) for g in grads]
    np.testing.assert_allclose(table["grad_norm"], expected, rtol=1e-4, atol=1e-9)
    assert table.loc[table["is_head"], "grad_norm"].gt(0).all()


def test_scoring_changes_nothing_and_is_deterministic(task, tiny_bert_dir):
    model = task.model
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first, seconds = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.training and not model.bert.embeddings.word_embeddings.weight.requires_grad
    second, _ = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    pd.testing.assert_frame_equal(first, second)
    assert set(seconds) == set(METRICS)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)


def test_score_table_columns_and_ranks(task, tiny_bert_dir):
    table, _ = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    assert len(table) == len(list(task.model.parameters()))
    for metric in METRICS:
        assert {metric, f"{metric}_per_element", f"{metric}_rank"} <= set(table.columns)
        assert table[f"{metric}_rank"].between(0, 1).all()
        top = table.loc[table[f"{metric}_per_element"].idxmax()]
        assert top[f"{metric}_rank"] == table[f"{metric}_rank"].max()  # ties share their rank
    weights = dict(task.model.named_parameters())
    row = table.set_index("name").loc["bert.encoder.layer.0.attention.self.query.weight"]
    w = weights["bert.encoder.layer.0.attention.self.query.weight"].detach()
    assert row["weight_l1_per_element"] == pytest.approx(float(w.abs().mean()), rel=1e-5)
    assert row["weight_l2_per_element"] == pytest.approx(float(w.pow(2).mean().sqrt()), rel=1e-5)


def test_layer_table_aggregates_by_metric_kind(task, tiny_bert_dir):
    table, _ = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    layers = layer_table(table).set_index("layer")
    block = [p for n, p in task.model.named_parameters() if n.startswith("bert.encoder.layer.1.")]
    flat = torch.cat([p.detach().flatten() for p in block])
    assert layers.loc["block02", "weight_l1"] == pytest.approx(float(flat.abs().sum()), rel=1e-5)
    assert layers.loc["block02", "weight_l2"] == pytest.approx(float(flat.norm()), rel=1e-5)
    assert layers.loc["block02", "numel"] == flat.numel()
    assert list(layers.index) == ["input", "block01", "block02", "output", "head"]


def test_agreement_is_a_spearman_matrix(task, tiny_bert_dir):
    table, _ = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    agreement = metric_agreement(table)
    assert list(agreement.columns) == METRICS
    assert np.allclose(np.diag(agreement), 1.0)
    expected = table["weight_l1_per_element"].rank().corr(table["grad_norm_per_element"].rank())
    assert agreement.loc["weight_l1", "grad_norm"] == pytest.approx(expected)


def test_heatmap_is_written(task, tiny_bert_dir, tmp_path):
    table, _ = score_model(task, tiny_batches(tiny_bert_dir), METRICS)
    plot_heatmap(layer_table(table), METRICS, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 10_000


def test_calibration_batches_cycle_a_small_split():
    frame = pd.DataFrame({"input_ids": [np.array([i + 1]) for i in range(5)], "label_id": range(5)})
    text = modalities.for_data(DataInfo.for_labels("text", list("abcde"), pad_token_id=0))
    batches = calibration_batches(text, frame, count=3, batch_size=4, seed=0)
    assert [len(b["labels"]) for b in batches] == [4, 4, 4]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert sorted(labels[:5]) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def minilm_news(bbc_sample_csv):
    """The bundled MiniLM's tokens of 4 real articles per class (its features carry the topic,
    unlike the random tiny BERT's, so a linear probe on them can learn)."""
    from adaptune.data import prepare, sample_few_shot
    from adaptune.settings import DataSettings, ModelSettings

    data = DataSettings.from_config(
        {
            "source": f"csv:{bbc_sample_csv}",
            "text_column": "body",
            "label_column": "topic",
            "max_length": 32,
        }
    )
    model = ModelSettings.from_config("bundled:all-MiniLM-L6-v2")
    splits, info = prepare(data, model)
    return model, sample_few_shot(splits["train"], 4, 0), info


def head_share(table: pd.DataFrame, metric: str) -> float:
    """The head's share of a metric summed over every tensor (grad_norm: of its square)."""
    values = table[metric] ** 2 if metric == "grad_norm" else table[metric]
    return float(values[table["is_head"]].sum() / values.sum())


def test_a_probed_head_leaves_the_body_untouched_and_the_gradients_to_it(minilm_news):
    """Through the new head as initialised, the head takes a fifth of the Fisher information
    and of the squared gradient (1,925 of 22.7M weights); after the probe, which fits the head
    alone (well above chance on its training split), a tenth of that, while every body weight
    stays bit for bit the pretrained one."""
    from adaptune.scoring import probe_head
    from adaptune.settings import ImportanceSettings

    model, few, info = minilm_news
    settings = ImportanceSettings.from_config({"head": "probe", "batches": 1, "batch_size": 8})
    modality = modalities.for_data(info)
    batches = calibration_batches(modality, few, 1, 8, settings.seed)
    shares = {}
    for head in ("random", "probe"):
        task = modality.load_pretrained(model, settings.seed)
        task.model.eval()
        before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        if head == "probe":
            probe = probe_head(task, few, settings, torch.device("cpu"))
            assert probe.probe_epochs == 10 and probe.train_accuracy > 0.6  # chance: 0.2
            changed = {n for n, p in task.model.named_parameters() if not torch.equal(before[n], p)}
            assert changed == set(task.head)
            assert not task.model.training  # its mode and flags as they were
            assert all(p.requires_grad for p in task.model.parameters())
        table, _ = score_model(task, batches, ["grad_norm", "fisher"])
        shares[head] = {m: head_share(table, m) for m in ("grad_norm", "fisher")}
    for metric in ("grad_norm", "fisher"):
        assert shares["random"][metric] > 0.1, shares
        assert shares["probe"][metric] < shares["random"][metric] / 4, shares
