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

**Memory** grows with the model as a step of full fine-tuning does, at most 2x its peak. With P
the bytes of the model's parameters (one "model-sized buffer"), an AdamW step in fp32 holds the
weights, their gradients and two moments (4P) and one batch's activations. Beyond the weights,
scoring holds at most ``MODEL_BUFFERS`` = 4 model-sized buffers (sums in float32: twice that
for a 16-bit model) and the activations of one chunk of examples (at most a batch):

- ``grad_norm``: one sum (P) and one batch's activations;
- ``fisher`` (and ``grad_norm`` from the same pass): two sums (2P) and, by the loop, one
  example's activations, or, by ``vmap``, the gradients of ``VMAP_EXAMPLES`` = 2 examples at
  most (2P) and their activations;
- ``hessian_trace``: the gradient of ``chunk_size`` examples and its double-backward graph (P
  and a few times those examples' activations) and one probe's Rademacher vector (P).

Gradients that backward produces one tensor at a time (the loop, ``grad_norm``, the
Hessian-vector products) are consumed as they come and freed (:func:`each_gradient`): only one
tensor's is held, never the model's. The per-example moments are reduced to their per-tensor
scores as soon as they are computed, so they are not held while another metric runs; no sum is
kept in float64 (float32 sums of 32 examples err by about 1e-7, relative).

The score table has one row per tensor: ``name, shape, numel, layer, layer_index, layer_kind,
module, category, is_head`` (``category``: :func:`adaptune.layers.tensor_categories`), then for
each metric ``<metric>`` (raw), ``<metric>_per_element`` (so large tensors do not win by size
alone) and ``<metric>_rank`` (percentile of the per-element score in the model, 1 = most
important); Monte Carlo metrics add ``<metric>_se`` (standard error) and
``<metric>_probes`` (the per-probe estimates).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import func, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaptune.layers import Layer, assign_layers, relative_depth, tensor_categories
from adaptune.modalities import Batch, Modality, TaskModel

log = logging.getLogger(__name__)

Scores = dict[str, float]

# Model-sized buffers that scoring may hold beyond the weights (see the module docstring): what
# a step of AdamW holds beyond them (gradients, two moments), and one more.
MODEL_BUFFERS = 4
# Examples whose gradients vmap computes at once: each holds a gradient of every tensor (P), next
# to the two sums of the moments (2P), within MODEL_BUFFERS whatever the model's size.
VMAP_EXAMPLES = MODEL_BUFFERS - 2


@dataclass
class Calibration:
    """What the metrics measure the model on: calibration batches from the few-shot training
    split, the model's layers, and the estimators' settings. Per-example gradient moments are
    computed once and shared by ``fisher`` and ``grad_norm`` when both are asked for: reduced at
    once to both metrics' scores, so that no model-sized buffer outlives its metric."""

    task: TaskModel
    batches: Sequence[Batch]
    layers: dict[str, Layer]
    probes: int = 4
    hessian_examples: int = 8
    chunk_size: int = 4
    per_example: str = "auto"
    seed: int = 0
    share_gradients: bool = False
    _gradient_scores: tuple[Scores, Scores] | None = None

    def first_examples(self, count: int) -> list[Batch]:
        """The first ``count`` calibration examples, as batches."""
        taken: list[Batch] = []
        for batch in self.batches:
            left = count - sum(len(b["labels"]) for b in taken)
            if left <= 0:
                break
            taken.append(self.task.modality.sub_batch(batch, 0, left))
        return taken

    def gradient_scores(self) -> tuple[Scores, Scores]:
        """``grad_norm`` and ``fisher`` of every tensor from one per-example pass: the norm of
        the mean gradient and the sum of the mean squared gradient."""
        if self._gradient_scores is None:
            mean, squares = gradient_moments(
                self.task, self.batches, self.chunk_size, self.per_example
            )
            norms = {n: float(torch.linalg.vector_norm(mean.pop(n).double())) for n in list(mean)}
            fisher = {n: float(squares.pop(n).double().sum()) for n in list(squares)}
            self._gradient_scores = norms, fisher
        return self._gradient_scores


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


def mean_gradient(
    task: TaskModel, batches: Sequence[Batch], at_least: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """The gradient of the mean task loss over all calibration examples, elementwise, for every
    parameter of ``task.model``, summed in the parameter's dtype or ``at_least`` where wider
    (float64 by default; :func:`grad_norm` sums in float32). Cost: one forward and backward pass
    per batch. Memory: the sums (one model-sized buffer in float32), to which each tensor's
    gradient is added as backward produces it (:func:`each_gradient`), and one batch's
    activations."""
    params = dict(task.model.named_parameters())
    sums = _sums(params, at_least)
    for batch, weight in zip(batches, _weights(batches), strict=True):

        def add(name: str, grad: torch.Tensor, weight: float = weight) -> None:
            sums[name].add_(grad, alpha=weight)

        with each_gradient(params, add):
            torch.autograd.backward(_loss(task, batch), inputs=list(params.values()))
    return sums


def grad_norm(task: TaskModel, batches: Sequence[Batch]) -> Scores:
    """L2 norm of the gradient of the mean task loss over all calibration examples.

    Cost: one forward and backward pass per batch. Memory: one model-sized sum in float32
    (:func:`mean_gradient`) and one batch's activations.
    """
    sums = mean_gradient(task, batches, torch.float32)
    return {n: float(torch.linalg.vector_norm(sums.pop(n).double())) for n in list(sums)}


def _sums(
    params: Mapping[str, torch.Tensor], at_least: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A zero sum like each parameter, in its dtype or ``at_least`` where wider: in float32,
    one model-sized buffer (float32 models; twice their size for 16-bit ones, whose own
    precision would not do for sums)."""
    return {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, at_least))
        for n, p in params.items()
    }


@contextlib.contextmanager
def each_gradient(
    params: Mapping[str, torch.Tensor], consume: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """While active, backward hands each parameter's gradient to ``consume(name, gradient)`` as
    soon as it is complete, then frees it: a model's gradients are never held all at once, only
    the tensors' that backward is computing. Gradients the parameters held before are put back
    afterwards."""
    held = {name: p.grad for name, p in params.items()}

    def hook(param: torch.Tensor, name: str) -> None:
        consume(name, param.grad)
        param.grad = None

    handles = []
    for name, param in params.items():
        param.grad = None
        handles.append(param.register_post_accumulate_grad_hook(lambda p, name=name: hook(p, name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, param in params.items():
            param.grad = held[name]


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

    ``method="vmap"`` computes the gradients of up to ``min(chunk_size, VMAP_EXAMPLES)``
    examples at once with ``torch.func`` (``vmap(grad(loss))``); ``"loop"`` backpropagates one
    example at a time (any model; embedding tables' gradients sparse); ``"auto"`` uses vmap on
    accelerators and the loop on the CPU, where it measured faster (MiniLM, 2 threads, 32
    examples: loop 2.5 s, vmap in chunks of 2 to 8: 7.2 to 10.0 s), and falls back to the loop
    where vmap cannot run the model (data-dependent control flow). The modality cuts the
    batches into chunks that can be computed per example (text: grouped by length, without
    padding).

    Memory, beyond the weights: the two sums (2P, P the parameters' bytes) and one chunk's
    activations; vmap's chunk holds a gradient of every tensor per example, hence at most
    ``VMAP_EXAMPLES`` of them (2P), each tensor's freed once added; the loop adds each tensor's
    gradient as backward produces it (:func:`each_gradient`), so it holds one tensor's at most.
    """
    model = task.model
    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    sums, squares = _sums(named), _sums(named)
    count = 0

    def example_loss(params: dict[str, torch.Tensor], example: Batch) -> torch.Tensor:
        return _loss(task, {k: v.unsqueeze(0) for k, v in example.items()}, params)

    def add(name: str, gradient: torch.Tensor) -> None:
        _accumulate(sums[name], squares[name], gradient)

    per_example = func.vmap(func.grad(example_loss), in_dims=(None, 0))
    device = next(model.parameters()).device
    use_vmap = method == "vmap" or (method == "auto" and device.type != "cpu")
    size = min(chunk_size, VMAP_EXAMPLES) if use_vmap else chunk_size
    with _math_attention():
        chunks = (c for b in batches for c in task.modality.example_chunks(b, size))
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
                for name in list(grads):  # each tensor's freed once added: no copy of it
                    g = grads.pop(name)
                    sums[name] += g.sum(0)
                    for row in g:
                        squares[name].addcmul_(row, row)
                    del g
            else:
                with _sparse_embeddings(model), each_gradient(named, add):
                    for i in range(len(chunk["labels"])):
                        example = {k: v[i : i + 1] for k, v in chunk.items()}
                        torch.autograd.backward(_loss(task, example), inputs=list(named.values()))
            count += len(chunk["labels"])
    for total in (*sums.values(), *squares.values()):
        total.div_(count)
    return sums, squares


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

    Memory, beyond the weights: the chunk's gradient with its graph (P, P the parameters'
    bytes, and a few times the chunk's activations), one probe's v (P, drawn tensor by tensor
    as floats, without an integer copy), and one tensor's part of H v at a time: each is reduced
    to v_t . (H v)_t as the double backward produces it (:func:`each_gradient`).
    """
    named = dict(task.model.named_parameters())
    names, params = list(named), list(named.values())
    estimates = np.zeros((len(params), probes))
    total = sum(len(b["labels"]) for b in batches)
    with _math_attention():
        for batch in batches:
            for start in range(0, len(batch["labels"]), chunk_size):
                chunk = task.modality.sub_batch(batch, start, start + chunk_size)
                loss = _loss(task, chunk) * (len(chunk["labels"]) / total)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                del loss
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for probe in range(probes):
                    vectors = _rademacher(params, seed * 100_003 + probe)
                    last = probe == probes - 1
                    for i, value in _hessian_products(named, grads, used, vectors, last).items():
                        estimates[i, probe] += value
                    del vectors  # before the next probe's are drawn
                del grads
    return dict(zip(names, estimates, strict=True))


def _hessian_products(
    named: Mapping[str, torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    used: Sequence[int],
    vectors: Sequence[torch.Tensor],
    last: bool,
) -> dict[int, float]:
    """v_t . (H v)_t for each tensor t that H v reaches: one double backward through the
    gradients ``grads[used]`` (their graph freed when ``last``), each tensor's part of H v
    reduced as soon as it is complete."""
    index = {name: i for i, name in enumerate(named)}
    products: dict[int, float] = {}

    def dot(name: str, hv: torch.Tensor) -> None:
        products[index[name]] = float((vectors[index[name]] * hv).sum())

    with each_gradient(named, dot):
        torch.autograd.backward(
            [grads[i] for i in used],
            grad_tensors=[vectors[i] for i in used],
            retain_graph=not last,
            inputs=list(named.values()),
        )
    return products


def _rademacher(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A Rademacher vector (entries +-1, equally likely) like ``params``, from ``seed``: drawn
    on the CPU, in float32 (the same draws as integers would be), so that no integer copy of
    the model is made."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1).to(p)
        for p in params
    ]


def _grad_norm(cal: Calibration) -> Scores:
    if not cal.share_gradients:
        return grad_norm(cal.task, cal.batches)
    return cal.gradient_scores()[0]


def _fisher(cal: Calibration) -> Scores:
    return cal.gradient_scores()[1]


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
    categories = tensor_categories(task.model)
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
                "category": categories[name],
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
    modality: Modality, frame: pd.DataFrame, count: int, batch_size: int, seed: int
) -> list[Batch]:
    """``count`` batches of ``batch_size`` examples from a (few-shot) training split: a seeded
    permutation of its examples, cycled when the split is smaller than the batches asked for."""
    order = np.random.default_rng(seed).permutation(len(frame))
    chosen = np.resize(order, count * batch_size)
    return list(modality.batches(frame.iloc[chosen], batch_size))
