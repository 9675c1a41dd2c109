"""Rule fetch: download a hub dataset or model once, where there is a network (adaptune.fetch)."""

# First: the job runs in adaptune's warm worker where the workflow has one (adaptune.worker).
from adaptune import worker

worker.delegate()

from typing import TYPE_CHECKING

from adaptune.fetch import run_fetch
from adaptune.logs import to_log_file
from adaptune.settings import DataSettings, ModelSettings

if TYPE_CHECKING:
    from snakemake.script import snakemake

with to_log_file(snakemake.log[0]):
    run_fetch(
        DataSettings.from_config(snakemake.params.data),
        ModelSettings.from_config(snakemake.params.model),
        snakemake.output.fetched,
    )
