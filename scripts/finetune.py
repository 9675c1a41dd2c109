"""Rule finetune: train under the freeze plan, tracked in MLflow (adaptune.training)."""

from typing import TYPE_CHECKING

import torch

from adaptune.logs import to_log_file
from adaptune.settings import ModelSettings, TrainSettings
from adaptune.training import RunKey, run_finetune

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wildcards = snakemake.wildcards
    run_finetune(
        RunKey(wildcards.strategy, wildcards.shots, int(wildcards.seed)),
        ModelSettings.from_config(snakemake.params.model),
        TrainSettings.from_config(snakemake.params.train),
        plan_path=snakemake.input.plan,
        train_path=snakemake.input.train,
        val_path=snakemake.input.val,
        data_info_path=snakemake.input.info,
        experiment_path=snakemake.input.experiment,
        artifacts={k: snakemake.input[k] for k in ("scores", "layers", "heatmap")},
        outputs=dict(snakemake.output.items()),
        resolved={"data": snakemake.params.data, "importance": snakemake.params.importance},
    )
