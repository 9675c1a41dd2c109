# The MLflow store and experiment, made once, before the jobs that log fan out: each takes
# mlflow_experiment.json as an ancient() input, so that where runs are tracked is not part of
# what they compute (a new tracking URI retrains nothing). This job runs when the file is
# missing, reading the tracking settings from the config, not from params: a job rerun for a
# changed param would hide the params changes of every job after it from Snakemake 9.27 in
# that run (its ancient() edges mask them). A store that lacks finished runs (deleted,
# replaced, another one, or a job could not reach it) is brought up to date from the files
# when the workflow starts, before any job (mlflow_up_to_date, adaptune.records). update()
# keeps the file in place while the job runs, and puts it back if the job fails.
rule create_mlflow_experiment:
    input:
        mlflow_up_to_date,
    output:
        experiment=update(EXP / "mlflow_experiment.json"),
    log:
        LOGS / "create_mlflow_experiment.log",
    benchmark:
        BENCH / "create_mlflow_experiment.tsv"
    conda:
        ENV
    params:
        artifact_root=str(EXP / "mlartifacts"),
    script:
        "../scripts/create_mlflow_experiment.py"


rule finetune:
    input:
        plan=PLANS / "k{shots}/{strategy}.json",
        train=DATA / "train_k{shots}.parquet",
        val=DATA / "val_k{shots}.parquet",
        info=DATA / "data.json",
        scores=strategy_scores("scores.parquet"),
        layers=strategy_scores("layers.parquet"),
        heatmap=strategy_scores("heatmap.png"),
        head=strategy_scores("head.json"),
        # Only that the experiment exists: where runs are tracked is not part of what is
        # computed, so a new tracking URI retrains nothing.
        experiment=ancient(EXP / "mlflow_experiment.json"),
    output:
        model=directory(RUN / "model"),
        history=RUN / "history.csv",
        summary=RUN / "train_summary.json",
        settings=RUN / "settings.json",
        run_id=RUN / "mlflow_run_id",
    log:
        LOGS / "finetune/{strategy}/k{shots}/seed{seed}.log",
    benchmark:
        BENCH / "finetune/{strategy}/k{shots}/seed{seed}.tsv"
    conda:
        ENV
    threads: 4
    params:
        train=train_settings,
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
        # Logged with the run's resolved config; a change to either reruns this job already
        # (through its data and plan inputs).
        data=data_settings,
        importance=strategy_importance_settings,
    script:
        "../scripts/finetune.py"
