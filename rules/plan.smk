rule make_freeze_plan:
    input:
        scores=strategy_scores("scores.parquet"),
        layers=strategy_scores("layers.parquet"),
    output:
        plan=PLANS / "k{shots}/{strategy}.json",
        summary=PLANS / "k{shots}/{strategy}.md",
        figure=report(
            PLANS / "k{shots}/{strategy}.png",
            caption="../report/plan.rst",
            category="Freeze plans",
            subcategory="{shots} shots",
        ),
    log:
        LOGS / "make_freeze_plan/k{shots}/{strategy}.log",
    benchmark:
        BENCH / "make_freeze_plan/k{shots}/{strategy}.tsv"
    conda:
        ENV
    params:
        strategy=plan_settings,
        train=plan_memory_settings,
    script:
        "../scripts/make_freeze_plan.py"
