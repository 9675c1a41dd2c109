import os
from pathlib import Path

from snakemake.utils import min_version, validate

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
else:
    from adaptune.experiment import check_device
    from adaptune.fetch import offline_environment

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


ENV = "../envs/adaptune.yaml"
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


# Each stage's params hold exactly the config it depends on, so that a change reruns exactly the
# stages it touches. The shot counts and seeds are wildcards, never params: adding one only adds
# jobs.


def data_settings(wildcards=None):
    """data: without the sample sizes (each shot count is its own sample_few_shot job)."""
    return {
        key: value
        for key, value in config["data"].items()
        if key not in ("shots", "val_shots")
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


def train_settings(wildcards):
    """train: with the strategy's overrides, without seeds (each seed is its own job)."""
    overrides = config["strategies"][wildcards.strategy].get("train", {})
    shared = {key: value for key, value in config["train"].items() if key != "seeds"}
    return {**shared, **overrides}


def inference_settings(wildcards):
    """What evaluate depends on: where and how the test split is run."""
    train = train_settings(wildcards)
    return {key: train[key] for key in ("device", "precision", "eval_batch_size")}


def mlflow_settings(wildcards=None):
    return {
        "tracking_uri": config["mlflow"]["tracking_uri"],
        "experiment_name": config["mlflow"]["experiment_name"] or EXPERIMENT,
    }


def all_run_metrics(wildcards=None):
    runs = expand(RUN / "metrics.json", strategy=STRATEGIES, shots=SHOTS, seed=SEEDS)
    baselines = expand(BASELINE_RUN / "metrics.json", baseline=BASELINES, shots=SHOTS)
    return runs + baselines


# Importance is scored through the new head as initialised (random) or after a linear probe
# (probe): one score_importance job per shot count and head. Each strategy plans from, and
# logs, the scores of its own head (its head: key, else importance.head), so only the heads
# that some strategy uses are scored. The probe's keys are params of the probe's jobs alone:
# changing them reruns the probe branch and leaves the random-head scores and plans alone.
SCORED = IMPORTANCE / "k{shots}/{head}"
PROBE_KEYS = ("probe_epochs", "probe_lr")


def scoring_head(wildcards):
    """The head whose scores strategy {strategy} uses."""
    own = config["strategies"][wildcards.strategy].get("head")
    return own or config["importance"]["head"]


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
