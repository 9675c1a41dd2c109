"""Rule score_importance: importance per parameter tensor and per layer (adaptune.importance),
on a GPU of its own where there is one (adaptune.devices)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

import torch

from adaptune import devices
from adaptune.logs import to_log_file
from adaptune.scoring import run_score_importance
from adaptune.settings import ImportanceSettings, ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]), devices.claimed(1):
    torch.set_num_threads(snakemake.threads)
    run_score_importance(
        snakemake.input.train,
        snakemake.input.info,
        ModelSettings.from_config(snakemake.params.model),
        ImportanceSettings.from_config(snakemake.params.importance),
        snakemake.output.scores,
        snakemake.output.layers,
        snakemake.output.heatmap,
        snakemake.output.agreement,
        snakemake.output.head,
    )
