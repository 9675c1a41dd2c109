# Light rules run in the process that runs the workflow, not as cluster jobs (a SLURM job
# costs more in queueing than these take); the stages that compute go through the executor.
localrules:
    fetch,
    create_mlflow_experiment,
    sample_few_shot,
    make_freeze_plan,
    report,


# The report's first page: the workflow's description, and once the report stage has run, its
# headline result (written by that stage beside the leaderboard).
DESCRIPTION = Path(workflow.basedir) / "report/workflow.rst"


report:
    str(Path(REPORT / "workflow.rst").resolve())
    if Path(REPORT / "workflow.rst").exists()
    else str(DESCRIPTION)


rule report:
    input:
        metrics=all_run_metrics(),
        # The selected runs are registered by id; a new id (the store rebuilt from the files)
        # is registered by that rebuild, not by rerunning this.
        run_ids=ancient(all_run_ids()),
        experiment=ancient(EXP / "mlflow_experiment.json"),
        description=DESCRIPTION,
    output:
        first_page=REPORT / "workflow.rst",
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
        sweep=REPORT / "sweep.csv",
        generalisation=report(
            REPORT / "generalisation.png",
            caption="../report/generalisation.rst",
            category="Leaderboard",
        ),
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


onsuccess:
    stop_worker()
    # Where to look, after a run that did something or found everything up to date.
    if Path(REPORT / "leaderboard.md").exists():
        given = [f"--configfile {f}" for f in workflow.overwrite_configfiles or []]
        store = config["mlflow"]["tracking_uri"]
        print(
            f"\nadaptune: results of '{EXPERIMENT}' are in {EXP}/",
            f"  leaderboard: {REPORT / 'leaderboard.md'} (the selected strategy first)",
            f"  report:      {' '.join(['snakemake', *given, '--report report.html'])}",
            f"  MLflow:      mlflow ui --backend-store-uri {store} --host 127.0.0.1",
            sep="\n",
        )
