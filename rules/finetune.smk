rule create_mlflow_experiment:
    output:
        experiment=EXP / "mlflow_experiment.json",
    log:
        LOGS / "create_mlflow_experiment.log",
    benchmark:
        BENCH / "create_mlflow_experiment.tsv"
    conda:
        ENV
    params:
        mlflow=mlflow_settings(),
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
