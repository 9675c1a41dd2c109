"""Rule shift_test_split: the test split under one seeded shift (adaptune.evaluation)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.evaluation import run_shift_split
from adaptune.logs import to_log_file
from adaptune.settings import DataSettings, ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_shift_split(
        snakemake.input.test,
        snakemake.input.info,
        snakemake.wildcards.shift,
        snakemake.params.seed,
        DataSettings.from_config(snakemake.params.data),
        ModelSettings.from_config(snakemake.params.model),
        snakemake.output.shifted,
    )
