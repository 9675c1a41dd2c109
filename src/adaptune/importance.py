"""Importance of each parameter tensor and each layer for the task at hand.

Metrics (``importance.metrics``), each a function of the model and the calibration batches with
the estimator and its cost in its docstring:

- ``weight_l1``, ``weight_l2``: norms of the pretrained weights;
- ``grad_norm``: norm of the task-loss gradient (the new head included, as in practice);
- ``fisher``: diagonal empirical Fisher information, from per-example gradients (torch.func);
- ``hessian_trace``: Hutchinson estimate of the trace of the loss Hessian, with standard error;
- ``depth``: a structural prior from the layer's position in the network;
- ``combined``: a weighted mean of the other metrics' ranks.

The scoring model is put in **eval mode**: dropout is off, so scores are deterministic for a
fixed seed, and BatchNorm normalises with its pretrained running statistics, which calibration
batches do not move. Scoring never changes a weight.

The gradient metrics depend on the head they are taken through. A new head, as initialised,
predicts nothing, and its gradients dwarf the pretrained body's; with ``importance.head: probe``
the head is first fitted alone on the few-shot training split
(:func:`adaptune.scoring.probe_head`, LP-FT's
linear probe), so that the body is scored through a head that has learnt the task.

The score table has one row per tensor: ``name, shape, numel, layer, layer_index, layer_kind,
module, is_head``, then for each metric ``<metric>`` (raw), ``<metric>_per_element`` (so large
tensors do not win by size alone) and ``<metric>_rank`` (percentile of the per-element score in
the model, 1 = most important); Monte Carlo metrics add ``<metric>_se`` (standard error) and
``<metric>_probes`` (the per-probe estimates).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import func, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaptune.data import batches as split_batches
from adaptune.layers import Layer, assign_layers, relative_depth
from adaptune.modalities import Batch, TaskModel

log = logging.getLogger(__name__)

Scores = dict[str, float]


@dataclass
class Calibration:
    """What the metrics measure the model on: calibration batches from the few-shot training
    split, the model's layers, and the estimators' settings. Per-example gradient moments are
    computed once and shared by ``fisher`` and ``grad_norm`` when both are asked for."""

    task: TaskModel
    batches: Sequence[Batch]
    layers: dict[str, Layer]
    probes: int = 4
    hessian_examples: int = 8
    chunk_size: int = 4
    per_example: str = "auto"
    seed: int = 0
    share_gradients: bool = False
    _moments: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def first_examples(self, count: int) -> list[Batch]:
        """The first ``count`` calibration examples, as batches."""
        taken: list[Batch] = []
        for batch in self.batches:
            left = count - sum(len(b["labels"]) for b in taken)
            if left <= 0:
                break
            taken.append(self.task.modality.sub_batch(batch, 0, left))
        return taken

    def moments(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self._moments is None:
            self._moments = gradient_moments(
                self.task, self.batches, self.chunk_size, self.per_example
            )
        return self._moments


# A metric returns one score per tensor, or, for a Monte Carlo estimator, one estimate per
# probe per tensor (the table then holds their mean and standard error).
MetricOutput = dict[str, float] | dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    """An importance metric. ``aggregate`` says how tensor scores make a layer score: ``"sum"``
    (additive: L1, Fisher, Hessian trace; per element = value / numel), ``"l2"`` (a Euclidean
    norm: root of the sum of squares; per element = value / sqrt(numel), an RMS) or ``"mean"``
    (a property of the layer, such as its depth; per element = value)."""

    name: str
    compute: Callable[[Calibration], MetricOutput]
    aggregate: str


def _loss(
    task: TaskModel, batch: Batch, params: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    return nn.functional.cross_entropy(task.logits(batch, params), batch["labels"])


def _weights(batches: Sequence[Batch]) -> list[float]:
    """Each batch's share of the calibration examples: the mean loss over their union is the
    weighted sum of the batch losses."""
    sizes = [len(b["labels"]) for b in batches]
    return [size / sum(sizes) for size in sizes]


def weight_l1(model: nn.Module) -> Scores:
    """L1 norm of the pretrained weights, sum |w|. Cost: one pass over the weights."""
    return {n: float(p.detach().abs().sum()) for n, p in model.named_parameters()}


def weight_l2(model: nn.Module) -> Scores:
    """L2 norm of the pretrained weights, ||w||_2. Cost: one pass over the weights."""
    return {n: float(torch.linalg.vector_norm(p.detach())) for n, p in model.named_parameters()}


def grad_norm(task: TaskModel, batches: Sequence[Batch]) -> Scores:
    """L2 norm of the gradient of the mean task loss over all calibration examples.

    Cost: one forward and backward pass per batch.
    """
    params = dict(task.model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for batch, weight in zip(batches, _weights(batches), strict=True):
        grads = torch.autograd.grad(_loss(task, batch), list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads, strict=True):
            if grad is not None:
                sums[name] += grad.detach().double() * weight
    return {n: float(torch.linalg.vector_norm(s)) for n, s in sums.items()}


def _math_attention() -> contextlib.AbstractContextManager:
    """Attention on PyTorch's math kernel: plain differentiable ops, which ``vmap`` batches
    and double backward differentiates on every device (the fused kernels do neither)."""
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def _sparse_embeddings(model: nn.Module) -> Iterator[None]:
    """Embedding tables give sparse gradients (the rows of the tokens seen) for the while: one
    example touches a few hundred of a vocabulary's rows, and adding the dense gradient of a
    30,000-row table per example was most of the per-example pass's time."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse]
    for module in embeddings:
        module.sparse = True
    try:
        yield
    finally:
        for module in embeddings:
            module.sparse = False


def _accumulate(total: torch.Tensor, squares: torch.Tensor, gradient: torch.Tensor) -> None:
    """Add a gradient and its elementwise square (only its rows, when it is sparse)."""
    if gradient.is_sparse:
        gradient = gradient.coalesce()
        rows, values = gradient.indices()[0], gradient.values()
        total.index_add_(0, rows, values.to(total.dtype))
        squares.index_add_(0, rows, values.to(total.dtype) ** 2)
    else:
        total += gradient
        squares += gradient * gradient


def gradient_moments(
    task: TaskModel, batches: Sequence[Batch], chunk_size: int = 8, method: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean and mean square, over the calibration examples, of the per-example loss gradient,
    elementwise. The mean is the gradient of the mean loss; the mean square is the diagonal of
    the empirical Fisher information. Sums are kept in float32 (for n examples their relative
    error is about n times float32's, 1e-7: far below what ranks tensors).

    ``method="vmap"`` computes the gradients of ``chunk_size`` examples at once with
    ``torch.func`` (``vmap(grad(loss))``), so at most one chunk of per-example gradients is held;
    ``"loop"`` backpropagates one example at a time (any model, one example's gradients held,
    embedding tables' gradients sparse); ``"auto"`` uses vmap on accelerators and the loop on
    the CPU, where it measured faster (MiniLM, 2 threads, 32 examples: loop 2.5 s, vmap in
    chunks of 2 to 8: 7.2 to 10.0 s), and falls back to the loop where vmap cannot run the
    model (data-dependent control flow). The modality cuts the batches into chunks that can be
    computed per example (text: grouped by length, without padding).
    """
    model = task.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0

    def example_loss(params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        return _loss(task, {k: v.unsqueeze(0) for k, v in example.items()}, params)

    per_example = func.vmap(func.grad(example_loss), in_dims=(None, 0))
    device = next(model.parameters()).device
    use_vmap = method == "vmap" or (method == "auto" and device.type != "cpu")
    with _math_attention():
        chunks = (c for b in batches for c in task.modality.example_chunks(b, chunk_size))
        for chunk in chunks:
            grads = None
            if use_vmap:
                try:
                    grads = per_example(params, chunk)
                except RuntimeError as err:
                    if method == "vmap":
                        raise
                    log.info(
                        "per-example gradients by a loop: vmap is not supported here (%s)", err
                    )
                    use_vmap = False
            if grads is not None:
                for name, g in grads.items():
                    sums[name] += g.sum(0)
                    squares[name] += (g * g).sum(0)
            else:
                with _sparse_embeddings(model):
                    for i in range(len(chunk["labels"])):
                        example = {k: v[i : i + 1] for k, v in chunk.items()}
                        one = torch.autograd.grad(
                            _loss(task, example), list(model.parameters()), allow_unused=True
                        )
                        for name, g in zip(params, one, strict=True):
                            if g is not None:
                                _accumulate(sums[name], squares[name], g)
            count += len(chunk["labels"])
    return (
        {n: s / count for n, s in sums.items()},
        {n: s / count for n, s in squares.items()},
    )


def fisher_diagonal(task: TaskModel, batches: Sequence[Batch], chunk_size: int = 8) -> Scores:
    """Diagonal empirical Fisher information summed over each tensor: sum over its elements of
    the mean squared per-example gradient (Kirkpatrick et al. 2017, EWC). Cost: one backward per
    example (see :func:`gradient_moments`)."""
    squares = gradient_moments(task, batches, chunk_size)[1]
    return {n: float(f.double().sum()) for n, f in squares.items()}


def hutchinson_trace(
    task: TaskModel, batches: Sequence[Batch], probes: int = 8, seed: int = 0, chunk_size: int = 8
) -> dict[str, np.ndarray]:
    """Hutchinson estimates of the trace of the loss Hessian's diagonal block of each tensor:
    tr(H_tt) = E[v_t . (H v)_t] for Rademacher v (Hutchinson 1989; Yao et al. 2020, PyHessian).
    Returns one estimate per probe and tensor; their mean is unbiased and their standard
    deviation / sqrt(probes) is its standard error.

    H v is a Hessian-vector product by double backward, of the mean loss over all examples of
    ``batches``, taken ``chunk_size`` examples at a time (HVPs add up over examples), which
    bounds memory: the double-backward graph of 16 MiniLM examples of 128 tokens held 3.7 GB,
    of 4 examples 2.6 GB, in 6% more time. The gradient graph of each chunk is built once and
    reused by every probe, and each probe's v is drawn again from its own seed for each chunk
    rather than stored. Cost: per chunk, one backward with ``create_graph`` plus one double
    backward per probe.
    """
    names, params = zip(*task.model.named_parameters(), strict=True)
    estimates = np.zeros((len(params), probes))
    total = sum(len(b["labels"]) for b in batches)
    with _math_attention():
        for batch in batches:
            for start in range(0, len(batch["labels"]), chunk_size):
                chunk = task.modality.sub_batch(batch, start, start + chunk_size)
                loss = _loss(task, chunk) * (len(chunk["labels"]) / total)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for probe in range(probes):
                    generator = torch.Generator().manual_seed(seed * 100_003 + probe)
                    vectors = [
                        (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p)
                        for p in params
                    ]
                    hv = torch.autograd.grad(
                        [grads[i] for i in used],
                        params,
                        grad_outputs=[vectors[i] for i in used],
                        retain_graph=probe < probes - 1,
                        allow_unused=True,
                    )
                    for i, (v, h) in enumerate(zip(vectors, hv, strict=True)):
                        if h is not None:
                            estimates[i, probe] += float((v * h).sum())
    return dict(zip(names, estimates, strict=True))


def _grad_norm(cal: Calibration) -> Scores:
    if not cal.share_gradients:
        return grad_norm(cal.task, cal.batches)
    mean, _ = cal.moments()
    return {n: float(torch.linalg.vector_norm(g.double())) for n, g in mean.items()}


def _fisher(cal: Calibration) -> Scores:
    _, squares = cal.moments()
    return {n: float(f.double().sum()) for n, f in squares.items()}


def depth_prior(layers: dict[str, Layer]) -> Scores:
    """Structural prior: the relative depth of each tensor's layer, 0 for the input layer
    (embeddings, stem) to 1 for the head. Encodes the common finding that lower layers hold
    general features and upper layers task-specific ones (Yosinski et al. 2014; Howard & Ruder
    2018). Cost: none."""
    return relative_depth(layers)


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("weight_l1", lambda cal: weight_l1(cal.task.model), "sum"),
        Metric("weight_l2", lambda cal: weight_l2(cal.task.model), "l2"),
        Metric("grad_norm", _grad_norm, "l2"),
        Metric("fisher", _fisher, "sum"),
        Metric(
            "hessian_trace",
            lambda cal: hutchinson_trace(
                cal.task,
                cal.first_examples(cal.hessian_examples),
                cal.probes,
                cal.seed,
                cal.chunk_size,
            ),
            "sum",
        ),
        Metric("depth", lambda cal: depth_prior(cal.layers), "mean"),
    )
}
COMBINED = "combined"


def _per_element(values: pd.Series, numel: pd.Series, aggregate: str) -> pd.Series:
    if aggregate == "sum":
        return values / numel
    if aggregate == "l2":
        return values / np.sqrt(numel)
    return values


def _rank(values: pd.Series) -> pd.Series:
    """Percentile rank in (0, 1], 1 = largest; ties share their average rank."""
    return values.rank(method="average", pct=True)


def _add_metric_columns(table: pd.DataFrame, name: str, values: pd.Series, aggregate: str) -> None:
    table[name] = values.astype("float64").to_numpy()
    table[f"{name}_per_element"] = _per_element(table[name], table["numel"], aggregate)
    table[f"{name}_rank"] = _rank(table[f"{name}_per_element"])


def _add_combined(table: pd.DataFrame, weights: dict[str, float]) -> None:
    """Weighted mean of the metrics' ranks (1 = most important), ranked again."""
    total = sum(weights.values())
    table[COMBINED] = sum(w * table[f"{m}_rank"] for m, w in weights.items()) / total
    table[f"{COMBINED}_per_element"] = table[COMBINED]
    table[f"{COMBINED}_rank"] = _rank(table[COMBINED])


def combination_weights(metrics: Sequence[str], weights: dict[str, float]) -> dict[str, float]:
    """The weights of ``combined``: those configured, else 1 for every other chosen metric."""
    chosen = [m for m in metrics if m != COMBINED]
    if weights:
        return {m: float(w) for m, w in weights.items() if w}
    return dict.fromkeys(chosen, 1.0)


def tensor_table(task: TaskModel, layers: dict[str, Layer] | None = None) -> pd.DataFrame:
    """One row per parameter tensor of ``task.model``, in its order: the columns of the score
    table that come before the metrics (see the module docstring)."""
    layers = layers or assign_layers(task.model, task.head)
    head = set(task.head)
    return pd.DataFrame(
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
            for name, p in task.model.named_parameters()
        ]
    )


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off, BatchNorm statistics frozen) with every parameter differentiable;
    the model's train/eval mode and ``requires_grad`` flags are restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(True)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)


def score_model(
    task: TaskModel,
    batches: Sequence[Batch],
    metrics: Sequence[str],
    probes: int = 4,
    hessian_examples: int = 8,
    chunk_size: int = 4,
    per_example: str = "auto",
    seed: int = 0,
    combine: dict[str, float] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Score every parameter tensor of ``task.model`` with each metric (see the module
    docstring).

    Returns the score table and the seconds each metric took. The model's weights, its
    ``requires_grad`` flags and its train/eval mode are as they were afterwards.
    """
    model = task.model
    layers = assign_layers(model, task.head)
    table = tensor_table(task, layers)
    calibration = Calibration(
        task,
        batches,
        layers,
        probes,
        hessian_examples,
        chunk_size,
        per_example,
        seed,
        share_gradients="fisher" in metrics and "grad_norm" in metrics,
    )
    seconds: dict[str, float] = {}
    with scoring_mode(model):
        for name in metrics:
            if name == COMBINED:
                continue
            metric = METRICS[name]
            start = time.perf_counter()
            output = metric.compute(calibration)
            seconds[name] = time.perf_counter() - start
            samples = table["name"].map(output)
            if isinstance(next(iter(output.values())), np.ndarray):
                table[f"{name}_probes"] = samples
                draws = np.vstack(samples.to_numpy())
                table[f"{name}_se"] = draws.std(axis=1, ddof=1) / np.sqrt(draws.shape[1])
                samples = pd.Series(draws.mean(axis=1))
            _add_metric_columns(table, name, samples, metric.aggregate)
            log.info("%s: %.2f s", name, seconds[name])
    if COMBINED in metrics:
        _add_combined(table, combination_weights(metrics, combine or {}))
    return table, seconds


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The metrics present in a score table, in registry order, ``combined`` last."""
    return [name for name in [*METRICS, COMBINED] if name in table.columns]


def layer_table(table: pd.DataFrame, combine: dict[str, float] | None = None) -> pd.DataFrame:
    """Per-layer scores: each metric aggregated over the layer's tensors (see :class:`Metric`),
    per element, and ranked across layers; Monte Carlo metrics with the standard error of the
    layer's estimate (from the per-probe sums over its tensors)."""
    keys = ["layer_index", "layer", "layer_kind", "module"]
    grouped = table.groupby(keys, sort=True, dropna=False)
    layers = grouped.agg(tensors=("name", "size"), numel=("numel", "sum")).reset_index()
    metrics = metric_columns(table)
    for name in metrics:
        if name == COMBINED:
            continue
        aggregate = METRICS[name].aggregate
        if f"{name}_probes" in table.columns:
            draws = [
                np.vstack(group.to_numpy()).sum(axis=0) for _, group in grouped[f"{name}_probes"]
            ]
            values = pd.Series([d.mean() for d in draws])
            layers[f"{name}_se"] = [d.std(ddof=1) / np.sqrt(len(d)) for d in draws]
        elif aggregate == "sum":
            values = grouped[name].sum().reset_index(drop=True)
        elif aggregate == "l2":
            values = (
                grouped[name].apply(lambda v: math.sqrt(float((v**2).sum()))).reset_index(drop=True)
            )
        else:
            values = grouped[name].mean().reset_index(drop=True)
        _add_metric_columns(layers, name, values, aggregate)
    if COMBINED in metrics:
        _add_combined(layers, combination_weights(metrics, combine or {}))
    return layers


def metric_agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation between the metrics' per-element scores over the rows of a
    score table (tensors or layers): how far the metrics agree on what matters."""
    metrics = [m for m in metric_columns(table) if table[f"{m}_per_element"].nunique() > 1]
    values = table[[f"{m}_per_element" for m in metrics]].set_axis(metrics, axis=1)
    return values.corr(method="spearman")


def calibration_batches(
    frame: pd.DataFrame, count: int, batch_size: int, data_info: Mapping[str, Any], seed: int
) -> list[Batch]:
    """``count`` batches of ``batch_size`` examples from a (few-shot) training split: a seeded
    permutation of its examples, cycled when the split is smaller than the batches asked for."""
    order = np.random.default_rng(seed).permutation(len(frame))
    chosen = np.resize(order, count * batch_size)
    return list(split_batches(frame.iloc[chosen], batch_size, data_info))
