"""Rule fit_baseline: a classical baseline on the same few-shot split (adaptune.baselines)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.baselines import run_baseline
from adaptune.logs import to_log_file

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_baseline(
        snakemake.wildcards.baseline,
        snakemake.wildcards.shots,
        snakemake.input.train,
        snakemake.input.test,
        snakemake.input.info,
        snakemake.input.experiment,
        outputs=dict(snakemake.output.items()),
        shifted=dict(zip(snakemake.params.shifts, snakemake.input.shifted, strict=True)),
    )
