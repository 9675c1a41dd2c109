# Light rules run in the process that runs the workflow, not as cluster jobs (a SLURM job
# costs more in queueing than these take); the stages that compute go through the executor.
localrules:
    create_mlflow_experiment,
    sample_few_shot,
    make_freeze_plan,
    report,


rule report:
    input:
        metrics=all_run_metrics(),
    output:
        leaderboard=report(
            REPORT / "leaderboard.csv",
            caption="../report/leaderboard_table.rst",
            category="Leaderboard",
        ),
        summary=REPORT / "summary.csv",
        markdown=REPORT / "leaderboard.md",
        plot=report(
            REPORT / "leaderboard.png",
            caption="../report/leaderboard.rst",
            category="Leaderboard",
        ),
        tradeoffs=report(
            REPORT / "tradeoffs.png",
            caption="../report/tradeoffs.rst",
            category="Leaderboard",
        ),
        best=REPORT / "best_per_shots.csv",
    log:
        LOGS / "report.log",
    benchmark:
        BENCH / "report.tsv"
    conda:
        ENV
    params:
        experiment=EXPERIMENT,
    script:
        "../scripts/report.py"
