"""Where and how computation runs: which device (:func:`select_device`, a rank's own GPU under
data-parallel training: :func:`rank_device`), whether the machine has it (:func:`check_device`),
the precision (:func:`autocast`), and distinct GPUs for jobs that run at once on one machine
(:func:`claimed`).

Snakemake's local scheduler counts a ``gpu`` resource (``--resources gpu=N``) but does not say
which GPU a job may use, nor set ``CUDA_VISIBLE_DEVICES``: without more, every job trains on
GPU 0. :func:`claimed` gives a job its own GPUs: one lock file per GPU index in a folder every
job on the machine shares; a job takes the first free ones (an exclusive ``flock``, held while
the job runs and freed by the kernel when its process ends, even after a crash) and sets
``CUDA_VISIBLE_DEVICES`` to them before torch initialises CUDA. Where a scheduler has already
set ``CUDA_VISIBLE_DEVICES`` (SLURM's ``--gpus``, Kubernetes' device plugin), that choice stands.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from adaptune.errors import ConfigError

log = logging.getLogger(__name__)


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` takes cuda, then mps, then cpu; anything else is passed to torch."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rank_device(spec: str, processes: int, local_rank: int) -> torch.device:
    """The device of one of ``processes`` data-parallel processes: ``select_device(spec)``,
    and on CUDA the process's own GPU (``cuda:LOCAL_RANK``; with CUDA_VISIBLE_DEVICES set,
    among the visible ones)."""
    device = select_device(spec)
    if processes == 1 or device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(
            f"train.devices = {processes}: data-parallel training runs on CUDA GPUs or CPU "
            f"processes, not on {device.type}; set train.device: cpu or train.devices: 1"
        )
    if device.index is not None:
        raise ConfigError(
            f"train.device: {spec!r} names one GPU, but train.devices = {processes} trains on "
            "several; use 'auto' or 'cuda'"
        )
    return torch.device("cuda", local_rank)


def check_device(device: str) -> None:
    """``train.device`` must exist on this machine (checked where the jobs run locally)."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise ConfigError(
                f"train.device = {device!r}, but this machine has {found} CUDA device(s); use "
                "auto (a GPU when there is one, else the CPU) or cpu"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device = 'mps', but MPS is not available here; use auto or cpu")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); full precision elsewhere."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- distinct GPUs for concurrent jobs -------------------------------------------------------

VISIBLE = "CUDA_VISIBLE_DEVICES"
# Where the lock files live: one folder per machine and user, unless this variable names one.
LOCK_DIR_VARIABLE = "ADAPTUNE_GPU_LOCK_DIR"


def default_lock_dir() -> Path:
    folder = os.environ.get(LOCK_DIR_VARIABLE)
    return Path(folder) if folder else Path(tempfile.gettempdir()) / f"adaptune-gpus-{os.getuid()}"


def gpu_count() -> int:
    """GPUs on this machine. ``torch.cuda.device_count`` asks NVML and leaves CUDA
    uninitialised; ``torch.cuda.is_available`` would not (it calls ``cuInit``, after which this
    process ignores a new CUDA_VISIBLE_DEVICES)."""
    return torch.cuda.device_count()


def try_claim(count: int, total: int, lock_dir: Path) -> dict[int, int] | None:
    """Lock the first ``count`` free GPU indices below ``total``: {index: open lock file}, or
    None (and nothing locked) when fewer are free."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held: dict[int, int] = {}
    for index in range(total):
        descriptor = os.open(lock_dir / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        held[index] = descriptor
        if len(held) == count:
            return held
    release(held)
    return None


def release(held: dict[int, int]) -> None:
    for descriptor in held.values():
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


@contextlib.contextmanager
def claimed(
    count: int = 1,
    lock_dir: Path | None = None,
    total: int | None = None,
    wait_seconds: float = 3600.0,
    poll_seconds: float = 2.0,
) -> Iterator[list[int]]:
    """While inside, this process (and those it starts) sees only ``count`` GPUs no other job
    holds: yields their indices among the machine's ``total`` (counted when not given); []
    where there is no GPU or the scheduler has set CUDA_VISIBLE_DEVICES. Waits up to
    ``wait_seconds`` for GPUs to come free (``--resources gpu=N`` makes that rare)."""
    if os.environ.get(VISIBLE) is not None:
        log.info("GPUs as assigned by the scheduler: %s=%s", VISIBLE, os.environ[VISIBLE])
        yield []
        return
    total = gpu_count() if total is None else total
    if total == 0:
        yield []
        return
    if count > total:
        raise ConfigError(f"train.devices = {count}, but this machine has {total} GPU(s)")
    if torch.cuda.is_initialized():
        raise RuntimeError(f"CUDA is initialised already: {VISIBLE} would change nothing")
    lock_dir = lock_dir or default_lock_dir()
    deadline = time.monotonic() + wait_seconds
    held = try_claim(count, total, lock_dir)
    while held is None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no {count} free GPU(s) of {total} after {wait_seconds:.0f} s (locks in "
                f"{lock_dir}); run snakemake with --resources gpu={total}"
            )
        time.sleep(poll_seconds)
        held = try_claim(count, total, lock_dir)
    indices = sorted(held)
    os.environ[VISIBLE] = ",".join(map(str, indices))
    log.info("GPU(s) %s of %d claimed (locks in %s)", indices, total, lock_dir)
    try:
        yield indices
    finally:
        os.environ.pop(VISIBLE, None)
        release(held)
