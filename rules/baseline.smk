rule fit_baseline:
    input:
        train=DATA / "train_k{shots}.parquet",
        test=DATA / "test.parquet",
        shifted=expand(DATA / "shifts/{shift}.parquet", shift=SHIFTS),
        info=DATA / "data.json",
        experiment=ancient(EXP / "mlflow_experiment.json"),
    output:
        metrics=BASELINE_RUN / "metrics.json",
        per_class=BASELINE_RUN / "per_class.csv",
        confusion=BASELINE_RUN / "confusion.csv",
        confusion_png=BASELINE_RUN / "confusion.png",
        run_id=BASELINE_RUN / "mlflow_run_id",
    log:
        LOGS / "fit_baseline/{baseline}/k{shots}.log",
    benchmark:
        BENCH / "fit_baseline/{baseline}/k{shots}.tsv"
    conda:
        ENV
    params:
        shifts=SHIFTS,
    script:
        "../scripts/fit_baseline.py"
