"""Rule finetune: train under the freeze plan, tracked in MLflow (adaptune.training); on
train.devices GPUs or CPU processes through torchrun (adaptune.distributed)."""

from typing import TYPE_CHECKING

import torch

from adaptune import distributed, gpus
from adaptune.logs import to_log_file
from adaptune.training import RunKey, finetune_job

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    torch.set_num_threads(snakemake.threads)
    wildcards = snakemake.wildcards
    train = snakemake.params.train
    job = finetune_job(
        RunKey(wildcards.strategy, wildcards.shots, int(wildcards.seed)),
        model=snakemake.params.model,
        train=train,
        inputs=dict(snakemake.input.items()),
        outputs=dict(snakemake.output.items()),
        artifacts={k: snakemake.input[k] for k in ("scores", "layers", "heatmap", "head")},
        resolved={"data": snakemake.params.data, "importance": snakemake.params.importance},
    )
    devices = train.get("devices", 1)
    with gpus.claimed(devices):
        distributed.launch(devices, "adaptune.training:run_finetune_job", job)
