"""Rule evaluate: test metrics, confusion matrix and drift from the pretrained model, logged to
the run (adaptune.evaluation)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

import torch

from adaptune.evaluation import run_evaluate
from adaptune.logs import to_log_file
from adaptune.settings import ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    inference = snakemake.params.inference
    run_evaluate(
        snakemake.input.model,
        snakemake.input.test,
        snakemake.input.info,
        snakemake.input.summary,
        snakemake.input.run_id,
        snakemake.input.experiment,
        device=inference["device"],
        batch_size=inference["eval_batch_size"],
        precision=inference["precision"],
        outputs=dict(snakemake.output.items()),
        shifted=dict(zip(snakemake.params.shifts, snakemake.input.shifted, strict=True)),
        model=ModelSettings.from_config(snakemake.params.model),
        pretrained_features=snakemake.input.pretrained,
    )
