"""Resuming a killed ``finetune`` job: its checkpoint, where it lives, whether it still fits the
job, and the SIGTERM that asks for one.

On a shared cluster jobs are preempted and cut by time limits; without a checkpoint a rerun
starts over from epoch 0. A job with ``train.checkpoint.enabled`` saves, at the end of the
first epoch that ends ``train.checkpoint.every_seconds`` after its last save (0: at every
epoch's end) and of the last epoch, every ``train.checkpoint.every_steps`` optimizer steps if
that is set, and after the step it is in when SIGTERM comes, everything the training loop
needs to continue as if it had never stopped
(:meth:`adaptune.training.TrainingLoop.state_dict`), and the MLflow run it logs into. A rerun
of the job (``--rerun-incomplete``, SLURM's requeue) finds it and continues; on the CPU with
the same thread count the finished run is bit-identical to an uninterrupted one.

The rules it keeps:

1. The checkpoint lives in a hidden folder beside the job's outputs
   (``results/<experiment>/runs/<strategy>/k<shots>/seed<seed>/.checkpoint/``), not among the
   rule's declared outputs, so Snakemake does not delete it when the job fails.
2. It is one file, ``state.pt``, written to a temporary name in the same folder and renamed
   over the last one (atomic on POSIX): a kill while writing leaves the previous checkpoint.
   It holds tensors and plain values only, read with ``torch.load(weights_only=True)``, and
   whole tensors (under FSDP too), so one process can load it.
3. It carries the fingerprint of what the job computes: its settings, its plan, its data
   (the data fingerprint and the few-shot splits' bytes), its pretrained model, the adaptune
   code and the versions of the libraries that compute. A job whose fingerprint differs is
   not resumed: the log says what changed, and the checkpoint is set aside
   (``.checkpoint.stale/``, replacing an older one, with a ``WHY`` file) for the user to
   inspect or delete.
4. It is removed when the job has written its outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE = "state.pt"
FORMAT = 1  # the layout of state.pt; another layout is refused like a stale fingerprint
# Libraries whose version can change what a run computes (kernels, random streams).
LIBRARIES = ("torch", "numpy", "transformers", "timm", "peft", "torchvision")


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def value_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def code_digest() -> str:
    """The adaptune package's source (every ``.py`` and ``.yaml`` file under it, by path and
    bytes) and the versions of the libraries that compute."""
    import adaptune

    root = Path(adaptune.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    for library in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    return digest.hexdigest()


def describe_changes(saved: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """The parts of a fingerprint that differ (``settings``, ``plan``, ``code``, ...)."""
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


class Checkpoints:
    """One job's checkpoint folder: :meth:`load` (or set aside a stale one), :meth:`save`,
    :meth:`remove`. ``fingerprint`` maps each part of what the job computes to its digest."""

    def __init__(
        self,
        folder: str | Path,
        fingerprint: Mapping[str, str],
        every_steps: int = 0,
        every_seconds: float = 0.0,
    ):
        self.folder = Path(folder)
        self.fingerprint = {**fingerprint, "format": str(FORMAT)}
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.clock = time.monotonic
        self.last_saved = self.clock()  # (or when the job began)
        # Saved with every state: what the job around the loop needs back (the MLflow run id).
        self.carry: dict[str, Any] = {}
        self.seconds = 0.0  # spent saving, by this process

    @property
    def path(self) -> Path:
        return self.folder / STATE

    def read(self) -> dict[str, Any] | None:
        """The saved state as it is (None when there is none)."""
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def load(self) -> dict[str, Any] | None:
        """The saved state if it was made by this job as it is now; a stale or unreadable one
        is set aside (with a warning saying what changed) and None returned."""
        try:
            state = self.read()
        except Exception as err:  # a truncated or foreign file: not ours to resume
            self.set_aside(f"it cannot be read ({type(err).__name__}: {err})")
            return None
        if state is None:
            return None
        changed = describe_changes(state.get("fingerprint", {}), self.fingerprint)
        if changed:
            self.set_aside(
                f"it was made under other {', '.join(changed)} than this job's (a changed "
                "setting, input or code is a new job, not a continuation)"
            )
            return None
        return state

    def set_aside(self, reason: str) -> None:
        """Move the folder to ``<folder>.stale`` (replacing an older one), with the reason."""
        aside = self.folder.with_name(self.folder.name + ".stale")
        shutil.rmtree(aside, ignore_errors=True)
        self.folder.rename(aside)
        (aside / "WHY").write_text(reason + "\n")
        log.warning(
            "checkpoint %s not resumed: %s. Set aside as %s; this job starts from epoch 1 "
            "(delete that folder once you no longer need it)",
            self.path,
            reason,
            aside,
        )

    def save(self, state: dict[str, Any]) -> float:
        """Write ``state`` (with the fingerprint) atomically; returns the seconds it took."""
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        for left in self.folder.glob(f".{STATE}.*.tmp"):  # an attempt killed while writing
            left.unlink(missing_ok=True)
        partial = self.folder / f".{STATE}.{os.getpid()}.tmp"
        with open(partial, "wb") as stream:
            torch.save({**state, **self.carry, "fingerprint": self.fingerprint}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, self.path)
        self.last_saved = self.clock()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        log.info(
            "checkpoint %s epoch %d (step %d of the run; %.1f MB, %.2f s)",
            "after" if state["epoch_done"] else "within",
            state["epoch"],
            state["global_step"],
            self.path.stat().st_size / 1e6,
            seconds,
        )
        return seconds

    def due(self, global_step: int) -> bool:
        """Whether the step interval calls for a checkpoint after ``global_step`` steps."""
        return self.every_steps > 0 and global_step % self.every_steps == 0

    def due_at_epoch_end(self, global_step: int) -> bool:
        """Whether an epoch that ends after ``global_step`` steps saves one: every epoch with
        ``every_seconds`` 0, else once ``every_seconds`` passed since the last save (a save
        of a large model takes seconds: a short job need not pay it every epoch), or when the
        step interval falls on the epoch's last step."""
        elapsed = self.clock() - self.last_saved
        return self.every_seconds <= 0 or elapsed >= self.every_seconds or self.due(global_step)

    def remove(self) -> None:
        """Delete the checkpoint (the job has written its outputs)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class StopRequest:
    """SIGTERM while training (Snakemake stopping its jobs, SLURM preempting or requeueing one,
    its time limit): the first one is noted, the training loop saves a checkpoint after the
    optimizer step it is in (or after the epoch's validation) and then calls :meth:`deliver`,
    which hands the signal to the handler that was there before (the tracked run's, which ends
    the run KILLED; or the default, which ends the process). A second SIGTERM is delivered at
    once. Outside the block, and in a thread other than the main one, signals are left alone."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> StopRequest:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
            self.installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.deliver()
            return
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")

    def deliver(self) -> None:
        """Stop as the signal would have stopped the job without checkpoints."""
        previous = self.previous if self.installed else signal.getsignal(signal.SIGTERM)
        self.__exit__()
        if callable(previous):
            previous(signal.SIGTERM, None)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the default action ends the process meanwhile
        raise SystemExit(128 + signal.SIGTERM)
