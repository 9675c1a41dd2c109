"""Importance of each parameter tensor and each layer for the task at hand.

Each metric is a function ``(model, batches) -> {tensor name: score}`` registered in
:data:`METRICS` with how it aggregates over a layer. The scoring model is put in **eval mode**:
dropout is off (scores are deterministic for a fixed seed) and BatchNorm uses its pretrained
running statistics (calibration batches do not move them). Weights are never changed.

The score table has one row per tensor: ``name, shape, numel, layer, layer_index, layer_kind,
module, is_head``, then for each metric ``<metric>`` (raw), ``<metric>_per_element`` (so large
tensors do not win by size alone) and ``<metric>_rank`` (percentile of the per-element score in
the model, 1 = most important).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from adaptune.layers import assign_layers
from adaptune.models import forward
from adaptune.settings import ImportanceSettings

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Scores = dict[str, float]


@dataclass(frozen=True)
class Metric:
    """An importance metric. ``aggregate`` says how tensor scores add up to a layer score:
    ``"sum"`` (additive: L1, Fisher, Hessian trace; per element = value / numel) or ``"l2"``
    (a Euclidean norm: root of the sum of squares; per element = value / sqrt(numel), an RMS)."""

    name: str
    compute: Callable[[nn.Module, Sequence[Batch]], Scores]
    aggregate: str


def _loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return nn.functional.cross_entropy(forward(model, batch), batch["labels"])


def weight_l1(model: nn.Module, batches: Sequence[Batch]) -> Scores:
    """L1 norm of the pretrained weights, sum |w|. Cost: one pass over the weights."""
    return {n: float(p.detach().abs().sum()) for n, p in model.named_parameters()}


def weight_l2(model: nn.Module, batches: Sequence[Batch]) -> Scores:
    """L2 norm of the pretrained weights, ||w||_2. Cost: one pass over the weights."""
    return {n: float(torch.linalg.vector_norm(p.detach())) for n, p in model.named_parameters()}


def grad_norm(model: nn.Module, batches: Sequence[Batch]) -> Scores:
    """L2 norm of the gradient of the mean task loss over all calibration examples.

    Batches are weighted by their size, so the result is the gradient of the loss over the
    union of the batches. Cost: one forward and backward pass per batch.
    """
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for batch in batches:
        size = len(batch["labels"])
        grads = torch.autograd.grad(_loss(model, batch), list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                sums[name] += grad.detach().double() * size
        total += size
    return {n: float(torch.linalg.vector_norm(s / total)) for n, s in sums.items()}


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("weight_l1", weight_l1, "sum"),
        Metric("weight_l2", weight_l2, "l2"),
        Metric("grad_norm", grad_norm, "l2"),
    )
}


def _per_element(values: pd.Series, numel: pd.Series, aggregate: str) -> pd.Series:
    return values / (numel if aggregate == "sum" else np.sqrt(numel))


def _rank(values: pd.Series) -> pd.Series:
    """Percentile rank in (0, 1], 1 = largest; ties share their average rank."""
    return values.rank(method="average", pct=True)


def score_model(
    model: nn.Module,
    head: Sequence[str],
    batches: Sequence[Batch],
    metrics: Sequence[str],
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Score every parameter tensor of ``model`` with each metric.

    Returns the score table and the seconds each metric took. The model's weights, its
    ``requires_grad`` flags and its train/eval mode are as they were afterwards.
    """
    layers = assign_layers(model, head)
    head = set(head)
    table = pd.DataFrame(
        [
            {
                "name": name,
                "shape": "x".join(map(str, p.shape)) or "scalar",
                "numel": p.numel(),
                "layer": layers[name].name,
                "layer_index": layers[name].index,
                "layer_kind": layers[name].kind,
                "module": layers[name].module,
                "is_head": name in head,
            }
            for name, p in model.named_parameters()
        ]
    )
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seconds: dict[str, float] = {}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        for name in metrics:
            metric = METRICS[name]
            start = time.perf_counter()
            scores = metric.compute(model, batches)
            seconds[name] = time.perf_counter() - start
            table[name] = table["name"].map(scores).astype("float64")
            table[f"{name}_per_element"] = _per_element(
                table[name], table["numel"], metric.aggregate
            )
            table[f"{name}_rank"] = _rank(table[f"{name}_per_element"])
            log.info("%s: %.2f s", name, seconds[name])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return table, seconds


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The metrics present in a score table, in registry order."""
    return [name for name in METRICS if name in table.columns]


def layer_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer scores: each metric aggregated over the layer's tensors (see :class:`Metric`),
    per element, and ranked across layers."""
    keys = ["layer_index", "layer", "layer_kind", "module"]
    grouped = table.groupby(keys, sort=True, dropna=False)
    layers = grouped.agg(tensors=("name", "size"), numel=("numel", "sum")).reset_index()
    for name in metric_columns(table):
        aggregate = METRICS[name].aggregate
        if aggregate == "sum":
            values = grouped[name].sum()
        else:
            values = grouped[name].apply(lambda v: math.sqrt(float((v**2).sum())))
        layers[name] = values.to_numpy()
        layers[f"{name}_per_element"] = _per_element(layers[name], layers["numel"], aggregate)
        layers[f"{name}_rank"] = _rank(layers[f"{name}_per_element"])
    return layers


def plot_heatmap(layers: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """Metric x layer heatmap of per-element scores relative to each metric's largest layer.

    The colour scale is logarithmic (1 down to 1e-3 and below): the new head's gradient is often
    orders of magnitude above the body's, and a linear scale would hide the body's ordering.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    metrics = metric_columns(layers)
    relative = np.vstack(
        [
            layers[f"{m}_per_element"].to_numpy() / max(layers[f"{m}_per_element"].max(), 1e-300)
            for m in metrics
        ]
    )
    floor = 1e-3
    width = max(6.0, 0.6 * len(layers) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 0.55 * len(metrics) + 2.2))
    image = ax.imshow(
        np.clip(relative, floor, 1), aspect="auto", cmap="viridis", norm=LogNorm(floor, 1)
    )
    ax.set_xticks(range(len(layers)), layers["layer"], rotation=45, ha="right")
    ax.set_yticks(range(len(metrics)), metrics)
    if len(layers) <= 30:
        for (row, col), value in np.ndenumerate(relative):
            text = f"{value:.2f}" if value >= 0.01 else f"{value:.0e}"
            color = "white" if value < 0.1 else "black"
            ax.text(col, row, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("layer (forward order)")
    ax.set_title(title or "Per-element importance by layer")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="relative to the metric's top layer")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def calibration_batches(
    frame: pd.DataFrame, count: int, batch_size: int, pad_token_id: int, seed: int
) -> list[Batch]:
    """``count`` batches of ``batch_size`` examples from a (few-shot) training split: a seeded
    permutation of its examples, cycled when the split is smaller than the batches asked for."""
    from adaptune.data import iterate_batches

    order = np.random.default_rng(seed).permutation(len(frame))
    chosen = np.resize(order, count * batch_size)
    return list(iterate_batches(frame.iloc[chosen], batch_size, pad_token_id))


def run_score_importance(
    train_path: str,
    data_info_path: str,
    model_name: str,
    settings: ImportanceSettings,
    scores_path: str,
    layers_path: str,
    heatmap_path: str,
) -> pd.DataFrame:
    """The ``score_importance`` stage: score the pretrained model (with its new head, initialised
    from ``settings.seed``) on calibration batches of the few-shot training split."""
    from adaptune.data import read_data_info, read_split
    from adaptune.models import load_model

    info = read_data_info(data_info_path)
    train = read_split(train_path)
    task = load_model(model_name, info["labels"], settings.seed)
    batches = calibration_batches(
        train, settings.batches, settings.batch_size, info["pad_token_id"], settings.seed
    )
    table, seconds = score_model(task.model, task.head, batches, settings.metrics)
    table.to_parquet(scores_path, index=False)
    layers = layer_table(table)
    layers.to_parquet(layers_path, index=False)
    plot_heatmap(layers, heatmap_path, f"{model_name}: per-element importance by layer")
    log.info("seconds per metric: %s", {k: round(v, 2) for k, v in seconds.items()})
    return table
