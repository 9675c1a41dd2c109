"""MLflow records of the runs, made from their files: the files are the source of truth, and the
tracking store is a view of them.

Each stage logs its part of a run from what it writes: ``finetune`` from the job and tags its
``settings.json`` holds, its splits, the per-epoch rows of ``history.csv``, the model folder
and ``train_summary.json`` (:func:`adaptune.finetune.log_run_inputs`,
:func:`~adaptune.finetune.log_run_outputs`); ``evaluate`` and ``fit_baseline`` their
``metrics.json`` and confusion files (:func:`adaptune.evaluation.log_evaluation`). Each ends by
tagging the run ``adaptune.logged`` with its name. So the same record is logged again, by the
same functions, from the files alone (:func:`relog_finetune`, :func:`relog_baseline`), without
retraining,
when the store lacks it (:func:`find_gaps`): the store was deleted, replaced by another, is a
different one than the runs were logged to, or stopped answering while a job logged.

When the workflow starts, before any job, :func:`bring_up_to_date` looks for gaps and fills
them (:func:`sync`): it recreates the experiment where needed, logs each run again as a new
run of its key (the one live run per key), writes the new run id into the run's
``mlflow_run_id`` (an ``ancient`` input of the stages after it, so nothing reruns) and points
the registry's ``champion`` aliases at the new runs. A dry run says what a run would do.
``adaptune sync-mlflow CONFIG`` does the same by hand, and recreates a lost
``mlflow_experiment.json`` (:func:`check_experiment_file`).

Not in the files, so not rebuilt: the per-step training loss, learning rate and gradient norm
(a rebuilt run has the per-epoch curves), system metrics, and registry versions of earlier
champions.

The Snakefile imports this module when it parses (:func:`bring_up_to_date`), so the stages'
modules (torch, transformers: 3.6 s for ``import adaptune.finetune``, measured on 2026-12-01) are
imported in the functions that log a run again, which a workflow whose store is whole never calls.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from adaptune import tracking
from adaptune.errors import TrackingError
from adaptune.logs import to_log_file

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "mlflow_experiment.json"
# Which stage's logging completes a run, in order (a later one implies the earlier).
STAGES = ("finetune", "evaluate")
# A fine-tuning run's folder: its job's outputs (rule finetune).
FINETUNE_FILES = {
    "model": "model",
    "history": "history.csv",
    "summary": "train_summary.json",
    "settings": "settings.json",
    "run_id": "mlflow_run_id",
}
EVALUATION_FILES = {
    "metrics": "metrics.json",
    "per_class": "per_class.csv",
    "confusion": "confusion.csv",
    "confusion_png": "confusion.png",
}


# --- the runs a results folder holds -----------------------------------------------------------


@dataclass(frozen=True)
class FinishedRun:
    """A finished run in the files: its folder, MLflow key, the run id its files name ("":
    none) and the stage whose logging completes it (``finetune``, ``evaluate``, ``baseline``)."""

    folder: Path
    key: str
    run_id: str
    expects: str

    @property
    def is_baseline(self) -> bool:
        return self.expects == "baseline"


def _finished_finetune(folder: Path) -> bool:
    return all((folder / file).exists() for file in FINETUNE_FILES.values())


def finished_runs(results: str | Path) -> list[FinishedRun]:
    """Every finished run under ``results`` (one experiment's folder): a folder with an
    ``mlflow_run_id`` and all of its stage's outputs. A fine-tuning run whose ``metrics.json``
    is at least as new as its training is complete once evaluated; a baseline, once fitted."""
    found = []
    for top, folders, files in os.walk(results):
        folders[:] = sorted(f for f in folders if f not in ("mlartifacts", "model", "logs"))
        folder = Path(top)
        if "mlflow_run_id" not in files:
            continue
        run_id = (folder / "mlflow_run_id").read_text().strip()
        metrics = folder / "metrics.json"
        if "settings.json" in files:
            if not _finished_finetune(folder):
                continue  # its job has not finished: it logs the run itself
            run = json.loads((folder / "settings.json").read_text())["run"]
            summary = folder / "train_summary.json"
            evaluated = metrics.is_file() and metrics.stat().st_mtime >= summary.stat().st_mtime
            key = f"{run['strategy']}/k{run['shots']}/seed{run['seed']}"
            found.append(FinishedRun(folder, key, run_id, STAGES[evaluated]))
        elif metrics.is_file():
            row = json.loads(metrics.read_text())
            found.append(
                FinishedRun(folder, f"{row['strategy']}/k{row['shots']}", run_id, "baseline")
            )
    return found


def _complete(status: str, logged: str | None, expects: str) -> bool:
    """Whether a live run holds what its files say: its completion tag names the stage the
    files expect (or a later one); a run logged before the tag existed, once FINISHED."""
    if logged is None:
        return status == "FINISHED"
    if expects in STAGES and logged in STAGES:
        return STAGES.index(logged) >= STAGES.index(expects)
    return logged == expects


# --- what the store holds ----------------------------------------------------------------------


@dataclass
class StoreView:
    """What a store holds of an experiment's runs: a problem with the experiment itself (None:
    it is there, by its id and name), the live runs by id (status and completion tag), and
    the run each registered model's ``champion`` alias points at."""

    problem: str | None
    runs: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    champions: dict[str, str] = field(default_factory=dict)


def _sqlite_view(path: Path, experiment_id: str, name: str, models: list[str]) -> StoreView:
    """Read from a SQLite store's tables, without MLflow (whose import and schema check take
    seconds at each start of the workflow)."""
    if not path.is_file():
        return StoreView(f"has no database file {path.resolve()} (deleted?)")
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master")}
        if "experiments" not in tables:
            return StoreView("holds no experiments (a new, empty store)")
        row = db.execute(
            "select name, lifecycle_stage from experiments where experiment_id = ?",
            (int(experiment_id),),
        ).fetchone()
        if row is None or row[0] != name or row[1] != "active":
            return StoreView(_missing_experiment(name, experiment_id, row))
        runs = {
            run_id: (status, logged)
            for run_id, status, logged in db.execute(
                "select r.run_uuid, r.status, (select value from tags t where t.run_uuid = "
                "r.run_uuid and t.key = ?) from runs r where r.experiment_id = ? and "
                "r.lifecycle_stage = 'active'",
                (tracking.LOGGED_TAG, int(experiment_id)),
            )
        }
        champions = {}
        if {"registered_model_aliases", "model_versions"} <= tables:
            for model in models:
                found = db.execute(
                    "select v.run_id from registered_model_aliases a join model_versions v on "
                    "v.name = a.name and v.version = a.version where a.name = ? and a.alias = ?",
                    (model, tracking.CHAMPION),
                ).fetchone()
                if found:
                    champions[model] = found[0]
    return StoreView(None, runs, champions)


def _missing_experiment(name: str, experiment_id: str, found: Any) -> str:
    if found is None:
        return (
            f"does not hold the experiment {name!r} (id {experiment_id}) the runs were logged "
            "to (the store was deleted, or replaced by another)"
        )
    if tuple(found) == (name, "deleted"):
        return f"holds the experiment {name!r} (id {experiment_id}) as deleted"
    return (
        f"holds, as experiment id {experiment_id}, {found[0]!r} ({found[1]}), not the "
        f"experiment {name!r} the runs were logged to (the store was replaced by another)"
    )


def _rest(uri: str, endpoint: str, body: Mapping[str, Any] | None = None) -> dict | None:
    """A call of MLflow's REST API (None for "does not exist")."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def _server_view(
    uri: str, experiment_id: str, name: str, workspace: str, models: list[str]
) -> StoreView:
    """Read through a tracking server's REST API, without MLflow's client."""
    query = urllib.parse.urlencode({"experiment_id": experiment_id})
    found = _rest(uri, f"experiments/get?{query}")
    experiment = (found or {}).get("experiment")
    if (
        experiment is None
        or experiment["name"] != name
        or experiment["lifecycle_stage"] != "active"
    ):
        row = (experiment["name"], experiment["lifecycle_stage"]) if experiment else None
        return StoreView(_missing_experiment(name, experiment_id, row))
    runs, token = {}, None
    while True:
        body = {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`{tracking.WORKSPACE_TAG}` = '{workspace}'",
            "max_results": 1000,
            **({"page_token": token} if token else {}),
        }
        page = _rest(uri, "runs/search", body) or {}
        for run in page.get("runs", []):
            tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
            runs[run["info"]["run_id"]] = (run["info"]["status"], tags.get(tracking.LOGGED_TAG))
        token = page.get("next_page_token")
        if not token:
            break
    champions = {}
    for model in models:
        query = urllib.parse.urlencode({"name": model, "alias": tracking.CHAMPION})
        version = (_rest(uri, f"registered-models/alias?{query}") or {}).get("model_version")
        if version:
            champions[model] = version.get("run_id", "")
    return StoreView(None, runs, champions)


def _client_view(
    uri: str, experiment_id: str, name: str, workspace: str, models: list[str]
) -> StoreView:
    """Any other store (PostgreSQL, MySQL), through MLflow's client."""
    from mlflow.exceptions import MlflowException

    client = tracking._client(uri)
    try:
        experiment = client.get_experiment(experiment_id)
    except MlflowException:
        experiment = None
    if experiment is None or experiment.name != name or experiment.lifecycle_stage != "active":
        row = (experiment.name, experiment.lifecycle_stage) if experiment else None
        return StoreView(_missing_experiment(name, experiment_id, row))
    query = f"tags.`{tracking.WORKSPACE_TAG}` = '{workspace}'"
    runs = {
        run.info.run_id: (run.info.status, run.data.tags.get(tracking.LOGGED_TAG))
        for run in client.search_runs([experiment_id], query, max_results=50000)
    }
    champions = {}
    for model in models:
        with contextlib.suppress(MlflowException):
            champions[model] = client.get_model_version_by_alias(model, tracking.CHAMPION).run_id
    return StoreView(None, runs, champions)


def store_view(experiment: Mapping[str, str], models: list[str]) -> StoreView:
    """What the store of ``experiment`` (a ``mlflow_experiment.json``) holds of it."""
    uri, experiment_id = experiment["tracking_uri"], str(experiment["experiment_id"])
    name, workspace = experiment["experiment_name"], experiment["workspace"]
    path = tracking.sqlite_file(uri)
    if path is not None:
        return _sqlite_view(path, experiment_id, name, models)
    if tracking.is_server(uri):
        return _server_view(uri, experiment_id, name, workspace, models)
    return _client_view(uri, experiment_id, name, workspace, models)


# --- gaps between the files and the store ------------------------------------------------------


@dataclass
class Gaps:
    """What a store lacks of a results folder: why, the runs to log again, and the registered
    models whose ``champion`` is not the run the report selected."""

    reason: str
    runs: list[FinishedRun]
    champions: list[str]


def selected_runs(results: Path, name: str, runs: list[FinishedRun]) -> dict[str, FinishedRun]:
    """The run the report selected per shot count (``report/best_per_shots.csv``), by the
    registered model whose ``champion`` it is (``<experiment>-k<shots>``)."""
    best = results / "report" / "best_per_shots.csv"
    if not best.is_file():
        return {}
    by_key = {run.key: run for run in runs}
    selected = {}
    for row in pd.read_csv(best, dtype={"shots": str}).itertuples(index=False):
        key = f"{row.model_strategy}/k{row.shots}/seed{int(row.model_seed)}"
        if key in by_key:
            selected[f"{name}-k{row.shots}"] = by_key[key]
    return selected


def find_gaps(results: str | Path, tracking_uri: str, name: str) -> Gaps | None:
    """What the store at ``tracking_uri`` lacks of the finished runs under ``results`` (None:
    nothing), as ``mlflow_experiment.json`` there recorded them: the runs were logged to
    another store or experiment; the experiment is gone (the store deleted or replaced); or
    some runs are missing or incomplete (a job could not reach the store)."""
    results = Path(results)
    recorded = tracking.read_experiment(results / EXPERIMENT_FILE)
    runs = finished_runs(results)
    selected = selected_runs(results, name, runs)
    if (recorded["tracking_uri"], recorded["experiment_name"]) != (tracking_uri, name):
        where = f"{recorded['tracking_uri']} (experiment {recorded['experiment_name']!r})"
        return Gaps(f"is not the store the runs were logged to, {where}", runs, list(selected))
    view = store_view(recorded, list(selected))
    if view.problem is not None:
        return Gaps(view.problem, runs, list(selected))
    missing = [
        run
        for run in runs
        if run.run_id not in view.runs or not _complete(*view.runs[run.run_id], run.expects)
    ]
    champions = [m for m, run in selected.items() if view.champions.get(m) != run.run_id]
    if not missing and not champions:
        return None
    reason = f"lacks {len(missing)} of the {len(runs)} finished runs' records"
    if champions:
        reason += f" and the champion of {', '.join(champions)}"
    return Gaps(
        f"{reason} (a job could not reach it, or the store was replaced)", missing, champions
    )


def check_experiment_file(results: str | Path, command: str) -> None:
    """When the workflow is parsed: a results folder whose finished runs lost their
    ``mlflow_experiment.json`` is a TrackingError naming ``command``, which recreates it
    (Snakemake would retrain every run that takes it as input)."""
    results = Path(results)
    if (results / EXPERIMENT_FILE).is_file():
        return
    runs = finished_runs(results)
    if runs:
        raise TrackingError(
            f"{results / EXPERIMENT_FILE} is missing, but {len(runs)} finished run(s) in "
            f"{results} log into MLflow through it: snakemake would train them all again. "
            f"Recreate it, without retraining: {command}"
        )


def bring_up_to_date(
    results: str | Path,
    tracking_uri: str,
    name: str,
    artifact_root: str | Path,
    execute: bool,
    locked: bool = False,
) -> dict[str, Any] | None:
    """When the workflow starts (its jobs not yet running): where the store lacks some of
    what the files under ``results`` hold (:func:`find_gaps`), log it again (:func:`sync`,
    logged to ``logs/sync_mlflow.log``) when the workflow executes, or say that it
    will (a dry run). Says what it did in one line; a failure costs nothing but the record
    (the next run tries again). Nothing before the experiment's first creation, nor while
    another snakemake holds the folder (``locked``)."""
    results = Path(results)
    if locked or not (results / EXPERIMENT_FILE).is_file():
        return None
    try:
        gaps = find_gaps(results, tracking_uri, name)
    except (OSError, ValueError, KeyError, sqlite3.Error) as err:
        gaps = Gaps(f"could not be read ({tracking.failure_text(err)})", [], [])
    if gaps is None:
        return None
    said = f"adaptune: MLflow at {tracking_uri} {gaps.reason}"
    what = f"{len(gaps.runs)} run(s) of {results} to log again from their files, nothing retrains"
    if not execute:
        print(f"{said}: the workflow brings it up to date when it runs ({what})", file=sys.stderr)
        return None
    log_path = results / "logs" / "sync_mlflow.log"
    print(f"{said}: bringing it up to date ({what}; log: {log_path})", file=sys.stderr)
    try:
        with to_log_file(log_path, job=False):
            done = sync(tracking_uri, name, artifact_root, results)
    except Exception as err:
        print(
            f"adaptune: MLflow at {tracking_uri} is not up to date: "
            f"{err if isinstance(err, TrackingError) else tracking.failure_text(err)} (log: "
            f"{log_path}); the runs' files are intact, and the next snakemake tries again",
            file=sys.stderr,
        )
        return None
    print(
        f"adaptune: MLflow at {tracking_uri} holds every finished run of {results} again "
        f"({len(done['relogged'])} logged from their files, experiment {name!r} id "
        f"{done['experiment_id']})",
        file=sys.stderr,
    )
    return done


# --- logging the files again -------------------------------------------------------------------


def _ms(path: Path) -> int:
    return int(path.stat().st_mtime * 1000)


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


def finetune_job(folder: Path, results: Path) -> tuple[Any, dict[str, str]]:
    """The job that trained the run in ``folder`` and the run's tags, from its
    ``settings.json``; its outputs are the folder's files (wherever the folder is now), its
    inputs and artifacts those still there. A run trained before ``settings.json`` held them
    gets what its other sections say: its data is ``data/data.json``, its tags the run's own,
    and no splits, plan or importance tables are named."""
    from adaptune.finetune import FinetuneJob, RunKey

    record = json.loads((folder / "settings.json").read_text())
    outputs = {name: str(folder / file) for name, file in FINETUNE_FILES.items()}
    if "job" in record:
        job = FinetuneJob.from_dict(record["job"])
        inputs = {k: v for k, v in job.inputs.items() if Path(v).exists()}
        artifacts = {k: v for k, v in job.artifacts.items() if Path(v).is_file()}
        return FinetuneJob(
            job.key, job.model, job.train, inputs, outputs, artifacts, job.resolved
        ), record["tags"]
    run = record["run"]
    key = RunKey(run["strategy"], str(run["shots"]), int(run["seed"]))
    inputs = {"info": str(results / "data" / "data.json")}
    tags = {
        "strategy": key.strategy,
        "shots": key.shots,
        "seed": str(key.seed),
        "adaptune.group": f"{key.strategy}/k{key.shots}",
        "stage": "finetune",
    }
    return FinetuneJob(key, record["model"], record["train"], inputs, outputs), tags


def relog_finetune(experiment: Mapping[str, str], tracked: FinishedRun, results: Path) -> str:
    """Log a fine-tuning run again from its folder, through the functions its job logged with
    (:mod:`adaptune.finetune`): a new run of its key (replacing any live one), with its params,
    config, datasets, per-epoch curves, model, artifacts and, once evaluated, test metrics; its
    start and end times those of its files. Writes the new id into ``mlflow_run_id`` and
    returns it."""
    from adaptune import finetune, modalities
    from adaptune.data import read_split
    from adaptune.data_info import DataInfo
    from adaptune.evaluation import log_evaluation

    folder = tracked.folder
    job, tags = finetune_job(folder, results)
    record = json.loads((folder / "settings.json").read_text())
    summary = json.loads((folder / "train_summary.json").read_text())
    info = DataInfo.read(job.inputs["info"])
    frames = {
        context: read_split(job.inputs[split])
        for split, context in (("train", "train"), ("val", "validation"))
        if split in job.inputs
    }
    example = frames.get("train")
    if example is None:
        example = read_split(Path(job.inputs["info"]).with_name("test.parquet"))
    tags = {
        "data_fingerprint": info.fingerprint,
        **tags,
        tracking.REBUILT_TAG: f"{folder} (was run {tracked.run_id or 'none'})",
    }
    evaluated = tracked.expects == "evaluate"
    trained = folder / "train_summary.json"
    last = folder / ("metrics.json" if evaluated else "train_summary.json")
    with tracking.start_run(
        experiment,
        tracked.key,
        job.key.run_name,
        tags,
        best_effort=False,
        start_time=_ms(trained) - int(1000 * summary["train_seconds"]),
        end_time=lambda: _ms(last),
    ) as run:
        device = summary.get("device", "")
        finetune.log_run_inputs(run, job, info, record["plan"], device, frames)
        history = pd.read_csv(folder / "history.csv").to_dict(orient="records")
        run.log_steps([finetune.epoch_metrics(row) for row in history])
        modality = modalities.for_data(info)
        finetune.log_run_outputs(run, job, summary, modality, example.head(2))
        if evaluated:
            metrics = json.loads((folder / "metrics.json").read_text())
            outputs = {key: str(folder / name) for key, name in EVALUATION_FILES.items()}
            log_evaluation(run, metrics, outputs, stage="evaluate")
        write_atomically(folder / "mlflow_run_id", run.run_id + "\n")
    return run.run_id


def relog_baseline(experiment: Mapping[str, str], tracked: FinishedRun) -> str:
    """Log a baseline again from its folder (params, test metrics, confusion files)."""
    from adaptune.evaluation import log_evaluation

    folder = tracked.folder
    metrics = json.loads((folder / "metrics.json").read_text())
    logged = metrics.get("mlflow", {})
    name, shots = metrics["strategy"], str(metrics["shots"])
    tags = {
        **(
            logged.get("tags")
            or {"strategy": name, "shots": shots, "seed": "0", "stage": "baseline"}
        ),
        tracking.REBUILT_TAG: f"{folder} (was run {tracked.run_id or 'none'})",
    }
    with tracking.start_run(
        experiment,
        tracked.key,
        f"{name}-k{shots}",
        tags,
        best_effort=False,
        start_time=_ms(folder / "metrics.json"),
        end_time=lambda: _ms(folder / "metrics.json"),
    ) as run:
        run.log_params(logged.get("params") or {"strategy": name, "shots": shots})
        outputs = {key: str(folder / file) for key, file in EVALUATION_FILES.items()}
        log_evaluation(run, metrics, outputs, stage="baseline")
        write_atomically(folder / "mlflow_run_id", run.run_id + "\n")
    return run.run_id


def register_selected(
    results: Path, experiment: Mapping[str, str], runs: list[FinishedRun]
) -> dict[str, int]:
    """Point each ``champion`` alias at the run the report selected, as the report does."""
    from adaptune.report import register_champions

    best = results / "report" / "best_per_shots.csv"
    if not best.is_file():
        return {}
    folders = {}
    for run in runs:
        if not run.is_baseline:
            settings = json.loads((run.folder / "settings.json").read_text())["run"]
            folders[(settings["strategy"], str(settings["shots"]), int(settings["seed"]))] = (
                run.folder
            )
    table = pd.read_csv(best, dtype={"shots": str})
    return register_champions(table, folders, experiment, best_effort=False)


def sync(
    tracking_uri: str, name: str, artifact_root: str | Path, results: str | Path
) -> dict[str, Any]:
    """Make the store at ``tracking_uri`` hold the experiment ``name`` and every finished run
    under ``results`` (:func:`find_gaps`), logging what it lacks again from the files, and
    the registry's ``champion`` aliases; write ``mlflow_experiment.json``. Returns what was
    done. A run that cannot be logged is a TrackingError."""
    results = Path(results)
    experiment = tracking.ensure_experiment(tracking_uri, name, artifact_root, results)
    write_atomically(results / EXPERIMENT_FILE, json.dumps(experiment, indent=2) + "\n")
    gaps = find_gaps(results, tracking_uri, name)
    relogged: dict[str, str] = {}
    for tracked in gaps.runs if gaps else []:
        log.info("logging %s again from %s", tracked.key, tracked.folder)
        try:
            if tracked.is_baseline:
                relogged[tracked.key] = relog_baseline(experiment, tracked)
            else:
                relogged[tracked.key] = relog_finetune(experiment, tracked, results)
        except Exception as err:
            raise TrackingError(
                f"mlflow.tracking_uri = {tracking_uri!r}: cannot log {tracked.key} again from "
                f"{tracked.folder}: {tracking.failure_text(err)}; its files are intact, and the "
                "next snakemake tries again"
            ) from err
    champions = {}
    if gaps and (gaps.champions or relogged):
        champions = register_selected(results, experiment, finished_runs(results))
    done = {
        "tracking_uri": tracking_uri,
        "experiment_id": experiment["experiment_id"],
        "found": gaps.reason if gaps else "nothing missing",
        "relogged": relogged,
        "champions": champions,
    }
    log.info(
        "MLflow at %s holds experiment %r and every finished run of %s (%d logged again from "
        "their files)",
        tracking_uri,
        name,
        results,
        len(relogged),
    )
    return done
