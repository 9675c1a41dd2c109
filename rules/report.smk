localrules:
    create_mlflow_experiment,
    sample_few_shot,
    make_freeze_plan,
    report,


rule report:
    input:
        metrics=all_run_metrics(),
    output:
        leaderboard=REPORT / "leaderboard.csv",
        summary=REPORT / "summary.csv",
        markdown=REPORT / "leaderboard.md",
        plot=REPORT / "leaderboard.png",
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
