rule evaluate:
    input:
        model=RUN / "model",
        test=DATA / "test.parquet",
        info=DATA / "data.json",
        summary=RUN / "train_summary.json",
        run_id=RUN / "mlflow_run_id",
        experiment=ancient(EXP / "mlflow_experiment.json"),
    output:
        metrics=RUN / "metrics.json",
        per_class=RUN / "per_class.csv",
        confusion=RUN / "confusion.csv",
        confusion_png=report(
            RUN / "confusion.png",
            caption="../report/confusion.rst",
            category="Runs",
            subcategory="{strategy}",
        ),
    log:
        LOGS / "evaluate/{strategy}/k{shots}/seed{seed}.log",
    benchmark:
        BENCH / "evaluate/{strategy}/k{shots}/seed{seed}.tsv"
    conda:
        ENV
    threads: 4
    params:
        inference=inference_settings,
    script:
        "../scripts/evaluate.py"
