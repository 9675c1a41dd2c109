"""Scoring's memory scales with the model as fine-tuning's does: the estimators hold no
per-example copy of the model beyond their bound, and give today's values (within 1e-6)."""

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertForSequenceClassification

from adaptune.importance import (
    MODEL_BUFFERS,
    grad_norm,
    gradient_moments,
    hutchinson_trace,
    score_model,
)
from adaptune.memory import profile_activations
from adaptune.modalities import TaskModel
from adaptune.modalities.text import MODALITY

from .conftest import tiny_batches, tiny_task
from .live_tensors import LiveTensorBytes

EVERY_METRIC = ["weight_l1", "weight_l2", "grad_norm", "fisher", "hessian_trace", "depth"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models' operations are tiny: on a loaded 2-core machine a second thread only spins
    (the bound tests took 10x longer with two threads than with one, measured 2026-11-30)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def padded(tiny_bert_dir):
    """The tiny BERT, and two batches of 5 (one example padded), in eval mode."""
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    task.model.eval()
    data = tiny_batches(tiny_bert_dir, count=2, size=5)
    data[0]["attention_mask"][1, 8:] = 0
    return task, data


def plain_moments(task, data):
    """Mean and mean square of the per-example gradients: one example at a time, every
    tensor's gradient at once, summed in float64 (the definition, and the former loop)."""
    params = dict(task.model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    squares = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for batch in data:
        for i in range(len(batch["labels"])):
            example = {k: v[i : i + 1] for k, v in batch.items()}
            logits = task.model(
                input_ids=example["input_ids"], attention_mask=example["attention_mask"]
            ).logits
            loss = torch.nn.functional.cross_entropy(logits, example["labels"])
            for name, g in zip(
                params, torch.autograd.grad(loss, list(params.values())), strict=True
            ):
                sums[name] += g.double()
                squares[name] += g.double() ** 2
            count += 1
    return {n: s / count for n, s in sums.items()}, {n: s / count for n, s in squares.items()}


def assert_within_1e6_of_the_model_scale(found, expected):
    """Every value within 1e-6 of the largest value of the model: some true gradients are zero
    (an attention key bias), where float32 rounding has no relative size."""
    scale = max(float(v.abs().max()) for v in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(found[name].double(), value, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("method,chunk_size", [("loop", 4), ("vmap", 4), ("vmap", 16)])
def test_moments_by_each_path_are_the_plain_loops_within_1e_6(padded, method, chunk_size):
    task, data = padded
    mean, squares = gradient_moments(task, data, chunk_size, method)
    expected_mean, expected_squares = plain_moments(task, data)
    assert_within_1e6_of_the_model_scale(mean, expected_mean)
    assert_within_1e6_of_the_model_scale(squares, expected_squares)
    assert all(p.grad is None for p in task.model.parameters())  # no gradient left behind


def test_grad_norm_summed_in_float32_is_the_float64_norm_within_1e_6(padded):
    task, data = padded
    mean, _ = plain_moments(task, data)  # the gradient of the mean loss over all examples
    found = grad_norm(task, data)
    expected = {n: float(torch.linalg.vector_norm(g)) for n, g in mean.items()}
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-6, abs=1e-6 * max(expected.values()))


def test_hutchinson_by_tensor_is_the_whole_models_double_backward(padded):
    """Each tensor's part of H v, reduced as backward produces it, gives the estimates of one
    double backward returning every tensor's part at once, as before, probe by probe."""
    task, data = padded
    names, params = zip(*task.model.named_parameters(), strict=True)
    expected = np.zeros((len(params), 3))
    total = sum(len(b["labels"]) for b in data)
    chunks = [MODALITY.sub_batch(b, i, i + 2) for b in data for i in range(0, len(b["labels"]), 2)]
    for chunk in chunks:
        with sdpa_kernel(SDPBackend.MATH):  # double backward needs plain ops
            logits = task.model(
                input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"]
            ).logits
            loss = torch.nn.functional.cross_entropy(logits, chunk["labels"])
            loss = loss * len(chunk["labels"]) / total
            grads = torch.autograd.grad(loss, params, create_graph=True)
        used = [i for i, g in enumerate(grads) if g.requires_grad]
        for probe in range(3):
            generator = torch.Generator().manual_seed(5 * 100_003 + probe)
            vectors = [
                (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).float() for p in params
            ]
            hv = torch.autograd.grad(
                [grads[i] for i in used],
                params,
                grad_outputs=[vectors[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
            for i, (v, h) in enumerate(zip(vectors, hv, strict=True)):
                if h is not None:
                    expected[i, probe] += float((v * h).sum())
    found = hutchinson_trace(task, data, probes=3, seed=5, chunk_size=2)
    scale = np.abs(expected).max()
    for i, name in enumerate(names):
        np.testing.assert_allclose(found[name], expected[i], rtol=1e-6, atol=1e-6 * scale)


# --- the bound ------------------------------------------------------------------------------


def balanced_bert(hidden: int = 128, vocab: int = 1024) -> TaskModel:
    """A 4-block BERT whose largest tensor is a fifth of it (the tiny BERT of the other tests is
    almost all embedding table, which would hide a per-example copy of everything else)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=3,
    )
    return TaskModel(
        BertForSequenceClassification(config), ("classifier.weight", "classifier.bias"), MODALITY
    )


def short_batches(count: int = 2, size: int = 16, tokens: int = 8) -> list[dict]:
    """Short texts: their activations are small next to the weights, so that the parameters'
    multiples decide the peak, where a per-example copy of the model would show."""
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "input_ids": torch.randint(5, 1024, (size, tokens), generator=generator),
            "attention_mask": torch.ones(size, tokens, dtype=torch.long),
            "labels": torch.randint(0, 3, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def held(task: TaskModel) -> list[torch.Tensor]:
    return [*task.model.parameters(), *task.model.buffers()]


@pytest.fixture(scope="module")
def fine_tuning_step_peak() -> int:
    """The most bytes of tensors alive in one step of full fine-tuning (AdamW, fp32, train
    mode) on a batch of 16: weights, gradients, two moments, and the batch's activations."""
    task, batch = balanced_bert(), short_batches()[0]
    task.model.train()
    with LiveTensorBytes(held(task)) as counted:
        optimizer = torch.optim.AdamW(task.model.parameters())
        loss = torch.nn.functional.cross_entropy(task.logits(batch), batch["labels"])
        loss.backward()
        optimizer.step()
    return counted.peak


@pytest.mark.parametrize(
    "metrics,method,chunk_size",
    [
        (EVERY_METRIC, "loop", 4),
        (EVERY_METRIC, "vmap", 4),
        (["fisher"], "vmap", 16),  # vmap takes at most VMAP_EXAMPLES examples at once anyway
        (["grad_norm"], "loop", 4),  # by its own pass, without fisher's moments
    ],
)
def test_scoring_holds_at_most_four_model_sized_buffers_and_half_a_step_more(
    fine_tuning_step_peak, metrics, method, chunk_size
):
    """Counted tensor by tensor over what the score_importance stage computes (the metrics, then
    the activation profile of the plans' memory estimates): beyond the weights, at most
    MODEL_BUFFERS = 4 buffers the size of the parameters, plus one tensor's temporaries and a
    chunk's activations (a quarter of the parameters here); so at most 2x (here: at most 1.4x)
    one fine-tuning step's peak. Before, vmap held 4 examples' gradients, their squares and a
    copy of the sums (11.9 parameter sizes beyond the weights) and the Hutchinson pass two more
    sums it no longer needed. The peak of the whole is the largest metric's, so hessian_trace
    needs no case of its own; grad_norm does (it shares fisher's pass when both run), and so
    does vmap at chunk_size 16, alone: with every metric, hessian_trace's graph of 8 examples
    would exceed the chunk term."""
    task = balanced_bert()
    params = sum(p.numel() * p.element_size() for p in task.model.parameters())
    largest = max(p.numel() * p.element_size() for p in task.model.parameters())
    assert largest < params / 4
    batches = short_batches()
    with LiveTensorBytes(held(task)) as counted:
        score_model(task, batches, metrics, per_example=method, chunk_size=chunk_size)
        profile_activations(task, batches[0])
    beyond_weights = counted.peak - params
    assert beyond_weights <= MODEL_BUFFERS * params + 2 * largest + params / 4
    assert counted.peak <= 1.4 * fine_tuning_step_peak
