"""One fine-tuning run on several devices: data-parallel training with ``torch.distributed``
(DistributedDataParallel), launched through ``torchrun``.

:func:`launch` runs a job in this process (one device) or starts ``torchrun`` with
``--nproc-per-node N`` on this machine (rendezvous on 127.0.0.1, a free port), which runs
:func:`main` once per device; :func:`main` joins the process group (NCCL on CUDA, Gloo on the
CPU), gives each rank its own device (``LOCAL_RANK``) and calls the job's function.

Inside the training loop (:mod:`adaptune.training`), every rank builds the same global batch
(the same shuffle, from the run's seed) and keeps its own slice (:func:`shard`): N processes
with B/N examples each take the same optimizer step as one process with B examples, because
each rank's loss is its examples' summed loss over the global batch size times N, and DDP
averages the N gradients. :class:`Replicas` wraps the model in DDP over the tensors that train
(frozen ones are left out of DDP, so they are neither broadcast nor all-reduced) and wraps it
again when the set changes (gradual unfreezing); validation runs on rank 0, and only rank 0
writes files and logs to MLflow.

With ``train.sharding: fsdp``, :class:`Replicas` shards the model instead (PyTorch's FSDP2,
``fully_shard``): each block found in the module tree (:func:`adaptune.layers.find_blocks`) is
one unit, gathered for its forward and backward passes, and the rest is the root's. Parameters
keep their names and their ``requires_grad`` (frozen tensors are sharded and take no
gradient; a tensor that thaws later takes one from then on); gradients are reduce-scattered
with the same average as DDP's, so the loss weighing is the same. Every rank runs validation
(its forward passes gather every unit), and at the end rank 0 gathers the whole model into
an unsharded copy of the original (:meth:`Replicas.gather`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaptune.devices import rank_device
from adaptune.layers import find_blocks
from adaptune.signals import handling_sigterm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``, and
    ``local_rank`` on its machine (which device it takes)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, writes files and logs to MLflow."""
        return self.rank == 0


def current() -> World:
    """The world of the process group this process has joined (one process if none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, Gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def share(count: int, world: World) -> tuple[int, int]:
    """The rows ``start:stop`` of a global batch of ``count`` examples that this rank takes:
    contiguous slices, the first ``count % size`` ranks one example more."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's examples of a global batch (see :func:`share`). A rank whose share is empty
    (a last batch smaller than the world) gets the batch's first example, to be weighed 0 by
    :func:`loss_weight`: every rank must run a backward pass for DDP's all-reduce."""
    start, stop = share(len(indices), world)
    return indices[start:stop] or indices[:1]


def loss_weight(global_count: int, world: World) -> float:
    """What this rank's summed per-example loss is multiplied by so that DDP's gradient average
    over ranks is the mean-loss gradient of the global batch: ``size / global_count`` (0 for a
    rank with no examples of it)."""
    start, stop = share(global_count, world)
    return world.size / global_count if stop > start else 0.0


class Replicas:
    """The model as the training step runs it: itself in one process; under DDP, wrapped over
    the tensors that train now. DDP registers the tensors that require gradients when it is
    built, and a tensor frozen then is never all-reduced, even once it trains
    (``find_unused_parameters`` handles the opposite case, a registered tensor without a
    gradient): so when the set of trainable tensors changes (gradual unfreezing, the end of
    LP-FT's probe), :meth:`sync` wraps the model again. That costs one broadcast of the trainable
    tensors per change, a few times a run, and keeps ``find_unused_parameters`` off, which would
    cost a traversal of the autograd graph at every step.

    With ``sharding="fsdp"`` (several processes), the model is sharded in place when this is
    made, before the optimizer is built over its (sharded) parameters; ``head`` names the new
    head's parameters, which are no block."""

    def __init__(
        self,
        model: nn.Module,
        world: World,
        device: torch.device,
        sharding: str = "ddp",
        head: tuple[str, ...] = (),
    ) -> None:
        self.model, self.world, self.device = model, world, device
        self.wrapped: DistributedDataParallel | None = None
        self.trainable: tuple[str, ...] = ()
        self.wraps = 0
        self.sharded = sharding == "fsdp" and world.size > 1
        self.skeleton: nn.Module | None = None
        if self.sharded:
            self.skeleton = self.shard(head)

    def shard(self, head: tuple[str, ...]) -> nn.Module | None:
        """Shard the model over the ranks (FSDP2), each block a unit; returns, on rank 0, an
        unsharded copy of it without weights (on the meta device) to gather them into."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = self.model
        skeleton = None
        if self.world.is_main:
            # Copy the module tree, not the weights: each parameter's copy is an empty one.
            memo = {
                id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                for p in model.parameters()
            }
            skeleton = copy.deepcopy(model, memo)
        mesh = init_device_mesh(self.device.type, (self.world.size,))
        blocks = find_blocks(model, head)
        for path in blocks:
            fully_shard(model.get_submodule(path), mesh=mesh)
        fully_shard(model, mesh=mesh)
        log.info(
            "FSDP over %d processes: %d blocks and the rest (%d tensors) sharded",
            self.world.size,
            len(blocks),
            sum(1 for _ in model.parameters()),
        )
        return skeleton

    def sync(self) -> nn.Module:
        """The module to run training steps with, wrapped again if the trainable set changed."""
        if self.world.size == 1 or self.sharded:
            return self.model
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self.wrapped is None or trainable != self.trainable:
            frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad]
            self.wrapped = None  # the previous reducer and its gradient hooks go first
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, frozen)
            self.wrapped = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )
            self.trainable = trainable
            self.wraps += 1
            log.info(
                "DDP over %d trainable tensors on %d processes (%d frozen left out)",
                len(trainable),
                self.world.size,
                len(frozen),
            )
        return self.wrapped

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside do not all-reduce or reduce-scatter (gradient accumulation's
        micro-batches before the last); in one process, nothing to skip."""
        if self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        elif self.wrapped is not None:
            with self.wrapped.no_sync():
                yield
        else:
            yield

    def gather(self) -> nn.Module | None:
        """Under FSDP, the whole trained model (every rank takes part): on rank 0 an unsharded
        copy of it, on the CPU (None elsewhere). Otherwise the model itself."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.skeleton is None:
            return None
        self.skeleton.load_state_dict(state, assign=True)
        return self.skeleton

    def close(self) -> None:
        self.wrapped = None


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Elementwise sums of ``values`` over the ranks (the values themselves in one process)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (e.g. the validation scores only rank 0 computes)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (the flag itself in one process): what all ranks
    act on together, such as a SIGTERM that reached some of them first."""
    if world.size == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor)
    return bool(tensor.item())


def gather_on_main(value: Any, world: World) -> list[Any] | None:
    """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
    if world.size == 1:
        return [value]
    values: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(value, values, dst=0)
    return values


# --- launching ----------------------------------------------------------------------------


def torchrun_command(processes: int, target: str, job_file: str | Path) -> list[str]:
    """``torchrun`` on this machine only: ``processes`` workers, a rendezvous on 127.0.0.1
    at a free port (what ``--standalone`` does, without going through name resolution), each
    worker running :func:`main` on ``job_file``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "--rdzv-id",
        f"adaptune-{os.getpid()}",
        "--max-restarts",
        "0",
        "-m",
        "adaptune.distributed",
        target,
        str(job_file),
    ]


def resolve(target: str) -> Callable[[Mapping[str, Any]], Any]:
    """The function ``module:name``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def launch(processes: int, target: str, job: Mapping[str, Any]) -> None:
    """Run ``target`` (``module:function``, taking one JSON-able mapping) on ``job``: here in
    one process, or on ``processes`` devices through ``torchrun``. The workers inherit this
    process's stdout and stderr (the stage's log) and its environment (CUDA_VISIBLE_DEVICES),
    and share its torch threads."""
    if processes == 1:
        resolve(target)(job)
        return
    with tempfile.TemporaryDirectory(prefix="adaptune-ddp-") as folder:
        job_file = Path(folder) / "job.json"
        job_file.write_text(json.dumps(job))
        command = torchrun_command(processes, target, job_file)
        log.info("launching %d processes: %s", processes, " ".join(command))
        sys.stdout.flush()
        sys.stderr.flush()
        # The job's threads (torch.set_num_threads, from the rule's threads:) shared out.
        threads = str(max(1, torch.get_num_threads() // processes))
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        with subprocess.Popen(command, env=env) as process, forwarding_sigterm(process):
            returncode = process.wait()
    if returncode != 0:
        raise RuntimeError(
            f"torchrun with {processes} processes failed (exit {returncode}); the "
            "traceback of the rank that failed is above in this log"
        )


@contextlib.contextmanager
def forwarding_sigterm(process: subprocess.Popen) -> Iterator[None]:
    """SIGTERM to this process (Snakemake or SLURM stopping the job) goes on to ``process``
    (torchrun, which passes it to its workers: each saves a checkpoint and stops), and this
    process waits for it instead of dying at once and leaving it behind."""
    with handling_sigterm(lambda signum, frame: process.terminate()):
        yield


def main(argv: list[str] | None = None) -> None:
    """A ``torchrun`` worker: join the process group on this rank's device, run the job, leave."""
    target, job_file = argv or sys.argv[1:]
    job = json.loads(Path(job_file).read_text())
    rank = int(os.environ["RANK"])
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s",
    )
    world = World(rank, int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    device = rank_device(job.get("device", "auto"), world.size, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        timeout=timedelta(minutes=30),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        resolve(target)(job)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
