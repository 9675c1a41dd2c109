"""Rule sample_few_shot: k examples per class of the training or validation split
(adaptune.data)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.data import run_sample_few_shot
from adaptune.logs import to_log_file
from adaptune.settings import parse_shots

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_sample_few_shot(
        snakemake.input.split,
        parse_shots(snakemake.params.per_class),
        snakemake.params.seed,
        snakemake.output.sample,
        at_most=snakemake.wildcards.split == "val",
    )
