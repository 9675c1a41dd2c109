rule score_importance:
    input:
        train=DATA / "train_k{shots}.parquet",
        info=DATA / "data.json",
    output:
        scores=SCORED / "scores.parquet",
        layers=SCORED / "layers.parquet",
        heatmap=report(
            SCORED / "heatmap.png",
            caption="../report/heatmap.rst",
            category="Importance",
            subcategory="{shots} shots, {head} head",
        ),
        agreement=SCORED / "agreement.csv",
        head=SCORED / "head.json",
    log:
        LOGS / "score_importance/k{shots}/{head}.log",
    benchmark:
        BENCH / "score_importance/k{shots}/{head}.tsv"
    wildcard_constraints:
        head="random|probe",
    conda:
        ENV
    threads: 4
    params:
        importance=scoring_settings,
        model=config["model"],
        model_content=EXTERNAL.model_fingerprint,
    script:
        "../scripts/score_importance.py"
