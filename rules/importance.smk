rule score_importance:
    input:
        train=DATA / "train_k{shots}.parquet",
        info=DATA / "data.json",
    output:
        scores=IMPORTANCE / "k{shots}/scores.parquet",
        layers=IMPORTANCE / "k{shots}/layers.parquet",
        heatmap=report(
            IMPORTANCE / "k{shots}/heatmap.png",
            caption="../report/heatmap.rst",
            category="Importance",
            subcategory="{shots} shots",
        ),
        agreement=IMPORTANCE / "k{shots}/agreement.csv",
    log:
        LOGS / "score_importance/k{shots}.log",
    benchmark:
        BENCH / "score_importance/k{shots}.tsv"
    conda:
        ENV
    threads: 4
    params:
        importance=config["importance"],
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/score_importance.py"
