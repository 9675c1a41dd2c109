"""Bytes of the tensors alive, counted exactly: the CPU's analogue of
``torch.cuda.max_memory_allocated``, free of the allocator's caching and of the process's other
memory, so that a test of a memory bound can fail for the right reason only (also used by
benchmarks/)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """While active, counts the bytes of every tensor storage that an operator returns (forward,
    backward, double backward, ``vmap``'s batched ops, in-place and sparse results alike), until
    the storage is freed; ``peak`` is the most alive at once. Storages alive before (the model's
    weights, the batches) count only once passed to :meth:`track`. Each storage counts once,
    however many views share it."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._alive: dict[int, weakref.ref] = {}
        self.now = 0
        self.peak = 0
        self.track(tensors)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self._count(tensor)

    def _count(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        if tensor.is_sparse:
            self._count(tensor._indices())
            self._count(tensor._values())
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        size = storage.nbytes()

        def freed(_: weakref.ref, key: int = key, size: int = size) -> None:
            if self._alive.pop(key, None) is not None:
                self.now -= size

        self._alive[key] = weakref.ref(storage, freed)
        self.now += size
        self.peak = max(self.peak, self.now)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._count(tensor)
        return out
