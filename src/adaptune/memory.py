"""Memory: what a run will need, what it holds, and the levers that lower it.

- :func:`profile_activations` and :func:`plan_memory`: the estimate each freeze plan states
  (weights, gradients, fp32 masters and optimizer state of what trains, activations at the
  batch size), so a user can plan a run before it starts.
- :func:`peak_bytes`: the peak a run reached, as the device counts it (CUDA's allocator on a
  GPU, the process's resident peak on the CPU, which includes the interpreter and libraries).
- :func:`checkpointed_blocks`: gradient checkpointing of every block of any model (the blocks
  come from :mod:`adaptune.layers`), non-reentrant, so that a frozen input layer (embeddings)
  still passes gradients to the blocks above it.
- :class:`OutOfMemory`: what a run that ran out of memory says, naming the levers.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adaptune.errors import AdaptuneError
from adaptune.layers import assign_layers, find_blocks
from adaptune.modalities import Batch, TaskModel
from adaptune.optim import OPTIMIZERS
from adaptune.plans import TensorPlan
from adaptune.settings import TrainSettings


def reset_peak(device: torch.device) -> None:
    """Start counting the peak afresh (on CUDA; a process's resident peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """The peak memory so far and what it counts: ``cuda_allocated`` (tensors on the GPU,
    since :func:`reset_peak`) or ``process_rss`` (the whole process's resident peak)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_rss"


def _checkpointed(block: nn.Module, forward: object, *args: object, **kwargs: object) -> object:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # type: ignore[operator]
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def checkpointed_blocks(
    model: nn.Module, head: Iterable[str], enabled: bool = True
) -> Iterator[list[str]]:
    """While inside, every block of ``model`` (:func:`adaptune.layers.find_blocks`) keeps
    only its inputs in the forward pass and recomputes its activations in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, dropout replayed with the same random state).
    The blocks' own ``forward`` is wrapped in place, so parameter names, hooks and the
    frozen-prefix cache are untouched; on leaving, it is restored. Yields the blocks' paths."""
    blocks = find_blocks(model, head) if enabled else []
    wrapped = []
    try:
        for path in blocks:
            block = model.get_submodule(path)
            block.forward = functools.partial(_checkpointed, block, block.forward)
            wrapped.append(block)
        yield blocks
    finally:
        for block in wrapped:
            del block.forward  # the class's forward again


class OutOfMemory(AdaptuneError, MemoryError):
    """A run ran out of memory; the message names what to lower."""


def out_of_memory(device: torch.device, batch_size: int, detail: str) -> OutOfMemory:
    """The error for a run that ran out of memory on ``device``, with the levers to pull."""
    where = "the GPU" if device.type == "cuda" else "this machine"
    return OutOfMemory(
        f"out of memory on {where} ({detail}). Lower what a step holds: train.accumulate_steps "
        f"(the same updates in smaller micro-batches; now {batch_size} examples per step), "
        "train.gradient_checkpointing: true (recompute activations), "
        "train.weight_precision: bf16 (half the weights' memory), a strategy that trains less "
        "(optimizer state and gradients only for what trains), or data.max_length / "
        "model.image_size"
    )


# --- what a plan's run will need ------------------------------------------------------------

WEIGHT_BYTES = {"fp32": 4, "bf16": 2}


def profile_activations(task: TaskModel, batch: Batch) -> pd.DataFrame:
    """What one example costs in activations, per layer: the bytes of the tensors autograd
    saves for the backward pass while the layer's modules run (``activation_bytes``; each
    storage counted once, the weights themselves not), and for a block the bytes of its input
    (``input_bytes``: what gradient checkpointing keeps of it). Measured on ``batch`` with
    every weight trainable, in training mode, then divided by its examples; the weights are not
    changed and the graph is dropped without a backward pass."""
    model = task.model
    layers = assign_layers(model, task.head)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # A module belongs to a layer when all the weights under it do (a block, its attention);
    # one that spans several (the encoder) or has none (an activation) to the one it runs in.
    owner = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        spanned = {layers[prefix + p].index for p, _ in module.named_parameters()}
        if len(spanned) == 1:
            owner[name] = spanned.pop()
    blocks = {layer.module: layer.index for layer in layers.values() if layer.kind == "block"}
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}
    seen: set[int] = set()
    stack = [min(layer.index for layer in layers.values())]

    def enter(name: str) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stack.append(owner.get(name, stack[-1]))
            if name in blocks:
                first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
                if first is not None:
                    inputs[blocks[name]] = first.numel() * first.element_size()

        return pre_hook

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in weights and pointer not in seen:
            seen.add(pointer)
            saved[stack[-1]] = saved.get(stack[-1], 0) + storage.nbytes()
        return tensor

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(leave))
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train()
        for param, _ in flags:
            param.requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            task.logits(batch)
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
    count = len(batch["labels"])
    indices = sorted({layer.index for layer in layers.values()})
    return pd.DataFrame(
        {
            "layer_index": indices,
            "activation_bytes": [saved.get(i, 0) / count for i in indices],
            "input_bytes": [inputs.get(i, 0) / count for i in indices],
        }
    )


def plan_memory(
    tensors: Sequence[TensorPlan],
    settings: TrainSettings,
    layers: pd.DataFrame | None = None,
    at_once: Sequence[TensorPlan] | None = None,
) -> dict[str, Any]:
    """What a run of a plan (its ``tensors``) needs under ``settings``, in bytes: every weight
    at ``train.weight_precision``; for the tensors that train at once (``at_once``: every
    trainable one unless a strategy trains a few at a time) their gradients, fp32 masters
    (bf16 weights) and optimizer state (:class:`adaptune.optim.OptimizerInfo`); and, where
    ``layers`` has the measured activations per example (:func:`profile_activations`), the
    activations of one micro-batch from the lowest layer that trains up (below it nothing
    needs a gradient), or with gradient checkpointing the blocks' inputs and the largest
    block's activations. Not counted: the framework's own memory, temporary buffers, LoRA's
    adapters."""
    element = WEIGHT_BYTES[settings.weight_precision]
    training = [t for t in (tensors if at_once is None else at_once) if not t.frozen]
    trained = sum(t.numel for t in training)
    info = OPTIMIZERS[settings.optimizer]
    estimate = {
        "weights": element * sum(t.numel for t in tensors),
        "master_weights": 4 * trained if settings.weight_precision == "bf16" else 0,
        "gradients": element * trained,
        "optimizer_state": info.state_bytes(trained, len(training), settings.momentum),
    }
    if layers is not None and "activation_bytes" in layers and training:
        micro_batch = -(-settings.batch_size // settings.accumulate_steps)
        lowest = min(t.layer_index for t in training)
        above = layers[layers["layer_index"] >= lowest]
        if settings.gradient_checkpointing:
            blocks = above[above["input_bytes"] > 0]
            rest = above[above["input_bytes"] == 0]["activation_bytes"].sum()
            per_example = rest + blocks["input_bytes"].sum()
            per_example += blocks["activation_bytes"].max() if len(blocks) else 0
        else:
            per_example = above["activation_bytes"].sum()
        estimate["activations"] = int(per_example * micro_batch)
    estimate = {key: int(value) for key, value in estimate.items()}
    return {
        **estimate,
        "total": sum(estimate.values()),
        "optimizer": settings.optimizer,
        "weight_precision": settings.weight_precision,
        "batch_size": settings.batch_size,
        "accumulate_steps": settings.accumulate_steps,
        "gradient_checkpointing": settings.gradient_checkpointing,
    }
