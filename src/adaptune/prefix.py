"""Frozen-prefix caching: compute the frozen bottom of the network once per example, then train
and validate only the part above it.

A plan knows before training what is frozen. When, for a phase of training, every tensor of the
input layer and of the first blocks (or of the whole body, as in ``head_only``, LP-FT's probe,
the frozen epochs of fastai's ``fine_tune`` and of gradual unfreezing) is frozen, the input of
the first module that trains (a block, the output layer's first module, or the head) is the same
every epoch. It is captured once per example, in eval mode, for the training and validation
splits; training steps then run the model with the frozen blocks and output-layer modules
passed through (a block that does not return a tensor shaped like its input is taken out of its
container instead), and that module's input replaced by the cached one. Layers come from
:mod:`adaptune.layers`, so this works on any model whose frozen prefix is a chain of modules
(encoders, CNNs, and decoders: the model makes their causal masks and rotary position embeddings
outside the blocks and hands them to every block that still runs); each cache is checked against
the full forward on a batch before it is used, and anything that does not match falls back to
the full forward, with a log line.

Because the prefix runs in eval mode, cached training has no dropout (and no batch statistics)
below the boundary: ``train.feature_cache: off`` keeps the full forward. With dropout 0 both give
the same weights (a test checks it).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from adaptune.layers import BLOCK, HEAD, Layer, assign_layers
from adaptune.modalities import Batch, Examples, TaskModel, loader
from adaptune.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Boundary:
    """Where the frozen prefix ends: layers up to ``depth`` are frozen; ``inject`` is the module
    whose input is cached; ``removed`` are the frozen blocks, which pass their input on (or are
    taken out of their containers: :meth:`PrefixCache.replaying`), and ``passed`` the frozen
    modules above the blocks, which pass their input on."""

    depth: int
    layer: str
    inject: str
    removed: tuple[str, ...]
    passed: tuple[str, ...]


def _owner(parameter: str) -> str:
    return parameter.rpartition(".")[0]


def find_boundary(model: nn.Module, head: Iterable[str]) -> Boundary | None:
    """The frozen prefix of ``model`` as its parameters' ``requires_grad`` stand now, or None
    when it holds no block (nothing worth caching)."""
    layers = assign_layers(model, head)
    params = dict(model.named_parameters())
    by_index: dict[int, list[str]] = {}
    for name, layer in layers.items():
        by_index.setdefault(layer.index, []).append(name)
    depth = -1
    for index in sorted(by_index):
        if any(params[name].requires_grad for name in by_index[index]):
            break
        depth = index
    frozen = {layers[n] for i in range(depth + 1) for n in by_index.get(i, [])}
    if not any(layer.kind == BLOCK for layer in frozen) or depth + 1 not in by_index:
        return None
    first: Layer = layers[by_index[depth + 1][0]]
    inject = first.module if first.kind == BLOCK else _owner(by_index[depth + 1][0])
    removed = tuple(sorted({layer.module for layer in frozen if layer.kind == BLOCK}))
    passed = tuple(
        dict.fromkeys(
            _owner(name)
            for i in range(depth + 1)
            for name in by_index.get(i, [])
            if layers[name].kind not in (BLOCK, "input") and layers[name].kind != HEAD
        )
    )
    return Boundary(depth, first.name, inject, removed, passed)


class _PassThrough(nn.Module):
    """A frozen module skipped: returns its first input unchanged."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else next(iter(kwargs.values()))


def _primary(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """Where a module's main input is: its first positional argument, else its first tensor
    keyword argument."""
    if args:
        return 0, args[0]
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            return key, value
    raise ValueError("the module has no tensor input to cache")


class FeatureStore:
    """Each example's cached tensor, in memory up to ``limit_bytes``, beyond that in a file on
    disk (a memory map), so that the cache never holds more memory than asked."""

    def __init__(self, count: int, limit_bytes: int) -> None:
        self.items: list[torch.Tensor | None] = [None] * count
        self.limit_bytes, self.used = limit_bytes, 0
        self.spill: np.memmap | None = None
        self.where: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self.spill_offset, self.folder = 0, None

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", copy=True).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.used + size <= self.limit_bytes:
            self.items[index], self.used = tensor, self.used + size
            return
        if self.spill is None:
            self.folder = tempfile.mkdtemp(prefix="adaptune-features-")
            capacity = max(size * len(self.items), 1)
            self.spill = np.memmap(
                Path(self.folder) / "features.bin", dtype=np.uint8, mode="w+", shape=(capacity,)
            )
            log.info(
                "feature cache over its %.1f GB in memory: the rest on disk in %s",
                self.limit_bytes / 1e9,
                self.folder,
            )
        raw = tensor.view(torch.uint8).numpy().reshape(-1) if size else np.zeros(0, np.uint8)
        if self.spill_offset + size > len(self.spill):
            raise MemoryError("the feature cache's disk file is full")
        self.spill[self.spill_offset : self.spill_offset + size] = raw
        self.where[index] = (self.spill_offset, tuple(tensor.shape), tensor.dtype)
        self.spill_offset += size

    def get(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if item is not None:
            return item
        offset, shape, dtype = self.where[index]
        size = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
        raw = torch.from_numpy(np.array(self.spill[offset : offset + size]))
        return raw.view(dtype).reshape(shape)

    def close(self) -> None:
        if self.folder is not None:
            self.spill = None
            shutil.rmtree(self.folder, ignore_errors=True)


class PrefixCache:
    """The cached inputs of ``boundary.inject`` for the examples of some splits, and the way
    to run ``task``'s model on them (:meth:`replaying`)."""

    def __init__(self, task: TaskModel, boundary: Boundary, limit_bytes: int) -> None:
        self.task, self.boundary, self.limit_bytes = task, boundary, limit_bytes
        self.stores: dict[str, FeatureStore] = {}
        self.where: str | int = 0
        self.current: torch.Tensor | None = None
        # Removed blocks seen to return a tensor shaped like their input: they stay in their
        # containers, passing their input on, so a model that picks each block's settings by
        # its position (transformers' ``config.layer_types[i]``: sliding-window or full
        # attention) still gives every block above the boundary its own.
        self.in_place: set[str] = set()

    def module(self, path: str) -> nn.Module:
        return self.task.model.get_submodule(path)

    @torch.no_grad()
    def capture(
        self, split: str, batches: Iterable[Batch], count: int, device: torch.device
    ) -> None:
        """Run the full model in eval mode over ``batches`` and keep each example's input of
        the injection module."""
        store = FeatureStore(count, self.limit_bytes - sum(s.used for s in self.stores.values()))
        seen: dict[str, Any] = {}

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["where"], seen["value"] = _primary(args, kwargs)

        def shape_kept(path: str) -> Any:
            def check(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                value = _primary(args, kwargs)[1]
                if torch.is_tensor(output) and output.shape == value.shape:
                    self.in_place.add(path)
                else:
                    self.in_place.discard(path)

            return check

        model = self.task.model
        was_training = model.training
        model.eval()
        handles = [
            self.module(self.boundary.inject).register_forward_pre_hook(keep, with_kwargs=True),
            *(
                self.module(path).register_forward_hook(shape_kept(path), with_kwargs=True)
                for path in self.boundary.removed
            ),
        ]
        try:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                self.task.logits(batch)
                self.where = seen["where"]
                pieces = self.task.modality.split_features(seen["value"], batch)
                for index, piece in zip(batch["index"].tolist(), pieces, strict=True):
                    store.put(index, piece)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        self.stores[split] = store

    def features(self, split: str, batch: Batch, device: torch.device) -> torch.Tensor:
        store = self.stores[split]
        pieces = [store.get(i) for i in batch["index"].tolist()]
        return self.task.modality.join_features(pieces, batch).to(device, non_blocking=True)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[PrefixCache]:
        """While inside, the model skips its frozen prefix: frozen blocks and output-layer
        modules pass their input on (a block seen to return something else than a tensor shaped
        like its input, such as a tuple, is taken out of its container), and the injection
        module receives :attr:`current` (set it before each forward) as its input."""
        model = self.task.model

        def parent_of(path: str) -> tuple[nn.Module, str]:
            parent_path, _, child = path.rpartition(".")
            return (model.get_submodule(parent_path) if parent_path else model), child

        originals: dict[int, tuple[nn.Module, dict[str, nn.Module]]] = {}
        for path in (*self.boundary.removed, *self.boundary.passed):
            parent, _ = parent_of(path)
            originals.setdefault(id(parent), (parent, dict(parent._modules)))

        def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if self.where == 0:
                return (self.current, *args[1:]), kwargs
            return args, {**kwargs, self.where: self.current}

        handle = self.module(self.boundary.inject).register_forward_pre_hook(
            replace, with_kwargs=True
        )
        try:
            for path in self.boundary.removed:
                parent, child = parent_of(path)
                if path not in self.in_place and isinstance(parent, nn.ModuleList | nn.Sequential):
                    del parent._modules[child]  # the container runs one block fewer
                else:
                    parent._modules[child] = _PassThrough()
            for path in self.boundary.passed:
                parent, child = parent_of(path)
                parent._modules[child] = _PassThrough()
            yield self
        finally:
            handle.remove()
            for parent, modules in originals.values():
                parent._modules.clear()
                parent._modules.update(modules)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()


def cache_limit_bytes() -> int:
    """Memory the frozen-prefix cache may hold (the rest goes to disk): a quarter of what is
    available, at most 2 GB."""
    return int(min(2e9, 0.25 * psutil.virtual_memory().available))


class PrefixState:
    """The frozen-prefix cache of a run, kept while the boundary stays where it is and rebuilt
    when a layer thaws (gradual unfreezing, the end of a probe)."""

    def __init__(
        self,
        task: TaskModel,
        settings: TrainSettings,
        train: Examples,
        val: Examples,
        device: torch.device,
    ) -> None:
        self.task, self.settings, self.device = task, settings, device
        self.train, self.val = train, val
        self.cache: PrefixCache | None = None
        self.enabled = settings.feature_cache == "auto"
        if self.enabled and settings.augment:
            log.info("feature cache off: augmented training examples differ every epoch")
            self.enabled = False

    def refresh(self) -> PrefixCache | None:
        """The cache for the model's frozen prefix as it is now (None: run everything)."""
        if not self.enabled:
            return None
        boundary = find_boundary(self.task.model, self.task.head)
        if self.cache is not None and boundary == self.cache.boundary:
            return self.cache
        self.close()
        if boundary is None:
            return None
        if self.settings.frozen_batchnorm == "train" and self._has_batchnorm(boundary):
            log.info("feature cache off: frozen BatchNorm layers train (frozen_batchnorm: train)")
            return None
        start = time.perf_counter()
        cache = PrefixCache(self.task, boundary, cache_limit_bytes())
        try:
            batch_size = self.settings.eval_batch_size
            for split, examples in (("train", self.train), ("val", self.val)):
                if split == "val" and self.val is self.train:
                    cache.stores["val"] = cache.stores["train"]  # captured once
                    continue
                batches = loader(examples, batch_size, by_length=True)
                cache.capture(split, batches, len(examples), self.device)
            problem = self._check(cache)
        except (RuntimeError, ValueError, MemoryError, OSError) as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            log.warning("feature cache off: %s; every step runs the whole network", problem)
            cache.close()
            self.enabled = False
            return None
        stores = {id(store): store for store in cache.stores.values()}.values()
        log.info(
            "feature cache: every layer below %s frozen; the inputs of %s cached for %s "
            "examples in %.1f s (%.0f MB in memory)",
            boundary.layer,
            boundary.inject,
            len(self.train) if len(stores) == 1 else f"{len(self.train)} + {len(self.val)}",
            time.perf_counter() - start,
            sum(store.used for store in stores) / 1e6,
        )
        self.cache = cache
        return cache

    def _has_batchnorm(self, boundary: Boundary) -> bool:
        model = self.task.model
        return any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for path in (*boundary.removed, *boundary.passed)
            for m in model.get_submodule(path).modules()
        )

    @torch.no_grad()
    def _check(self, cache: PrefixCache) -> str | None:
        """Compare the cached forward with the full one on a batch of validation examples."""
        batch = next(iter(loader(self.val, min(len(self.val), 8))))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        model = self.task.model
        was_training = model.training
        model.eval()
        try:
            full = self.task.logits(batch).float()
            with cache.replaying():
                cache.current = cache.features("val", batch, self.device)
                cached = self.task.logits(batch).float()
        finally:
            model.train(was_training)
        if full.shape != cached.shape or not torch.allclose(full, cached, rtol=1e-4, atol=1e-5):
            gap = (full - cached).abs().max() if full.shape == cached.shape else "shape"
            return f"the cached and the full forward disagree ({gap})"
        return None

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
