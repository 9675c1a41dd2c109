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
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adaptune.errors import ConfigError
from adaptune.runtime import select_device

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


def device_for(spec: str, world: World) -> torch.device:
    """The device of this rank: ``select_device(spec)``, and on CUDA the rank's own GPU
    (``cuda:LOCAL_RANK``; with CUDA_VISIBLE_DEVICES set, among the visible ones)."""
    device = select_device(spec)
    if world.size == 1 or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(
            f"train.devices = {world.size}: data-parallel training runs on CUDA GPUs or CPU "
            f"processes, not on {device.type}; set train.device: cpu or train.devices: 1"
        )
    if device.index is not None:
        raise ConfigError(
            f"train.device: {spec!r} names one GPU, but train.devices = {world.size} trains on "
            "several; use 'auto' or 'cuda'"
        )
    return torch.device("cuda", world.local_rank)


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
    cost a traversal of the autograd graph at every step."""

    def __init__(self, model: nn.Module, world: World, device: torch.device) -> None:
        self.model, self.world, self.device = model, world, device
        self.wrapped: DistributedDataParallel | None = None
        self.trainable: tuple[str, ...] = ()
        self.wraps = 0

    def sync(self) -> nn.Module:
        """The module to run training steps with, wrapped again if the trainable set changed."""
        if self.world.size == 1:
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
        result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"torchrun with {processes} processes failed (exit {result.returncode}); the "
            "traceback of the rank that failed is above in this log"
        )


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
    device = device_for(job.get("device", "auto"), world)
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
