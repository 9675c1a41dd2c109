"""Wall time of one tiny experiment run three ways: locally (``snakemake --cores 2``), through a
single-node SLURM cluster on this host (``profiles/slurm``, tests/cluster/slurm.sh), and locally
logging to an ``mlflow server`` (SQLite backend, artifacts served from its own folder).

    python benchmarks/scaling.py [--repeat 1] [--skip slurm]

Needs root for the SLURM row (the script installs and starts slurm-wlm and munge). Every run is
in a fresh copy of the workflow (nothing cached), on the tiny BERT of the tests (2 blocks, hidden
size 32), 24 BBC News articles per class from a CSV, one strategy (head_only), the TF-IDF
baseline: 11 jobs. Prints a markdown table: the service's start-up, the run's wall time, and
where the time goes. The servers are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import Workflow, news_sample_config, save_news_sample, save_tiny_bert
from tests.services import mlflow_server, run_with_timeout, slurm_cluster

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def experiment(model: Path, csv: Path, tracking_uri: str) -> dict:
    config = news_sample_config(model, csv, "scaling")
    config["mlflow"] = {"tracking_uri": tracking_uri}
    return config


def timed_run(root: Path, config: dict, args: list[str], env: dict[str, str]) -> float:
    flow = Workflow(root, config)
    start = time.perf_counter()
    result = run_with_timeout([*SNAKEMAKE, *args], flow.root, env, timeout=1800)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {args} failed:\n{result.stdout[-3000:]}{result.stderr}")
    if not (flow.results("scaling") / "report/leaderboard.csv").is_file():
        raise RuntimeError("no leaderboard")
    return seconds


def repeat(count: int, run: Callable[[int], float]) -> str:
    times = [run(index) for index in range(count)]
    if count == 1:
        return f"{times[0]:.1f}"
    return f"{statistics.mean(times):.1f} ± {statistics.stdev(times):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["local", "slurm", "server"])
    args = parser.parse_args()
    cores = str(min(2, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="adaptune-scaling-") as tmp:
        work = Path(tmp)
        model = save_tiny_bert(work / "tiny-bert")
        csv = save_news_sample(work / "news.csv")
        sqlite = "sqlite:///results/mlflow.db"

        if "local" not in args.skip:
            wall = repeat(
                args.repeat,
                lambda i: timed_run(
                    work / f"local{i}",
                    experiment(model, csv, sqlite),
                    ["--cores", cores],
                    {**os.environ},
                ),
            )
            rows.append(("local, `--cores 2`, SQLite", "–", wall, "11 jobs in local processes"))

        if "slurm" not in args.skip:
            start = time.perf_counter()
            with slurm_cluster(work / "slurm") as env:
                up = time.perf_counter() - start
                profile = ["--workflow-profile", "profiles/slurm", "--max-threads", cores]
                wall = repeat(
                    args.repeat,
                    lambda i: timed_run(
                        work / f"slurm{i}", experiment(model, csv, sqlite), profile, env
                    ),
                )
            rows.append(
                (
                    "single-node SLURM, `profiles/slurm`, SQLite",
                    f"{up:.1f} (slurm.sh start)",
                    wall,
                    "5 sbatch jobs on 4 DAG levels, 6 local rules; status polled with squeue",
                )
            )

        if "server" not in args.skip:
            start = time.perf_counter()
            with mlflow_server(work / "server") as server:
                up = time.perf_counter() - start
                wall = repeat(
                    args.repeat,
                    lambda i: timed_run(
                        work / f"server{i}",
                        experiment(model, csv, server.uri),
                        ["--cores", cores],
                        {**os.environ},
                    ),
                )
            rows.append(
                (
                    "local, `--cores 2`, `mlflow server` (SQLite backend)",
                    f"{up:.1f} (to /health)",
                    wall,
                    "params, metrics and artifacts over HTTP",
                )
            )

    print(f"\nTiny experiment (11 jobs), {os.cpu_count()} CPUs, repeat {args.repeat}\n")
    print("| setup | service start-up s | workflow wall s | notes |")
    print("|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
