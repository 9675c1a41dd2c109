localrules:
    create_mlflow_experiment,
    sample_few_shot,
    make_freeze_plan,
    fit_baseline,
    report,


rule report:
    input:
        metrics=all_run_metrics(),
        experiment=ancient(EXP / "mlflow_experiment.json"),
    output:
        page=report(
            REPORT / "leaderboard.html",
            caption="../report/headline.rst",
            category="1. Result",
        ),
        curves=report(
            REPORT / "curves.png",
            caption="../report/curves.rst",
            category="Leaderboard",
        ),
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
        config=config,
    script:
        "../scripts/report.py"
