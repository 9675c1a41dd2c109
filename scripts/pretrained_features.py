"""Rule pretrained_features: the pretrained body's features on the test split, once per
experiment, for every run's drift (adaptune.evaluation)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

import torch

from adaptune.evaluation import run_pretrained_features
from adaptune.logs import to_log_file
from adaptune.settings import ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    inference = snakemake.params.inference
    run_pretrained_features(
        snakemake.input.test,
        snakemake.input.info,
        ModelSettings.from_config(snakemake.params.model),
        device=inference["device"],
        batch_size=inference["eval_batch_size"],
        precision=inference["precision"],
        output=snakemake.output.features,
    )
