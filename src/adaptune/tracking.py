"""MLflow: one experiment per ``experiment``, one run per (strategy, shots, seed).

The store and the experiment are created once, by the ``create_mlflow_experiment`` rule, before
jobs fan out (several processes creating a new SQLite store at once race on its schema). The
``finetune`` job starts the run and writes its id to a file; ``evaluate`` takes that file as input
and resumes the same run, so a rerun of ``evaluate`` adds to the run rather than making another.
Nothing reads results back from MLflow: the workflow's files are the source of truth.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def _is_transient(err: Exception) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def retrying(call: Callable[..., T], attempts: int = 8) -> Callable[..., T]:
    """Retry ``call`` with backoff while SQLite reports a lock held by a parallel job."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts):
            try:
                return call(*args, **kwargs)
            except Exception as err:  # MLflow wraps the sqlite error in its own types
                if attempt == attempts - 1 or not _is_transient(err):
                    raise
                time.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


def ensure_experiment(tracking_uri: str, name: str, artifact_root: str | Path) -> dict[str, str]:
    """Create (or find) the MLflow experiment ``name`` with its artifacts under
    ``artifact_root``; returns what later stages need to log into it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = Path(artifact_root).resolve()
        location.mkdir(parents=True, exist_ok=True)
        experiment_id = client.create_experiment(name, artifact_location=location.as_uri())
        log.info("created MLflow experiment %r (%s) in %s", name, experiment_id, tracking_uri)
    else:
        experiment_id = experiment.experiment_id
        log.info("MLflow experiment %r (%s) exists in %s", name, experiment_id, tracking_uri)
    return {"tracking_uri": tracking_uri, "experiment_name": name, "experiment_id": experiment_id}


def read_experiment(path: str | Path) -> dict[str, str]:
    return json.loads(Path(path).read_text())


@contextmanager
def mlflow_run(
    experiment: dict[str, str],
    run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Any]:
    """Start a new run in ``experiment`` (or resume ``run_id``) and end it afterwards; a run
    whose job fails is marked FAILED."""
    import mlflow

    mlflow.set_tracking_uri(experiment["tracking_uri"])
    start = retrying(mlflow.start_run)
    if run_id:
        run = start(run_id=run_id)
    else:
        run = start(experiment_id=experiment["experiment_id"], run_name=run_name, tags=tags)
    try:
        yield run
    except BaseException:
        retrying(mlflow.end_run)(status="FAILED")
        raise
    retrying(mlflow.end_run)()


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    retrying(mlflow.log_params)({k: str(v)[:6000] for k, v in params.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    retrying(mlflow.log_metrics)({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifact(path: str | Path, folder: str | None = None) -> None:
    import mlflow

    retrying(mlflow.log_artifact)(str(path), artifact_path=folder)


def metric_name(text: str) -> str:
    """``text`` made valid as part of an MLflow metric name (a class label, say)."""
    import re

    return re.sub(r"[^\w\-. /]", "_", text)
