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


rule pretrained_features:
    input:
        test=DATA / "test.parquet",
        info=DATA / "data.json",
    output:
        features=EXP / "pretrained/batch{batch}/test_features.npy",
    log:
        LOGS / "pretrained_features/batch{batch}.log",
    benchmark:
        BENCH / "pretrained_features/batch{batch}.tsv"
    conda:
        ENV
    threads: 4
    params:
        inference=features_inference_settings,
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/pretrained_features.py"


rule evaluate:
    input:
        model=RUN / "model",
        test=DATA / "test.parquet",
        pretrained=pretrained_features,
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
        # the weight change from the pretrained model loads it again
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/evaluate.py"
