"""Rule finetune: train under the freeze plan, tracked in MLflow (adaptune.finetune); on
train.devices GPUs or CPU processes through torchrun (adaptune.distributed)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

import torch

from adaptune import devices, distributed
from adaptune.finetune import FinetuneJob, RunKey
from adaptune.logs import to_log_file

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wildcards = snakemake.wildcards
    job = FinetuneJob(
        RunKey(wildcards.strategy, wildcards.shots, int(wildcards.seed)),
        model=snakemake.params.model,
        # train.checkpoint is read from the config, not a param: how often a job saves its
        # progress changes none of its results, so changing it reruns nothing.
        train={**snakemake.params.train, "checkpoint": snakemake.config["train"]["checkpoint"]},
        inputs=dict(snakemake.input.items()),
        outputs=dict(snakemake.output.items()),
        artifacts={k: snakemake.input[k] for k in ("scores", "layers", "heatmap", "head")},
        resolved={"data": snakemake.params.data, "importance": snakemake.params.importance},
        model_content=snakemake.params.model_content,
    )
    with devices.claimed(job.devices):
        distributed.launch(job.devices, "adaptune.finetune:run_finetune_job", job.to_dict())
