"""The importance estimators against exact answers on models small enough to compute them."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.func import functional_call

from adaptune import importance
from adaptune.importance import (
    fisher_diagonal,
    gradient_moments,
    hutchinson_trace,
    layer_table,
    score_model,
)
from adaptune.modalities import TaskModel
from adaptune.modalities.image import MODALITY as IMAGE

from .conftest import tiny_batches, tiny_task


def task_of(model: nn.Module, head=()) -> TaskModel:
    """A model fed one positional tensor (``pixel_values``), as image models are."""
    return TaskModel(model, tuple(head), IMAGE)


def squared_gradients(model, data, chunk_size=8, method="auto"):
    return gradient_moments(task_of(model), data, chunk_size, method)[1]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


def batches(count: int = 2, size: int = 6, features: int = 3, classes: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pixel_values": torch.randn(size, features, generator=generator),
            "labels": torch.randint(0, classes, (size,), generator=generator),
        }
        for _ in range(count)
    ]


def exact_block_traces(model: nn.Module, data: list[dict]) -> dict[str, float]:
    """Trace of each tensor's diagonal block of the Hessian of the mean loss, from the full
    Hessian of the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    x = torch.cat([b["pixel_values"] for b in data]).double()
    y = torch.cat([b["labels"] for b in data])

    def loss(vector: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = vector[offset : offset + size].view(shape)
            offset += size
        return nn.functional.cross_entropy(functional_call(model.double(), params, (x,)), y)

    diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
    model.float()
    traces, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape))
        traces[name] = float(diagonal[offset : offset + size].sum())
        offset += size
    return traces


def test_hutchinson_is_within_three_standard_errors_of_the_exact_trace():
    model, data = mlp(), batches()
    exact = exact_block_traces(model, data)
    estimates = hutchinson_trace(task_of(model), data, probes=400, seed=0)
    for name, draws in estimates.items():
        se = draws.std(ddof=1) / np.sqrt(len(draws))
        assert abs(draws.mean() - exact[name]) <= 3 * se + 1e-6, name
    # The estimate of the whole trace converges: its error shrinks as 1/sqrt(probes).
    total = sum(exact.values())
    few = np.sum(list(hutchinson_trace(task_of(model), data, probes=16, seed=1).values()), axis=0)
    many = np.sum(
        list(hutchinson_trace(task_of(model), data, probes=1024, seed=1).values()), axis=0
    )
    se_few, se_many = few.std(ddof=1) / 4, many.std(ddof=1) / 32
    assert 0.08 < se_many / se_few < 0.2  # 1/8 expected
    assert abs(many.mean() - total) <= 3 * se_many


def test_hutchinson_is_deterministic_for_a_seed():
    model, data = mlp(), batches()
    first = hutchinson_trace(task_of(model), data, probes=4, seed=7)
    second = hutchinson_trace(task_of(model), data, probes=4, seed=7)
    other = hutchinson_trace(task_of(model), data, probes=4, seed=8)
    assert all(np.array_equal(first[n], second[n]) for n in first)
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_fisher_of_softmax_regression_matches_its_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    data = batches(count=2, size=5)
    x = torch.cat([b["pixel_values"] for b in data])
    y = torch.cat([b["labels"] for b in data])
    with torch.no_grad():
        residual = torch.softmax(model(x), dim=1) - nn.functional.one_hot(y, 4).float()
    # per-example gradients: dL/dW = (p - y) x^T, dL/db = p - y
    expected_w = (residual[:, :, None] * x[:, None, :]).pow(2).mean(0)
    expected_b = residual.pow(2).mean(0)
    for method in ("vmap", "loop"):
        fisher = squared_gradients(model, data, chunk_size=3, method=method)
        torch.testing.assert_close(fisher["weight"], expected_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fisher["bias"], expected_b, rtol=1e-5, atol=1e-7)
    totals = fisher_diagonal(task_of(model), data, chunk_size=4)
    assert totals["weight"] == pytest.approx(float(expected_w.sum()), rel=1e-5)


def test_per_example_gradients_by_vmap_agree_with_a_loop_on_a_transformer(tiny_bert_dir):
    task = tiny_task(tiny_bert_dir, ["a", "b", "c"])
    model = task.model.eval()
    data = tiny_batches(tiny_bert_dir, count=1, size=5)
    data[0]["attention_mask"][1, 8:] = 0  # a padded example
    fast = gradient_moments(task, data, chunk_size=2, method="vmap")[1]
    # The reference: a plain loop over the padded examples, attention mask and all.
    params = dict(model.named_parameters())
    slow = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(5):
        example = {k: v[i : i + 1] for k, v in data[0].items()}
        inputs = {k: v for k, v in example.items() if k != "labels"}
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, example["labels"])
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            slow[name] += g**2 / 5
    # Absolute tolerance on the model's scale: some true gradients are exactly zero (an attention
    # key bias shifts every score of a query alike), where rounding noise has no relative size.
    scale = max(float(v.abs().max()) for v in slow.values())
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6 * scale)


class DataDependent(nn.Module):
    """Control flow on a tensor's value: torch.func.vmap refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out * 2 if out.sum() > 0 else out


def test_models_vmap_cannot_handle_fall_back_to_the_loop():
    model, data = DataDependent(), batches(count=1, size=4)
    with pytest.raises(RuntimeError):
        squared_gradients(model, data, method="vmap")
    auto = squared_gradients(model, data, method="auto")
    loop = squared_gradients(model, data, method="loop")
    torch.testing.assert_close(auto["linear.weight"], loop["linear.weight"])


def test_dropout_is_off_and_batchnorm_statistics_are_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 4))
    model.train()
    running = model[1].running_mean.clone()
    metrics = ["grad_norm", "fisher", "hessian_trace"]
    first, _ = score_model(task_of(model, ["3.weight", "3.bias"]), batches(), metrics, probes=3)
    second, _ = score_model(task_of(model, ["3.weight", "3.bias"]), batches(), metrics, probes=3)
    pd.testing.assert_frame_equal(
        first.drop(columns="hessian_trace_probes"), second.drop(columns="hessian_trace_probes")
    )
    assert torch.equal(model[1].running_mean, running) and model.training


def test_grad_norm_from_the_shared_per_example_pass_equals_the_batched_one(monkeypatch):
    model, data = mlp(), batches()
    alone, _ = score_model(task_of(model, ["2.weight", "2.bias"]), data, ["grad_norm"])

    def no_second_pass(*args, **kwargs):
        raise AssertionError("grad_norm ran its own pass although fisher's was there to share")

    monkeypatch.setattr(importance, "grad_norm", no_second_pass)
    shared, _ = score_model(task_of(model, ["2.weight", "2.bias"]), data, ["grad_norm", "fisher"])
    np.testing.assert_allclose(shared["grad_norm"], alone["grad_norm"], rtol=1e-5)


def test_combined_is_the_weighted_mean_of_ranks_and_layers_sum_their_probes():
    model, data = mlp(), batches()
    metrics = ["weight_l1", "grad_norm", "hessian_trace", "depth", "combined"]
    table, seconds = score_model(
        task_of(model, ["2.weight", "2.bias"]),
        data,
        metrics,
        probes=5,
        combine={"grad_norm": 3, "depth": 1},
    )
    assert "combined" not in seconds
    expected = (3 * table["grad_norm_rank"] + table["depth_rank"]) / 4
    np.testing.assert_allclose(table["combined"], expected)
    assert table["hessian_trace_se"].gt(0).all()
    layers = layer_table(table, {"grad_norm": 3, "depth": 1}).set_index("layer")
    first = table[table["layer"] == "0"]
    assert layers.loc["0", "hessian_trace"] == pytest.approx(first["hessian_trace"].sum())
    draws = np.vstack(first["hessian_trace_probes"].to_numpy()).sum(axis=0)
    assert layers.loc["0", "hessian_trace_se"] == pytest.approx(draws.std(ddof=1) / np.sqrt(5))
    assert list(layers["depth"]) == [0.0, 1.0]


def test_hutchinson_in_chunks_estimates_the_same_trace():
    """The Hessian-vector products of chunks add up to the whole batch's: chunking bounds
    memory and changes nothing else."""
    model, data = mlp(), batches()
    whole = hutchinson_trace(task_of(model), data, probes=3, seed=2, chunk_size=12)
    chunked = hutchinson_trace(task_of(model), data, probes=3, seed=2, chunk_size=2)
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-7)
