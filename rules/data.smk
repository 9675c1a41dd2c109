rule prepare_data:
    input:
        fetched=FETCH_FIRST,
    output:
        train=DATA / "train.parquet",
        val=DATA / "val.parquet",
        test=DATA / "test.parquet",
        info=DATA / "data.json",
    log:
        LOGS / "prepare_data.log",
    benchmark:
        BENCH / "prepare_data.tsv"
    conda:
        ENV
    threads: 2
    params:
        data=data_settings(),
        model=config["model"],
        source_content=EXTERNAL.source_fingerprint,
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/prepare_data.py"


rule sample_few_shot:
    input:
        split=DATA / "{split}.parquet",
    output:
        sample=DATA / "{split}_k{shots}.parquet",
    log:
        LOGS / "sample_few_shot/{split}_k{shots}.log",
    benchmark:
        BENCH / "sample_few_shot/{split}_k{shots}.tsv"
    conda:
        ENV
    params:
        seed=config["data"]["seed"],
        per_class=examples_per_class,
    script:
        "../scripts/sample_few_shot.py"
