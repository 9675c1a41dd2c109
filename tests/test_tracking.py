"""A real MLflow tracking server holds everything: runs, parameters, metrics and artifacts, with
nothing of them on the disk of the checkout that ran the workflow."""

from __future__ import annotations

import importlib.util
import json

import pandas as pd
import pytest

from adaptune import tracking
from adaptune.errors import ConfigError

from .conftest import Workflow, tiny_config
from .services import mlflow_server

HAS_KUBERNETES = importlib.util.find_spec("snakemake_executor_plugin_kubernetes") is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def test_local_artifact_locations_are_told_apart():
    assert tracking.is_local_location("file:///srv/mlruns/1")
    assert tracking.is_local_location("/srv/mlruns/1")
    assert tracking.is_local_location("./mlruns/1")
    assert not tracking.is_local_location("mlflow-artifacts:/1")
    assert not tracking.is_local_location("s3://bucket/mlflow/1")


def test_an_experiment_on_a_server_gets_the_servers_artifact_location(server, tmp_path):
    """Two checkouts (two results folders) share one experiment, whose artifacts the server
    holds; the local artifact root is neither used nor made."""
    from mlflow.tracking import MlflowClient

    first = tracking.ensure_experiment(
        server.uri, "shared", tmp_path / "a/mlartifacts", tmp_path / "a"
    )
    second = tracking.ensure_experiment(
        server.uri, "shared", tmp_path / "b/mlartifacts", tmp_path / "b"
    )
    assert first["experiment_id"] == second["experiment_id"]
    assert first["workspace"] != second["workspace"]
    location = MlflowClient(server.uri).get_experiment(first["experiment_id"]).artifact_location
    assert location.startswith("mlflow-artifacts:"), location
    assert not (tmp_path / "a/mlartifacts").exists()
    assert not (tmp_path / "b/mlartifacts").exists()


def test_a_server_experiment_with_a_local_artifact_path_is_refused(server, tmp_path):
    from mlflow.tracking import MlflowClient

    MlflowClient(server.uri).create_experiment(
        "old-local", artifact_location=(tmp_path / "on-my-disk").as_uri()
    )
    with pytest.raises(
        ConfigError,
        match=r"'old-local' there keeps its artifacts at 'file://.*on-my-disk'.*"
        r"--artifacts-destination.*mlflow.experiment_name",
    ):
        tracking.ensure_experiment(server.uri, "old-local", tmp_path / "art", tmp_path)


@pytest.mark.workflow
def test_the_workflow_tracks_everything_to_the_server(server, tmp_path, tiny_bert_dir):
    from mlflow.tracking import MlflowClient

    config = tiny_config(tiny_bert_dir, experiment="served")
    config["strategies"] = {"head_only": {"kind": "head_only", "train": {"lr": 1e-3}}}
    config["mlflow"] = {"tracking_uri": server.uri}
    flow = Workflow(tmp_path / "checkout", config)
    flow.run("--cores", "2")

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("served")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = {
        run.data.tags["adaptune.key"]: run for run in client.search_runs([experiment.experiment_id])
    }
    assert set(runs) == {"head_only/k4/seed0", "tfidf_logreg/k4"}

    results = flow.results("served")
    run_dir = results / "runs/head_only/k4/seed0"
    run = runs["head_only/k4/seed0"]
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    assert run.info.status == "FINISHED"
    # parameters, training curves and test metrics, as the files of the run say
    summary = json.loads((run_dir / "train_summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.params["lr"] == "0.001"
    assert run.data.params["trainable_params"] == str(summary["trainable_params"])
    assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["test_macro_f1"])
    assert run.data.metrics["best_val_macro_f1"] == pytest.approx(summary["best_val_macro_f1"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1  # one epoch

    # artifacts: listed by the server, and physically in its --artifacts-destination
    listed = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/metrics.json" in listed
    stored = (
        server.artifacts
        / experiment.experiment_id
        / run.info.run_id
        / "artifacts/evaluation/metrics.json"
    )
    assert stored.read_bytes() == (run_dir / "metrics.json").read_bytes()
    assert (stored.parents[1] / "importance/scores.parquet").is_file()
    baseline = runs["tfidf_logreg/k4"]
    assert {item.path for item in client.list_artifacts(baseline.info.run_id, "evaluation")} >= {
        "evaluation/metrics.json",
        "evaluation/confusion.png",
    }

    # the model, logged to the server's store and registered as the champion
    champion = client.get_model_version_by_alias("served-k4", "champion")
    assert champion.run_id == run.info.run_id
    model_files = [p.name for p in server.artifacts.rglob("model.safetensors")]
    assert model_files, "the logged model is not in the server's artifacts"

    # nothing of MLflow's on the checkout's disk
    local = [
        path.relative_to(flow.root)
        for pattern in ("mlruns", "mlartifacts", "*.db")
        for path in flow.root.rglob(pattern)
    ]
    assert local == [], local

    # a second checkout joins the same experiment and keeps its own workspace
    other = Workflow(tmp_path / "other", config)
    other.run("--cores", "1", "--until", "create_mlflow_experiment")
    joined = tracking.read_experiment(other.results("served") / "mlflow_experiment.json")
    mine = tracking.read_experiment(results / "mlflow_experiment.json")
    assert joined["experiment_id"] == mine["experiment_id"]
    assert joined["workspace"] != mine["workspace"]


def test_jobs_that_share_no_files_need_a_store_they_reach():
    for local in ("sqlite:///results/mlflow.db", "file:///tmp/mlruns", "mlruns"):
        with pytest.raises(ConfigError, match=r"mlflow.tracking_uri = .* an MLflow server"):
            tracking.check_store_for_jobs(local, jobs_share_files=False)
        tracking.check_store_for_jobs(local, jobs_share_files=True)
    for reachable in ("http://mlflow.ns:5000", "https://mlflow.example", "postgresql://db/ml"):
        tracking.check_store_for_jobs(reachable, jobs_share_files=False)


@pytest.mark.workflow
@pytest.mark.parametrize(
    "how",
    [
        pytest.param(
            ("--workflow-profile", "profiles/kubernetes"),
            id="kubernetes-profile",
            marks=pytest.mark.skipif(not HAS_KUBERNETES, reason='needs ".[kubernetes]"'),
        ),
        pytest.param(("--shared-fs-usage", "none"), id="no-shared-fs"),
    ],
)
def test_a_sqlite_store_without_shared_files_stops_when_parsed(tmp_path, tiny_bert_dir, how):
    flow = Workflow(tmp_path, tiny_config(tiny_bert_dir))
    result = flow.run("-n", *how, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "mlflow.tracking_uri = 'sqlite:///results/mlflow.db' is a file on this machine" in output
    assert "mlflow='{tracking_uri: \"http://mlflow.<namespace>:5000\"}'" in output
    assert "Building DAG of jobs" not in output  # stopped while parsing
    # a tracking server passes this check (and is then asked whether it answers)
    config = flow.config
    config["mlflow"]["tracking_uri"] = "http://127.0.0.1:9"
    flow.write_config(config)
    result = flow.run("-n", *how, check=False)
    output = result.stdout + result.stderr
    assert "is a file on this machine" not in output
    assert "no MLflow server answers at http://127.0.0.1:9" in output


@pytest.mark.workflow
@pytest.mark.slow  # 2 min; in process: test_faults' store that does not answer
def test_a_server_that_stops_mid_job_costs_no_training_and_is_caught_up(tmp_path, tiny_bert_dir):
    """The tracking server stops while a run trains: the jobs finish and write their files,
    saying (naming the URL) that MLflow is brought up to date later; once the server is back,
    the next run logs them, leaving one finished run per key with all of its files' record."""
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    from .services import free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    config = tiny_config(tiny_bert_dir, experiment="outage")
    config["strategies"] = {"head_only": {"kind": "head_only", "train": {"lr": 1e-3}}}
    config["baselines"] = []
    epochs = 150  # long enough to lose the server while training, on a fast machine too
    config["train"]["epochs"] = epochs
    config["mlflow"] = {"tracking_uri": uri}
    flow = Workflow(tmp_path / "checkout", config)
    run_dir = flow.results("outage") / "runs/head_only/k4/seed0"
    log = (tmp_path / "snakemake.log").open("w")
    with mlflow_server(tmp_path / "server", port=port):
        process = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "2"],
            cwd=flow.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while not (run_dir / "mlflow_run_id").exists():
            assert process.poll() is None and time.monotonic() < deadline, "finetune never started"
            time.sleep(0.5)
        time.sleep(5)  # a few epochs logged
        first_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert process.wait(timeout=900) == 0, (tmp_path / "snakemake.log").read_text()[-3000:]
    output = (tmp_path / "snakemake.log").read_text()
    assert f"adaptune: MLflow at {uri} stopped answering (" in output
    assert "the next snakemake brings MLflow up to date from them once it answers again" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(pd.read_csv(run_dir / "history.csv")) == epochs
    training = (flow.results("outage") / "logs/finetune/head_only/k4/seed0.log").read_text()
    assert f"MLflow at {uri} stopped answering" in training, "trained before the server stopped"

    with mlflow_server(tmp_path / "server", port=port):
        rerun = flow.run("--cores", "2")
        output = rerun.stdout + rerun.stderr
        assert f"adaptune: MLflow at {uri} lacks 1 of the 1 finished runs' records" in output
        assert "Nothing to be done" in output  # nothing trained again
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        assert [r.data.tags["adaptune.key"] for r in runs] == ["head_only/k4/seed0"]
        run = runs[0]
        assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip() != first_id
        assert run.info.status == "FINISHED" and run.data.tags[tracking.LOGGED_TAG] == "evaluate"
        assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["test_macro_f1"])
        assert len(client.get_metric_history(run.info.run_id, "val_macro_f1")) == epochs
        replaced = client.get_run(first_id)
        assert replaced.info.lifecycle_stage == "deleted"
        assert replaced.data.tags[tracking.SUPERSEDED_TAG] == run.info.run_id
        champion = client.get_model_version_by_alias("outage-k4", "champion")
        assert champion.run_id == run.info.run_id
        assert "adaptune: MLflow" not in flow.run("-n").stderr


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C's SIGINT raises KeyboardInterrupt, as in a terminal's foreground: a suite started
    in the background by a non-interactive shell inherits SIGINT ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_inside_a_deferred_block_acts_when_the_block_ends(ctrl_c_raises):
    import os
    import signal

    from adaptune import signals

    done = []
    with pytest.raises(KeyboardInterrupt), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a store write
        done.append("the write")
    assert done == ["the write"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), signals.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # asked twice: at once
        done.append("never")
    assert done == ["the write"]


# A job's store write cut by Ctrl-C: SQLAlchemy sends SIGINT to its own process as it
# executes the INSERT of the run's parameters, inside the write's transaction.
_CUT_WRITE = """
import os, signal, sys, time
import sqlalchemy
from adaptune import tracking

root = sys.argv[1]
experiment = tracking.ensure_experiment(f"sqlite:///{root}/mlflow.db", "cut", root, root)
fired = []

def interrupt(conn, cursor, statement, *args):
    if statement.startswith("INSERT INTO params") and not fired:
        fired.append(time.time())
        os.kill(os.getpid(), signal.SIGINT)

sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt)
try:
    with tracking.start_run(experiment, "cut", "cut", {}) as run:
        run.log_params({f"p{i}": i for i in range(50)})
        time.sleep(60)
except KeyboardInterrupt:
    print(run.run_id, f"{time.time() - fired[0]:.1f}")
"""


def test_ctrl_c_in_the_middle_of_a_store_write_ends_the_run_killed_at_once(tmp_path):
    """A store write finishes before the interrupt acts. Cut at a random moment instead, a
    write could leave the SQLite database locked against the job's own next one, the one
    that ends its run KILLED, which then waited out every retry (about 190 s) while Snakemake
    waited for the job (3 of 6 SIGINTs at random moments of a logging loop, before the fix;
    the workflow's Ctrl-C test in CI once). At this fixed moment the old code lost the write
    (0 of the 50 parameters) instead."""
    import signal
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CUT_WRITE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        # as in a terminal's foreground (see ctrl_c_raises)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    run_id, seconds = done.stdout.split()
    assert float(seconds) < 10, seconds
    client = tracking._client(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert len(run.data.params) == 50  # the write the signal came in finished
