"""Where a job's seconds go: the process's start (interpreter, imports, Snakemake's script
preamble) up to the stage function, then each named phase of the stage (loading the model,
training, inference, MLflow logging, writing files).

A stage keeps a :class:`StageClock` and calls :meth:`StageClock.lap` at the end of each phase;
:meth:`StageClock.seconds` goes into its JSON output (``train_summary.json``'s ``job_seconds``,
``metrics.json``'s ``evaluate_seconds``) and its log, so that ``benchmarks/job_time.py`` can
tell, for every job of a pipeline, the seconds spent on the work (training, inference) from the
seconds around it.
"""

from __future__ import annotations

import logging
import time

import psutil

from adaptune import worker

log = logging.getLogger(__name__)

# The phases that are the job's work; every other phase is time around it.
WORK = ("train", "inference", "drift")


class StageClock:
    """Seconds per phase of one job, from the moment its process started: ``startup`` is what
    came before the clock was made (interpreter, imports, the script's preamble)."""

    def __init__(self) -> None:
        # A job that ran in adaptune's worker (adaptune.worker) started with its own process,
        # not with the process forked to run it.
        started = worker.job_started()
        self.process_started = psutil.Process().create_time() if started is None else started
        self.phases: dict[str, float] = {"startup": time.time() - self.process_started}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        """The seconds since the previous lap (or the clock's start) were phase ``name``
        (laps of one name add up)."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    def split(self, phase: str, part: str, seconds: float) -> None:
        """``seconds`` of phase ``phase`` were phase ``part`` (timed inside it: the
        checkpoints a training phase saved)."""
        self.phases[phase] = self.phases.get(phase, 0.0) - seconds
        self.phases[part] = self.phases.get(part, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        """Each phase's seconds, ``outside_work`` (all but :data:`WORK`) and ``total`` (since
        the process started)."""
        total = time.time() - self.process_started
        rounded = {name: round(value, 3) for name, value in self.phases.items()}
        outside = total - sum(v for k, v in self.phases.items() if k in WORK)
        return {**rounded, "outside_work": round(outside, 3), "total": round(total, 3)}

    def report(self, stage: str) -> dict[str, float]:
        """Log and return :meth:`seconds`."""
        seconds = self.seconds()
        log.info("%s seconds: %s", stage, ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
        return seconds
