# Only where the data or the model come from a network (hf: ids, library weights named):
# fetched once, in the submitting process, before the stages that load them.
FETCHED = EXP / "fetched.json"
FETCH_FIRST = [FETCHED] if EXTERNAL.downloads else []

if FETCH_FIRST and not workflow.is_main_process:
    # A job of a cluster executor (it parses this file again, on its node): read the caches
    # the fetch stage filled, never the network.
    offline_environment(os.environ)


rule fetch:
    output:
        fetched=FETCHED,
    log:
        LOGS / "fetch.log",
    benchmark:
        BENCH / "fetch.tsv"
    conda:
        ENV
    params:
        data=data_settings(),
        model=config["model"],
    script:
        "../scripts/fetch.py"
