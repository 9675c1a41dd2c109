"""The workflow on a real SLURM cluster, through profiles/slurm as shipped: a single-node cluster
on this host (tests/cluster/slurm.sh: slurmctld, slurmd and a private munged, no slurmdbd).

Needs root (the script installs slurm-wlm and munge with apt-get where they are missing) and
takes minutes, so it runs only when asked for: ``pytest -m cluster`` (or
``ADAPTUNE_CLUSTER_TESTS=1 pytest tests/test_cluster.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import Workflow, news_sample_config
from .services import run_with_timeout, slurm_cluster

pytestmark = [
    pytest.mark.cluster,
    # Without the plugin, snakemake stops at its arguments ("invalid choice: 'slurm'").
    pytest.mark.skipif(
        importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
        reason='needs the SLURM executor plugin: pip install -e ".[slurm]"',
    ),
]

# What goes through sbatch, and what the profile runs in the submitting process.
CLUSTER_RULES = {
    "prepare_data",
    "score_importance",
    "fit_baseline",
    "finetune",
    "pretrained_features",
    "evaluate",
}
LOCAL_RULES = {"create_mlflow_experiment", "sample_few_shot", "make_freeze_plan", "report"}
MB_PER_THREAD = 2000  # profiles/slurm: default-resources mem_mb
RULE_THREADS = {
    "prepare_data": 2,
    "score_importance": 4,
    "finetune": 4,
    "pretrained_features": 4,
    "evaluate": 4,
}


def cluster_config(model_dir: Path, csv: Path) -> dict:
    """The tiny BERT on a CSV of real articles, one strategy and the TF-IDF baseline."""
    return news_sample_config(model_dir, csv, "on-slurm")


def finished_jobs(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The cluster's jobs (finished ones stay listed for MinJobAge), by SLURM job id: rule (the
    plugin's --comment rule_<name>), CPUs, memory and state."""
    listing = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%k|%C|%m|%T"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    jobs = {}
    for line in listing.splitlines():
        job_id, comment, cpus, memory, state = line.strip().split("|")
        jobs[job_id] = {
            "rule": comment.removeprefix("rule_"),
            "cpus": cpus,
            "memory": memory,
            "state": state,
        }
    return jobs


def megabytes(memory: str) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]?)", memory).groups()
    return round(float(number) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit])


def test_the_workflow_runs_through_slurm_as_shipped(tmp_path, tiny_bert_dir, bbc_sample_csv):
    flow = Workflow(tmp_path / "checkout", cluster_config(tiny_bert_dir, bbc_sample_csv))
    # The profile's one size to edit: its max-threads (4) is more than this node's CPUs.
    node_cpus = os.cpu_count() or 1
    command = [
        *(sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm"),
        *("--max-threads", str(node_cpus)),
    ]
    with slurm_cluster(tmp_path / "slurm") as env:
        first = run_with_timeout(command, flow.root, env, timeout=1500)
        output = first.stdout + first.stderr
        (tmp_path / "first_run.log").write_text(output)
        print(output)
        assert first.returncode == 0, output[-6000:]

        # every computing stage went through sbatch, once, and finished there
        logs = dict(
            re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", output)
        )
        submitted = {job_id: re.search(r"/rule_(\w+?)/", log)[1] for job_id, log in logs.items()}
        assert sorted(submitted.values()) == sorted(CLUSTER_RULES), submitted
        jobs = finished_jobs(env)
        print(json.dumps(jobs, indent=1))
        controller_log = (tmp_path / "slurm/log/slurmctld.log").read_text()
        for job_id, rule in submitted.items():
            # the plugin's --comment: rule_<name>[_wildcards_<values>]
            assert re.fullmatch(rf"{rule}(_wildcards_.*)?", jobs[job_id]["rule"]), jobs[job_id]
            assert jobs[job_id]["state"] == "COMPLETED", jobs[job_id]
            assert f"_slurm_rpc_submit_batch_job: JobId={job_id} " in controller_log
            assert Path(logs[job_id]).is_file()
            assert Path(logs[job_id]).is_relative_to(flow.root / ".snakemake/slurm_logs")
            # sizes come from the rule's threads, capped by max-threads, x mem_mb per thread
            threads = min(RULE_THREADS.get(rule, 1), node_cpus)
            assert int(jobs[job_id]["cpus"]) == threads, (rule, jobs[job_id])
            assert megabytes(jobs[job_id]["memory"]) == MB_PER_THREAD * threads, jobs[job_id]
        # the light rules ran in the submitting process
        for rule in LOCAL_RULES:
            assert f"localrule {rule}:" in output, rule
            assert not (flow.root / f".snakemake/slurm_logs/rule_{rule}").exists()

        # the results are all there, and MLflow holds one finished run per row
        results = flow.results("on-slurm")
        board = pd.read_csv(results / "report/leaderboard.csv")
        assert sorted(board["strategy"]) == ["head_only", "tfidf_logreg"]
        assert board["test_macro_f1"].between(0, 1).all()
        with sqlite3.connect(flow.root / "results/mlflow.db") as db:
            statuses = db.execute(
                "select status from runs where lifecycle_stage = 'active'"
            ).fetchall()
        assert sorted(statuses) == [("FINISHED",), ("FINISHED",)]

        # a second run finds everything up to date and submits nothing
        second = run_with_timeout(command, flow.root, env, timeout=300)
        rerun = second.stdout + second.stderr
        (tmp_path / "second_run.log").write_text(rerun)
        print(rerun)
        assert second.returncode == 0, rerun[-3000:]
        assert "Nothing to be done" in rerun
        assert "has been submitted" not in rerun


def slurm_job_of(rule: str, env: dict[str, str]) -> str | None:
    """The SLURM job id of the (one) job of ``rule`` that is queued or running."""
    for job_id, job in finished_jobs(env).items():
        if job["rule"].startswith(rule) and job["state"] in ("RUNNING", "PENDING"):
            return job_id
    return None


def test_a_requeued_finetune_job_resumes_from_its_checkpoint(tmp_path, tiny_bert_dir):
    """scontrol requeue (what a preemption with PreemptMode=REQUEUE does) of a finetune job
    after its first checkpoint: SLURM stops it (SIGTERM: a checkpoint after the step it is
    in), queues it again under the same id, and it resumes; snakemake waits for it (the
    profile's slurm-requeue), and the result is bit-identical to the job run without a stop."""
    from .test_checkpoints import RUN, finetune_runs, gradual_config, target

    flow = Workflow(tmp_path / "checkout", gradual_config(tiny_bert_dir))
    config = flow.config
    epochs = config["train"]["epochs"] = 12  # long enough to requeue it while it trains
    flow.write_config(config)
    node_cpus = os.cpu_count() or 1
    command = [
        *(sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm"),
        *("--max-threads", str(node_cpus), target(flow)),
    ]
    state_file = flow.results("resume") / RUN / ".checkpoint/state.pt"
    with slurm_cluster(tmp_path / "slurm") as env:
        log = open(tmp_path / "snakemake.log", "w")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            command, cwd=flow.root, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.time() + 1200
        while not state_file.exists():
            assert process.poll() is None and time.time() < deadline, "no checkpoint"
            time.sleep(0.2)
        job_id = slurm_job_of("finetune", env)
        assert job_id, finished_jobs(env)
        before = subprocess.run(
            ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
        ).stdout
        requeue = subprocess.run(
            ["scontrol", "requeue", job_id], env=env, capture_output=True, text=True
        )
        print(f"$ scontrol requeue {job_id}\n{requeue.stdout}{requeue.stderr}")
        assert requeue.returncode == 0, requeue.stderr
        # SLURM stops the job with SIGTERM: it saves a checkpoint after the step it is in
        # (the log of this attempt, before the requeued one starts afresh)
        job_log = flow.results("resume") / "logs/finetune/gradual/k4/seed0.log"
        deadline = time.time() + 120
        while "Interrupted: signal 15" not in job_log.read_text():
            assert time.time() < deadline, job_log.read_text()[-3000:]
            time.sleep(0.2)
        stopped = job_log.read_text()
        stopped = stopped[stopped.index("SIGTERM") - 40 :]
        print(f"the requeued attempt's log from SIGTERM on:\n{stopped}")
        try:
            returncode = process.wait(timeout=1500)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=120)
        log.close()
        output = (tmp_path / "snakemake.log").read_text()
        print(output)
        after = subprocess.run(
            ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True
        ).stdout
        print(f"before the requeue:\n{before}\nafter:\n{after}")
        assert returncode == 0, output[-6000:]
        assert "Requeue=1" in before  # sbatch --requeue, from the profile's slurm-requeue
        assert "Restarts=1" in after and "JobState=COMPLETED" in after, after
        assert re.search(r"checkpoint (within|after) epoch \d+", stopped), stopped
        resumed_log = job_log.read_text()
        print("the job's log after the requeue:\n" + "\n".join(resumed_log.splitlines()[:8]))
        assert re.search(r"resumed from epoch \d+", resumed_log), resumed_log[-3000:]
        assert not state_file.parent.exists()
    runs, client = finetune_runs(flow)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_macro_f1")]
    assert sorted(logged) == list(range(1, epochs + 1))
    model = flow.results("resume") / RUN / "model/model.safetensors"
    requeued = model.read_bytes()
    # the same job on this machine with the same threads, never stopped
    local = flow.run("--cores", str(min(4, node_cpus)), "--forcerun", "finetune", target(flow))
    assert local.returncode == 0
    assert model.read_bytes() == requeued
