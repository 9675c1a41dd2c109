rule shift_test_split:
    input:
        test=DATA / "test.parquet",
        info=DATA / "data.json",
    output:
        shifted=DATA / "shifts/{shift}.parquet",
    log:
        LOGS / "shift_test_split/{shift}.log",
    benchmark:
        BENCH / "shift_test_split/{shift}.tsv"
    conda:
        ENV
    params:
        seed=config["evaluate"]["shift_seed"],
        data=data_settings(),
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/shift_test_split.py"


rule evaluate:
    input:
        model=RUN / "model",
        test=DATA / "test.parquet",
        shifted=expand(DATA / "shifts/{shift}.parquet", shift=SHIFTS),
        info=DATA / "data.json",
        summary=RUN / "train_summary.json",
        # Rewritten (a new run id) when the store is rebuilt from the files: not a reason to
        # evaluate again.
        run_id=ancient(RUN / "mlflow_run_id"),
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
        shifts=SHIFTS,
        # drift from the pretrained model (weight change, CKA) loads it again
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/evaluate.py"
