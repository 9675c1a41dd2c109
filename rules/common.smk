import os
from argparse import Namespace
from pathlib import Path

from snakemake.utils import min_version, validate

from adaptune.settings import PLAN_MEMORY_SETTINGS

min_version("9.0")


def jobs_share_files(shared_fs_usage):
    """Whether jobs see this machine's working directory: its outputs or Snakemake's own records
    in .snakemake/ are on a shared file system (--shared-fs-usage; none for kubernetes).
    """
    return bool(
        {usage.name for usage in shared_fs_usage} & {"INPUT_OUTPUT", "PERSISTENCE"}
    )


# The config is checked once, here, before any job starts: against config/schema.yaml (which
# fills in its defaults), then the rules between keys and that the data, the model and the
# baselines are of one modality, each problem in one line naming the key; the process that runs
# the workflow also checks the device and the tracking store. EXTERNAL holds the content
# fingerprints of the data source and the pretrained model (their files' bytes, the versions of
# packaged ones): params of the stages that read them, so that changed content reruns them and
# a file only touched or copied does not. Where snakemake runs without adaptune beside it
# (rules' environments built by --sdm conda), Snakemake checks the schema alone, the stages
# check the rest, and edits to local data are not noticed. The executor itself is not known
# while the workflow is parsed, but whether its jobs share this machine's files is:
# profiles/kubernetes says --shared-fs-usage none, so a SQLite tracking store stops here.
try:
    from adaptune.experiment import validate_config
except ImportError:
    from types import SimpleNamespace

    validate(config, schema="../config/schema.yaml")
    # A strategy's sweep becomes one strategy per value in adaptune.sweeps: without it, the
    # sweep would be silently ignored.
    swept = [name for name, spec in config["strategies"].items() if "sweep" in spec]
    if swept:
        raise ValueError(
            f"strategies {', '.join(swept)}: sweep: needs the adaptune package where snakemake "
            "runs (pip install -e . in snakemake's environment)"
        )
    EXTERNAL = SimpleNamespace(
        source_fingerprint="", model_fingerprint="", downloads=False
    )
    records = None
else:
    from adaptune.devices import check_device
    from adaptune.fetch import offline_environment
    from adaptune import records

    EXTERNAL = validate_config(
        config,
        main_process=workflow.is_main_process,
        jobs_share_files=jobs_share_files(workflow.storage_settings.shared_fs_usage),
        devices=False,
    )

    # The executor is known only once execution starts (not while the Snakefile is parsed):
    # where jobs run on this machine, the device they ask for must be here; on a cluster, each
    # job checks its own node.
    onstart:
        if workflow.local_exec and not workflow.dryrun:
            check_device(config["train"]["device"])
            start_worker()


ENV = "../envs/adaptune.yaml"
WORKER = None  # adaptune's worker, once onstart has started it


def start_worker():
    """Jobs that run here, each in Snakemake's fresh Python, hand themselves to one warm
    process that has imported torch, transformers and MLflow (adaptune.worker; off with
    ADAPTUNE_WORKER=off). Not for jobs in conda or container environments, nor on a
    cluster's nodes (a job there is its own Snakemake process, without onstart)."""
    global WORKER
    deployed = workflow.deployment_settings.deployment_method
    if workflow.is_main_process and not deployed:
        from adaptune import worker

        WORKER = worker.start(LOGS / "worker.log")


def stop_worker():
    if WORKER is not None:
        WORKER.stop()


onerror:
    stop_worker()


EXPERIMENT = config["experiment"]
EXP = Path("results") / EXPERIMENT
DATA = EXP / "data"
IMPORTANCE = EXP / "importance"
PLANS = EXP / "plans"
RUNS = EXP / "runs"
REPORT = EXP / "report"
LOGS = EXP / "logs"
BENCH = EXP / "benchmarks"
RUN = RUNS / "{strategy}/k{shots}/seed{seed}"
BASELINE_RUN = EXP / "baselines/{baseline}/k{shots}"

SHOTS = [str(shots) for shots in config["data"]["shots"]]
STRATEGIES = list(config["strategies"])
BASELINES = config["baselines"]
# The shifted copies of the test split that evaluate scores every model on, named KIND-sSEVERITY
# (typos-s3; adaptune.modalities.shifts.shift_name, whose inverse the stages use).
SHIFTS = [
    f"{kind}-s{severity}"
    for kind, severities in config["evaluate"]["shifts"].items()
    for severity in severities
]
SEEDS = config["train"]["seeds"]


wildcard_constraints:
    split="train|val",
    shots=r"[0-9]+|all",
    seed=r"[0-9]+",
    # A strategy's sweep makes NAME@KEY=VALUE[,KEY=VALUE] (adaptune.sweeps).
    strategy=r"[A-Za-z0-9][A-Za-z0-9_-]*(@[A-Za-z0-9_.,=+-]+)?",
    shift=r"[a-z_]+-s[1-5]",
    batch=r"[0-9]+",


# Each stage's params hold exactly the config it depends on, so that a change reruns exactly the
# stages it touches. The shot counts and seeds are wildcards, never params: adding one only adds
# jobs.


# data: keys added after results existed, left out of params at the default that keeps the
# earlier behaviour: upgrading adaptune reruns nothing, and setting one reruns what it touches.
LATER_DATA_DEFAULTS = {"separator": "", "unreadable_images": "error"}


def data_settings(wildcards=None):
    """data: without the sample sizes (each shot count is its own sample_few_shot job)."""
    return {
        key: value
        for key, value in config["data"].items()
        if key not in ("shots", "val_shots")
        and not (key in LATER_DATA_DEFAULTS and value == LATER_DATA_DEFAULTS[key])
    }


def examples_per_class(wildcards):
    """Examples per class in the {split}_k{shots} sample: the shot count for the training split,
    data.val_shots for the validation split ("same": the shot count)."""
    if wildcards.split == "train" or config["data"]["val_shots"] == "same":
        return wildcards.shots
    return str(config["data"]["val_shots"])


def plan_settings(wildcards):
    """A strategy's plan settings: its entry without the training overrides and the head of its
    scores (which picks the plan's input)."""
    spec = config["strategies"][wildcards.strategy]
    return {key: value for key, value in spec.items() if key not in ("train", "head")}


# train: keys added after results existed, left out of params at the default that keeps the
# earlier behaviour: upgrading adaptune reruns nothing, and setting one reruns what it touches.
LATER_TRAIN_DEFAULTS = {"sharding": "ddp"}


def train_settings(wildcards):
    """train: with the strategy's overrides, without seeds (each seed is its own job) and
    checkpoint (how often a job saves its progress changes none of its results)."""
    overrides = config["strategies"][wildcards.strategy].get("train", {})
    shared = {
        key: value
        for key, value in config["train"].items()
        if key not in ("seeds", "checkpoint")
        and not (key in LATER_TRAIN_DEFAULTS and value == LATER_TRAIN_DEFAULTS[key])
    }
    return {**shared, **overrides}


def plan_memory_settings(wildcards):
    """What a plan's memory estimate depends on: the run's optimizer, batch and precision."""
    train = train_settings(wildcards)
    return {key: train[key] for key in PLAN_MEMORY_SETTINGS if key in train}


def inference_settings(wildcards):
    """What evaluate depends on: where and how the test split is run."""
    train = train_settings(wildcards)
    return {key: train[key] for key in ("device", "precision", "eval_batch_size")}


def pretrained_features(wildcards):
    """The pretrained body's test features that a run of strategy {strategy} reads for its
    drift: made with its eval_batch_size (batches of another size pad otherwise, which changes
    the last bits)."""
    batch = inference_settings(wildcards)["eval_batch_size"]
    return EXP / f"pretrained/batch{batch}/test_features.npy"


def features_inference_settings(wildcards):
    """inference_settings of the pretrained_features job of batch size {batch} (device and
    precision are the experiment's: a strategy does not override them)."""
    train = config["train"]
    return {
        "device": train["device"],
        "precision": train["precision"],
        "eval_batch_size": int(wildcards.batch),
    }


def mlflow_settings(wildcards=None):
    return {
        "tracking_uri": config["mlflow"]["tracking_uri"],
        "experiment_name": config["mlflow"]["experiment_name"] or EXPERIMENT,
    }


def all_run_metrics(wildcards=None):
    runs = expand(RUN / "metrics.json", strategy=STRATEGIES, shots=SHOTS, seed=SEEDS)
    baselines = expand(BASELINE_RUN / "metrics.json", baseline=BASELINES, shots=SHOTS)
    return runs + baselines


def all_run_ids(wildcards=None):
    return expand(RUN / "mlflow_run_id", strategy=STRATEGIES, shots=SHOTS, seed=SEEDS)


# Importance is scored through the new head as initialised (random) or after a linear probe
# (probe): one score_importance job per shot count and head. Each strategy plans from, and
# logs, the scores of its own head (its head: key, else importance.head), so only the heads
# that some strategy uses are scored. The probe's keys are params of the probe's jobs alone:
# changing them reruns the probe branch and leaves the random-head scores and plans alone.
SCORED = IMPORTANCE / "k{shots}/{head}"
PROBE_KEYS = ("probe_epochs", "probe_lr")


def strategy_head(strategy):
    """The head whose scores `strategy` uses."""
    return config["strategies"][strategy].get("head") or config["importance"]["head"]


def scoring_head(wildcards):
    """The head whose scores strategy {strategy} uses."""
    return strategy_head(wildcards.strategy)


def importance_settings(head):
    """importance: as the scores through `head` depend on it."""
    probe = PROBE_KEYS if head == "probe" else ()
    shared = {
        key: value
        for key, value in config["importance"].items()
        if key != "head" and (key not in PROBE_KEYS or key in probe)
    }
    return {**shared, "head": head}


def scoring_settings(wildcards):
    """score_importance's importance settings, for its {head}."""
    return importance_settings(wildcards.head)


def strategy_importance_settings(wildcards):
    """The importance settings of the scores strategy {strategy} uses."""
    return importance_settings(scoring_head(wildcards))


def strategy_scores(file):
    """An input function: `file` of the importance scores strategy {strategy} uses, {shots}."""

    def path(wildcards):
        return str(SCORED / file).format(
            shots=wildcards.shots, head=scoring_head(wildcards)
        )

    return path


def stage_outputs():
    """Every file the stages write for this config (the report's aside): inputs of the default
    target. Snakemake checks the files of the jobs it is asked for, but not those of the jobs
    before them (since 7.7, snakemake#1978): a model folder, metrics file, plan or split
    deleted after a complete run would stay deleted, the report being up to date. Listed
    here, a deleted one is rebuilt by the next plain run, with the jobs after it (and a dry
    run lists them)."""
    runs = {"strategy": STRATEGIES, "shots": SHOTS, "seed": SEEDS}
    heads = sorted({strategy_head(strategy) for strategy in STRATEGIES})
    produced = [
        FETCH_FIRST,
        rules.prepare_data.output,
        expand(rules.sample_few_shot.output, split=["train", "val"], shots=SHOTS),
        expand(rules.shift_test_split.output, shift=SHIFTS),
        expand(rules.score_importance.output, shots=SHOTS, head=heads),
        expand(rules.make_freeze_plan.output, shots=SHOTS, strategy=STRATEGIES),
        rules.create_mlflow_experiment.output,
        expand(rules.finetune.output, **runs),
        expand(rules.evaluate.output, **runs),
        {pretrained_features(Namespace(strategy=strategy)) for strategy in STRATEGIES},
        expand(rules.fit_baseline.output, baseline=BASELINES, shots=SHOTS),
    ]
    return [str(path) for paths in produced for path in paths]


# MLflow is a view of the files. Runs whose mlflow_experiment.json is gone stop the workflow
# here, naming the command that recreates it (Snakemake would retrain them all).
if records is not None and workflow.is_main_process:
    records.check_experiment_file(
        EXP,
        "adaptune sync-mlflow "
        + " ".join(
            os.path.relpath(path)  # (snakemake holds them as absolute Paths)
            for path in workflow.overwrite_configfiles or ["config/config.yaml"]
        ),
    )


def mlflow_up_to_date(wildcards):
    """No input: when the workflow starts (the DAG is built, no job runs yet) and the MLflow
    store lacks finished runs of the files (deleted, replaced, another one than they were
    logged to, or a job could not reach it), log them into it again from their files, once
    (adaptune.records); a dry run says that it would."""
    if records is not None and workflow.is_main_process and not MLFLOW_CHECKED:
        MLFLOW_CHECKED.append(True)
        records.bring_up_to_date(
            EXP,
            config["mlflow"]["tracking_uri"],
            mlflow_settings()["experiment_name"],
            EXP / "mlartifacts",
            execute=workflow.executor_plugin is not None
            and not workflow.dryrun
            and not workflow.touch,
            locked=any(Path(".snakemake/locks").glob("*")),
        )
    return []


MLFLOW_CHECKED = []
