"""Rule create_mlflow_experiment: the MLflow store and experiment, made once before jobs fan out."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

import json
from pathlib import Path
from typing import TYPE_CHECKING

from adaptune.logs import to_log_file
from adaptune.tracking import ensure_experiment

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    # From the config, not params (rules/finetune.smk says why).
    mlflow = snakemake.config["mlflow"]
    experiment = ensure_experiment(
        mlflow["tracking_uri"],
        mlflow["experiment_name"] or snakemake.config["experiment"],
        snakemake.params.artifact_root,
        results=Path(snakemake.output.experiment).parent,
    )
    with open(snakemake.output.experiment, "w") as out:
        json.dump(experiment, out, indent=2)
