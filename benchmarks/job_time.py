"""Where a pipeline's seconds go, job by job: the wall time and peak memory Snakemake measured
for each job (its ``benchmark:`` files), and for ``finetune`` and ``evaluate`` jobs the phases
the stage timed itself (:mod:`adaptune.timing`: start-up, loading, training or inference,
checkpoints, saving, MLflow logging; ``untimed``: the rest of the job's wall time), so that the
seconds outside the work (the job's wall time less its training, inference and drift) stand
apart.

    python benchmarks/job_time.py --run [--configfile config/config.yaml] [--cores 2]
    python benchmarks/job_time.py results/<experiment>      # a pipeline that already ran

``--run`` runs the workflow from scratch in a temporary copy of the repository (nothing cached)
and reports its wall time too. Prints markdown tables: per stage, the jobs' median wall seconds,
median seconds outside training and inference, and the largest resident memory; per finetune
job, its phases; and how much faster the head-only job is than the full one, as whole jobs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from adaptune import worker
from adaptune.timing import WORK

REPO = Path(__file__).resolve().parents[1]
COPIED = ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report")


def run_pipeline(configfile: str, cores: int) -> tuple[Path, float]:
    """The workflow run from nothing in a temporary copy; its results folder and wall time."""
    root = Path(tempfile.mkdtemp(prefix="adaptune-job-time-"))
    for name in COPIED:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)
    began = time.perf_counter()
    command = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile"]
    subprocess.run([*command, configfile], cwd=root, check=True, capture_output=True)
    wall = time.perf_counter() - began
    (results,) = [p for p in (root / "results").iterdir() if (p / "benchmarks").is_dir()]
    return results, wall


def job_table(results: Path) -> pd.DataFrame:
    """One row per job: stage, job name, wall seconds, peak resident memory (MB), and for
    finetune and evaluate jobs the seconds outside their work and each timed phase."""
    rows = []
    for path in sorted((results / "benchmarks").rglob("*.tsv")):
        measured = pd.read_csv(path, sep="\t").iloc[-1]
        relative = path.relative_to(results / "benchmarks").with_suffix("")
        stage, job = relative.parts[0], "/".join(relative.parts[1:])
        # A job that ran in adaptune's worker noted the peak memory of the process that ran it
        # in its log; Snakemake's benchmark measured only the job's own (waiting) process.
        in_worker = worker.peak_memory_in_log(results / "logs" / relative.with_suffix(".log"))
        row = {
            "stage": stage,
            "job": job,
            "wall": measured["s"],
            "max_rss_mb": max(measured["max_rss"], in_worker or 0.0),
        }
        phases = timed_phases(results, stage, job)
        if phases:
            # Outside the work: the job's whole wall time (Snakemake's measure, start-up and
            # the script's preamble included) less its training, inference and drift.
            row.update({k: v for k, v in phases.items() if k not in ("outside_work", "total")})
            row["untimed"] = row["wall"] - phases["total"]
            row["outside_work"] = row["wall"] - sum(phases.get(k, 0.0) for k in WORK)
        rows.append(row)
    return pd.DataFrame(rows)


def timed_phases(results: Path, stage: str, job: str) -> dict[str, float]:
    """The phases a finetune or evaluate job wrote beside its results ({} for other stages,
    or a job that ran before adaptune timed itself)."""
    run = results / "runs" / job
    if stage == "finetune" and (run / "train_summary.json").exists():
        return json.loads((run / "train_summary.json").read_text()).get("job_seconds", {})
    if stage == "evaluate" and (run / "metrics.json").exists():
        return json.loads((run / "metrics.json").read_text()).get("evaluate_seconds", {})
    return {}


def stage_summary(jobs: pd.DataFrame) -> str:
    lines = [
        "| stage | jobs | median wall (s) | median outside work (s) | max RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage, group in jobs.groupby("stage", sort=False):
        outside = group["outside_work"].dropna() if "outside_work" in group else []
        lines.append(
            f"| {stage} | {len(group)} | {statistics.median(group['wall']):.1f} | "
            f"{statistics.median(outside) if len(outside) else float('nan'):.1f} | "
            f"{group['max_rss_mb'].max():.0f} |"
        )
    return "\n".join(lines)


def phase_table(jobs: pd.DataFrame, stage: str) -> str:
    rows = jobs[jobs["stage"] == stage].dropna(axis=1, how="all")
    fixed = {"stage", "job", "wall", "max_rss_mb"}
    phases = [c for c in rows.columns if c not in fixed]
    lines = ["| job | wall | " + " | ".join(phases) + " |", "|---" * (len(phases) + 2) + "|"]
    for _, row in rows.iterrows():
        values = " | ".join(f"{row[p]:.1f}" for p in phases)
        lines.append(f"| {row['job']} | {row['wall']:.1f} | {values} |")
    return "\n".join(lines)


def head_only_speedup(jobs: pd.DataFrame) -> str:
    finetune = jobs[jobs["stage"] == "finetune"]
    full = finetune[finetune["job"].str.startswith("full/")]["wall"]
    head = finetune[finetune["job"].str.startswith("head_only/")]["wall"]
    if full.empty or head.empty:
        return "(no full and head_only finetune jobs to compare)"
    ratio = statistics.median(full) / statistics.median(head)
    return (
        f"finetune jobs, whole: full {statistics.median(full):.1f} s, head_only "
        f"{statistics.median(head):.1f} s (medians): head_only {ratio:.1f}x faster"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", help="results/<experiment> of a pipeline that ran")
    parser.add_argument("--run", action="store_true", help="run the workflow from nothing first")
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    if args.run:
        results, wall = run_pipeline(args.configfile, args.cores)
        print(f"pipeline wall time ({args.configfile}, --cores {args.cores}): {wall:.1f} s\n")
    elif args.results:
        results = Path(args.results)
    else:
        parser.error("give a results folder or --run")
    jobs = job_table(results)
    print(stage_summary(jobs), "\n")
    print("finetune jobs, seconds per phase:\n")
    print(phase_table(jobs, "finetune"), "\n")
    print("evaluate jobs, seconds per phase:\n")
    print(phase_table(jobs, "evaluate"), "\n")
    print(head_only_speedup(jobs))


if __name__ == "__main__":
    main()
