"""MLflow: one experiment per ``experiment``, one live run per (strategy, shots, seed).

The lifecycle of a run:

1. ``create_mlflow_experiment`` makes the store and the experiment once, before jobs fan out
   (several processes creating a new SQLite store at once race on its schema). With a local
   store, artifacts go under ``results/<experiment>/mlartifacts``; with a tracking server
   (``http(s)://``), to the server: the experiment is created without an artifact location,
   so the server chooses it (``mlflow-artifacts:/...``, under its ``--artifacts-destination``),
   and an experiment there whose artifacts would land on each client's own disk is refused.
   Several checkouts (or machines) find the same experiment on a server by name, and share it.
2. ``finetune`` starts the run, tagged with its key (``adaptune.key``, e.g. ``full/k16/seed0``)
   and its workspace (the results folder it writes to), writes the run id to a file, and logs
   parameters and curves into it. A job resuming from its checkpoint (which carries the run
   id) opens that run again instead, and logs only what it does not hold yet. Any other
   run of the same key and workspace (an attempt that was killed, or one a rerun replaces)
   is ended (KILLED if it was still RUNNING), tagged ``adaptune.superseded_by`` and deleted,
   so the UI and any search show one run per key. A job that fails marks its run FAILED; one
   that is interrupted (Ctrl-C, SIGTERM) KILLED.
3. ``evaluate`` takes the run-id file as input and logs the test metrics into the same run, by
   id, without reopening it (its status and duration stay those of the training).

Each stage ends its logging by tagging the run ``adaptune.logged`` with its name (``finetune``,
``evaluate``, ``baseline``): a run without the tag its files call for is incomplete. A job
tracks on a best-effort basis (:class:`TrackedRun`): when the store stops answering, the job says so
once, naming the store, and goes on to write its files.

Nothing reads results back from MLflow: the workflow's files are the source of truth, and the
store is a view of them, which :mod:`adaptune.records` rebuilds from the files when it was
deleted, replaced or missed some logging.

MLflow is imported in the functions that talk to it: ``import mlflow`` takes 2.7 s (measured on
2026-12-01, the 2-core machine), and the Snakefile, ``adaptune check`` and every stage import
this module, most of them without logging anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from adaptune import signals
from adaptune.errors import ConfigError
from adaptune.logs import NOTICE

log = logging.getLogger(__name__)

T = TypeVar("T")
KEY_TAG, WORKSPACE_TAG, SUPERSEDED_TAG = (
    "adaptune.key",
    "adaptune.workspace",
    "adaptune.superseded_by",
)
# The stage whose logging a run has completed (finetune, then evaluate; baseline): set last.
LOGGED_TAG = "adaptune.logged"
# On a run rebuilt from a run's files: the folder, and the run it replaces.
REBUILT_TAG = "adaptune.rebuilt_from"
EXPERIMENT_KIND = "mlflow.experimentKind"
CHAMPION = "champion"  # the Model Registry alias of the strategy selected per shot count
# Fail in seconds when a tracking server is down, not after MLflow's default 7 retries with
# backoff (about 4 minutes); a user's own settings of these variables win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class Interrupted(BaseException):
    """The job was asked to stop (SIGTERM, as Snakemake and SLURM send)."""


def _is_transient(err: Exception) -> bool:
    text = str(err).lower()
    # Parallel jobs logging the same dataset race to insert it; a retry finds it there.
    racing = "unique constraint failed: datasets" in text
    return (
        racing
        or "database is locked" in text
        or "database table is locked" in text
        or ("busy" in text)
    )


def retrying(call: Callable[..., T], attempts: int = 8) -> Callable[..., T]:
    """Retry ``call`` with backoff while SQLite reports a lock held by a parallel job. Each
    attempt runs whole: a signal that comes during it acts after it (:func:`signals.deferred`)."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts):
            try:
                with signals.deferred():  # a write cut in two keeps SQLite locked against us
                    return call(*args, **kwargs)
            except Exception as err:  # MLflow wraps the sqlite error in its own types
                if attempt == attempts - 1 or not _is_transient(err):
                    raise
                time.sleep(0.25 * 2**attempt)
        raise AssertionError("unreachable")

    return wrapper


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` store (PATH relative to the working folder)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))
    return None


def is_local_store(tracking_uri: str) -> bool:
    """Whether the tracking store is a file on this machine's disk (``sqlite:///``, ``file:``,
    a bare path), rather than a server or a database that other machines reach."""
    return urllib.parse.urlparse(tracking_uri).scheme in ("", "file", "sqlite")


def check_store_for_jobs(tracking_uri: str, jobs_share_files: bool) -> None:
    """Jobs that share no files with this machine (the kubernetes executor; any run with
    ``--shared-fs-usage none``) cannot log into a store that is a file here: each would write
    its own copy, and every run would be lost with its pod. Raises a ConfigError naming the key
    and the fix."""
    if jobs_share_files or not is_local_store(tracking_uri):
        return
    raise ConfigError(
        f"mlflow.tracking_uri = {tracking_uri!r} is a file on this machine, but the jobs of this "
        "run share no files with it (the kubernetes executor, or --shared-fs-usage none): each "
        "job would log into its own copy and the runs would be lost. Set mlflow.tracking_uri to "
        "an MLflow server that the jobs reach, e.g. --config "
        'mlflow=\'{tracking_uri: "http://mlflow.<namespace>:5000"}\' (README, "Clusters and '
        'GPUs")'
    )


def check_store(tracking_uri: str, timeout: float = 5.0) -> None:
    """That the tracking store can be used, in seconds: a tracking server answers its health
    check; a SQLite file, if it exists, is a SQLite database. Raises a ConfigError naming the
    store and the fix."""
    if is_server(tracking_uri):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                answer.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"mlflow.tracking_uri = {tracking_uri!r}: no MLflow server answers at {url} "
                f"({reason}); start it (mlflow server --host ... --port ...) or set "
                "mlflow.tracking_uri to one that runs"
            ) from None
        return
    path = sqlite_file(tracking_uri)
    if path is not None and path.exists():
        if path.is_dir():
            raise ConfigError(f"mlflow.tracking_uri = {tracking_uri!r}: {path} is a folder")
        with path.open("rb") as db:
            header = db.read(16)
        if header and header != b"SQLite format 3\x00":
            raise ConfigError(
                f"mlflow.tracking_uri = {tracking_uri!r}: {path.resolve()} is not an SQLite "
                "database (corrupt, or another kind of file); move it aside and rerun, or set "
                "mlflow.tracking_uri to another file"
            )


def relocate_artifacts(tracking_uri: str, name: str, artifact_root: str | Path) -> bool:
    """After ``results/`` (with its SQLite store) was moved or copied elsewhere, point the
    experiment ``name``'s artifact locations (the experiment's, its runs', logged models' and
    registered versions') at ``artifact_root`` where the recorded folder no longer exists.
    MLflow records absolute ``file://`` paths and has no call to change them, so the SQLite
    tables are updated in place. Returns whether anything moved."""
    path = sqlite_file(tracking_uri)
    if path is None or not path.is_file():
        return False
    import sqlite3
    import urllib.parse

    wanted = Path(artifact_root).resolve().as_uri()
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db, db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
        if "experiments" not in tables:
            return False
        row = db.execute(
            "select experiment_id, artifact_location from experiments where name = ?", (name,)
        ).fetchone()
        if row is None or row[1] == wanted or not row[1].startswith("file:"):
            return False
        if Path(urllib.parse.urlparse(row[1]).path).exists():
            return False  # still there: two checkouts may share it
        old = row[1]
        db.execute(
            "update experiments set artifact_location = ? where experiment_id = ?", (wanted, row[0])
        )
        updates = [("runs", "artifact_uri"), ("logged_models", "artifact_location")]
        updates += [("model_versions", "source"), ("model_versions", "storage_location")]
        for table, column in updates:
            if table in tables:
                db.execute(
                    f"update {table} set {column} = ? || substr({column}, ?) "
                    f"where substr({column}, 1, ?) = ?",
                    (wanted, len(old) + 1, len(old), old),
                )
    log.info("MLflow experiment %r: artifacts moved from %s to %s", name, old, wanted)
    return True


def _client(tracking_uri: str) -> Any:
    # Imported here: MLflow takes about a second to import, and stages that track nothing
    # (and the workflow's parse-time checks above) do not need it.
    from mlflow.tracking import MlflowClient

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(store_uri(tracking_uri))


def store_uri(tracking_uri: str) -> str:
    """``tracking_uri`` as MLflow is given it: a relative SQLite path made absolute. MLflow
    keeps one database engine per URI for the life of the process, so a relative path would
    keep meaning the folder it was first used from (a process that changes folders, such as
    a test running stages in process, wrote into another folder's database, or one since
    deleted: "attempt to write a readonly database")."""
    path = sqlite_file(tracking_uri)
    if path is None or path.is_absolute():
        return tracking_uri
    return f"sqlite:///{path.resolve()}"


def workspace(results: str | Path) -> str:
    """Who a run belongs to: the absolute path of its experiment's results folder (the same
    from every node of a cluster that shares it), hashed into a tag value."""
    return hashlib.sha256(str(Path(results).resolve()).encode()).hexdigest()[:16]


def ensure_experiment(
    tracking_uri: str, name: str, artifact_root: str | Path, results: str | Path
) -> dict[str, str]:
    """Create (or find) the MLflow experiment ``name``; returns what later stages need to log
    into it. A local store keeps artifacts under ``artifact_root``; a tracking server keeps
    them itself (its ``--artifacts-destination``), and an experiment on a server whose
    artifacts would go to a local path is a ConfigError naming the fix."""
    check_store(tracking_uri)
    path = sqlite_file(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        client = _client(tracking_uri)
        experiment = retrying(client.get_experiment_by_name)(name)
        if experiment is None:
            experiment = _create_experiment(client, tracking_uri, name, artifact_root)
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"the MLflow experiment {name!r} (id {experiment.experiment_id}) in "
                f"{tracking_uri} is deleted: restore it (MLFLOW_TRACKING_URI={tracking_uri} "
                f"mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                "mlflow.experiment_name to a new name"
            )
        experiment_id = experiment.experiment_id
        if is_server(tracking_uri):
            check_server_artifacts(tracking_uri, name, experiment.artifact_location)
        log.info(
            "MLflow experiment %r (%s) in %s keeps its artifacts at %s",
            name,
            experiment_id,
            tracking_uri,
            experiment.artifact_location,
        )
        # The UI then opens the experiment on its runs table, not on the GenAI overview.
        retrying(client.set_experiment_tag)(
            experiment_id, EXPERIMENT_KIND, "custom_model_development"
        )
    except ConfigError:
        raise
    except Exception as err:
        where = path.resolve() if path is not None else tracking_uri
        raise ConfigError(
            f"mlflow.tracking_uri = {tracking_uri!r}: cannot use the MLflow store at {where}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return {
        "tracking_uri": tracking_uri,
        "experiment_name": name,
        "experiment_id": experiment_id,
        "workspace": workspace(results),
    }


def _create_experiment(client: Any, tracking_uri: str, name: str, artifact_root: str | Path) -> Any:
    """Create the experiment ``name``: with its artifacts under ``artifact_root`` in a local
    store, where the server chooses on a tracking server. Another checkout creating it at the
    same moment is no error: both then use the one experiment."""
    from mlflow.exceptions import MlflowException

    location = None
    if not is_server(tracking_uri):
        root = Path(artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        experiment_id = retrying(client.create_experiment)(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        log.info("MLflow experiment %r was created by another process meanwhile", name)
        return retrying(client.get_experiment_by_name)(name)
    log.info("created MLflow experiment %r (%s) in %s", name, experiment_id, tracking_uri)
    return retrying(client.get_experiment)(experiment_id)


def is_local_location(artifact_location: str) -> bool:
    """Whether an artifact location is a path on the disk of the process that logs (``file:``
    or a bare path), rather than a server or an object store."""
    return urllib.parse.urlparse(artifact_location).scheme in ("", "file")


def check_server_artifacts(tracking_uri: str, name: str, artifact_location: str) -> None:
    """On a tracking server, an experiment's artifacts must go to the server (or an object store
    every client reaches), not to a path that each client would write on its own disk."""
    if not is_local_location(artifact_location):
        return
    raise ConfigError(
        f"mlflow.tracking_uri = {tracking_uri!r}: the MLflow experiment {name!r} there keeps "
        f"its artifacts at {artifact_location!r}, a path that each job would write on its own "
        "disk, not on the server. Serve artifacts from the server (mlflow server "
        "--artifacts-destination DIR, without --no-serve-artifacts or a local "
        "--default-artifact-root) and set mlflow.experiment_name to a new name (or delete "
        "this experiment and run `mlflow gc` on the server)"
    )


def read_experiment(path: str | Path) -> dict[str, str]:
    return json.loads(Path(path).read_text())


def metric_name(text: str) -> str:
    """``text`` made valid as part of an MLflow metric name (a class label, say)."""
    return re.sub(r"[^\w\-. /]", "_", text)


# Causes worth naming alone, found in the (long, nested) messages of MLflow's and SQLite's errors.
FAILURE_CAUSES = (
    "Connection refused",
    "Name or service not known",
    "timed out",
    "database is locked",
    "Read-only file system",
    "No space left on device",
    "database or disk is full",
)


def failure_text(err: BaseException) -> str:
    """An exception in one short line: its type and its cause (a known one, else the first
    line of its message)."""
    text = str(err).strip()
    cause = next((c for c in FAILURE_CAUSES if c.lower() in text.lower()), None)
    first = cause or (text.splitlines()[0] if text else "")
    return f"{type(err).__name__}: {first}"[:200]


def tell_store_failed(tracking_uri: str, failure: str) -> None:
    """Say, in the job's log and on the terminal (:func:`adaptune.logs.to_log_file`), that the
    store failed and what happens to this run's record."""
    logging.getLogger(NOTICE).warning(
        "MLflow at %s stopped answering (%s): this job goes on without it and writes its "
        "files; the next snakemake brings MLflow up to date from them once it answers again "
        "(or now: adaptune sync-mlflow CONFIG)",
        tracking_uri,
        failure,
    )


class TrackedRun:
    """One MLflow run, logged into by id (``MlflowClient``), with retries on SQLite locks.

    A job's run is best effort (``best_effort``): the first call that fails (the store went
    away, a tracking server stopped answering) is told once, naming the store
    (:func:`tell_store_failed`), and every later call is skipped, so that the job finishes and
    writes its files; the next workflow run logs them again (:mod:`adaptune.records`). Otherwise
    (the re-logging itself) a failure raises. A run without an id (its store could not create
    it) logs nothing."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        tracking_uri: str = "",
        best_effort: bool = False,
        reopened: bool = False,
    ) -> None:
        self.client, self.run_id = client, run_id
        self.tracking_uri, self.best_effort = tracking_uri, best_effort
        self.failure: str | None = None
        self.reopened = reopened  # a resumed job's run, opened again (see start_run)
        self.held: dict[str, set[int]] = {}  # log_steps_once's: the steps each key holds

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``function(*args, **kwargs)``, or None in a best-effort run once one call failed."""
        if self.failure is not None:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as err:
            if not self.best_effort:
                raise
            self.failure = failure_text(err)
            log.info(
                "MLflow call %s failed", getattr(function, "__name__", function), exc_info=True
            )
            tell_store_failed(self.tracking_uri, self.failure)
            return None

    def _client_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The client's ``method`` with retries on SQLite locks, through :meth:`call`."""
        return self.call(lambda: retrying(getattr(self.client, method))(*args, **kwargs))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params a call
            self._client_call("log_batch", self.run_id, params=batch[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_steps([{**metrics, "step": step or 0}])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client_call("set_tag", self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._client_call("log_artifact", self.run_id, str(path), folder)

    def log_steps(self, rows: Sequence[Mapping[str, float]]) -> None:
        """Per-step metrics: each row's ``step`` and its other values."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k != "step"
        ]
        for start in range(0, len(batch), 1000):
            self._client_call("log_batch", self.run_id, metrics=batch[start : start + 1000])

    def log_steps_once(self, rows: Sequence[Mapping[str, float]]) -> int:
        """:meth:`log_steps`, leaving out each (metric, step) that the run holds already (a
        resumed job's rows whose logging a kill may or may not have cut short). Each key's
        history is read from the store once, then kept up to date here. Returns how many
        values it logged."""
        keys = {k for row in rows for k in row if k != "step"} - self.held.keys()
        read = self.call(
            lambda: {
                key: {m.step for m in retrying(self.client.get_metric_history)(self.run_id, key)}
                for key in keys
            }
        )
        if read is None:  # the store does not answer
            return 0
        self.held.update(read)
        held = self.held
        missing = [
            {"step": row["step"], **{k: v for k, v in row.items() if k != "step"}} for row in rows
        ]
        missing = [
            {k: v for k, v in row.items() if k == "step" or int(row["step"]) not in held[k]}
            for row in missing
        ]
        missing = [row for row in missing if len(row) > 1]
        self.log_steps(missing)
        for row in missing:
            for key in row.keys() - {"step"}:
                held[key].add(int(row["step"]))
        return sum(len(row) - 1 for row in missing)

    def log_dict(self, values: Mapping[str, Any], name: str) -> None:
        self._client_call("log_dict", self.run_id, dict(values), name)

    def log_dataset(self, frame: Any, name: str, source: str, digest: str, context: str) -> None:
        """``frame`` as an MLflow dataset input of the run (the Datasets column), named and
        fingerprinted as ``data.json`` knows it."""
        import mlflow.data
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = mlflow.data.from_pandas(
            frame, source=LocalArtifactDatasetSource(source), name=name, digest=digest[:36]
        )
        entity = DatasetInput(
            dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        )
        self._client_call("log_inputs", self.run_id, datasets=[entity])

    def logged(self, stage: str) -> None:
        """Mark the run's logging by ``stage`` complete (:data:`LOGGED_TAG`): the last call."""
        self.set_tags({LOGGED_TAG: stage})


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (Snakemake stopping its jobs, SLURM cancelling one) raises :class:`Interrupted`,
    so that the run is ended as KILLED instead of being left RUNNING."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    with signals.handling_sigterm(interrupt):
        yield


@contextlib.contextmanager
def start_run(
    experiment: Mapping[str, str],
    key: str,
    run_name: str,
    tags: Mapping[str, str],
    best_effort: bool = True,
    start_time: int | None = None,
    end_time: Callable[[], int | None] = lambda: None,
    run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """A new run of ``key`` in ``experiment``, replacing (ending, tagging and deleting) any
    earlier run of the same key and workspace; ended FINISHED (at ``end_time()``, epoch ms,
    or now), or FAILED when the block raises, or KILLED when it is interrupted. A job's run is
    ``best_effort`` (:class:`TrackedRun`): a store that does not answer costs its record, not
    the job.

    With ``run_id`` (a job resuming from its checkpoint), that run is opened again (RUNNING
    once more, its metrics kept; ``reopened`` is True) if it is a live run of ``key`` in this
    workspace; otherwise a new run starts as above (``reopened`` False)."""
    run = TrackedRun(None, "", experiment["tracking_uri"], best_effort)
    run.client = run.call(_client, run.tracking_uri)
    if run_id and run.call(_reopen, run.client, experiment, key, run_id):
        run.run_id, run.reopened = run_id, True
    if not run.run_id:
        all_tags = {**tags, KEY_TAG: key, WORKSPACE_TAG: experiment["workspace"]}
        created = run._client_call(
            "create_run",
            experiment["experiment_id"],
            run_name=run_name,
            tags=all_tags,
            start_time=start_time,
        )
        if created is not None:
            run.run_id = created.info.run_id
    if run.run_id:
        run.call(_supersede, run.client, experiment, key, run.run_id)
    status = "FINISHED"
    try:
        with _stop_on_sigterm():
            yield run
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if run.run_id:
            try:
                run._client_call("set_terminated", run.run_id, status, end_time())
            except Exception:
                if status == "FINISHED":
                    raise
                log.warning("could not mark MLflow run %s %s", run.run_id, status, exc_info=True)


def _reopen(client: Any, experiment: Mapping[str, str], key: str, run_id: str) -> bool:
    """Set the run ``run_id`` RUNNING again, if it exists, is not deleted and is ``key``'s in
    this workspace; whether it did."""
    from mlflow.exceptions import MlflowException

    try:
        found = retrying(client.get_run)(run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # the store, not the run, is the problem
        return False
    tags = found.data.tags
    if (
        found.info.lifecycle_stage != "active"
        or tags.get(KEY_TAG) != key
        or tags.get(WORKSPACE_TAG) != experiment["workspace"]
    ):
        return False
    retrying(client.update_run)(run_id, status="RUNNING")
    log.info("MLflow run %s (%s, was %s) reopened", run_id, key, found.info.status)
    return True


def _supersede(client: Any, experiment: Mapping[str, str], key: str, current: str) -> None:
    """End, tag and delete the other live runs of ``key`` in this workspace."""
    query = f"tags.`{KEY_TAG}` = '{key}' and tags.`{WORKSPACE_TAG}` = '{experiment['workspace']}'"
    for old in retrying(client.search_runs)([experiment["experiment_id"]], query):
        if old.info.run_id == current:
            continue
        if old.info.status == "RUNNING":
            retrying(client.set_terminated)(old.info.run_id, "KILLED")
        retrying(client.set_tag)(old.info.run_id, SUPERSEDED_TAG, current)
        retrying(client.delete_run)(old.info.run_id)
        log.info(
            "MLflow run %s (%s, %s) replaced by %s and deleted",
            old.info.run_id,
            key,
            old.info.status,
            current,
        )


def log_flavor_model(
    log_model: Callable[..., Any],
    run_id: str,
    tracking_uri: str,
    packages: Sequence[str],
    inputs: Any,
    outputs: Any,
    **kwargs: Any,
) -> str:
    """Log a model into run ``run_id`` with an MLflow flavor's ``log_model``, its signature
    made of the ``inputs`` and ``outputs`` schemas; its requirements are the installed versions
    of torch and ``packages`` (not inferred: inferring loads the model in a subprocess).
    Returns the logged model's URI."""
    import importlib.metadata

    import mlflow
    from mlflow.models import ModelSignature

    mlflow.set_tracking_uri(store_uri(tracking_uri))
    # The logged model belongs to the run's experiment (and its artifact location), not to
    # whichever experiment is active in this process.
    run = retrying(_client(tracking_uri).get_run)(run_id)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", *packages)]
    signature = ModelSignature(inputs=inputs, outputs=outputs)
    info = retrying(log_model)(
        name="model", run_id=run_id, pip_requirements=pins, signature=signature, **kwargs
    )
    return str(info.model_uri)


def logged_model_uri(tracking_uri: str, run_id: str) -> str | None:
    """The ``models:/...`` URI of the model logged in run ``run_id`` (None if it has none)."""
    client = _client(tracking_uri)
    run = retrying(client.get_run)(run_id)
    found = retrying(client.search_logged_models)(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return str(found[0].model_uri) if found else None


def register_champion(tracking_uri: str, name: str, run_id: str, description: str) -> int | None:
    """Register the model logged in run ``run_id`` as a version of the registered model
    ``name`` (once: a version of the same run is reused) and point its ``champion`` alias at
    it; returns the version (None when the run logged no model)."""
    import mlflow

    # the registry resolves models:/ URIs through it
    mlflow.set_tracking_uri(store_uri(tracking_uri))
    client = _client(tracking_uri)
    versions = []
    if retrying(client.search_registered_models)(f"name = '{name}'"):
        versions = retrying(client.search_model_versions)(
            f"name = '{name}' and run_id = '{run_id}'"
        )
    if versions:
        version = versions[0]
    else:
        model_uri = logged_model_uri(tracking_uri, run_id)
        if model_uri is None:
            log.warning("MLflow run %s logged no model: nothing to register as %s", run_id, name)
            return None
        # register_model links the version to the logged model (a tracking server needs that)
        version = retrying(mlflow.register_model)(model_uri, name)
        retrying(client.update_model_version)(name, version.version, description)
    retrying(client.set_registered_model_alias)(name, CHAMPION, str(version.version))
    return int(version.version)


def source_tags(stage: str, description: str) -> dict[str, str]:
    """What made a run: the stage (MLflow's Source column), the git commit of the working
    folder (with ``adaptune.git_dirty`` when it has uncommitted changes) and a description
    (the run page's Description)."""
    import subprocess

    import adaptune

    tags = {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": f"snakemake rule {stage} (adaptune {adaptune.__version__})",
        "mlflow.note.content": description,
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
        tags["adaptune.git_dirty"] = str(bool(status.stdout.strip())).lower()
    return tags


@contextlib.contextmanager
def system_metrics(run: TrackedRun, interval: float = 10.0) -> Iterator[None]:
    """CPU, memory, disk (and GPU, where there is one) sampled into ``run`` while the block
    runs (MLflow's ``system/...`` metrics); nothing where the run has no store."""
    if not run.run_id or run.failure is not None:
        yield
        return
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run.run_id, interval, tracking_uri=store_uri(run.tracking_uri)
        )
        monitor.start()
    except Exception as err:  # no psutil, or the monitor cannot start: train anyway
        log.warning("no system metrics for this run: %s", err)
        yield
        return
    try:
        yield
    finally:
        try:
            monitor.finish()
        except Exception as err:  # its store went away: the run's record is rebuilt later
            log.warning("system metrics not finished: %s", failure_text(err))


def existing_run(experiment: Mapping[str, str], run_id: str) -> TrackedRun:
    """A run made earlier (by ``finetune``), to log more into without reopening it, best
    effort (:class:`TrackedRun`). Without an id (its training could not reach the store) it logs
    nothing: the next workflow run logs the whole run from its files."""
    run = TrackedRun(None, run_id, experiment["tracking_uri"], best_effort=True)
    if not run_id:
        run.failure = "no MLflow run id"
        log.warning(
            "this run has no MLflow run (its training could not reach %s): the next snakemake "
            "logs it from its files",
            run.tracking_uri,
        )
        return run
    run.client = run.call(_client, run.tracking_uri)
    return run
